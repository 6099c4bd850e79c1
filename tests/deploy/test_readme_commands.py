"""README's fresh-machine commands are what CI runs, and they resolve to versions that pass
(issue 20, item 8). Before: CI installed with ``-c constraints.txt`` while README's unconstrained
``pip install -e '.[dev]'`` took pytest 9.2, with which the schemathesis 4.32 plugin fails."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]


def _readme_commands() -> tuple[str, str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Fresh machine"):text.index("## Using the service")]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    install = next(b for b in blocks if "pip install" in b).strip()
    test = next(b for b in blocks if "pytest" in b).strip()
    return install.split(" && ")[0], test  # `pip install -e '.[dev]' && skqk serve`: the install part


def test_ci_runs_exactly_readmes_two_commands() -> None:
    install, test = _readme_commands()
    assert install == "pip install -e '.[dev]'" and test == "python3 -m pytest -q"
    lines = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert install in lines, "CI must install exactly as README says"
    assert test in lines, "CI must test exactly as README says"
    assert not any("pip install" in ln and ln != install for ln in lines), "no second, constrained install"


def _dev() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {Requirement(r).name: Requirement(r) for r in project["optional-dependencies"]["dev"]}


def test_dev_extra_keeps_pytest_to_versions_the_schemathesis_plugin_works_with() -> None:
    pytest_req = _dev()["pytest"]
    assert Version("9.2.0") not in pytest_req.specifier  # breaks schemathesis 4.32.5 (`_nodeid`)
    assert Version("9.1.1") in pytest_req.specifier and Version("9.0.3") in pytest_req.specifier


def test_the_image_pins_satisfy_the_dev_extra() -> None:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[Requirement(name.strip()).name.lower()] = Version(version.split(";")[0].strip())
    for name, req in _dev().items():
        pinned = pins.get(name.lower())
        if pinned is not None:
            assert pinned in req.specifier, f"constraints.txt pins {name}=={pinned}, outside {req}"
