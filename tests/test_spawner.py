"""hub_spawner/spawner.py pieces that need no cluster: job scripts for hostile names, state."""

import asyncio
import subprocess
from types import SimpleNamespace

import pytest

from hub_spawner.errors import ClusterUnreachable
from hub_spawner.resources import Resources
from hub_spawner.spawner import (
    STATE_VERSION,
    SGESSHSpawner,
    SlurmSSHSpawner,
    TorqueSSHSpawner,
    _slug,
)

SPAWNERS = {"slurm": SlurmSSHSpawner, "sge": SGESSHSpawner, "torque": TorqueSSHSpawner}
JOB_NAME_DIRECTIVES = {"slurm": "#SBATCH --job-name=", "sge": "#$ -N ", "torque": "#PBS -N "}


def make_spawner(user_name: str = "alice", server_name: str = "", scheduler: str = "slurm",
                 **config) -> SlurmSSHSpawner:
    return SPAWNERS[scheduler](user=SimpleNamespace(name=user_name), hub=SimpleNamespace(),
                               orm_spawner=SimpleNamespace(name=server_name, server=None),
                               **config)


@pytest.mark.parametrize("name", ["a'b\"c;$(id)`x`", "../../etc", "x" * 100, "ünïcode name", ""])
def test_slug_is_always_safe(name):
    slug = _slug(name)
    assert len(slug) <= 24
    assert all(ch.isascii() and (ch.isalnum() or ch in "_.-") for ch in slug)


@pytest.mark.parametrize("scheduler", SPAWNERS)
def test_job_script_for_hostile_names_is_valid_bash_with_everything_quoted(scheduler, tmp_path):
    spawner = make_spawner("eve';touch /tmp/pwned;'", "srv$(id)", scheduler,
                           job_prologue="module load jupyter",
                           cmd=["/opt/jupyter bin/jupyterhub-singleuser"])
    spawner.job_name = f"jupyterhub-{_slug(spawner.user.name)}-{_slug(spawner.name)}-0a1b2c3d"
    spawner.output_path = f"/home/eve/.hub-spawner/{spawner.job_name}.out"
    spawner.secrets_path = f"/home/eve/.hub-spawner/{spawner.job_name}.env"
    script = spawner._job_script(Resources("debug", 2, 1024, 3600, ""))
    directive = JOB_NAME_DIRECTIVES[scheduler]
    assert f"{directive}jupyterhub-eve--touch--tmp-pwned---srv--id--0a1b2c3d" in script
    assert "'/opt/jupyter bin/jupyterhub-singleuser'" in script
    assert "module load jupyter" in script
    (tmp_path / "job.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sh")]).returncode == 0


def test_state_round_trips_with_a_version():
    spawner = make_spawner()
    spawner.job_id, spawner.job_host, spawner.remote_port = "42", "compute", 43211
    spawner.tunnel_port, spawner.api_tunnel_port = 40001, 40002
    state = spawner.get_state()
    assert state["hub_spawner_version"] == STATE_VERSION
    restored = make_spawner()
    restored.load_state(state)
    assert (restored.job_id, restored.job_host, restored.remote_port, restored.tunnel_port,
            restored.api_tunnel_port) == ("42", "compute", 43211, 40001, 40002)
    restored.clear_state()
    assert restored.get_state().get("job_id") is None


def test_state_of_an_unknown_version_is_not_trusted():
    spawner = make_spawner()
    spawner.load_state({"hub_spawner_version": STATE_VERSION + 1, "job_id": "42"})
    assert spawner.job_id == ""


def test_bad_limit_in_config_is_a_clear_error():
    with pytest.raises(ValueError, match="Memory 'lots' is not understood"):
        make_spawner(max_memory="lots").resource_limits()


def test_cluster_username_template_must_give_a_unix_name():
    spawner = make_spawner("alice@example.org", login_host="login")
    with pytest.raises(ClusterUnreachable, match="not a valid Unix user name"):
        asyncio.run(spawner._ssh_target())


@pytest.mark.parametrize(("scheduler", "label"),
                         [("slurm", "Partition"), ("sge", "Queue"), ("torque", "Queue")])
def test_form_speaks_the_schedulers_language_and_offers_gpus_only_when_allowed(scheduler, label):
    spawner = make_spawner(scheduler=scheduler)
    form = spawner.options_form(spawner)
    assert f">{label}</label>" in form
    assert 'name="gpus"' not in form
    spawner = make_spawner(scheduler=scheduler, max_gpus=2)
    assert 'name="gpus"' in spawner.options_form(spawner)


def test_gpus_are_refused_where_none_are_offered():
    spawner = make_spawner()
    with pytest.raises(ValueError, match="GPUs are not offered here"):
        spawner.options_from_form({"gpus": ["1"]})


def test_grid_engine_form_refuses_cores_without_a_parallel_environment():
    spawner = make_spawner(scheduler="sge", parallel_environment="")
    with pytest.raises(ValueError, match="one core per Grid Engine job"):
        spawner.options_from_form({"cpus": ["2"]})
    assert spawner.options_from_form({"cpus": ["1"]})["cpus"] == 1


def test_hostile_admin_setting_never_reaches_a_directive():
    spawner = make_spawner(scheduler="sge", parallel_environment="smp\n#$ -u root")
    with pytest.raises(ValueError, match="Bad spawner setting"):
        spawner.options_from_form({"cpus": ["2"]})
