"""A job's files on the real cluster: the per-job directory, exclusive creation of the secrets
file through OpenSSH's own SFTP server (the lab's sshd runs ``internal-sftp``), retention of
old job directories, and a ready line that names another host."""

from __future__ import annotations

import os
import pwd
import stat
import time
from pathlib import Path

import pytest

from hub_spawner import jobfiles
from hub_spawner.ssh import ConnectionPool, SSHCommandError, SSHTarget

from .conftest import active_jobs, wait_for

DAY = 86400


@pytest.fixture
def alice(lab) -> pwd.struct_passwd:
    """alice's account, read once the lab (which creates it) is up."""
    return pwd.getpwnam("alice")


def _as(user: pwd.struct_passwd, path: Path) -> Path:
    os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)
    return path


async def test_the_secrets_file_is_created_exclusively_through_openssh_sftp(lab, alice):
    """``write_private_file`` over the lab's real sshd: an existing file is neither truncated
    nor rewritten, a symbolic link in its place (dangling, or to a file of alice's) is not
    followed, and a new file is 0600 from its first byte."""
    directory = Path(alice.pw_dir) / f".excl-test-{os.getpid()}"
    directory.mkdir(mode=0o700)
    existing = directory / "existing"
    existing.write_text("keep me")
    target_file = directory / "target"
    target_file.write_text("original")
    (directory / "to-target").symlink_to(target_file)
    (directory / "dangling").symlink_to(directory / "created-through-link")
    for path in (directory, *directory.iterdir()):
        _as(alice, path)
    pool = ConnectionPool()
    try:
        connection = await pool.get(SSHTarget(
            host=lab.LOGIN_IP, port=22, username="alice", key_path=str(lab.KEY_DIR / "alice"),
            known_hosts_path=str(lab.KNOWN_HOSTS), connect_timeout=5))
        for name in ("existing", "to-target", "dangling"):
            with pytest.raises(SSHCommandError):
                await connection.write_private_file(str(directory / name), "SECRET=1\n")
        await connection.write_private_file(str(directory / "new"), "SECRET=1\n")
    finally:
        pool.close_all()
    try:
        assert existing.read_text() == "keep me"
        assert target_file.read_text() == "original"
        assert not (directory / "created-through-link").exists()
        assert (directory / "new").read_text() == "SECRET=1\n"
        assert stat.S_IMODE((directory / "new").stat().st_mode) == 0o600
        assert (directory / "new").stat().st_uid == alice.pw_uid
    finally:
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()


def test_old_job_directories_beyond_the_newest_ten_are_removed_at_the_next_submit(hub, alice):
    """Backdated directories of alice's (older than max_walltime + start_timeout, which the
    spawner requires before it deletes anything) beyond the newest ``job_files_keep`` = 10 go
    at the next submit, and so does an old job's file of the earlier layout; a directory of
    another owner, one with another name, and a recent one beyond the ten stay."""
    state_dir = Path(alice.pw_dir) / ".hub-spawner"
    if not state_dir.exists():  # a fresh machine: alice's, as the spawner would make it
        state_dir.mkdir(mode=0o700)
        _as(alice, state_dir)
    ours = [d for d in state_dir.iterdir()
            if d.is_dir() and jobfiles.JOB_NAME.fullmatch(d.name) and d.stat().st_uid ==
            alice.pw_uid]
    now = time.time()
    # The newest first: alice's existing job directories (all recent), then these, oldest last.
    old = []
    for index in range(14):
        path = state_dir / f"jupyterhub-alice-backdated-{index:08x}"
        path.mkdir(mode=0o700)
        (path / "job.out").write_text("old output\n")
        age = (30 + index) * DAY
        for each in (path / "job.out", path):
            _as(alice, each)
            os.utime(each, (now - age, now - age))
        old.append(path)
    legacy = state_dir / "jupyterhub-alice-legacy-0000abcd.out"
    legacy.write_text("old layout\n")
    _as(alice, legacy)
    os.utime(legacy, (now - 60 * DAY, now - 60 * DAY))
    foreign = state_dir / "jupyterhub-alice-foreign-0000beef"  # root's, old
    foreign.mkdir()
    os.utime(foreign, (now - 90 * DAY, now - 90 * DAY))
    other_name = state_dir / "notes"
    other_name.mkdir(exist_ok=True)
    _as(alice, other_name)
    os.utime(other_name, (now - 90 * DAY, now - 90 * DAY))
    try:
        events, _ = hub.spawn("alice", "retention")
        assert events[-1].get("ready"), events
        hub.stop("alice", "retention")
        kept = max(0, 10 - len(ours))
        assert [p.exists() for p in old] == [True] * kept + [False] * (14 - kept), (
            len(ours), [p.name for p in old if p.exists()])
        assert not legacy.exists()
        removed = f"alice:retention: removed {14 - kept + 1} old job file(s) in {state_dir}"
        assert removed in hub.log()
        assert foreign.exists() and other_name.exists()
        assert all(d.exists() for d in ours), "a recent job directory was removed"
    finally:
        for path in old:
            if path.exists():
                (path / "job.out").unlink(missing_ok=True)
                path.rmdir()
        legacy.unlink(missing_ok=True)
        foreign.rmdir()
        other_name.rmdir()
    assert wait_for(lambda: not active_jobs("alice"), 30), active_jobs("alice")


def test_a_ready_line_naming_another_host_is_refused_and_the_job_cancelled(hub):
    """The job's output is the user's to write: a ready line for another host is refused,
    and nothing is dialled."""
    events, _ = hub.spawn("alice", "wrong-host")
    assert events[-1].get("failed"), events
    message = events[-1]["message"]
    assert "the job says its server is on 'elsewhere.127.0.0.1.nip.io'" in message, message
    assert "the scheduler placed it on 'compute'" in message, message
    assert wait_for(lambda: not active_jobs("alice"), 30), active_jobs("alice")


def test_a_node_that_calls_itself_by_its_full_name_is_the_schedulers_node(hub_for):
    """Issue 28: the node says ``compute.lab.example``, Slurm ``compute`` (the short name
    rule, README "Which node"); the server starts."""
    hub = hub_for("slurm")
    events, _ = hub.spawn("alice", "full-host-name")
    assert events[-1].get("ready"), events
    hub.stop("alice", "full-host-name")
    assert wait_for(lambda: not active_jobs("alice", "slurm"), 30)


@pytest.mark.parametrize("server", ["", "socket"])
def test_grid_engine_knows_the_node_by_its_full_name(lab, hub_for, server):
    """Issue 28, the other way round: the lab's Grid Engine knows the compute host by its full
    name (``compute.lab.example``, its canonical name; ``ignore_fqdn false``), while the node
    calls itself ``compute``. The ready line matches by the short name rule, the tunnel dials
    the scheduler's name from the login node (over the node hop too, checked against
    known_hosts under that name), and the server answers through it."""
    queues = lab.sge_command("qstat -f -q all.q").stdout
    assert f"all.q@{lab.COMPUTE_FQDN} " in queues, queues
    hub = hub_for("sge")
    events, _ = hub.spawn("alice", server)
    assert events[-1].get("ready"), events
    model = hub.api("GET", "/users/alice").json()["servers"][server]
    assert model["state"]["job_host"] == lab.COMPUTE_FQDN, model["state"]
    [job] = active_jobs("alice", "sge")
    assert f"all.q@{lab.COMPUTE_FQDN} " in job, job  # qstat's queue column: where it runs
    assert hub.api_server("GET", "alice", "/api/status", server).json()["started"]
    hub.stop("alice", server)
    assert wait_for(lambda: not active_jobs("alice", "sge"), 30)


@pytest.mark.parametrize("scheduler", ["slurm", "sge"])
def test_a_node_with_another_host_name_needs_the_schedulers_name_for_it(hub_for, scheduler):
    """The node calls itself ``node-a17``: on Slurm the job also says its NodeName
    (``SLURMD_NODENAME``), which matches; Grid Engine tells the job nothing of the kind, so
    the ready line is refused, saying what to do."""
    hub = hub_for(scheduler)
    events, _ = hub.spawn("alice", "other-host-name")
    if scheduler == "slurm":
        assert events[-1].get("ready"), events
        hub.stop("alice", "other-host-name")
    else:
        message = events[-1]["message"]
        assert events[-1].get("failed") and "on 'node-a17'" in message, events
        assert "tell an administrator" in message, message
    assert wait_for(lambda: not active_jobs("alice", scheduler), 30)
