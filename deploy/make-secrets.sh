#!/bin/sh
# Writes the secrets docker-compose.yml mounts, once: an existing file is never overwritten
# (Postgres keeps the password it was initialised with; a new one would lock the stack out).
#   sh deploy/make-secrets.sh            → deploy/secrets/
#   sh deploy/make-secrets.sh DIR        → DIR (then set SKQK_SECRETS_DIR=DIR for compose)
# Files: api_key (the admin X-API-Key), postgres_password, database_url (built from that
# password), flower_auth (user:password for the optional Flower dashboard).
# Modes: the directory 0700 keeps other users of this host out; the files are 0644 because
# compose bind-mounts them with the host's owner and mode, and the containers read them as
# their own users (skqk 10001, postgres 70, flower 1000).
set -eu
dir="${1:-$(dirname "$0")/secrets}"
mkdir -p "$dir"
chmod 700 "$dir"

random_hex() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }

write() {  # write NAME VALUE, unless NAME exists
  path="$dir/$1"
  if [ -d "$path" ]; then
    echo "$path is a directory (a compose run before the secrets existed made it):" \
         "remove it (sudo rmdir '$path') and run this again" >&2
    exit 1
  fi
  if [ -s "$path" ]; then
    echo "kept    $path"
  else
    (umask 022 && printf '%s\n' "$2" > "$path")
    echo "written $path"
  fi
}

write api_key "$(random_hex)"
write postgres_password "$(random_hex)"
write database_url "postgresql+psycopg://skqk:$(cat "$dir/postgres_password")@postgres:5432/skqk"
write flower_auth "admin:$(random_hex)"
chmod 644 "$dir/api_key" "$dir/postgres_password" "$dir/database_url" "$dir/flower_auth"
echo "admin key: $dir/api_key (send it as X-API-Key)"
