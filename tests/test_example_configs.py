"""Every example_hub_config/*.py loads, and names only options that exist, with valid values.

JupyterHub (traitlets) only warns about an option it does not know, and ignores a section whose
class it does not know: a misspelled name in a config is silently ignored. ``config_problems``
is the strict check: each section must name a configurable class the hub would use (the
spawner, the authenticator, the proxy, JupyterHub itself, or any of ``JupyterHub.classes``,
with their base classes), each key must be a ``config=True`` trait of that class, and each
value must pass the trait's validation, cross-validators (``@validate``) included.
"""

import importlib
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from jupyterhub.app import JupyterHub
from traitlets import TraitError
from traitlets.config import Config, Configurable, LazyConfigValue, PyFileConfigLoader

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "example_hub_config"
EXAMPLE_NAMES = sorted(path.name for path in EXAMPLES_DIR.glob("*.py"))
LAB_CONFIG_NAME = "lab_jupyterhub_config.py"


def config_problems(path: Path) -> list[str]:
    """What is wrong with the config file at ``path``, one message per problem (empty: none)."""
    config = PyFileConfigLoader(path.name, path=str(path.parent)).load_config()
    try:
        roots = _root_classes(config)
    except (ImportError, AttributeError, ValueError) as error:
        return [f"{path.name}: cannot resolve a class it names: {error}"]
    instances: dict[type, Configurable] = {}
    problems = []
    for section in sorted(config):
        found = _section_class(section, roots)
        if found is None:
            problems.append(f"{path.name}: c.{section}: no such configurable class")
            continue
        section_class, root = found
        if root not in instances:
            instances[root] = root()
        traits = section_class.class_traits(config=True)
        for key, value in config[section].items():
            where = f"{path.name}: c.{section}.{key}"
            if key not in traits:
                problems.append(f"{where}: {section} has no option {key!r}")
                continue
            trait = traits[key]
            if isinstance(value, LazyConfigValue):  # c.X.y.append(...) and friends
                value = value.get_value(trait.default_value)
            try:
                trait._validate(instances[root], value)  # validate() plus @validate methods
            except (TraitError, ValueError, TypeError) as error:
                problems.append(f"{where} = {value!r}: {error}")
    return problems


def resolve_class(value: Any, group: str) -> type:
    """A ``*_class`` setting as JupyterHub resolves it: a class, an entry-point name of
    ``group`` (``"slurm-ssh"``), or a dotted import path."""
    if isinstance(value, type):
        return value
    for entry_point in entry_points(group=group):
        if entry_point.name == value:
            return entry_point.load()
    module, _, name = value.rpartition(".")
    if not module:
        raise ValueError(f"{value!r} is neither a {group} entry point nor a dotted path")
    return getattr(importlib.import_module(module), name)


def _root_classes(config: Config) -> list[type]:
    """The classes this config would configure, the chosen ones first."""
    hub_config = config.JupyterHub if "JupyterHub" in config else Config()
    hub_traits = JupyterHub.class_traits()
    chosen = [
        resolve_class(hub_config.get(setting, hub_traits[setting].default_value), group)
        for setting, group in [
            ("spawner_class", "jupyterhub.spawners"),
            ("authenticator_class", "jupyterhub.authenticators"),
            ("proxy_class", "jupyterhub.proxies"),
        ]
    ]
    return [*chosen, JupyterHub, *JupyterHub().classes]


def _section_class(section: str, roots: list[type]) -> tuple[type, type] | None:
    """The class named ``section`` and the first root class that is (or inherits) it."""
    for root in roots:
        for klass in root.__mro__:
            if klass.__name__ == section and issubclass(klass, Configurable):
                return klass, root
    return None


@pytest.fixture
def lab_environment(monkeypatch, tmp_path):
    """What lab_jupyterhub_config.py reads from the environment, pointed at a tmp dir."""
    for name in ["lab", "prefix", "state"]:
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HUB_SPAWNER_LAB_DIR", str(tmp_path / "lab"))
    monkeypatch.setenv("LAB_PREFIX", str(tmp_path / "prefix"))
    monkeypatch.setenv("HUB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HUB_PORT", "8000")
    monkeypatch.setenv("HUB_SCHEDULER", "slurm")
    monkeypatch.delenv("HUB_DEMO_PASSWORD", raising=False)
    monkeypatch.delenv("HUB_DEMO_ADMIN_PASSWORD", raising=False)
    return monkeypatch


def test_there_are_examples():
    assert LAB_CONFIG_NAME in EXAMPLE_NAMES and len(EXAMPLE_NAMES) > 1


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_config_is_valid(name, lab_environment):
    assert config_problems(EXAMPLES_DIR / name) == []


@pytest.mark.parametrize("scheduler", ["slurm", "sge", "torque"])
def test_lab_config_is_valid_for_every_scheduler(scheduler, lab_environment):
    lab_environment.setenv("HUB_SCHEDULER", scheduler)
    assert config_problems(EXAMPLES_DIR / LAB_CONFIG_NAME) == []


def write_config(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "jupyterhub_config.py"
    path.write_text("\n".join(["c = get_config()  # noqa: F821", *lines, ""]))
    return path


def test_a_misspelled_option_is_reported(tmp_path):
    path = write_config(
        tmp_path, 'c.JupyterHub.spawner_class = "slurm-ssh"', 'c.SlurmSSHSpawner.login_hots = "x"'
    )
    problems = config_problems(path)
    assert len(problems) == 1
    assert "c.SlurmSSHSpawner.login_hots" in problems[0]


def test_a_value_of_the_wrong_type_is_reported(tmp_path):
    path = write_config(
        tmp_path, 'c.JupyterHub.spawner_class = "slurm-ssh"', 'c.SlurmSSHSpawner.max_cpus = "many"'
    )
    problems = config_problems(path)
    assert len(problems) == 1
    assert "c.SlurmSSHSpawner.max_cpus" in problems[0] and "'many'" in problems[0]


def test_a_misspelled_class_is_reported(tmp_path):
    path = write_config(tmp_path, 'c.SlurmSSHSpwner.login_host = "x"')
    assert config_problems(path) == [
        "jupyterhub_config.py: c.SlurmSSHSpwner: no such configurable class"
    ]


def test_an_option_of_another_scheduler_on_the_shared_class_is_reported(tmp_path):
    path = write_config(
        tmp_path, 'c.JupyterHub.spawner_class = "sge-ssh"', 'c.SSHBatchSpawner.qos = "x"'
    )
    assert config_problems(path) == [
        "jupyterhub_config.py: c.SSHBatchSpawner.qos: SSHBatchSpawner has no option 'qos'"
    ]


def test_callables_and_dotted_class_paths_pass(tmp_path):
    path = write_config(
        tmp_path,
        'c.JupyterHub.spawner_class = "hub_spawner.spawner.SGESSHSpawner"',
        'c.SGESSHSpawner.cluster_username = lambda spawner: "hpc_" + spawner.user.name',
        'c.SSHBatchSpawner.job_extra_directives = ["--constraint=skylake"]',
        'c.Spawner.start_timeout = 600',
    )
    assert config_problems(path) == []


def test_an_unknown_spawner_class_is_reported(tmp_path):
    path = write_config(tmp_path, 'c.JupyterHub.spawner_class = "slurm-shh"')
    assert "slurm-shh" in config_problems(path)[0]


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_every_example_form_offers_valid_choices_to_every_group(name, lab_environment):
    """Partitions, presets and accounts are checked when the form is built: each example's
    must build for a user in no group and in each group it names, and each preset must fit
    its limits."""
    from hub_spawner.choices import resolve
    from hub_spawner.spawner import SlurmSSHSpawner

    config = PyFileConfigLoader(name, path=str(EXAMPLES_DIR)).load_config()
    spawner_config = Config()
    for section in config:
        if section.endswith("Spawner"):
            spawner_config.merge(Config({"SlurmSSHSpawner": config[section]}))
    spawner = SlurmSSHSpawner(config=spawner_config)
    entries = [*spawner.partitions, *spawner.presets, *spawner.accounts]
    groups = {g for e in entries if isinstance(e, dict) for g in e.get("groups", [])}
    for member_of in [set(), *({g} for g in sorted(groups))]:
        choices = spawner.cluster.choices(member_of)
        for preset in choices.presets:
            assert resolve({"preset": preset.key}, choices).summary == preset.title


SYSTEMD_DIR = EXAMPLES_DIR / "systemd"


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_the_services_an_example_runs_are_installed(name):
    """A managed service's ``python -m MODULE`` (the idle culler) is importable here, where the
    lab installs what pyproject's ``hub`` extra names."""
    config = PyFileConfigLoader(name, path=str(EXAMPLES_DIR)).load_config()
    services = config.JupyterHub.get("services", [])
    modules = [service["command"][service["command"].index("-m") + 1] for service in services
               if "-m" in service.get("command", [])]
    for module in modules:
        assert importlib.util.find_spec(module) is not None, f"{name}: {module} is not installed"


def test_the_systemd_units_pass_systemd_analyze_verify(tmp_path):
    """example_hub_config/systemd/ as a site installs them, with the lab's venv and proxy at the
    places the units name (/opt/jupyterhub, /usr/local/bin): systemd's own checker accepts the
    three together (syntax, the units the hub's requires, executables)."""
    verify = shutil.which("systemd-analyze")
    assert verify, "systemd-analyze is missing: tests/lab/install.sh installs Debian's systemd"
    proxy = Path(os.environ.get("LAB_PREFIX", "/opt/hub-spawner-lab")) / (
        "node_modules/.bin/configurable-http-proxy")
    assert proxy.exists(), proxy
    units = sorted(SYSTEMD_DIR.glob("*.service"))
    assert [unit.name for unit in units] == [
        "hub-spawner-tunnels.service", "jupyterhub-proxy.service", "jupyterhub.service"]
    for unit in units:
        text = unit.read_text().replace("/opt/jupyterhub/", f"{sys.prefix}/")
        text = text.replace("/usr/local/bin/configurable-http-proxy", str(proxy))
        (tmp_path / unit.name).write_text(text)
    paths = [str(tmp_path / unit.name) for unit in units]
    result = subprocess.run([verify, "verify", "--man=no", *paths], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_hub_unit_needs_the_tunnel_unit_and_restarts_without_it():
    """The hub requires the tunnel service's unit and starts after it; the tunnel unit kills
    only its own process (its OpenSSH masters stay for the next one); the example configs
    never let the hub start a service of its own inside the hub's unit."""
    hub = (SYSTEMD_DIR / "jupyterhub.service").read_text()
    tunnels = (SYSTEMD_DIR / "hub-spawner-tunnels.service").read_text()
    [requires] = [line for line in hub.splitlines() if line.startswith("Requires=")]
    [after] = [line for line in hub.splitlines() if line.startswith("After=")]
    for unit in ("hub-spawner-tunnels.service", "jupyterhub-proxy.service"):
        assert unit in requires.split("=", 1)[1].split() and unit in after
    assert "\nKillMode=process\n" in tunnels
    assert "--dir /srv/jupyterhub/tunnels" in tunnels
    for name in EXAMPLE_NAMES:
        if name == LAB_CONFIG_NAME:
            continue
        config = PyFileConfigLoader(name, path=str(EXAMPLES_DIR)).load_config()
        assert config.SSHBatchSpawner.tunnel_service_start is False, name
        assert config.SSHBatchSpawner.tunnel_service_dir == "/srv/jupyterhub/tunnels", name
        assert config.ConfigurableHTTPProxy.should_start is False, name
