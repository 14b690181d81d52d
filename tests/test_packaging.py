"""pyproject.toml and environment.yml name the same pins; torchvision stays out."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]


def _pins(lines):
    return dict(re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", line).groups() for line in lines if "==" in line)


def test_environment_yml_and_pyproject_agree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_pins = _pins(project["dependencies"] + project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert _pins(pip_section) == pip_pins
    assert "torchvision" not in pip_pins


def test_installed_versions_match_the_pins():
    from importlib.metadata import PackageNotFoundError, version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for name, pinned in _pins(project["dependencies"]).items():
        assert version(name).split("+")[0] == pinned, name
    try:
        version("torchvision")
    except PackageNotFoundError:
        pass
    else:
        raise AssertionError("torchvision is installed; it breaks transformers next to the CPU torch wheel")


def test_license_is_mit_in_the_file_the_metadata_and_the_readme():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert "MIT (`LICENSE`)" in (ROOT / "README.md").read_text()
