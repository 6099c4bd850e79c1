"""docker-compose.yml (+ docker-compose.gpu.yml) is valid and wires the services as documented.

Only the compose client runs here (no Docker engine): `docker-compose config` renders the files
the way `up` would read them, and the assertions run on that rendering.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.compose import COMPOSE_FILE, compose, compose_command

REPO = COMPOSE_FILE.parent
GPU_FILE = REPO / "docker-compose.gpu.yml"
APP_SERVICES = ("init", "api", "worker")


def render(*files: Path, profiles: tuple[str, ...] = (), env: dict[str, str] | None = None,
           secrets_dir: Path | None = None) -> dict:
    """`docker-compose config` with a bare environment: no SKQK_API_KEY, no secret files."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose (Debian package) is not installed; .ci/run installs it")
    base = {"PATH": "/usr/bin:/bin"}
    if secrets_dir is not None:
        base["SKQK_SECRETS_DIR"] = str(secrets_dir)
    args = [exe, "--project-directory", str(REPO)]
    for f in files or (COMPOSE_FILE,):
        args += ["-f", str(f)]
    for p in profiles:
        args += ["--profile", p]
    out = subprocess.run([*args, "config"], capture_output=True, text=True, env={**base, **(env or {})},
                         check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def published(port: str | dict) -> tuple[str, str, str]:
    """(host address, host port, container port) of a `ports` entry, short or long syntax."""
    if isinstance(port, dict):
        return port.get("host_ip", ""), str(port["published"]), str(port["target"])
    address, host, target = port.split("/")[0].rsplit(":", 2)
    return address, host, target


@pytest.fixture(scope="module")
def default_stack(tmp_path_factory: pytest.TempPathFactory) -> dict:
    # an empty secrets dir: parsing must not need the secret files (nor SKQK_API_KEY)
    return render(secrets_dir=tmp_path_factory.mktemp("no-secrets"))["services"]


def test_every_variant_renders_without_key_or_secret_files(tmp_path: Path) -> None:
    for files, profiles in (((COMPOSE_FILE,), ()), ((COMPOSE_FILE,), ("monitoring",)),
                            ((COMPOSE_FILE, GPU_FILE), ()), ((COMPOSE_FILE, GPU_FILE), ("monitoring",))):
        render(*files, profiles=profiles, secrets_dir=tmp_path)
    text = COMPOSE_FILE.read_text() + GPU_FILE.read_text()
    assert ":?" not in text  # no parse-time hard errors: `down`, `ps`, `config` always work


def test_default_stack_is_cpu_only(default_stack: dict) -> None:
    assert {"init", "api", "worker", "proxy", "redis", "postgres"} <= set(default_stack)
    for name, svc in default_stack.items():
        assert "resources" not in svc.get("deploy", {}), f"{name} reserves devices"
    images = {default_stack[n]["image"] for n in APP_SERVICES}
    assert images == {"skqk-serve:latest"}  # one CPU image, built once
    for name in APP_SERVICES:
        assert default_stack[name]["build"]["args"]["TORCH_VARIANT"] == "cpu"


def test_gpu_worker_only_in_the_opt_in_file(tmp_path: Path) -> None:
    overlay = yaml.safe_load(GPU_FILE.read_text())
    assert set(overlay["services"]) == {"worker"}
    merged = render(COMPOSE_FILE, GPU_FILE, secrets_dir=tmp_path)["services"]
    worker = merged["worker"]
    assert worker["command"] == compose_command("worker")  # same command, GPU image + reservation
    assert worker["image"] == "skqk-serve:latest-cuda"
    assert worker["build"]["args"]["TORCH_VARIANT"] == "cu128"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    for name in ("init", "api"):  # everything else stays on the CPU image
        assert merged[name]["image"] == "skqk-serve:latest"
        assert merged[name]["build"]["args"]["TORCH_VARIANT"] == "cpu"


def test_proxy_is_the_one_entry_point_on_localhost(default_stack: dict, tmp_path: Path) -> None:
    ports = {name: svc["ports"] for name, svc in default_stack.items()
             if svc.get("ports") and not svc.get("profiles")}
    assert set(ports) == {"proxy"}, ports  # api replicas are reached through the proxy only
    (port,) = ports["proxy"]
    assert published(port) == ("127.0.0.1", "8000", "80")
    assert default_stack["proxy"]["depends_on"]["api"]["condition"] == "service_healthy"
    mounts = [(v["source"], v["target"]) if isinstance(v, dict) else tuple(v.split(":")[:2])
              for v in default_stack["proxy"]["volumes"]]
    (source,) = [src for src, target in mounts if target == "/etc/nginx/conf.d/default.conf"]
    assert Path(source) == REPO / "deploy" / "nginx.conf"
    nginx = Path(source).read_text()
    api_port = compose_command("api")[compose_command("api").index("--port") + 1]
    assert f"server api:{api_port} resolve" in nginx  # follows --scale api=N
    # the bind address and port are settings, not edits
    opened = render(env={"SKQK_PUBLISH_ADDRESS": "0.0.0.0", "SKQK_PUBLISH_PORT": "9000"},
                    secrets_dir=tmp_path)["services"]["proxy"]["ports"][0]
    assert published(opened) == ("0.0.0.0", "9000", "80")


def test_each_service_has_its_own_health_check(default_stack: dict) -> None:
    assert default_stack["api"]["healthcheck"]["test"] == ["CMD", "skqk-healthcheck", "serve"]
    assert default_stack["worker"]["healthcheck"]["test"] == ["CMD", "skqk-healthcheck", "worker"]
    assert default_stack["init"]["healthcheck"]["test"] == ["NONE"]  # one-shot: disabled
    assert default_stack["init"]["restart"] == "no"  # a failed init stops `up` instead of looping
    for name in ("proxy", "redis", "postgres"):
        assert default_stack[name]["healthcheck"]["test"]


def test_secrets_are_files_and_no_password_is_written_down(default_stack: dict) -> None:
    for name in APP_SERVICES:
        env = default_stack[name]["environment"]
        mounted = {s["source"] for s in default_stack[name]["secrets"]}
        assert env["SKQK_API_KEY_FILE"] == "/run/secrets/skqk_api_key" and "skqk_api_key" in mounted
        assert env["SKQK_DATABASE_URL_FILE"] == "/run/secrets/skqk_database_url"
        assert "skqk_database_url" in mounted
        assert "SKQK_API_KEY" not in env and "SKQK_DATABASE_URL" not in env
    pg = default_stack["postgres"]
    assert pg["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert "POSTGRES_PASSWORD" not in pg["environment"]
    raw = compose()
    assert set(raw["secrets"]) == {"skqk_api_key", "skqk_database_url", "postgres_password", "flower_auth"}
    assert "skqk:skqk@" not in COMPOSE_FILE.read_text()


def test_flower_is_opt_in_local_and_behind_basic_auth(tmp_path: Path) -> None:
    raw = compose()["services"]["flower"]
    assert raw["profiles"] == ["monitoring"]
    assert "FLOWER_BASIC_AUTH" in " ".join(raw["command"]) and raw["secrets"] == ["flower_auth"]
    port = render(profiles=("monitoring",), secrets_dir=tmp_path)["services"]["flower"]["ports"][0]
    assert published(port)[0] == "127.0.0.1"


def test_services_and_policies(default_stack: dict) -> None:
    services = compose()["services"]
    assert services["api"]["command"][:2] == ["skqk", "serve"]
    assert services["api"]["deploy"]["replicas"] >= 2
    assert services["worker"]["command"][:2] == ["skqk", "worker"]
    assert "gpu" in compose_command("worker")  # the retrain queue's name, whatever the device
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--appendfsync everysec" in redis_cmd
    assert "--maxmemory-policy noeviction" in redis_cmd
    assert services["postgres"]["volumes"][0].startswith("pg-data:")
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["api"]["depends_on"]["init"]["condition"] == "service_completed_successfully"


def test_compose_command_overrides():
    cmd = compose_command("api", port="9001", host="127.0.0.1")
    assert cmd[cmd.index("--port") + 1] == "9001" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert compose_command("api", log_level="debug")[-2:] == ["--log-level", "debug"]


def test_env_example_documents_every_variable_the_files_read() -> None:
    used = set(re.findall(r"\$\{(\w+)", COMPOSE_FILE.read_text() + GPU_FILE.read_text()))
    example = (REPO / ".env.example").read_text()
    documented = set(re.findall(r"^#? ?(\w+)=", example, flags=re.MULTILINE))
    assert used <= documented, used - documented
    assert "KEY" not in " ".join(documented - {"SKQK_SECRETS_DIR"})  # no secrets in .env
