"""What a site installs: the declared dependencies are the versions the lab tests, the licence
file is the one pyproject names, and the changelog has the version being released."""

import re
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
TESTED = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$",
                         (REPO / "tests" / "lab" / "requirements.txt").read_text(), re.M))


def _lowest(requirement: str) -> tuple[str, str]:
    name, lowest = re.match(r"([A-Za-z0-9_.-]+)>=([0-9][^,;\s]*)", requirement).groups()
    return name, lowest


def test_each_dependency_declares_the_version_the_lab_tests_as_its_lowest():
    declared = dict(_lowest(r) for r in PYPROJECT["project"]["dependencies"]
                    if not r.startswith("jinja2"))
    assert set(declared) == {"jupyterhub", "asyncssh", "traitlets"}
    for name, lowest in declared.items():
        assert lowest == TESTED[name], (name, lowest, TESTED[name])


def test_jupyterhub_is_capped_below_the_next_major_version():
    [jupyterhub] = [r for r in PYPROJECT["project"]["dependencies"]
                    if r.startswith("jupyterhub")]
    major = int(TESTED["jupyterhub"].split(".")[0])
    assert jupyterhub.endswith(f",<{major + 1}"), jupyterhub


def test_the_hub_extra_has_what_the_examples_use_beside_the_spawner():
    """The idle culler and the authenticator, at the major version the lab tests."""
    extra = dict(_lowest(r) for r in PYPROJECT["project"]["optional-dependencies"]["hub"])
    assert set(extra) == {"jupyterhub-idle-culler", "oauthenticator"}
    for name, lowest in extra.items():
        assert TESTED[name].split(".")[0] == lowest.split(".")[0], (name, lowest)
    examples = "".join(p.read_text() for p in (REPO / "example_hub_config").glob("*.py"))
    assert "jupyterhub_idle_culler" in examples and '"generic-oauth"' in examples


def test_the_licence_file_is_the_one_pyproject_names():
    assert PYPROJECT["project"]["license"] == {"text": "BSD-3-Clause"}
    licence = (REPO / "LICENSE").read_text()
    assert licence.startswith("BSD 3-Clause License\n")
    assert "Neither the name of the copyright holder" in licence


def test_the_changelog_has_the_version_being_released():
    version = PYPROJECT["project"]["version"]
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert re.search(rf"^## {re.escape(version)}\b", changelog, re.M), version
