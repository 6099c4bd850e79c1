#!/usr/bin/env python3
"""Container health check for every role of the skqk-serve image (installed as `skqk-healthcheck`).

    skqk-healthcheck [serve|worker|auto] [--port N] [--node NAME] [--timeout S]

- serve:  GET /v2/health/ready on 127.0.0.1 (200 once a version is loaded and warmed up).
- worker: a Celery ping to this container's worker node (`celery@<hostname>`) through the broker,
          so it proves the worker process is alive and consuming, not just that Redis answers.
- other:  healthy (`skqk init` and other one-shot commands have nothing to probe).
- auto (default): the role of the `skqk` command that runs as PID 1, so the image's HEALTHCHECK
  fits `docker run IMAGE skqk worker` as well as the default `skqk serve`.
Exit status 0: healthy; 1: unhealthy (the reason on stderr).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import urllib.request
from pathlib import Path


def pid1_command() -> list[str]:
    try:
        return Path("/proc/1/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def role_of(argv: list[str]) -> str:
    """``serve`` / ``worker`` / ``other`` for an argv such as [python, /usr/local/bin/skqk, serve, …]."""
    for i, arg in enumerate(argv):
        if os.path.basename(arg) == "skqk" and i + 1 < len(argv):
            return argv[i + 1] if argv[i + 1] in ("serve", "worker") else "other"
    return "other"


def port_of(argv: list[str]) -> int:
    if "--port" in argv[:-1]:
        return int(argv[argv.index("--port") + 1])
    return int(os.environ.get("SKQK_PORT", "8000"))


def check_serve(port: int, timeout: float) -> str | None:
    url = f"http://127.0.0.1:{port}/v2/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return None if response.status == 200 else f"{url}: HTTP {response.status}"
    except OSError as exc:  # URLError and HTTPError (503 while loading) are OSErrors
        return f"{url}: {exc}"


def check_worker(node: str, timeout: float) -> str | None:
    from workers.celery_app import celery_app

    try:
        replies = celery_app.control.ping(destination=[node], timeout=timeout)
    except Exception as exc:  # broker unreachable: the worker cannot get work either
        return f"ping {node}: {type(exc).__name__}: {exc}"
    if not any(node in reply for reply in replies):
        return f"ping {node}: no answer within {timeout}s"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="health check of a skqk-serve container")
    parser.add_argument("role", nargs="?", default="auto", choices=["auto", "serve", "worker", "other"])
    parser.add_argument("--port", type=int, default=None, help="serve: default PID 1's --port, "
                                                               "else SKQK_PORT, else 8000")
    parser.add_argument("--node", default=f"celery@{socket.gethostname()}", help="worker: Celery node")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    pid1 = pid1_command()
    role = role_of(pid1) if args.role == "auto" else args.role
    if role == "serve":
        problem = check_serve(args.port or port_of(pid1), args.timeout)
    elif role == "worker":
        problem = check_worker(args.node, args.timeout)
    else:
        problem = None
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
