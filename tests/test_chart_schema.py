"""The chart's ``spawner`` values are the spawner's options: generated from the traits
(hub_spawner/chart_schema.py), checked by ``helm install``, and set by the chart's config."""

from __future__ import annotations

import re

import pytest
import yaml

from hub_spawner import chart_schema
from hub_spawner.spawner import SlurmSSHSpawner, SSHBatchSpawner
from tests import helm_chart as chart

from .test_helm_chart import with_changes


def test_the_committed_schema_is_generated_from_the_options():
    assert chart_schema.main(["--check"]) == 0


@pytest.mark.parametrize("cls", [SSHBatchSpawner, *chart_schema.SCHEDULER_CLASSES.values()])
def test_every_option_of_ours_is_a_value_or_set_by_the_chart(cls):
    """An option added to a spawner class without a place in values fails here."""
    schema = chart_schema.spawner_schema()["properties"]
    if cls is not SSHBatchSpawner:
        [scheduler] = [k for k, v in chart_schema.SCHEDULER_CLASSES.items() if v is cls]
        schema = schema[scheduler]["properties"]
    for name in cls.class_own_traits(config=True):
        assert chart_schema.camel(name) in schema or name in chart_schema.SET_BY_THE_CHART, name
    for name in chart_schema.SET_BY_THE_CHART:
        assert name in SSHBatchSpawner.class_trait_names(config=True), name


def test_the_charts_config_turns_each_key_back_into_its_option():
    """The chart's jupyterhub_config.py reads ``spawner.*`` keys as camelCase option names."""
    source = (chart.CHART_DIR / "files" / "jupyterhub_config.py").read_text()
    start = source.index("def trait_name(")
    namespace: dict = {"re": re}
    exec(source[start:source.index("\n\n\n", start)], namespace)
    for name in SSHBatchSpawner.class_trait_names(config=True):
        assert namespace["trait_name"](chart_schema.camel(name)) == name, name


STRUCTURED = {
    "partitions": ["interactive", {"name": "gpu", "description": "GPU nodes", "groups": ["gpu"],
                                   "max_gpus": 2}],
    "presets": [{"name": "small", "display_name": "Small", "cpus": 1, "memory": "4G",
                 "walltime": "02:00:00"}],
    "accounts": ["proj-a", "proj-b"],
    "groupLimits": {"power-users": {"max_cpus": 16}},
    "clusters": [{"name": "hpc", "display_name": "HPC", "scheduler": "slurm", "config": {}}],
    "statusClusterUsername": "jupyterhub-status",
    "serverTransport": "socket",
    "walltimeWarning": 600,
    "jobFilesKeep": 5,
    "sshCertificateMinUid": 1000,
    "environment": {"OMP_NUM_THREADS": "1"},
    "slurm": {"qos": "interactive"},
}


def test_structured_options_go_through_values_to_the_spawner(tmp_path):
    """The options the chart refused before (README "Options"): structures as structures, and
    the spawner takes each value as the hub will."""
    values = chart.load_values(chart.SLURM_VALUES)
    spawner_values = dict(values["spawner"])
    spawner_values.pop("partitions", None)
    spawner_values.update(STRUCTURED)
    values["spawner"] = spawner_values
    c = chart.load_hub_config(chart.render(values), tmp_path)
    assert c.SSHBatchSpawner.partitions == STRUCTURED["partitions"]
    assert c.SSHBatchSpawner.group_limits == {"power-users": {"max_cpus": 16}}
    assert c.SSHBatchSpawner.status_cluster_username == "jupyterhub-status"
    assert c.SlurmSSHSpawner.qos == "interactive"
    live = SlurmSSHSpawner(config=c)
    assert live.server_transport == "socket" and live.job_files_keep == 5
    assert live.presets[0]["name"] == "small" and live.accounts == ["proj-a", "proj-b"]
    assert live.environment == {"OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("changes,where", [
    ({"spawner": {"serverTransport": "udp"}}, "/spawner/serverTransport"),
    ({"spawner": {"presets": {"name": "small"}}}, "/spawner/presets"),
    ({"spawner": {"jobFilesKeep": "5"}}, "/spawner/jobFilesKeep"),
    ({"spawner": {"loginHost": "x"}}, "/spawner"),  # the chart's: cluster.loginHost
    ({"spawner": {"sge": {"qos": "x"}}}, "/spawner/sge"),  # Slurm's option under sge
])
def test_a_wrong_value_or_key_fails_at_install_naming_it(changes, where):
    values = with_changes(chart.load_values(chart.SLURM_VALUES), changes)
    with pytest.raises(chart.sdk().HelmValuesError) as rendering:
        chart.render(values)
    assert where in str(rendering.value), str(rendering.value)


def test_values_yaml_shows_only_keys_the_schema_takes():
    """The spawner section's keys and its commented examples in values.yaml are real keys."""
    text = (chart.CHART_DIR / "values.yaml").read_text()
    section = text.split("\nspawner:\n", 1)[1].split("\n# ---", 1)[0]
    example = yaml.safe_load("\n".join(line.strip()[2:] for line in section.splitlines()
                                       if line.strip().startswith("# ") and ":" in line))
    schema = chart_schema.spawner_schema()["properties"]
    assert example and set(example) <= set(schema), set(example) - set(schema)
    values = yaml.safe_load(text)["spawner"]
    assert values == {"statusClusterUsername": "jupyterhub-status"}, values
    assert set(values) <= set(schema)
