"""``python -m hub_spawner init``'s pure parts: reading each scheduler's limits, and the config
and chart values it writes (which must load and render). The lab test drives it for real
(tests/integration/test_init.py)."""

from __future__ import annotations

import argparse

import pytest
import yaml
from traitlets.config import PyFileConfigLoader

from hub_spawner import init
from hub_spawner.schedulers import (
    ALL_NODES,
    CommandOutput,
    QueueLimits,
    parse_duration,
    parse_memory_mb,
    sge,
    slurm,
    torque,
)
from tests import helm_chart as chart

from .test_example_configs import config_problems

KNOWN_HOSTS = "login.example.org ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBl5cHJvYmUta2V5LWZvci10ZXN0cw"


@pytest.mark.parametrize("text,minutes_first,seconds", [
    ("infinite", True, None), ("UNLIMITED", True, None), ("INFINITY", False, None),
    ("30:00", True, 1800), ("1:00:00", True, 3600), ("2-00:00:00", True, 172800),
    ("1-12", True, 129600), ("60", True, 3600), ("08:00:00", False, 28800),
    ("3600", False, 3600), ("168:00:00", False, 604800),
])
def test_time_limits_read(text, minutes_first, seconds):
    assert parse_duration(text, minutes_first) == seconds


def test_a_time_limit_that_is_not_one_is_refused():
    with pytest.raises(ValueError, match="not a time limit"):
        parse_duration("soon")


@pytest.mark.parametrize("text,mb", [("900", 900), ("1.9G", 1945), ("65855484kb", 64311),
                                     ("4gb", 4096), ("2T", 2097152), ("lots", None)])
def test_memory_read(text, mb):
    assert parse_memory_mb(text) == mb


def test_slurm_partitions_keep_their_largest_node_type():
    output = CommandOutput(0, "debug|1:00:00|2|900|(null)\n"
                              "gpu|2-00:00:00|32|128000|gpu:a100:4(S:0-1)\n"
                              "gpu|2-00:00:00|64+|256000|gpu:2\n", "")
    assert slurm.parse_discovery_output(output) == [
        QueueLimits("debug", 3600, 2, 900, 0), QueueLimits("gpu", 172800, 64, 256000, 4)]


def test_slurm_discovery_says_when_sinfo_failed():
    with pytest.raises(ValueError, match="sinfo failed"):
        slurm.parse_discovery_output(CommandOutput(1, "", "slurm_load_partitions: down"))


def test_grid_engine_queues_take_slots_and_the_largest_hosts_memory():
    output = CommandOutput(0, """%queue all.q
h_rt                  INFINITY
slots                 1,[compute.lab.example=2]
%queue short.q
h_rt                  08:00:00
slots                 4
%hosts
HOSTNAME                ARCH         NCPU NSOC NCOR NTHR  LOAD  MEMTOT  MEMUSE  SWAPTO  SWAPUS
----------------------------------------------------------------------------------------------
global                  -               -    -    -    -     -       -       -       -       -
compute.lab.example     lx-amd64        2    1    2    2  0.52    1.9G  300.0M     0.0     0.0
""", "")
    assert sge.parse_discovery_output(output) == [
        QueueLimits("all.q", None, 2, 1945), QueueLimits("short.q", 28800, 4, 1945)]


def test_torque_queues_from_qstat_and_nodes_from_pbsnodes():
    output = CommandOutput(0, """cn01
     state = free
     np = 16
     gpus = 2
     status = rectime=1,physmem=65855484kb,ncpus=16
%queues
Queue: batch
    queue_type = Execution
    resources_max.walltime = 24:00:00
Queue: long
    resources_max.walltime = 168:00:00
""", "")
    assert torque.parse_discovery_output(output) == [
        QueueLimits("batch", 86400, 16, 64311, 2), QueueLimits("long", 604800, 16, 64311, 2)]
    nodes_only = CommandOutput(0, "compute\n     state = free\n     np = 2\n%queues\n", "")
    assert torque.parse_discovery_output(nodes_only) == [QueueLimits(ALL_NODES, None, 2)]


def found(scheduler: str, queues: list[QueueLimits], **more) -> init.Found:
    return init.Found("login.example.org", 22, "alice", "/etc/hub_spawner/keys/{username}",
                      KNOWN_HOSTS, scheduler, queues, "login-ib0", **more)


CASES = {
    "slurm": found("slurm", [QueueLimits("debug", 3600, 2, 900),
                             QueueLimits("gpu", None, 64, 256000, 4)],
                   job_prologue="module load jupyter", accounts=["proj-a", "proj-b"],
                   singleuser="/opt/jupyter/bin/jupyterhub-singleuser"),
    "sge": found("sge", [QueueLimits("all.q", None, 2, 1945)], parallel_environment="smp"),
    "torque": found("torque", [QueueLimits(ALL_NODES, None, 2)],
                    notes=["qstat -Qf listed no queue"]),
}


@pytest.mark.parametrize("scheduler", CASES)
def test_the_written_config_loads_with_only_real_options(scheduler, tmp_path):
    (tmp_path / "jupyterhub_config.py").write_text(init.render_config(CASES[scheduler]))
    assert config_problems(tmp_path / "jupyterhub_config.py") == []
    config = PyFileConfigLoader("jupyterhub_config.py", path=str(tmp_path)).load_config()
    assert config.JupyterHub.spawner_class == f"{scheduler}-ssh"
    spawner = config.SSHBatchSpawner
    assert spawner.login_host == "login.example.org"
    assert spawner.hub_api_tunnel_host == "login-ib0"
    if scheduler == "slurm":
        assert [p["name"] for p in spawner.partitions] == ["debug", "gpu"]
        assert spawner.partitions[0]["max_walltime"] == "01:00:00"
        assert spawner.partitions[1]["max_gpus"] == 4 and "max_walltime" not in (
            spawner.partitions[1])
        assert (spawner.max_cpus, spawner.max_memory, spawner.max_gpus) == (64, "250G", 4)
        assert spawner.max_walltime == "7-00:00:00"  # one partition has no limit: EDIT
        assert spawner.accounts == ["proj-a", "proj-b"]
    if scheduler == "torque":
        assert "partitions" not in spawner  # no queue named: any the user types
        assert "# note: qstat -Qf listed no queue" in init.render_config(CASES[scheduler])


@pytest.mark.parametrize("scheduler", CASES)
def test_the_written_values_render_the_chart(scheduler):
    values = yaml.safe_load(init.render_values(CASES[scheduler]))
    assert values["cluster"]["knownHosts"].strip() == KNOWN_HOSTS
    manifests = chart.render(values)
    assert chart.fullname(manifests)


def test_a_fingerprint_must_match_or_be_confirmed():
    init.confirm_fingerprint("SHA256:abc", "SHA256:abc", "login", ask=None)
    with pytest.raises(init.InitError, match="do not trust"):
        init.confirm_fingerprint("SHA256:abc", "SHA256:xyz", "login", ask=None)
    init.confirm_fingerprint("SHA256:abc", "", "login", ask=lambda question: "yes")
    with pytest.raises(init.InitError, match="not confirmed"):
        init.confirm_fingerprint("SHA256:abc", "", "login", ask=lambda question: "")


async def test_existing_files_are_not_overwritten(tmp_path):
    (tmp_path / "values.yaml").write_text("mine\n")
    said = []
    args = argparse.Namespace(out=tmp_path, force=False, user="alice", key=tmp_path / "k",
                              login="login", port=22, fingerprint="")
    code = await init.run_init(args, say=lambda *a, **k: said.append(a[0]))
    assert code == 1 and "pass --force" in said[0]
    assert (tmp_path / "values.yaml").read_text() == "mine\n"


@pytest.mark.parametrize("user", ["alice; rm -rf ~", "$(id)", "-oProxyCommand=x", "a b"])
async def test_a_hostile_user_name_is_refused_before_any_connection(tmp_path, user):
    """--user reaches a remote command (sacctmgr user=...): anything but a user name is
    refused before init connects anywhere, and nothing is written."""
    said = []
    args = argparse.Namespace(out=tmp_path / "out", force=False, user=user, key=tmp_path / "k",
                              login="login.invalid", port=22, fingerprint="")
    code = await init.run_init(args, say=lambda *a, **k: said.append(a[0]))
    assert code == 1 and "is not a user name" in said[0], said
    assert not (tmp_path / "out").exists()
