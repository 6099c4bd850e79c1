"""docker-compose.yml is valid and wires the services the way the design says."""

import shutil
import subprocess

import pytest

from tests.compose import COMPOSE_FILE, compose, compose_command


def test_compose_file_is_valid_for_docker_compose():
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose (Debian package) is not installed; .ci/run installs it")
    env = {"SKQK_API_KEY": "ci-key", "PATH": "/usr/bin:/bin"}
    for profile in ([], ["--profile", "cpu"], ["--profile", "monitoring"]):
        out = subprocess.run([exe, "-f", str(COMPOSE_FILE), *profile, "config", "-q"],
                             capture_output=True, text=True, env=env, check=False)
        assert out.returncode == 0, out.stderr


def test_services_and_policies():
    services = compose()["services"]
    assert {"api", "worker", "redis", "postgres"} <= set(services)
    assert services["api"]["command"][:2] == ["skqk", "serve"]
    assert services["api"]["deploy"]["replicas"] >= 2
    assert services["worker"]["command"][:2] == ["skqk", "worker"]
    assert "gpu" in compose_command("worker")
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert services["worker-cpu"]["profiles"] == ["cpu"]
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
