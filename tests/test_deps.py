"""Packaging: pyproject.toml declares ranges, requirements/constraints.txt pins what CI installs (inside
those ranges), model packages stay hash-pinned, and the downgrade check of `make compat`."""

import importlib.util
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def load_deps():
    spec = importlib.util.spec_from_file_location("deps_script", ROOT / "scripts" / "deps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in ("dev", "eval", "data", "tensorboard", "deepspeed", "serve"):
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"not an exact pin: {line}"
            pins[canonicalize_name(name)] = version
    return pins


def test_pyproject_declares_ranges_not_pins():
    for req in project_requirements():
        exact = [s for s in req.specifier if s.operator in ("==", "===")]
        assert not exact, f"{req}: an exact pin belongs in requirements/constraints.txt"
        if canonicalize_name(req.name) in ("transformers", "accelerate", "peft", "torch"):
            assert any(s.operator == "<" for s in req.specifier), f"{req}: no upper bound"


def test_the_lock_pins_every_requirement_inside_its_range():
    pins = constraints()
    for req in project_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req}: locked at {pins[name]}"
    assert pins["torch"] == "2.13.0"  # what the Makefile installs first


def test_model_packages_stay_pinned_with_hashes():
    lines = [
        line
        for line in (ROOT / "requirements" / "presets.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines
    for line in lines:
        assert "==" in line and "--hash=sha256:" in line, line
    preset_names = {canonicalize_name(line.split("==")[0]) for line in lines}
    assert not preset_names & set(constraints())  # not in the lock: their pins and hashes live in presets.txt


def test_downgrades_are_found():
    deps = load_deps()
    alone = {"transformers": "5.24.0", "trl": "1.16.0", "numpy": "2.4.6"}
    assert deps.downgrades(alone, {**alone, "transformers": "5.24.1", "peft": "0.21.2"}) == []
    assert deps.downgrades(alone, {**alone, "numpy": "2.10.0"}) == []  # versions, not strings
    assert deps.downgrades(alone, {**alone, "transformers": "5.23.0"}) == [
        ("transformers", "5.24.0", "5.23.0")
    ]
