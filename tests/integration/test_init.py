"""``python -m hub_spawner init`` against the lab's three schedulers: it confirms the login
node's key by the fingerprint given, reads the partitions or queues and their limits off the
real scheduler, and writes a config and chart values; then ``check --submit`` passes on the
config it wrote (a real job, tunnel and server), and the values render the chart."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from traitlets.config import PyFileConfigLoader

from tests import helm_chart as chart

from .conftest import active_jobs, wait_for

#: The lab's users run jupyterhub-singleuser from the lab's venv, as a site's job prologue
#: would load a module.
PROLOGUE = "export PATH={prefix}/venv/bin:$PATH"


def fingerprint(lab) -> str:
    result = subprocess.run(["ssh-keygen", "-lf", str(lab.LAB_DIR / "ssh_host_ed25519_key.pub")],
                            capture_output=True, text=True, check=True)
    return result.stdout.split()[1]


@pytest.mark.parametrize("scheduler,user,queues", [
    ("slurm", "alice", ["debug", "long"]),
    ("sge", "bob", ["all.q"]),
    ("torque", "bob", None),  # the lab's Torque wrappers answer no qstat -Qf: any queue
])
def test_init_writes_a_config_that_check_submit_passes(lab, tmp_path, scheduler, user, queues):
    port = lab.LOGIN_PORTS[scheduler]
    command = [sys.executable, "-m", "hub_spawner", "init", "--login", lab.LOGIN_IP,
               "--port", str(port), "--user", user, "--key", str(lab.KEY_DIR / user),
               "--fingerprint", fingerprint(lab), "--out", str(tmp_path),
               "--job-prologue", PROLOGUE.format(prefix=lab.LAB_PREFIX)]
    if scheduler != "slurm":  # the lab's login host has Slurm's sinfo on every PATH too
        command += ["--scheduler", scheduler]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert f"wrote {tmp_path}/jupyterhub_config.py" in result.stdout, result.stdout

    config = PyFileConfigLoader("jupyterhub_config.py", path=str(tmp_path)).load_config()
    spawner = config.SSHBatchSpawner
    assert config.JupyterHub.spawner_class == f"{scheduler}-ssh"
    assert spawner.ssh_key_path_template == f"{lab.KEY_DIR}/{{username}}"
    assert spawner.hub_api_tunnel_host == "login"  # the login node's own name
    if queues is None:
        assert "partitions" not in spawner
    else:
        assert [p["name"] for p in spawner.partitions] == queues
    assert spawner.max_cpus == 2  # the lab's compute host
    if scheduler == "slurm":  # detected; slurm.conf gives both partitions MaxTime=INFINITE
        assert "max_walltime" not in spawner.partitions[1]
        assert spawner.max_walltime == "7-00:00:00"
        assert "(no limit found: EDIT)" in (tmp_path / "jupyterhub_config.py").read_text()
    if scheduler == "sge":
        assert config.SGESSHSpawner.parallel_environment == "smp"
    known = (tmp_path / "known_hosts").read_text()
    assert known.split()[1:] == (lab.LAB_DIR / "ssh_host_ed25519_key.pub").read_text().split()[:2]

    values = yaml.safe_load((tmp_path / "values.yaml").read_text())
    assert values["cluster"]["scheduler"] == scheduler
    assert chart.fullname(chart.render(values))

    env = dict(os.environ)
    check = subprocess.run(
        [sys.executable, "-m", "hub_spawner", "check", "-f", "jupyterhub_config.py",
         "--user", user, "--submit"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "all 11 checks passed" in check.stdout, check.stdout
    assert wait_for(lambda: not active_jobs(user, scheduler), 30)


def test_a_wrong_fingerprint_writes_nothing(lab, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hub_spawner", "init", "--login", lab.LOGIN_IP, "--user", "alice",
         "--key", str(lab.KEY_DIR / "alice"), "--fingerprint", "SHA256:" + "A" * 43,
         "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "do not trust this connection" in result.stderr, result.stderr
    assert not (tmp_path / "out" / "jupyterhub_config.py").exists()
