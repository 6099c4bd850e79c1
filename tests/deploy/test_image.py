"""What the Dockerfile installs, and in which order (no Docker engine here: the file, the pins
and the Python environment are checked instead of a built image)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.helpers.server import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
CONSTRAINTS = REPO / "constraints.txt"
EXPERIMENTS_ONLY = ("matplotlib", "mlxtend", "pandas")  # pandas comes with mlxtend only


def _deps_module():
    spec = importlib.util.spec_from_file_location("skqk_deploy_deps", REPO / "deploy" / "deps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _instructions() -> list[str]:
    """Dockerfile instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.splitlines()
                                            if not line.lstrip().startswith("#")))
    return [line.strip() for line in text.splitlines() if line.strip()]


def _pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_dependencies_are_installed_before_the_source_is_copied() -> None:
    steps = _instructions()
    final = max(i for i, s in enumerate(steps) if s.startswith("FROM"))  # the image stage
    image = steps[final:]
    deps = next(i for i, s in enumerate(image) if s.startswith("RUN") and "-r /tmp/requirements.txt" in s)
    torch = next(i for i, s in enumerate(image)
                 if s.startswith("RUN") and "torch" in s and "pip install" in s)
    copy_app = next(i for i, s in enumerate(image) if re.match(r"COPY\s+app\b", s))
    copy_workers = next(i for i, s in enumerate(image) if re.match(r"COPY\s+workers\b", s))
    assert torch < deps < min(copy_app, copy_workers)
    # the dependency layer is keyed on the requirement list and the pins, never on the source
    assert "from=requirements" in image[deps] and "source=constraints.txt" in image[deps]
    for step in image:
        if step.startswith("RUN") and "pip install" in step:
            assert "--mount=type=cache,target=/root/.cache/pip" in step, step
    after_source = " ".join(image[copy_app:])
    assert "pip install --no-deps ." in after_source  # only the project itself once the source is in
    assert "PIP_NO_CACHE_DIR" not in DOCKERFILE  # it would disable the cache mount
    assert not any(s.startswith("VOLUME") for s in steps)  # anonymous volumes lose the SQLite store
    assert DOCKERFILE.startswith("# syntax=docker/dockerfile:1")  # cache/bind mounts, COPY --chmod


def test_one_torch_pin_for_ci_image_and_project() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (torch_req,) = [r for r in project["dependencies"] if r.startswith("torch")]
    assert torch_req == f"torch=={_pins()['torch']}"  # constraints.txt agrees with pyproject
    assert not re.search(r"\d+\.\d+\.\d+", " ".join(s for s in _instructions() if "torch" in s))


def test_constraints_pin_the_whole_image_and_leave_experiments_out() -> None:
    from packaging.utils import canonicalize_name

    deps = _deps_module()
    extras = re.search(r"ARG SKQK_EXTRAS=(\S*)", DOCKERFILE).group(1).split(",")
    image_requirements = deps.requirements(extras)
    closure = {canonicalize_name(n): v for n, v in deps.closure(image_requirements).items()}
    pins = _pins()
    unpinned = {n: v for n, v in closure.items() if pins.get(n) != v}
    assert not unpinned, f"not pinned in constraints.txt (python3 deploy/deps.py constraints): {unpinned}"
    for name in EXPERIMENTS_ONLY:
        assert name not in closure, f"{name} would land in the serving image"


def test_serving_and_workers_import_without_the_experiments_extra() -> None:
    """Every module outside app.experiments imports with matplotlib/mlxtend/pandas made unimportable,
    and `skqk experiment` then names the extra to install instead of failing later."""
    block = "; ".join(f"sys.modules[{m!r}] = None" for m in EXPERIMENTS_ONLY)
    code = f"""
import importlib, pkgutil, sys
{block}
import app, workers
for pkg in (app, workers):
    for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if not mod.name.startswith(("app.experiments.", "app.storage.migrations.")):
            importlib.import_module(mod.name)
from app.cli import main
sys.argv = ["skqk", "experiment", "stability", "--seeds", "1"]
main()
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=240, check=False)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "pip install 'skqk-serve[experiments]'" in out.stderr
    assert "matplotlib" in out.stderr


def test_healthcheck_script_is_what_the_image_and_compose_run() -> None:
    assert "COPY --chmod=755 deploy/healthcheck.py /usr/local/bin/skqk-healthcheck" in DOCKERFILE
    (healthcheck,) = [s for s in _instructions() if s.startswith("HEALTHCHECK")]
    assert healthcheck.endswith('CMD ["skqk-healthcheck"]')  # role from PID 1: serve, worker, other
    assert Path(REPO / "deploy" / "healthcheck.py").read_text().startswith("#!/usr/bin/env python3")
