"""hub_spawner/ssh.py against an asyncssh SSH/SFTP server in this process, on 127.0.0.1 only.

The server stands in for a login node's sshd (no sshd is reachable from unit tests): its
commands are a few fakes (``print N``, ``hang``...), its SFTP serves this machine's files in
``tmp_path``. What only OpenSSH's sftp-server does (blocking in ``open()`` on a FIFO) is
replaced by operations that never return.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import stat
import time
from pathlib import Path

import pytest

from hub_spawner.errors import ClusterUnreachable
from hub_spawner.ssh import (
    MAX_OUTPUT_BYTES,
    ConnectionPool,
    Frame,
    LoginConnection,
    SSHCommandError,
    SSHTarget,
    client_identity,
    within,
)
from hub_spawner.sshlib import asyncssh

RUNNING = {"now": 0, "most": 0}


#: What a noisy login shell (``echo`` in ``~/.bashrc``) prints before every command.
NOISE = {"stdout": b"", "stderr": b""}


async def fake_command(process: asyncssh.SSHServerProcess) -> None:
    """A login shell: it prints ``NOISE``, then runs the command. A framed command (every
    ``LoginConnection.run``) whose inner command is one of the fakes (``fake``) gets its
    markers here; any other command runs in this machine's ``/bin/sh``."""
    command = process.command or ""
    words = shlex.split(command) if command.startswith("exec sh -c ") else command.split()
    process.stdout.write(NOISE["stdout"])
    process.stderr.write(NOISE["stderr"])
    if words[:3] == ["exec", "sh", "-c"] and words[3:4] == [Frame._SCRIPT]:
        marker, inner = words[4].encode(), words[5]
        if inner.split()[:1] and inner.split()[0] in FAKES:
            process.stdout.write(marker + b"\n")
            process.stderr.write(marker + b"\n")
            status = await fake(process, inner.split())
            if status is not None:
                process.stdout.write(b"\n" + marker + b"\n")
                process.stderr.write(b"\n" + marker + b"\n")
                process.exit(status)
            return
    if words[:3] == ["exec", "sh", "-c"]:
        await run_locally(process)
    elif words[:1] == ["true"]:  # asyncssh's warm-up command, unframed
        process.exit(0)
    else:
        process.stderr.write(b"unknown command\n")
        process.exit(127)


FAKES = ("true", "print", "print-stderr", "forever", "hang", "slot", "cat")


async def fake(process: asyncssh.SSHServerProcess, words: list[str]) -> int | None:
    """``true``; ``print N`` / ``print-stderr N`` (N bytes); ``forever`` (prints without end);
    ``hang``; ``slot`` (counts the commands running at once); ``cat`` (stdin back, exit status
    3). Returns the exit status (None: the client closed the channel first)."""
    if words[0] == "true":
        return 0
    if words[0] in ("print", "print-stderr"):
        stream = process.stdout if words[0] == "print" else process.stderr
        left = int(words[1])
        while left > 0:
            chunk = min(left, 65536)
            stream.write(b"x" * chunk)
            await stream.drain()
            left -= chunk
        return 0
    if words[0] == "forever":
        try:
            while not process.is_closing():
                process.stdout.write(b"y" * 65536)
                await process.stdout.drain()
        except (OSError, asyncssh.Error):
            pass  # the client closed the channel: what we expect
        return None
    if words[0] == "hang":
        await asyncio.Event().wait()
    if words[0] == "slot":
        RUNNING["now"] += 1
        RUNNING["most"] = max(RUNNING["most"], RUNNING["now"])
        await asyncio.sleep(0.1)
        RUNNING["now"] -= 1
        return 0
    process.stdout.write(await process.stdin.read())  # cat
    return 3


async def run_locally(process: asyncssh.SSHServerProcess) -> None:
    """The command as this machine's ``/bin/sh`` runs it (the real ``sh`` and ``tail`` that a
    login node has), with the channel's stdin and stdout; as sshd, closes the stdin pipe when
    the client ends its stdin or the channel."""
    local = await asyncio.create_subprocess_shell(
        process.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )

    async def pump_out(source: asyncio.StreamReader, sink) -> None:
        try:
            while chunk := await source.read(65536):
                sink.write(chunk)
        except (OSError, asyncssh.Error):
            pass  # the client closed the channel

    async def pump_in() -> None:
        try:
            while chunk := await process.stdin.read(65536):
                local.stdin.write(chunk)
        except (OSError, asyncssh.Error):
            pass
        local.stdin.close()

    outputs = [asyncio.ensure_future(pump_out(local.stdout, process.stdout)),
               asyncio.ensure_future(pump_out(local.stderr, process.stderr))]
    feeding = asyncio.ensure_future(pump_in())
    try:
        status = await local.wait()
        await asyncio.gather(*outputs)  # all it printed, before the exit status
        process.exit(status)
    finally:
        for pump in [*outputs, feeding]:
            pump.cancel()


REFUSE = {"sessions": 0}


class SometimesFullServer(asyncssh.SSHServer):
    """Refuses the next ``REFUSE["sessions"]`` session opens, as sshd beyond MaxSessions."""

    def session_requested(self):
        if REFUSE["sessions"] > 0:
            REFUSE["sessions"] -= 1
            return False
        # What asyncssh makes itself when given process_factory (which skips this method).
        return asyncssh.SSHServerProcess(fake_command, asyncssh.SFTPServer, 3, False)


async def stand_in_server(tmp_path: Path, known_port: int = 0):
    """The stand-in SSH server on 127.0.0.1 (its sessions run fake_command, or SFTP), a
    client key it accepts (``tmp_path/key``) and a known_hosts file naming it on its port (or
    on ``known_port``: a relay in front of it). Returns (server, port, known_hosts, key)."""
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.listen(
        "127.0.0.1", 0,
        server_host_keys=[host_key],
        authorized_client_keys=asyncssh.import_authorized_keys(
            client_key.export_public_key().decode()),
        encoding=None,
        server_factory=SometimesFullServer,
    )
    port = server.sockets[0].getsockname()[1]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{known_port or port} "
                           f"{host_key.export_public_key().decode()}")
    key_path = tmp_path / "key"
    client_key.write_private_key(str(key_path))
    key_path.chmod(0o600)
    return server, port, known_hosts, key_path


@pytest.fixture
async def login(tmp_path):
    """A ``LoginConnection`` to the stand-in server; closed afterwards."""
    server, port, known_hosts, key_path = await stand_in_server(tmp_path)
    pool = ConnectionPool()
    target = SSHTarget("127.0.0.1", port, "alice", str(key_path), str(known_hosts),
                       connect_timeout=5)
    try:
        yield await pool.get(target)
    finally:
        pool.close_all()
        server.close()
        NOISE.update(stdout=b"", stderr=b"")


# --- commands: output and time are bounded -----------------------------------------------------

async def test_run_returns_exit_status_output_and_takes_stdin(login):
    result = await login.run("cat", stdin="ünï\n")
    assert (result.exit_status, result.stdout, result.stderr) == (3, "ünï\n", "")


async def test_what_a_noisy_login_shell_prints_is_not_the_commands_output(login):
    """A ``~/.bashrc`` that prints on stdout and stderr (issue 28): each command's own output
    is what it printed between its markers; the rest is ``noise``, for error messages."""
    NOISE.update(stdout=b"Welcome to the login node. Quota: 12% used.\n",
                 stderr=b"module: loaded gcc/12\n")
    result = await login.run("cat", stdin="82\n")
    assert (result.exit_status, result.stdout, result.stderr) == (3, "82\n", "")
    assert "Welcome" in result.noise and "gcc/12" in result.noise
    assert "Welcome to the login node" in result.around()
    # Real commands through this machine's sh, with output that does not end in a newline.
    result = await login.run("printf 812; printf 'oops\\n' >&2; exit 4")
    assert (result.exit_status, result.stdout, result.stderr) == (4, "812", "oops\n")
    # A banner without a newline of its own does not hide the command's first line.
    NOISE.update(stdout=b"no newline here", stderr=b"")
    result = await login.run("echo 812")
    assert result.stdout == "812\n" and result.noise == "no newline here"


async def test_a_quiet_login_shell_adds_nothing_around_the_output(login):
    result = await login.run("printf 'a\\n\\nb\\n\\n'")
    assert (result.stdout, result.stderr, result.noise) == ("a\n\nb\n\n", "", "")
    assert result.around() == ""


async def test_the_limit_is_the_commands_own_output_whatever_the_shell_prints(login):
    NOISE.update(stdout=b"x" * 60000 + b"\n", stderr=b"y" * 60000 + b"\n")
    result = await login.run(f"print {MAX_OUTPUT_BYTES}")
    assert result.exit_status == 0 and len(result.stdout) == MAX_OUTPUT_BYTES
    with pytest.raises(SSHCommandError, match="printed more than"):
        await login.run(f"print {MAX_OUTPUT_BYTES + 1}")


async def test_output_up_to_the_limit_is_read_whole(login):
    result = await login.run(f"print {MAX_OUTPUT_BYTES}")
    assert result.exit_status == 0 and len(result.stdout) == MAX_OUTPUT_BYTES


@pytest.mark.parametrize("command", [f"print {MAX_OUTPUT_BYTES + 1}",
                                     f"print-stderr {MAX_OUTPUT_BYTES + 1}", "forever"])
async def test_more_output_than_the_limit_stops_the_command(login, command):
    started = time.monotonic()
    with pytest.raises(SSHCommandError, match=r"printed more than 4 MiB; it was stopped"):
        await login.run(command, timeout=30)
    assert time.monotonic() - started < 10
    assert (await login.run("true")).exit_status == 0, "the connection stays usable"


async def test_the_limit_is_a_parameter(login):
    with pytest.raises(SSHCommandError, match="printed more than 1000 bytes"):
        await login.run("print 1001", max_output_bytes=1000)
    assert len((await login.run("print 1000", max_output_bytes=1000)).stdout) == 1000


async def test_a_command_that_hangs_times_out_and_is_closed(login):
    started = time.monotonic()
    with pytest.raises(SSHCommandError, match="'hang' on 127.0.0.1 did not finish within 0.5 s"):
        await login.run("hang", timeout=0.5)
    assert time.monotonic() - started < 3
    assert (await login.run("true")).exit_status == 0


# --- SFTP: exclusive creation, fresh directories, regular files only ----------------------------

async def test_private_file_is_created_0600(login, tmp_path):
    path = tmp_path / "server.env"
    await login.write_private_file(str(path), "TOKEN=x\n")
    assert path.read_text() == "TOKEN=x\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_an_existing_file_is_never_truncated_or_rewritten(login, tmp_path):
    path = tmp_path / "server.env"
    path.write_text("theirs")
    with pytest.raises(SSHCommandError, match="exists already and is not overwritten"):
        await login.write_private_file(str(path), "TOKEN=x\n")
    assert path.read_text() == "theirs"


@pytest.mark.parametrize("dangling", [False, True])
async def test_a_symlink_in_place_of_the_file_is_never_followed(login, tmp_path, dangling):
    target = tmp_path / "elsewhere"
    if not dangling:
        target.write_text("theirs")
    link = tmp_path / "server.env"
    link.symlink_to(target)
    with pytest.raises(SSHCommandError, match="exists already"):
        await login.write_private_file(str(link), "TOKEN=x\n")
    assert target.exists() is not dangling
    if not dangling:
        assert target.read_text() == "theirs"


async def test_a_new_private_dir_is_fresh_and_0700(login, tmp_path):
    path = tmp_path / "jupyterhub-alice-default-0a1b2c3d"
    entry = await login.make_new_private_dir(str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert (entry.name, entry.uid, entry.is_dir) == (path.name, os.getuid(), True)
    assert abs(entry.mtime - path.stat().st_mtime) < 2
    with pytest.raises(SSHCommandError, match="it is not reused"):
        await login.make_new_private_dir(str(path))


async def test_a_symlink_in_place_of_the_new_dir_is_refused(login, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(SSHCommandError, match="it is not reused"):
        await login.make_new_private_dir(str(tmp_path / "link"))


async def test_listing_tells_directories_files_and_links_apart(login, tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "dir")
    entries = {entry.name: entry for entry in await login.list_dir(str(tmp_path))}
    assert {"dir", "file", "link"} <= set(entries) and "." not in entries
    assert (entries["dir"].is_dir, entries["dir"].is_file) == (True, False)
    assert (entries["file"].is_dir, entries["file"].is_file) == (False, True)
    assert (entries["link"].is_dir, entries["link"].is_file) == (False, False)
    assert entries["file"].uid == os.getuid()


async def test_read_file_gives_the_tail_or_none(login, tmp_path):
    path = tmp_path / "job.out"
    path.write_text("a" * 100 + "HUB_SPAWNER_READY")
    assert await login.read_file(str(path), max_bytes=17) == "HUB_SPAWNER_READY"
    assert await login.read_file(str(tmp_path / "missing")) is None


async def test_a_fifo_in_place_of_the_output_file_is_not_opened(login, tmp_path):
    fifo = tmp_path / "job.out"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(SSHCommandError, match="not a regular file"):
        await login.read_file(str(fifo), timeout=5)
    assert time.monotonic() - started < 3


async def test_an_sftp_operation_that_never_returns_times_out_and_drops_the_connection(login):
    """Stand-in for sftp-server blocked in ``open()`` on a FIFO (the race after the regular-file
    check): the whole operation is bounded, and the stuck session goes with the connection."""
    started = time.monotonic()
    with pytest.raises(SSHCommandError, match="did not finish reading x within 0.5 s"):
        await login._sftp_call("reading x", lambda sftp: asyncio.Event().wait(), timeout=0.5)
    assert time.monotonic() - started < 3
    await asyncio.sleep(0.1)
    assert login.is_closed()


# --- within(): the bound itself ----------------------------------------------------------------

async def test_within_gives_the_result_in_time():
    async def quick():
        return 42

    assert await within(1, quick(), "slow") == 42


async def test_within_raises_at_the_timeout_for_a_stub_that_never_returns():
    """Stand-in for an SFTP request the server never answers."""
    called = []
    started = time.monotonic()
    with pytest.raises(SSHCommandError, match="^too slow$"):
        await within(0.2, asyncio.Event().wait(), "too slow", on_timeout=lambda: called.append(1))
    assert time.monotonic() - started < 1 and called == [1]


async def test_within_does_not_wait_for_a_cleanup_that_hangs():
    """``asyncio.wait_for`` would wait for this cancellation for ever (an ``async with`` whose
    exit talks to a server that does not answer)."""
    async def stubborn():
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.Event().wait()

    started = time.monotonic()
    with pytest.raises(SSHCommandError):
        await within(0.2, stubborn(), "too slow")
    assert time.monotonic() - started < 1


async def test_within_passes_errors_through():
    async def failing():
        raise SSHCommandError("lost")

    with pytest.raises(SSHCommandError, match="lost"):
        await within(1, failing(), "slow")


async def test_cancelling_the_caller_cancels_the_operation():
    cancelled = asyncio.Event()

    async def operation():
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    caller = asyncio.ensure_future(within(10, operation(), "slow"))
    await asyncio.sleep(0.05)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.wait_for(cancelled.wait(), 1)


# --- key files: refused when group or others can read them (as OpenSSH does) --------------------

def key_target(path) -> SSHTarget:
    return SSHTarget("127.0.0.1", 22, "alice", str(path), "/nonexistent/known_hosts")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o700 | 0o044])
def test_a_key_file_readable_by_group_or_others_is_refused_with_chmod_advice(tmp_path, mode):
    path = tmp_path / "alice"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(path))
    path.chmod(mode)
    with pytest.raises(ClusterUnreachable) as raised:
        client_identity(key_target(path))
    assert str(path) in str(raised.value)
    assert f"chmod 600 {path}" in str(raised.value)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_private_key_file_is_used(tmp_path, mode):
    path = tmp_path / "alice"
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(path))
    path.chmod(mode)
    loaded = client_identity(key_target(path))
    assert loaded.export_public_key() == key.export_public_key()


async def test_the_pool_refuses_a_loose_key_before_connecting(tmp_path):
    path = tmp_path / "alice"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(path))
    path.chmod(0o644)
    with pytest.raises(ClusterUnreachable, match="chmod 600"):
        await ConnectionPool().get(key_target(path))


# --- following a file as it grows ------------------------------------------------------------


def tails_of(path) -> list[int]:
    """PIDs of this machine's ``tail`` processes that follow ``path``."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                words = cmdline.read().split(b"\0")
        except OSError:
            continue
        if words[:1] == [b"tail"] and str(path).encode() in words:
            found.append(int(entry))
    return found


async def wait_until(condition, seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_follower_sees_a_file_that_appears_and_grows_without_a_round_trip(
    login, tmp_path
):
    path = tmp_path / "job dir" / "job.out"  # a space: the path is one quoted word
    path.parent.mkdir()
    follower = await login.follow_file(str(path))
    try:
        assert not await follower.wait(0.3) and follower.text == ""  # no file yet
        path.write_text("hub_spawner: job started\n")
        assert await follower.wait(5)
        await wait_until(lambda: "job started" in follower.text)
        started = time.monotonic()
        with path.open("a") as output:
            output.write('HUB_SPAWNER_READY {"host": "cn1", "port": 4000}\n')
        assert await follower.wait(5)
        await wait_until(lambda: "HUB_SPAWNER_READY" in follower.text)
        assert time.monotonic() - started < 0.5  # tail's 0.05 s poll, no status check
        assert login.busy == 1  # following holds the connection open
        assert tails_of(path), "expected the tail process on the 'login node'"
    finally:
        follower.close()
    assert follower.ended and login.busy == 0
    await wait_until(lambda: not tails_of(path))  # closing the channel ends the remote tail


async def test_a_follower_stops_at_its_limit_and_says_so(login, tmp_path):
    path = tmp_path / "job.out"
    path.write_bytes((b"z" * 99 + b"\n") * 50)
    follower = await login.follow_file(str(path), max_bytes=1000)
    try:
        await wait_until(lambda: follower.ended)
        assert 1000 < len(follower.text) <= 5000
        assert login.busy == 0
    finally:
        follower.close()
    await wait_until(lambda: not tails_of(path))


async def test_the_followers_of_a_connection_share_one_tail(login, tmp_path):
    """Each pending spawn follows its own job's output; one ``tail`` (one sshd session) serves
    all of them, started again when one is added or closed."""
    paths = [tmp_path / f"job{n}.out" for n in range(3)]
    followers = [await login.follow_file(str(path)) for path in paths]
    try:
        await wait_until(lambda: len(tails_of(paths[2])) == 1)
        assert tails_of(paths[0]) == tails_of(paths[2])  # the same process follows all three
        for number, path in enumerate(paths):
            path.write_text(f"job {number} started\n")
        for number, follower in enumerate(followers):
            await wait_until(lambda f=follower, n=number: f"job {n} started" in f.text)
            assert follower.text == f"job {number} started\n"  # only its own file's lines
        followers[0].close()
        with paths[1].open("a") as output:
            output.write("job 1 ready\n")
        await wait_until(lambda: "job 1 ready" in followers[1].text)
        assert followers[1].text == "job 1 started\njob 1 ready\n"  # re-read from the start
        await wait_until(lambda: not tails_of(paths[0]))
        assert len(tails_of(paths[1])) == 1 and login.busy == 1
    finally:
        for follower in followers:
            follower.close()
    await wait_until(lambda: not tails_of(paths[1]))
    assert login.busy == 0


@pytest.mark.parametrize("first_exists", [True, False])
async def test_the_last_file_to_appear_gets_its_own_lines(login, tmp_path, first_exists):
    """GNU tail prints no header for its last file when that one prints first: its lines must
    not go to another file's follower, nor be lost."""
    first, last = tmp_path / "a.out", tmp_path / "b.out"
    if first_exists:
        first.write_text("a started\n")
    followers = [await login.follow_file(str(path)) for path in (first, last)]
    try:
        if first_exists:
            await wait_until(lambda: followers[0].text == "a started\n")
        await asyncio.sleep(0.2)
        last.write_text('HUB_SPAWNER_READY {"host": "cn1", "port": 4000}\n')
        await wait_until(lambda: "HUB_SPAWNER_READY" in followers[1].text)
        assert followers[0].text == ("a started\n" if first_exists else "")
    finally:
        for follower in followers:
            follower.close()


async def test_a_line_cut_by_a_header_stays_incomplete_until_its_end(login, tmp_path):
    one, two = tmp_path / "one.out", tmp_path / "two.out"
    followers = [await login.follow_file(str(path)) for path in (one, two)]
    try:
        with one.open("w") as output:
            output.write("HUB_SPAWNER_READY {\"ho")
            output.flush()
            await asyncio.sleep(0.3)
            two.write_text("other\n")  # tail switches files in the middle of one's line
            await wait_until(lambda: followers[1].text == "other\n")
            assert followers[0].text == ""  # no half line
            output.write('st": "cn1", "port": 4000}\n')
        await wait_until(lambda: followers[0].text != "")
        assert followers[0].text == 'HUB_SPAWNER_READY {"host": "cn1", "port": 4000}\n'
    finally:
        for follower in followers:
            follower.close()


async def test_a_line_without_end_ends_its_follower_and_no_other(login, tmp_path):
    """A user appends megabytes with no newline to her job's output: the reader keeps at most
    ``FOLLOW_MAX_LINE_BYTES`` of it, her follower ends (its caller reads the file's tail
    instead), and another file's follower goes on."""
    flood, other = tmp_path / "flood.out", tmp_path / "other.out"
    followers = [await login.follow_file(str(path)) for path in (flood, other)]
    try:
        flood.write_bytes(b"started\n" + b"x" * (8 * 1024 * 1024))
        await wait_until(lambda: followers[0].ended, seconds=20)
        assert followers[0].text in ("", "started\n")  # never any of the long line
        reader = login._followers
        assert followers[0] not in reader._followers
        other.write_text('HUB_SPAWNER_READY {"host": "cn1", "port": 4000}\n')
        await wait_until(lambda: "HUB_SPAWNER_READY" in followers[1].text)
        assert not followers[1].ended
        await wait_until(lambda: tails_of(other) and not tails_of(flood))
    finally:
        for follower in followers:
            follower.close()


async def test_what_the_login_shell_prints_before_tail_is_no_files(login, tmp_path):
    """A banner without a final newline would glue itself to tail's first header: the
    follower's session prints its own marker first and everything before it is dropped."""
    NOISE.update(stdout=b"Welcome, no newline", stderr=b"module: loaded gcc/12\n")
    path = tmp_path / "job.out"
    path.write_text("first line\n")
    follower = await login.follow_file(str(path))
    try:
        await wait_until(lambda: follower.text == "first line\n")
        assert "Welcome" not in follower.text and not follower.ended
    finally:
        follower.close()


async def test_a_follow_cancelled_while_tail_starts_leaves_nothing(login, tmp_path):
    path = tmp_path / "job.out"
    task = asyncio.ensure_future(login.follow_file(str(path)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: login.busy == 0)
    await wait_until(lambda: not tails_of(path))


async def test_followers_removed_while_tail_starts_leave_the_right_tail(login, tmp_path):
    paths = [tmp_path / f"job{n}.out" for n in range(3)]
    followers = [await login.follow_file(str(path)) for path in paths[:2]]
    adding = asyncio.ensure_future(login.follow_file(str(paths[2])))
    await asyncio.sleep(0)
    followers[0].close()  # while the tail for all three starts
    followers.append(await adding)
    await wait_until(lambda: tails_of(paths[1]) and not tails_of(paths[0]))
    paths[2].write_text("three\n")
    await wait_until(lambda: followers[2].text == "three\n")
    assert followers[1].text == ""
    for follower in followers:
        follower.close()
    await wait_until(lambda: login.busy == 0 and not tails_of(paths[1]))


async def test_commands_wait_for_a_session_slot_beyond_max_sessions(login):
    """sshd refuses sessions beyond its MaxSessions: with 3, at most 2 commands run at once
    (one slot is kept for the followers); the others wait, and all complete."""
    connection = LoginConnection(login.target, login.connection, max_sessions=3)
    RUNNING.update(now=0, most=0)
    results = await asyncio.gather(*(connection.run("slot") for _ in range(8)))
    assert [result.exit_status for result in results] == [0] * 8
    assert RUNNING["most"] == 2


@pytest.mark.parametrize("operation", ["command", "sftp"])
async def test_a_session_sshd_refuses_for_a_moment_is_opened_again(login, tmp_path, operation):
    REFUSE["sessions"] = 3
    try:
        if operation == "command":
            assert (await login.run("true")).exit_status == 0
        else:
            (tmp_path / "f").write_text("x")
            assert await login.read_file(str(tmp_path / "f")) == "x"
        assert REFUSE["sessions"] == 0
    finally:
        REFUSE["sessions"] = 0


async def test_a_session_sshd_keeps_refusing_is_an_error_that_says_so(login):
    REFUSE["sessions"] = 100
    try:
        with pytest.raises(SSHCommandError, match="kept refusing a new session for 'true'.*"
                           "ssh_max_sessions no higher than the login node's MaxSessions"):
            await login.run("true")
    finally:
        REFUSE["sessions"] = 0


async def test_a_closed_connection_is_not_retried_as_a_full_one(login, tmp_path):
    login.connection.close()
    await login.connection.wait_closed()
    started = time.monotonic()
    with pytest.raises(SSHCommandError, match="Lost the SSH connection"):
        await login.run("true")
    with pytest.raises(SSHCommandError, match="Lost the SSH connection|SFTP on"):
        await login.read_file(str(tmp_path / "f"))
    assert time.monotonic() - started < 1.0


async def test_a_follower_that_cannot_start_is_ended_not_an_error(login):
    login.connection.close()
    await login.connection.wait_closed()
    follower = await login.follow_file("/nonexistent/job.out")
    assert follower.ended and follower.text == ""
    assert await follower.wait(0.1)  # wakes its waiter once, to read the file another way
    assert not await follower.wait(0.1)


# --- the pool: idle connections close ------------------------------------------------------------


async def test_an_idle_connection_is_closed_and_the_next_use_opens_a_new_one(login):
    pool = ConnectionPool(idle_timeout=0.4)
    try:
        first = await pool.get(login.target)
        for _ in range(6):  # in use: kept
            await asyncio.sleep(0.15)
            assert await pool.get(login.target) is first
        assert not first.is_closed()
        await asyncio.sleep(0.9)  # idle: closed
        assert first.is_closed() and pool.open_count() == 0
        second = await pool.get(login.target)
        assert second is not first
        assert (await second.run("true")).exit_status == 0
    finally:
        pool.close_all()


async def test_without_an_idle_timeout_connections_stay_open(login):
    pool = ConnectionPool()
    try:
        first = await pool.get(login.target)
        await asyncio.sleep(0.5)
        assert not first.is_closed() and pool.open_count() == 1
    finally:
        pool.close_all()


async def test_a_connection_in_use_is_not_closed_however_long_the_command_takes(login):
    pool = ConnectionPool(idle_timeout=0.3)
    try:
        connection = await pool.get(login.target)
        with pytest.raises(SSHCommandError) as raised:
            await connection.run("hang", timeout=1.5)  # five idle timeouts, busy throughout
        assert "within 1.5 s" in str(raised.value), raised.value
        assert (await connection.run("true")).exit_status == 0  # still the same, still open
    finally:
        pool.close_all()


# --- framing in the login shells sites use ---------------------------------------------------

@pytest.mark.parametrize("shell", ["sh", "bash", "dash", "tcsh", "csh"])
def test_a_framed_command_runs_as_itself_in_every_login_shell(shell):
    """sshd runs ``$SHELL -c COMMAND``: the framed line must mean the same in csh as in sh,
    with quotes, dollars, backslashes and globs in the command left alone."""
    import shutil
    import subprocess

    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed here")
    inner = ("printf '%s|' \"it's\" '$HOME' 'a;b' '\\\\' '*' \"$(echo 1)\"; "
             "echo to-stderr >&2; exit 7")
    frame = Frame()
    done = subprocess.run([shell, "-c", frame.wrap(inner)], capture_output=True, timeout=30)
    direct = subprocess.run(["sh", "-c", inner], capture_output=True, timeout=30)
    assert done.returncode == direct.returncode == 7
    assert frame.split(done.stdout) == (direct.stdout, b"")
    assert frame.split(done.stderr) == (direct.stderr, b"")
    assert direct.stdout == b"it's|$HOME|a;b|\\\\|*|1|"


def test_a_frame_tells_the_commands_output_from_the_shells():
    frame = Frame()
    marker = frame.marker
    assert frame.split(b"banner\n" + marker + b"\n812\n\n" + marker + b"\nbye\n") == (
        b"812\n", b"banner\nbye\n")
    assert frame.split(b"no frame at all") == (b"", b"no frame at all")  # never ran
    assert frame.split(marker + b"\ncut sh") == (b"cut sh", b"")  # cut short
    assert Frame().marker != marker
    with pytest.raises(ValueError):
        frame.wrap("echo one\necho two")


# --- several login nodes: the first that answers ---------------------------------------------

async def test_a_login_node_that_refuses_is_passed_over_for_the_next(tmp_path):
    """The target's own node (127.0.0.2: nothing listens there) refuses: the pool connects to
    its alternate, remembers the first as down (tried last for a while), and a cluster whose
    nodes all refuse is one error naming each."""
    server, port, known_hosts, key_path = await stand_in_server(tmp_path)
    pool = ConnectionPool()
    target = SSHTarget("127.0.0.2", port, "alice", str(key_path), str(known_hosts),
                       connect_timeout=5, alternates=("127.0.0.1",))
    try:
        connection = await pool.get(target)
        assert connection.target.host == "127.0.0.1"
        assert pool.is_down("127.0.0.2", port) and not pool.is_down("127.0.0.1", port)
        assert pool.order(target) == ["127.0.0.1", "127.0.0.2"]
        assert await pool.get(target) is connection  # kept, no new attempt
        nowhere = SSHTarget("127.0.0.3", port + 1, "alice", str(key_path), str(known_hosts),
                            connect_timeout=5, alternates=("127.0.0.4",))
        with pytest.raises(ClusterUnreachable, match="None of the cluster's 2 login nodes "
                           r"answers \(127.0.0.3, 127.0.0.4\)"):
            await pool.get(nowhere)
    finally:
        pool.close_all()
        server.close()


async def test_a_connection_sshd_cuts_before_the_handshake_is_tried_again(tmp_path):
    """A login node beyond its MaxStartups closes new connections before the SSH banner: the
    connection is tried again (after a short random pause), and succeeds when sshd lets it
    in; one that is always cut says so, naming MaxStartups."""
    cut = {"left": 2}

    async def relay(reader, writer):
        if cut["left"] > 0:  # as sshd beyond MaxStartups: closed before a word
            cut["left"] -= 1
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", ssh_port)

        async def pump(source, sink):
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    front = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = front.sockets[0].getsockname()[1]
    server, ssh_port, known_hosts, key_path = await stand_in_server(tmp_path, known_port=port)
    pool = ConnectionPool()
    target = SSHTarget("127.0.0.1", port, "alice", str(key_path), str(known_hosts),
                       connect_timeout=5)
    try:
        connection = await pool.get(target)
        assert cut["left"] == 0 and not connection.is_closed()
        pool.close_all()
        cut["left"] = 100
        with pytest.raises(ClusterUnreachable, match="closed the connection before the SSH "
                           "handshake.*MaxStartups"):
            await pool.get(target)
        assert cut["left"] == 100 - 4  # HANDSHAKE_TRIES
    finally:
        pool.close_all()
        front.close()
        server.close()
