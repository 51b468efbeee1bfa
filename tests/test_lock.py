"""requirements.lock is in step with pyproject.toml: generated from the current dependency lists
(the fingerprint scripts/lock.sh writes), and every requirement, extras included, has exactly one
pin for this interpreter that its specifier allows. The image and scripts/setup.sh install with
the lock as constraints; rerun ``bash scripts/lock.sh`` after editing the dependencies."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest
from conftest import require

packaging = require("packaging", "packaging is not installed")
from packaging.markers import default_environment  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402
from packaging.version import Version  # noqa: E402

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = require("tomli", "tomli is not installed (Python 3.10)")

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
RELOCK = "requirements.lock is out of step with pyproject.toml: run `bash scripts/lock.sh`"


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def fingerprint(p: dict) -> str:
    """What scripts/lock.sh hashes: the dependency lists and requires-python."""
    deps = {"dependencies": sorted(p["dependencies"]),
            "optional-dependencies": {k: sorted(v) for k, v in sorted(p.get("optional-dependencies", {}).items())},
            "requires-python": p.get("requires-python")}
    return hashlib.sha256(json.dumps(deps, sort_keys=True).encode()).hexdigest()


def lock_pins(text: str, env: dict[str, str] | None = None) -> dict[str, list[Version]]:
    """name -> pinned versions whose marker holds in ``env`` (default: this interpreter)."""
    pins: dict[str, list[Version]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"not an exact pin: {line!r}"
        if req.marker is None or req.marker.evaluate(env):
            pins.setdefault(canonicalize_name(req.name), []).append(Version(spec[0].version))
    return pins


def all_requirements(p: dict) -> list[Requirement]:
    reqs = [Requirement(r) for r in p["dependencies"]]
    reqs += [Requirement(r) for group in p.get("optional-dependencies", {}).values() for r in group]
    return reqs


def check_lock(p: dict, text: str, env: dict[str, str] | None = None) -> list[str]:
    """Problems of ``text`` as the lock of project ``p`` (empty: in step)."""
    problems = []
    m = re.search(r"^# pyproject-sha256: ([0-9a-f]{64})$", text, re.M)
    if not m:
        problems.append("no pyproject-sha256 line")
    elif m.group(1) != fingerprint(p):
        problems.append("pyproject.toml's dependencies changed since the lock was made")
    pins = lock_pins(text, env)
    for req in all_requirements(p):
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        got = pins.get(canonicalize_name(req.name), [])
        if len(got) != 1:
            problems.append(f"{req.name}: {len(got)} pins for this interpreter")
        elif not req.specifier.contains(got[0], prereleases=True):
            problems.append(f"{req.name}=={got[0]} is outside {req.specifier}")
    return problems


def test_lock_in_step_with_pyproject():
    problems = check_lock(project(), LOCK.read_text())
    assert not problems, RELOCK + "\n" + "\n".join(problems)


@pytest.mark.parametrize("python", ["3.10", "3.11", "3.12", "3.13"])
def test_lock_pins_every_requirement_on_supported_pythons(python):
    """A universal lock: the GPU base (Ubuntu 24.04, 3.12), the CPU base (bookworm, 3.11) and 3.10."""
    env = {**default_environment(), "python_version": python, "python_full_version": python + ".0",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
    problems = [p for p in check_lock(project(), LOCK.read_text(), env) if "sha256" not in p]
    assert not problems, RELOCK + "\n" + "\n".join(problems)


def test_check_lock_catches_drift():
    """The checks above can fail: a new dependency, a tightened bound, a stale fingerprint."""
    p, text = project(), LOCK.read_text()
    assert check_lock(p, text) == []
    added = {**p, "dependencies": [*p["dependencies"], "left-pad-nonexistent>=1"]}
    assert any("left-pad-nonexistent: 0 pins" in x for x in check_lock(added, text))
    assert any("changed since" in x for x in check_lock(added, text))
    torch_pin = lock_pins(text)["torch"][0]
    raised = {**p, "dependencies": [d if not d.startswith("torch") else f"torch>{torch_pin}" for d in p["dependencies"]]}
    assert any(x.startswith("torch==") and "outside" in x for x in check_lock(raised, text))
    assert any("no pyproject-sha256" in x for x in check_lock(p, text.replace("# pyproject-sha256: ", "# x: ")))


def test_image_and_setup_install_with_the_lock():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY requirements.lock" in dockerfile
    assert len(re.findall(r"pip install[^\n]*-c requirements\.lock", dockerfile)) >= 2, "torch and the dependencies"
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert setup.count("-c requirements.lock") >= 2
    assert "requirements.lock" in (ROOT / ".dockerignore").read_text()
