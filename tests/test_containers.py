"""The container files install exactly pyproject.toml's pins (checked statically: there is no
Docker engine or Apptainer on these machines; the images are built elsewhere)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONTAINER_FILES = ["containers/Dockerfile", "containers/dino.def"]
PIN = re.compile(r"""["']?(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(?P<version>[^\s"'\\]+)["']?""")


def _normalise(name: str) -> str:
    """PEP 503 project names: case, '-', '_' and '.' do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _parse_pins(lines: list[str]) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in lines:
        for match in PIN.finditer(line):
            name = _normalise(match["name"])
            assert name not in pins, f"{name} pinned twice"
            pins[name] = match["version"]
    return pins


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    for requirement in requirements:
        assert "==" in requirement, f"pyproject.toml: {requirement!r} is not an exact pin"
    return _parse_pins(requirements)


def container_pins(path: Path) -> dict[str, str]:
    """Pins in the file's commands, comments left out."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    return _parse_pins(lines)


def test_pin_parser_reads_what_pip_reads() -> None:
    pins = _parse_pins(['RUN pip install "torch==2.14.1" \\', "    Scikit_Learn==1.9.1 'x.y[extra]==0.1'"])
    assert pins == {"torch": "2.14.1", "scikit-learn": "1.9.1", "x-y": "0.1"}


def test_pyproject_pins_everything() -> None:
    pins = pyproject_pins()
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    assert "pytest" in pins  # the dev extra too: the images can run the tests


@pytest.mark.parametrize("name", CONTAINER_FILES)
def test_container_pins_equal_pyproject(name: str) -> None:
    expected, found = pyproject_pins(), container_pins(REPO / name)
    missing = {k: v for k, v in expected.items() if k not in found}
    extra = {k: v for k, v in found.items() if k not in expected}
    differ = {k: (found[k], v) for k, v in expected.items() if k in found and found[k] != v}
    assert not missing and not extra and not differ, f"{name}: missing {missing}, extra {extra}, differ {differ}"


@pytest.mark.parametrize("name", CONTAINER_FILES)
def test_container_python_matches_requires_python(name: str) -> None:
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    text = (REPO / name).read_text()
    base = re.search(r"^(?:FROM|From:)\s*(?:docker://)?python:(\d+\.\d+)", text, re.MULTILINE)
    assert base, f"{name}: no python base image"
    assert f">={base[1]}" in requires, (base[1], requires)


@pytest.mark.parametrize("name", CONTAINER_FILES)
def test_container_installs_the_project_without_resolving_again(name: str) -> None:
    """The project goes in with --no-deps, so nothing but the pins above is installed."""
    commands = [line for line in (REPO / name).read_text().splitlines() if not line.lstrip().startswith("#")]
    project_installs = [line for line in commands if "pip install" in line and "--no-deps" in line]
    assert project_installs, f"{name}: the project is not installed with --no-deps"
    assert any("dataset-fashion-mnist" in line for line in commands), f"{name}: no Fashion-MNIST for the demo"


def test_snakefile_names_the_apptainer_image() -> None:
    snakefile = (REPO / "Snakefile").read_text()
    assert 'container: "containers/dino.sif"' in snakefile
    assert "apptainer build containers/dino.sif containers/dino.def" in (REPO / "containers/dino.def").read_text()
