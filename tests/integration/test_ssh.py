"""hub_spawner/ssh.py and the spawner's poll() against the lab's real OpenSSH sshd and Slurm."""

from __future__ import annotations

import asyncio
import os
import pwd
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from hub_spawner.errors import ClusterUnreachable
from hub_spawner.spawner import SlurmSSHSpawner
from hub_spawner.ssh import ConnectionPool, SSHTarget, default_pool

from .conftest import active_jobs


def target(lab, user="alice", **changes) -> SSHTarget:
    fields = dict(host=lab.LOGIN_IP, port=22, username=user, key_path=str(lab.KEY_DIR / user),
                  known_hosts_path=str(lab.KNOWN_HOSTS), connect_timeout=5)
    fields.update(changes)
    return SSHTarget(**fields)


async def test_one_kept_connection_runs_commands_as_the_user_on_the_login_host(lab):
    pool = ConnectionPool()
    connection = await pool.get(target(lab))
    result = await connection.run("hostname; id -un")
    assert result.stdout.split() == ["login", "alice"]
    assert await pool.get(target(lab)) is connection
    assert connection.connection.get_extra_info("send_cipher") == "aes128-gcm@openssh.com"
    pool.close_all()


async def test_private_file_is_0600_and_private_dir_0700(lab):
    pool = ConnectionPool()
    connection = await pool.get(target(lab))
    home = await connection.home()
    assert home == pwd.getpwnam("alice").pw_dir
    directory = f"{home}/.hub-spawner-ssh-test"
    await connection.make_private_dir(directory)
    await connection.write_private_file(f"{directory}/secret.env", "TOKEN=x\n")
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(f"{directory}/secret.env").st_mode) == 0o600
    assert await connection.read_file(f"{directory}/secret.env") == "TOKEN=x\n"
    assert await connection.read_file(f"{directory}/missing") is None
    await connection.remove_file(f"{directory}/secret.env")
    assert not Path(f"{directory}/secret.env").exists()
    await connection.run(f"rmdir {directory}")
    pool.close_all()


async def test_unknown_host_key_is_refused(lab, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(ClusterUnreachable, match="host key of .* is not in .*Refusing"):
        await ConnectionPool().get(target(lab, known_hosts_path=str(empty)))


async def test_changed_host_key_is_refused(lab, tmp_path):
    other = tmp_path / "known_hosts"
    bob_public = (lab.KEY_DIR / "bob.pub").read_text().split()
    other.write_text(f"{lab.LOGIN_IP} {bob_public[0]} {bob_public[1]}\n")
    with pytest.raises(ClusterUnreachable, match="Refusing to connect"):
        await ConnectionPool().get(target(lab, known_hosts_path=str(other)))


async def test_wrong_key_is_refused_with_advice(lab):
    with pytest.raises(ClusterUnreachable, match="refused the SSH key .*authorized_keys"):
        await ConnectionPool().get(target(lab, key_path=str(lab.KEY_DIR / "bob")))


async def test_missing_key_says_so(lab, tmp_path):
    with pytest.raises(ClusterUnreachable, match="No SSH key for alice"):
        await ConnectionPool().get(target(lab, key_path=str(tmp_path / "nokey")))


async def test_unreachable_login_node_is_a_clear_error(lab):
    with pytest.raises(ClusterUnreachable, match="Cannot reach the login node .*:2222"):
        await ConnectionPool().get(target(lab, port=2222))


async def test_poll_says_unknown_not_gone_while_the_login_node_is_unreachable(lab):
    """poll() on a real Slurm job: running -> None; login node unreachable -> still None
    (never "gone"); job cancelled -> 1. The spawner has no hub here: poll() needs none."""
    default_pool.close_all()
    connection = await default_pool.get(target(lab))
    submitted = await connection.run("sbatch --parsable --output=/dev/null", stdin=(
        "#!/bin/bash\nsleep 300\n"))
    job_id = submitted.stdout.strip()
    spawner = SlurmSSHSpawner(
        user=SimpleNamespace(name="alice"), hub=SimpleNamespace(),
        login_host=lab.LOGIN_IP, known_hosts_path=str(lab.KNOWN_HOSTS),
        ssh_key_path_template=str(lab.KEY_DIR / "{username}"), ssh_connect_timeout=3,
    )
    spawner.load_state({"hub_spawner_version": 1, "job_id": job_id})
    try:
        for _ in range(20):
            if active_jobs("alice") and "RUNNING" in active_jobs("alice")[0]:
                break
            await asyncio.sleep(0.5)
        assert await spawner.poll() is None

        default_pool.close_all()
        spawner.login_port = 2222  # nothing listens there: the login node is "down"
        assert await spawner.poll() is None
        assert spawner.job_id == job_id

        spawner.login_port = 22
        await spawner.stop()
        assert active_jobs("alice") == []
        spawner.load_state({"hub_spawner_version": 1, "job_id": job_id})
        assert await spawner.poll() == 1
    finally:
        lab.in_namespace("login", ["scancel", job_id], check=False)
        default_pool.close_all()
