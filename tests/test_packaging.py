"""The versions pyproject.toml admits are the versions tested: `.ci/oldest.txt`, which CI installs for a
second run of the default suite, pins every requirement at its lower bound."""

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def lower_bounds() -> dict[str, Version]:
    declared = project()
    texts = declared["dependencies"] + [t for extra in declared["optional-dependencies"].values() for t in extra]
    bounds = {}
    for text in texts:
        requirement = Requirement(text)
        at_least = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        assert len(at_least) == 1, f"{text}: every requirement needs one lower bound, which CI then tests"
        bounds[canonicalize_name(requirement.name)] = at_least[0]
    return bounds


def oldest_pins() -> dict[str, Version]:
    pins = {}
    for line in (REPO / ".ci" / "oldest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_ci_tests_every_requirement_at_its_lower_bound():
    assert oldest_pins() == lower_bounds()


def test_ci_runs_the_oldest_suite_on_the_oldest_python_admitted():
    oldest = project()["requires-python"].removeprefix(">=")
    assert f"PYENV_VERSION={oldest} python{oldest} " in (REPO / ".ci" / "run").read_text()
