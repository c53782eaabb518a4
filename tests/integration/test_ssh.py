"""hub_spawner/ssh.py and the spawner's poll() against the lab's real OpenSSH sshd and Slurm."""

from __future__ import annotations

import asyncio
import os
import pwd
import stat
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from hub_spawner.errors import ClusterUnreachable
from hub_spawner.hub import hub_of
from hub_spawner.spawner import SlurmSSHSpawner
from hub_spawner.ssh import ConnectionPool, SSHTarget

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
    await connection.run(f"rm -r {directory}")
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
    with pytest.raises(ClusterUnreachable, match="Cannot reach the login node .*:2299"):
        await ConnectionPool().get(target(lab, port=2299))


def spawner_for_job(lab, job_id: str, **config) -> SlurmSSHSpawner:
    """A spawner, outside any hub, that has (as after a hub restart) only the job id."""
    spawner = SlurmSSHSpawner(
        user=SimpleNamespace(name="alice"), hub=SimpleNamespace(),
        login_host=lab.LOGIN_IP, known_hosts_path=str(lab.KNOWN_HOSTS),
        ssh_key_path_template=str(lab.KEY_DIR / "{username}"), ssh_connect_timeout=3, **config,
    )
    spawner.load_state({"hub_spawner_version": 1, "job_id": job_id})
    return spawner


async def submit_sleep_job(lab) -> str:
    connection = await hub_of().pool.get(target(lab))
    submitted = await connection.run("sbatch --parsable --output=/dev/null",
                                     stdin="#!/bin/bash\nsleep 300\n")
    return submitted.stdout.strip()


async def wait_until_running(timeout: float = 10) -> None:
    for _ in range(int(timeout / 0.5)):
        if active_jobs("alice") and "RUNNING" in active_jobs("alice")[0]:
            return
        await asyncio.sleep(0.5)


async def test_poll_says_unknown_not_gone_while_the_login_node_is_unreachable(lab, tmp_path):
    """poll() on a real Slurm job: running -> None; login node unreachable -> still None
    (never "gone"); job cancelled -> 1. The spawner has no hub here: poll() needs none."""
    hub_of().pool.close_all()
    job_id = await submit_sleep_job(lab)
    spawner = spawner_for_job(lab, job_id, tunnel_service_dir=str(tmp_path / "tunnels"))
    try:
        await wait_until_running()
        assert await spawner.poll() is None

        hub_of().pool.close_all()
        spawner.login_port = 2299  # nothing listens there: the login node is "down"
        assert await spawner.poll() is None
        assert spawner.job_id == job_id

        spawner.login_port = 22
        await spawner.stop()
        assert active_jobs("alice") == []
        spawner.load_state({"hub_spawner_version": 1, "job_id": job_id})
        assert await spawner.poll() == 1
    finally:
        lab.in_namespace("login", ["scancel", job_id], check=False)
        hub_of().pool.close_all()


async def test_stop_during_a_login_node_outage_answers_at_once_and_leaves_the_job_listed(
        lab, tmp_path, caplog):
    """sshd really stops listening: stop() tries the cancel once, within
    ``stop_cancel_timeout``, clears the state and says the reconciler takes the job; the job
    is still there (outside a hub nothing reconciles; test_reconciler.py covers a real hub
    cancelling it once the login node is back)."""
    hub_of().pool.close_all()
    job_id = await submit_sleep_job(lab)
    spawner = spawner_for_job(lab, job_id, stop_cancel_timeout=4,
                              tunnel_service_dir=str(tmp_path / "tunnels"))
    sshd_stopped = False
    try:
        await wait_until_running()
        hub_of().pool.close_all()
        lab.stop_sshd()
        sshd_stopped = True
        started = time.monotonic()
        await spawner.stop()  # does not raise: JupyterHub clears the state whatever happens
        assert time.monotonic() - started < 10
        assert spawner.job_id == ""
        assert [job for job in active_jobs("alice") if job.startswith(job_id + " ")]
        assert "the reconciler cancels it" in caplog.text, caplog.text[-2000:]
    finally:
        if sshd_stopped:
            lab.start_sshd()
        await asyncio.to_thread(lab.stop_tunnel_service, tmp_path / "tunnels")
        lab.in_namespace("login", ["scancel", job_id], check=False)
        hub_of().pool.close_all()


async def test_a_startup_file_that_prints_gigabytes_cannot_fill_the_hubs_memory(lab):
    """alice's ~/.bashrc prints for ever before any command of ours runs: the command is cut
    off at MAX_OUTPUT_BYTES (plus the frame's allowance) with a message that points at her
    start-up files, and the connection stays usable once the file is fixed."""
    bashrc = Path("/home/alice/.bashrc")
    saved = bashrc.read_bytes() if bashrc.exists() else None
    pool, second_pool = ConnectionPool(), ConnectionPool()
    try:
        connection = await pool.get(target(lab))
        bashrc.write_text("yes 0123456789abcdef\n")
        started = time.monotonic()
        with pytest.raises(ClusterUnreachable, match=r"printed more than 4 MiB.*start-up files"):
            await connection.run("squeue --noheader", timeout=60)
        assert time.monotonic() - started < 20
        # A new connection's first session (``true``) throws the flood away as it comes and
        # gives up after the connect timeout.
        started = time.monotonic()
        with pytest.raises(ClusterUnreachable, match=r"did not run even `true` within 5 s.*"
                                                     r"start-up files"):
            await second_pool.get(target(lab))
        assert time.monotonic() - started < 15
        restore(bashrc, saved)
        assert (await connection.run("echo still usable")).stdout.strip() == "still usable"
    finally:
        pool.close_all()
        second_pool.close_all()
        restore(bashrc, saved)


async def test_a_function_in_the_startup_files_cannot_stand_in_for_a_scheduler_command(lab):
    """alice's ~/.bashrc defines a function named ``squeue`` that prints for ever: our
    commands run under ``exec sh -c`` (``ssh.Frame``), so the real squeue answers."""
    bashrc = Path("/home/alice/.bashrc")
    saved = bashrc.read_bytes() if bashrc.exists() else None
    pool = ConnectionPool()
    try:
        bashrc.write_text("squeue() { yes 0123456789abcdef; }\necho sourced-bashrc\n")
        connection = await pool.get(target(lab))
        output = await connection.run("squeue --version", timeout=30)
        assert output.exit_status == 0, output
        assert output.stdout.startswith("slurm-wlm "), output  # not ``yes``
        assert "sourced-bashrc" in output.noise, output  # the file was read, and set aside
    finally:
        pool.close_all()
        restore(bashrc, saved)


def restore(path: Path, saved: bytes | None) -> None:
    if saved is None:
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(saved)


async def test_a_fifo_in_place_of_a_file_is_refused_not_waited_on(lab):
    fifo = "/home/alice/.hub-spawner-fifo-test"
    pool = ConnectionPool()
    try:
        connection = await pool.get(target(lab))
        await connection.run(f"rm -f {fifo}; mkfifo {fifo}")
        started = time.monotonic()
        with pytest.raises(ClusterUnreachable, match="is not a regular file"):
            await connection.read_file(fifo, timeout=10)
        assert time.monotonic() - started < 10
    finally:
        await connection.run(f"rm -f {fifo}")
        pool.close_all()
