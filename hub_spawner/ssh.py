"""SSH to the login node: one kept connection per (login host, cluster user), with strict host keys.

Requirements:
- one live connection per target, shared by commands, SFTP and tunnels, re-made when it dies;
  never a new connection per command (each costs ~0.15 CPU-s on the login node);
- host keys are checked against the configured known_hosts file only; an unknown or changed key
  is a ``ClusterUnreachable`` error that says so, never silently accepted;
- AES-GCM is preferred (half the CPU of chacha20 on AES-NI machines), compression is off, and
  every new connection runs one trivial command (OpenSSH < 10.1 sets TCP_NODELAY only when a
  session starts: without it forwarded traffic sees ~44 ms delayed-ACK stalls);
- secrets travel only as file contents over SFTP, in files created exclusively (never an
  existing file, never through a symbolic link) with mode 0600 before any byte of content;
  commands and their standard input are free of secrets (callers' duty) and are only ever
  logged at debug level;
- nothing the cluster does can hold the hub for ever or fill its memory: a command is bounded
  by its timeout and by ``MAX_OUTPUT_BYTES`` of stdout and of stderr (read in chunks; beyond
  it the channel is closed), an SFTP operation by its timeout as a whole, and only regular
  files are read (a FIFO in place of a job's output is refused, not opened);
- a cluster with several login nodes (``SSHTarget.alternates``) is reached through the first
  that answers: a node whose connection attempt was refused or timed out is passed over for
  ``LOGIN_DOWN_SECONDS`` (while another answers) and the pool's connections to it are closed,
  so every user's next command goes to another node;
- whatever the user's login shell prints around a command (a banner in ``~/.bashrc``, quota
  lines, ``module`` chatter, on stdout or stderr) is never parsed: each command runs between
  markers of its own (``Frame``) and only what it printed between them is its output.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import posixpath
import random
import secrets
import shlex
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from . import identity
from .errors import ClusterUnreachable
from .jobfiles import RemoteEntry
from .schedulers import MAX_OUTPUT_BYTES, CommandOutput
from .sshlib import asyncssh

log = logging.getLogger(__name__)

#: Seconds a whole SFTP operation (session start, the operation, session end) may take.
SFTP_TIMEOUT = 30.0
_READ_CHUNK_BYTES = 64 * 1024
_Result = TypeVar("_Result")
#: OpenSSH's default ``MaxSessions``: sessions (commands, SFTP) open at once per connection.
DEFAULT_MAX_SESSIONS = 10
#: What a ``FileFollower`` keeps of a file: the head of a job's output, where its ready line is.
FOLLOW_MAX_BYTES = 256 * 1024
#: The longest line the followers' reader keeps while it waits for the line's end. The user owns
#: her job's output: a file that grows without a newline must not grow a buffer in the hub.
FOLLOW_MAX_LINE_BYTES = 64 * 1024
#: How long a login node that did not answer is passed over, when the cluster has others.
LOGIN_DOWN_SECONDS = 60.0
#: New connections the pool opens to one login node at once: with the tunnel service's own
#: (``MASTER_STARTS_PER_HOST``) at most 10, sshd's default ``MaxStartups`` start.
HANDSHAKES_PER_HOST = 4

ENCRYPTION_PREFERENCE = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)


@dataclass(frozen=True)
class SSHTarget:
    """Who connects where: the pool's key."""

    host: str
    port: int
    username: str
    key_path: str
    known_hosts_path: str
    connect_timeout: float = 15.0
    keepalive_interval: float = 30.0
    #: Certificate mode: the CA key that signs an ephemeral key per connection (``key_path``
    #: is then unused), the certificate's validity and its key id.
    ca_key_path: str = ""
    certificate_minutes: float = 10.0
    key_id: str = ""
    #: auth_state mode: the key (and certificate) the authenticator handed over, as text.
    key_text: str = field(default="", repr=False)
    certificate_text: str = field(default="", repr=False)
    #: The cluster's other login nodes (same port, scheduler and homes), tried in order when
    #: ``host`` does not answer.
    alternates: tuple[str, ...] = ()
    #: The site's bastion (jump host): the connection to ``host`` is tunneled through a
    #: connection to it (as strict: its host key in the same known_hosts file).
    jump: SSHTarget | None = None

    def describe(self) -> str:
        via = f" via {self.jump.describe()}" if self.jump is not None else ""
        return f"{self.username}@{self.host}:{self.port}{via}"

    def at(self, host: str) -> SSHTarget:
        """This target on login node ``host`` alone."""
        return dataclasses.replace(self, host=host, alternates=())


#: Room for what the login shell prints around a command, beyond the command's own limit.
_FRAME_ALLOWANCE = 64 * 1024


class Frame:
    """One command between markers of its own, so that what the login shell prints around it
    is told apart from what it printed. The login shell (any: sh, bash, csh) runs one line,
    ``exec sh -c SCRIPT MARKER COMMAND``; SCRIPT prints MARKER on stdout and on stderr, runs
    COMMAND with ``eval``, prints a newline and MARKER on both again and exits with COMMAND's
    status. The marker is random per call, so no output can fake it by chance."""

    _SCRIPT = (
        'printf "%s\\n" "$0"; printf "%s\\n" "$0" >&2; eval "$1"; s=$?; '
        'printf "\\n%s\\n" "$0"; printf "\\n%s\\n" "$0" >&2; exit "$s"'
    )

    def __init__(self) -> None:
        self.marker = f"hub-spawner-frame-{secrets.token_hex(8)}".encode()

    def wrap(self, command: str) -> str:
        if "\n" in command:  # csh cannot take a newline inside quotes
            raise ValueError("a command to frame must be one line")
        return (f"exec sh -c {shlex.quote(self._SCRIPT)} {self.marker.decode()} "
                f"{shlex.quote(command)}")

    def split(self, raw: bytes) -> tuple[bytes, bytes]:
        """``(inside, outside)``: what the command printed, and what came before and after
        it. Without the first marker (the command never ran) all of it is outside; without
        the last (it was cut short) everything after the first marker is inside."""
        start = raw.find(self.marker + b"\n")
        if start < 0:
            return b"", raw
        body = start + len(self.marker) + 1
        end = raw.rfind(b"\n" + self.marker + b"\n")
        if end < body:
            return raw[body:], raw[:start]
        return raw[body:end], raw[:start] + raw[end + len(self.marker) + 2:]


class LoginNodeDown(ClusterUnreachable):
    """The login node did not answer (refused, timed out, unreachable): another may."""


class HandshakeCut(ClusterUnreachable):
    """sshd closed the connection before the SSH handshake (beyond its ``MaxStartups``)."""


class LoginRefused(ClusterUnreachable):
    """The host answered and refused this user's key or certificate, or there is none."""


class SSHCommandError(ClusterUnreachable):
    """A command could not be run to completion (connection lost, timeout, too much output)."""


class LoginConnection:
    """One live SSH connection to a login node, as one cluster user.

    Every operation is bounded: a command by its ``timeout`` and ``max_output_bytes`` (each of
    stdout and stderr), an SFTP operation by its ``timeout`` as a whole, however the other side
    behaves (a FIFO in place of a file, a command that prints forever, a hung sftp-server).
    """

    def __init__(
        self,
        target: SSHTarget,
        connection: asyncssh.SSHClientConnection,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
    ) -> None:
        self.target = target
        self.connection = connection
        # sshd refuses sessions (commands, SFTP) beyond its MaxSessions per connection: many
        # spawns of one user at once wait for a slot instead. One is kept for the followers.
        self._sessions = asyncio.Semaphore(max(1, max_sessions - 1))
        self._home: str | None = None
        self._followers: _Followers | None = None
        self.busy = 0  # operations running now (the pool never closes a busy connection)
        self.last_used = time.monotonic()

    @contextlib.contextmanager
    def _in_use(self) -> Iterator[None]:
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1
            self.last_used = time.monotonic()

    def is_closed(self) -> bool:
        return self.connection.is_closed()

    async def run(
        self,
        command: str,
        stdin: str | None = None,
        timeout: float = 60,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
    ) -> CommandOutput:
        """Run ``command``; see ``_run``."""
        with self._in_use():
            return await self._run(command, stdin, timeout, max_output_bytes)

    async def _run(
        self,
        command: str,
        stdin: str | None,
        timeout: float,
        max_output_bytes: int,
    ) -> CommandOutput:
        """Run ``command`` in the user's login shell; return its exit status and output
        (decoded as UTF-8, undecodable bytes replaced).

        Raises ``SSHCommandError`` when the command could not complete: the connection was
        lost, it did not finish within ``timeout`` seconds, or it printed more than
        ``max_output_bytes`` on stdout or on stderr (its channel is then closed at once). A
        non-zero exit status is *not* an error here: the caller reads it.
        """
        log.debug("ssh %s: %s", self.target.describe(), command)
        name = _command_name(command)
        frame = Frame()
        raw_limit = max_output_bytes + _FRAME_ALLOWANCE
        process: asyncssh.SSHClientProcess | None = None

        def close_process() -> None:
            if process is not None:
                process.close()

        async def run_to_end() -> CommandOutput:
            async with self._sessions:
                return await _retry_refused_session(run_in_session, self.connection.is_closed)

        async def run_in_session() -> CommandOutput:
            nonlocal process
            process = await self.connection.create_process(frame.wrap(command), encoding=None)
            if stdin is not None:
                process.stdin.write(stdin.encode())
            process.stdin.write_eof()
            readers = [
                asyncio.ensure_future(_read_at_most(process.stdout, raw_limit)),
                asyncio.ensure_future(_read_at_most(process.stderr, raw_limit)),
            ]
            try:
                stdout, stderr = await asyncio.gather(*readers)
            finally:
                for reader in readers:
                    reader.cancel()
            await process.wait_closed()
            exit_status = process.exit_status if process.exit_status is not None else -1
            (stdout, noise_out), (stderr, noise_err) = frame.split(stdout), frame.split(stderr)
            if max(len(stdout), len(stderr)) > max_output_bytes:
                raise _TooMuchOutput()
            return CommandOutput(
                exit_status,
                _text(stdout),
                _text(stderr),
                _text(noise_out + noise_err),
            )

        try:
            return await within(
                timeout,
                run_to_end(),
                f"The command {name!r} on {self.target.host} did not finish within "
                f"{timeout:g} s.",
                on_timeout=close_process,
            )
        except _TooMuchOutput:
            close_process()
            raise SSHCommandError(
                f"The command {name!r} on {self.target.host} printed more than "
                f"{_size(max_output_bytes)}; it was stopped and its output ignored. No "
                "scheduler answer is that long: check the login shell's start-up files "
                f"(~/.bashrc, ~/.profile of {self.target.username}) for commands that print, "
                "or tell an administrator."
            ) from None
        except asyncssh.ChannelOpenError as error:
            if not self.connection.is_closed():
                raise SSHCommandError(_refused(self.target.host, name, error)) from None
            raise SSHCommandError(
                f"Lost the SSH connection to {self.target.host} while running {name!r}: {error}"
            ) from None
        except (asyncssh.Error, OSError) as error:
            close_process()
            raise SSHCommandError(
                f"Lost the SSH connection to {self.target.host} while running {name!r}: {error}"
            ) from None

    async def home(self, timeout: float = SFTP_TIMEOUT) -> str:
        """The user's home directory on the cluster (absolute path)."""
        if self._home is None:
            self._home = await self._sftp_call("finding the home directory", _realpath, timeout)
        return self._home

    async def make_private_dir(self, path: str, timeout: float = SFTP_TIMEOUT) -> None:
        """Create ``path`` (and parents) if it is missing and make it mode 0700."""

        async def make(sftp: asyncssh.SFTPClient) -> None:
            await sftp.makedirs(path, exist_ok=True)
            await sftp.chmod(path, 0o700)

        await self._sftp_call(f"creating {path}", make, timeout)

    async def make_new_private_dir(self, path: str, timeout: float = SFTP_TIMEOUT) -> RemoteEntry:
        """Create the directory ``path``, which must not exist yet (nor be a symbolic link),
        with mode 0700; return its listing entry (owner, time on the cluster's clock)."""

        async def make(sftp: asyncssh.SFTPClient) -> RemoteEntry:
            try:
                await sftp.mkdir(path, asyncssh.SFTPAttrs(permissions=0o700))
            except asyncssh.SFTPError as error:
                raise SSHCommandError(
                    f"Cannot create the new directory {path} on {self.target.host}: "
                    f"{error.reason}. If it exists already, something else made it: it is not "
                    "reused. Try again; if it persists, tell an administrator."
                ) from None
            await sftp.chmod(path, 0o700)
            return _entry(posixpath.basename(path), await sftp.lstat(path))

        return await self._sftp_call(f"creating {path}", make, timeout)

    async def list_dir(self, path: str, timeout: float = SFTP_TIMEOUT) -> list[RemoteEntry]:
        """The entries of directory ``path`` (without ``.`` and ``..``), not following links."""

        async def listing(sftp: asyncssh.SFTPClient) -> list[RemoteEntry]:
            names = await sftp.readdir(path)
            return [
                _entry(str(name.filename), name.attrs)
                for name in names
                if name.filename not in (".", "..", b".", b"..")
            ]

        return await self._sftp_call(f"listing {path}", listing, timeout)

    async def write_private_file(
        self, path: str, content: str, timeout: float = SFTP_TIMEOUT
    ) -> None:
        """Create ``path`` with mode 0600 and write ``content``.

        The file is created exclusively (``O_CREAT | O_EXCL``): an existing file is never
        truncated or rewritten, and a symbolic link in its place (even a dangling one) is never
        followed; either is an ``SSHCommandError``. The mode is given at creation and set again
        before the first byte of content.
        """

        async def write(sftp: asyncssh.SFTPClient) -> None:
            attrs = asyncssh.SFTPAttrs(permissions=0o600)
            try:
                remote_file = await sftp.open(path, "x", attrs=attrs)
            except asyncssh.SFTPError as error:
                raise SSHCommandError(
                    f"Cannot create {path} on {self.target.host}: {error.reason}. A file (or a "
                    "link) of that name exists already and is not overwritten. Try again; if it "
                    "persists, tell an administrator."
                ) from None
            async with remote_file:
                await remote_file.chmod(0o600)
                await remote_file.write(content)

        await self._sftp_call(f"writing {path}", write, timeout)

    async def read_file(
        self, path: str, max_bytes: int = 256 * 1024, timeout: float = SFTP_TIMEOUT
    ) -> str | None:
        """The last ``max_bytes`` of a regular file, or ``None`` if it does not exist (yet).

        Anything but a regular file (a FIFO, a device, a directory) is an ``SSHCommandError``
        and is never opened; the whole read is bounded by ``timeout``.
        """

        async def read(sftp: asyncssh.SFTPClient) -> bytes | None:
            try:
                attrs = await sftp.stat(path)
                if not _is_regular(attrs):
                    raise SSHCommandError(
                        f"{path} on {self.target.host} is not a regular file; not reading it."
                    )
                async with sftp.open(path, "rb") as remote_file:
                    size = (await remote_file.stat()).size or 0
                    if size > max_bytes:
                        await remote_file.seek(size - max_bytes)
                    return await remote_file.read(max_bytes)
            except asyncssh.SFTPNoSuchFile:
                return None

        data = await self._sftp_call(f"reading {path}", read, timeout)
        return None if data is None else data.decode("utf-8", errors="replace")

    async def _sftp_call(
        self,
        what: str,
        operation: Callable[[asyncssh.SFTPClient], Awaitable[_Result]],
        timeout: float,
    ) -> _Result:
        """Run ``operation`` in an SFTP session of its own, all of it (session start, the
        operation, session end) within ``timeout`` seconds; failures become
        ``SSHCommandError``.

        On a timeout the connection is closed (the pool makes a new one next time): asyncssh
        has no call that closes one SFTP session without waiting for the server, and a server
        stuck in ``open()`` on a FIFO would never answer.
        """

        async def sftp_session() -> _Result:
            async with self.connection.start_sftp_client() as sftp:
                return await operation(sftp)

        async def session() -> _Result:
            try:
                return await _retry_refused_session(sftp_session, self.connection.is_closed)
            except asyncssh.ChannelOpenError as error:
                if self.connection.is_closed():
                    raise SSHCommandError(
                        f"Lost the SSH connection to {self.target.host} while {what}."
                    ) from None
                raise SSHCommandError(_refused(self.target.host, "SFTP", error)) from None
            except (asyncssh.Error, OSError) as error:
                raise SSHCommandError(
                    f"SFTP on {self.target.host} failed while {what}: {error}"
                ) from None

        with self._in_use():
            # Waiting for a free session is bounded on its own: a timeout there is no reason
            # to close the connection (and every command on it), as a stuck SFTP server is.
            try:
                await asyncio.wait_for(self._sessions.acquire(), timeout)
            except asyncio.TimeoutError:
                raise SSHCommandError(
                    f"No SSH session to {self.target.host} became free for {what} within "
                    f"{timeout:g} s (ssh_max_sessions are all busy). Try again; if it "
                    "persists, tell an administrator."
                ) from None
            try:
                return await within(
                    timeout,
                    session(),
                    f"SFTP on {self.target.host} did not finish {what} within {timeout:g} s; "
                    "the connection was closed. Try again; if it persists, tell an "
                    "administrator.",
                    on_timeout=self.connection.close,
                )
            finally:
                self._sessions.release()

    async def open_session(self, command: str) -> asyncssh.SSHClientProcess:
        """A long-lived session running ``command`` (the followers' ``tail``), in the one
        session slot kept for it; the caller closes it."""
        try:
            return await within(
                SFTP_TIMEOUT,
                self.connection.create_process(command, encoding=None),
                f"Could not start {_command_name(command)!r} on {self.target.host} in time.",
            )
        except (asyncssh.Error, OSError) as error:
            raise SSHCommandError(
                f"Cannot start a session on {self.target.host}: {error}"
            ) from None

    async def follow_file(self, path: str, max_bytes: int = FOLLOW_MAX_BYTES) -> FileFollower:
        """Follow ``path`` as it grows (whether or not it exists yet); see ``FileFollower``.
        All the files followed on this connection share one ``tail`` (one SSH session)."""
        if self._followers is None:
            self._followers = _Followers(self)
        return await self._followers.add(path, max_bytes)

    def close(self) -> None:
        self.connection.close()


#: The remote side of the followers: ``tail -F`` of every followed file in the background,
#: killed as soon as the channel's stdin ends (a closed channel does not end a silent ``tail``
#: by itself). It first prints its marker (``$0``, random per session) on a line of its own:
#: what the login shell printed before it is not a file's. ``-v``: each file's output comes
#: after a ``==> PATH <==`` header; ``/dev/null`` last, because tail prints no header for its
#: last file when that is the first to print. It waits for a file to appear, and then polls it
#: every 0.05 s: GNU tail uses inotify only for files that exist when it starts (a job's output
#: does not yet), and never on NFS; a poll is a ``stat`` per file. Run through ``sh -c`` so
#: that it works in any login shell (csh too); the paths are its arguments.
_FOLLOW_SCRIPT = (
    'printf "\\n%s\\n" "$0"; '
    'tail -v -F -n +1 -s 0.05 -- "$@" /dev/null 2>/dev/null & t=$!; read -r _; '
    'kill "$t" 2>/dev/null'
)


class FileFollower:
    """One followed file's text as it grows, without a round trip per look: ``changed`` is set
    each time more arrives (``wait`` clears it). Best effort: when ``tail`` is missing, the
    channel dies or the file grows past ``max_bytes``, it stops (``ended``), and callers fall
    back to reading the file. The connection counts as busy while it follows (no idle close)."""

    def __init__(self, owner: _Followers, path: str, max_bytes: int) -> None:
        self._owner = owner
        self.path = path
        self.max_bytes = max_bytes
        self.changed = asyncio.Event()
        self.ended = False
        self._data = bytearray()

    @property
    def text(self) -> str:
        """The file's complete lines so far (UTF-8, undecodable bytes replaced)."""
        return self._data[: self._data.rfind(b"\n") + 1].decode("utf-8", errors="replace")

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for more text; ``True`` if some arrived."""
        if self.ended and not self.changed.is_set():
            await asyncio.sleep(timeout)
            return False
        try:
            await asyncio.wait_for(self.changed.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        self.changed.clear()
        return True

    def close(self) -> None:
        """Stop following this file; idempotent."""
        self._owner.remove(self)
        self._end()

    def _append(self, data: bytes) -> None:
        if self.ended:
            return
        self._data += data
        self.changed.set()
        if len(self._data) > self.max_bytes:
            self.close()

    def _unterminate(self) -> None:
        """The last line was not complete: tail ended it only to print a header."""
        if self._data.endswith(b"\n"):
            del self._data[-1]

    def _restart(self) -> None:
        """The shared ``tail`` starts again from the files' first lines."""
        self._data.clear()

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self.changed.set()  # a waiter looks again, and then reads the file itself


class _Followers:
    """The followed files of one connection and the one remote ``tail`` that follows them all,
    re-started (from the files' first lines) whenever the set of files changes. Restarts run
    one at a time, and each follows the set as it is when its ``tail`` has started."""

    def __init__(self, connection: LoginConnection) -> None:
        self._connection = connection
        self._followers: list[FileFollower] = []
        self._process: asyncssh.SSHClientProcess | None = None
        self._paths: list[str] = []  # what the running tail follows
        self._reader: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._closing: list[asyncssh.SSHClientProcess] = []
        self._restarts: set[asyncio.Task] = set()

    async def add(self, path: str, max_bytes: int) -> FileFollower:
        follower = FileFollower(self, path, max_bytes)
        self._followers.append(follower)
        try:
            await self._restart()
        except BaseException:  # cancelled: nobody else could close it
            follower.close()
            raise
        return follower

    def remove(self, follower: FileFollower) -> None:
        if follower not in self._followers:
            return
        self._followers.remove(follower)
        if not self._followers:
            self._stop()  # the last one: its session ends now
        else:
            task = asyncio.ensure_future(self._restart())
            self._restarts.add(task)
            task.add_done_callback(self._restarts.discard)

    def _wanted(self) -> list[str]:
        return sorted({f.path for f in self._followers})

    async def _restart(self) -> None:
        async with self._lock:
            while self._wanted() != (self._paths if self._process is not None else None):
                if not await self._start_tail(self._wanted()):
                    return

    async def _start_tail(self, paths: list[str]) -> bool:
        """Replace the running tail by one of ``paths``; False if it cannot start (then every
        follower is ended, and falls back to reading its file)."""
        self._stop()
        # sshd counts a session until its channel has closed: the old tail's must be gone
        # before the new one opens, or the two could pass MaxSessions together.
        while self._closing:
            with contextlib.suppress(asyncio.TimeoutError, asyncssh.Error, OSError):
                await asyncio.wait_for(self._closing.pop().wait_closed(), 5)
        if not paths:
            return False
        marker = f"hub-spawner-follow-{secrets.token_hex(8)}"
        command = f"exec sh -c {shlex.quote(_FOLLOW_SCRIPT)} {marker} " + " ".join(
            shlex.quote(path) for path in paths
        )
        log.debug("ssh %s: %s", self._connection.target.describe(), command)
        try:
            process = await self._connection.open_session(command)
        except (asyncssh.Error, OSError, SSHCommandError) as error:
            log.debug("cannot follow %s: %s", ", ".join(paths), error)
            for follower in list(self._followers):
                follower.close()
            return False
        for follower in self._followers:
            follower._restart()
        self._process, self._paths = process, paths
        self._connection.busy += 1
        self._reader = asyncio.ensure_future(self._read(process, paths, marker.encode()))
        return True

    async def _read(self, process: asyncssh.SSHClientProcess, paths: list[str],
                    marker: bytes) -> None:
        headers = {f"==> {path} <==".encode(): path for path in [*paths, "/dev/null"]}
        current = ""
        pending = b""
        started = False  # the marker came: what the login shell printed before it is done
        skipping = False  # the rest of a line longer than FOLLOW_MAX_LINE_BYTES
        blank = False  # an empty line: tail's own before a header, or the file's
        ended_line = ""  # the file whose line the last one ended (a header may take it back)
        try:
            while chunk := await process.stdout.read(_READ_CHUNK_BYTES):
                if skipping:
                    end = chunk.find(b"\n")
                    if end < 0:
                        continue
                    chunk, skipping = chunk[end + 1:], False
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    if not started:
                        started = line.endswith(marker)
                        continue
                    if line in headers:
                        if ended_line and not blank:  # tail ended a partial line for this
                            self._unterminate(ended_line)
                        current, blank, ended_line = headers[line], False, ""
                        continue
                    if blank:
                        self._deliver(current, b"\n")  # the file's own empty line
                    blank = not line
                    if line:
                        self._deliver(current, line + b"\n")
                    ended_line = current if line else ""
                if len(pending) > FOLLOW_MAX_LINE_BYTES:
                    # No line we look for is this long: the file's followers stop (their
                    # callers read the file's tail instead, bounded) and the line is skipped.
                    log.debug("a line of %s is over %d bytes; no longer following it",
                              current, FOLLOW_MAX_LINE_BYTES)
                    self._give_up(current)
                    pending, skipping, blank, ended_line = b"", True, False, ""
        except (asyncssh.Error, OSError) as error:
            log.debug("stopped following: %s", error)
        if process is self._process:  # it ended by itself (no tail?): followers fall back
            self._stop()
            for follower in list(self._followers):
                follower.close()

    def _deliver(self, path: str, data: bytes) -> None:
        for follower in list(self._followers):
            if follower.path == path:
                follower._append(data)

    def _give_up(self, path: str) -> None:
        for follower in list(self._followers):
            if follower.path == path:
                follower.close()

    def _unterminate(self, path: str) -> None:
        for follower in self._followers:
            if follower.path == path:
                follower._unterminate()

    def _stop(self) -> None:
        if self._process is not None:
            process, self._process, self._paths = self._process, None, []
            self._connection.busy -= 1
            self._connection.last_used = time.monotonic()
            with contextlib.suppress(asyncssh.Error, OSError):
                process.stdin.write_eof()
            process.close()
            self._closing.append(process)
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
        self._reader = None


async def within(
    timeout: float,
    operation: Awaitable[_Result],
    message: str,
    on_timeout: Callable[[], object] | None = None,
) -> _Result:
    """The result of ``operation``, awaited for at most ``timeout`` seconds, and never longer.

    On a timeout, ``on_timeout()`` is called (it should make the operation's pending I/O fail:
    close its channel or connection), the operation is cancelled *and not waited for* (unlike
    ``asyncio.wait_for``, whose wait for the cancellation can itself hang when the cleanup
    talks to an unresponsive server), and ``SSHCommandError(message)`` is raised. When the
    caller is cancelled, the operation is cancelled too.
    """
    task = asyncio.ensure_future(operation)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task in done:
        return task.result()
    if on_timeout is not None:
        on_timeout()
    task.cancel()
    task.add_done_callback(_forget)
    raise SSHCommandError(message)


async def _retry_refused_session(
    open_and_use: Callable[[], Awaitable[_Result]], is_closed: Callable[[], bool], tries: int = 6
) -> _Result:
    """``open_and_use()``, tried again (after 0.1, 0.2, 0.4... s) while sshd refuses to open its
    session: it does so beyond its MaxSessions, which may be lower than ``ssh_max_sessions``
    says, or while a session that ended has not yet closed on its side. Not once the
    connection is closed (``is_closed()``). The caller's timeout bounds it all."""
    for attempt in range(tries):
        try:
            return await open_and_use()
        except asyncssh.ChannelOpenError as error:
            if attempt == tries - 1 or is_closed():
                raise
            log.debug("sshd refused a session (%s); trying again", error.reason)
            await asyncio.sleep(0.1 * 2**attempt)
    raise AssertionError("unreachable")


def _refused(host: str, what: str, error: asyncssh.ChannelOpenError) -> str:
    return (
        f"sshd on {host} kept refusing a new session for {what!r} ({error.reason}). It allows "
        "MaxSessions at once per connection (10 by default): tell an administrator to set "
        "ssh_max_sessions no higher than the login node's MaxSessions."
    )


class _TooMuchOutput(Exception):
    """A command's stdout or stderr went over the limit."""


async def _read_at_most(stream: asyncssh.SSHReader, limit: int) -> bytes:
    """All of ``stream`` in chunks, or ``_TooMuchOutput`` as soon as it exceeds ``limit``."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = await stream.read(_READ_CHUNK_BYTES)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise _TooMuchOutput()
        chunks.append(chunk)


async def _realpath(sftp: asyncssh.SFTPClient) -> str:
    return str(await sftp.realpath("."))


def _entry(name: str, attrs: asyncssh.SFTPAttrs) -> RemoteEntry:
    mode = attrs.permissions or 0
    return RemoteEntry(
        name=name,
        mtime=float(attrs.mtime or 0),
        uid=attrs.uid,
        is_dir=attrs.permissions is not None and stat.S_ISDIR(mode),
        is_file=attrs.permissions is not None and stat.S_ISREG(mode),
    )


def _is_regular(attrs: asyncssh.SFTPAttrs) -> bool:
    if attrs.permissions is not None:
        return stat.S_ISREG(attrs.permissions)
    return attrs.type == asyncssh.FILEXFER_TYPE_REGULAR


def _forget(task: asyncio.Future) -> None:
    """Retrieve an abandoned task's outcome, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _command_name(command: str) -> str:
    words = command.split()
    return words[0] if words else command


def _size(count: int) -> str:
    return f"{count / (1024 * 1024):g} MiB" if count >= 1024 * 1024 else f"{count} bytes"


class ConnectionPool:
    """Keeps one ``LoginConnection`` per ``SSHTarget``; re-connects when one has died, and
    closes one that nobody asked for in ``idle_timeout`` seconds (0: never), so a login node
    holds no sshd for users whose servers need nothing from it."""

    def __init__(self, idle_timeout: float = 0, max_sessions: int = DEFAULT_MAX_SESSIONS) -> None:
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self._connections: dict[SSHTarget, LoginConnection] = {}
        self._locks: dict[SSHTarget, asyncio.Lock] = {}
        self._last_used: dict[SSHTarget, float] = {}
        self._reaper: asyncio.Task | None = None
        self._down_until: dict[tuple[str, int], float] = {}  # (host, port) -> monotonic
        self._handshakes: dict[tuple[str, int], asyncio.Semaphore] = {}

    async def get(self, target: SSHTarget) -> LoginConnection:
        """A live connection for ``target`` (on its host, or, when that does not answer, on
        the first of its alternates that does); raises ``ClusterUnreachable`` with the
        reason. The connection's own ``target`` says which node it reached."""
        if not target.alternates:
            return await self._get(target)
        hosts = self.order(target)
        for host in hosts:  # a connection open to a node that answers serves as it is
            existing = self._connections.get(target.at(host))
            if existing is not None and not existing.is_closed() and not self.is_down(
                    host, target.port):
                self._last_used[target.at(host)] = time.monotonic()
                return existing
        errors = []
        for number, host in enumerate(hosts, 1):
            try:
                return await self._get(target.at(host), pass_over=number < len(hosts))
            except LoginNodeDown as error:
                errors.append(str(error))
        raise ClusterUnreachable(
            f"None of the cluster's {len(hosts)} login nodes answers ({', '.join(hosts)}): "
            + " ".join(errors))

    def order(self, target: SSHTarget) -> list[str]:
        """``target``'s host and alternates, those that did not answer lately last."""
        hosts = list(dict.fromkeys((target.host, *target.alternates)))
        up = [host for host in hosts if not self.is_down(host, target.port)]
        return up + [host for host in hosts if host not in up]

    def is_down(self, host: str, port: int) -> bool:
        return self._down_until.get((host, port), 0.0) > time.monotonic()

    def mark_down(self, host: str, port: int, why: str) -> None:
        """Login node ``host`` did not answer: pass it over for ``LOGIN_DOWN_SECONDS``, and
        close the pool's connections to it (likely dead; a command on one would wait for its
        timeout)."""
        if not self.is_down(host, port):
            log.warning("login node %s:%d does not answer (%s); where the cluster has other "
                        "login nodes, they are used for %.0f s", host, port, why,
                        LOGIN_DOWN_SECONDS)
        self._down_until[(host, port)] = time.monotonic() + LOGIN_DOWN_SECONDS
        for target, connection in list(self._connections.items()):
            if (target.host, target.port) == (host, port) and not connection.busy:
                connection.close()
                del self._connections[target]

    async def _get(self, target: SSHTarget, pass_over: bool = False) -> LoginConnection:
        """``pass_over``: another node is left to try, so one marked down while this waited
        for the lock is not dialled again (each waiter would wait its connect timeout)."""
        self._last_used[target] = time.monotonic()
        lock = self._locks.setdefault(target, asyncio.Lock())
        async with lock:
            existing = self._connections.get(target)
            if existing is None or existing.is_closed():
                if pass_over and self.is_down(target.host, target.port):
                    raise LoginNodeDown(f"{target.host}:{target.port} did not answer lately")
                handshakes = self._handshakes.setdefault(
                    (target.host, target.port), asyncio.Semaphore(HANDSHAKES_PER_HOST))
                try:
                    async with handshakes:  # below sshd's MaxStartups, with the service's
                        made = await connect(target)
                except LoginNodeDown as error:
                    self.mark_down(target.host, target.port, str(error))
                    raise
                existing = LoginConnection(target, made, self.max_sessions)
                self._connections[target] = existing
        if self.idle_timeout > 0 and (self._reaper is None or self._reaper.done()):
            self._reaper = asyncio.ensure_future(self._close_idle())
        return existing

    def open_count(self) -> int:
        return sum(not c.is_closed() for c in self._connections.values())

    async def _close_idle(self) -> None:
        while self._connections and self.idle_timeout > 0:
            await asyncio.sleep(max(self.idle_timeout / 4, 0.2))
            now = time.monotonic()
            for target, connection in list(self._connections.items()):
                last = max(self._last_used.get(target, now), connection.last_used)
                if not connection.busy and now - last > self.idle_timeout:
                    log.debug("closing the idle SSH connection %s@%s", target.username,
                              target.host)
                    connection.close()
                    del self._connections[target]
                    self._last_used.pop(target, None)

    def close_all(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()


async def connect(
    target: SSHTarget, client_key: asyncssh.SSHKey | tuple | None = None
) -> asyncssh.SSHClientConnection:
    """Open and warm up one SSH connection (through its own connection to ``target.jump``,
    which it closes when it closes); every failure becomes a ``ClusterUnreachable``.
    ``client_key``: log in with this (key, or key and certificate) instead of the target's."""
    client_key = client_key or client_identity(target)
    tunnel = None
    if target.jump is not None:
        try:
            tunnel = await _with_retries(_connect, target.jump, None, None, warm=False)
        except LoginNodeDown as error:  # the bastion, not this login node: no other node helps
            raise ClusterUnreachable(str(error)) from None
    try:
        connection = await _with_retries(_connect, target, client_key, tunnel, warm=True)
    except BaseException:
        if tunnel is not None:
            tunnel.close()
        raise
    if tunnel is not None:
        asyncio.ensure_future(_close_after(connection, tunnel)).add_done_callback(_forget)
    return connection


#: Tries of a connection sshd closed before the handshake (beyond its ``MaxStartups``: 10
#: unauthenticated connections at once by default, easily passed by a spawn storm).
HANDSHAKE_TRIES = 4


async def _with_retries(connect_once: Callable[..., Awaitable[_Result]], target: SSHTarget,
                        *args: object, **kwargs: object) -> _Result:
    for attempt in range(1, HANDSHAKE_TRIES + 1):
        try:
            return await connect_once(target, *args, **kwargs)
        except HandshakeCut as error:
            if attempt == HANDSHAKE_TRIES:
                raise
            log.info("%s (try %d of %d); trying again", error, attempt, HANDSHAKE_TRIES)
            await asyncio.sleep(random.uniform(0.2, 1.0) * attempt)
    raise AssertionError("unreachable")


async def _close_after(connection: asyncssh.SSHClientConnection,
                       tunnel: asyncssh.SSHClientConnection) -> None:
    await connection.wait_closed()
    tunnel.close()


async def _connect(target: SSHTarget, client_key: asyncssh.SSHKey | tuple | None,
                   tunnel: asyncssh.SSHClientConnection | None,
                   warm: bool) -> asyncssh.SSHClientConnection:
    where = target.describe()
    role = "login node" if warm else "bastion"
    client_key = client_key or client_identity(target)
    try:
        connection = await asyncssh.connect(
            target.host,
            target.port,
            tunnel=tunnel,
            username=target.username,
            client_keys=[client_key],
            known_hosts=target.known_hosts_path,
            agent_path=None,
            config=(),
            encryption_algs=list(ENCRYPTION_PREFERENCE),
            compression_algs=["none"],
            connect_timeout=target.connect_timeout,
            keepalive_interval=target.keepalive_interval,
            keepalive_count_max=3,
        )
    except asyncssh.HostKeyNotVerifiable as error:
        raise ClusterUnreachable(
            f"The host key of {target.host}:{target.port} is not in {target.known_hosts_path} "
            f"(or does not match it): {error.reason}. Refusing to connect. An administrator must "
            f"add the {role}'s key to that known_hosts file."
        ) from None
    except asyncssh.PermissionDenied:
        if target.ca_key_path:
            raise LoginRefused(
                f"{where} refused the hub's SSH certificate for {target.username} (signed by "
                f"{target.ca_key_path}). Check that the login node's sshd trusts that CA "
                "(TrustedUserCAKeys) and accepts the principal "
                f"{target.username}, and that the hub's clock is right."
            ) from None
        raise LoginRefused(
            f"{where} refused the SSH key {target.key_path}. Check that its public key is in "
            f"{target.username}'s ~/.ssh/authorized_keys on the cluster."
        ) from None
    except asyncssh.ChannelOpenError as error:  # the bastion could not (or may not) reach it
        if error.code != asyncssh.OPEN_CONNECT_FAILED:
            raise ClusterUnreachable(
                f"The bastion {target.jump.host if target.jump else ''} refused to forward to "
                f"{target.host}:{target.port}: {error.reason}. It needs AllowTcpForwarding; "
                "tell an administrator.") from None
        raise LoginNodeDown(
            f"The bastion {target.jump.host if target.jump else ''} cannot reach the login node "
            f"{target.host}:{target.port}: {error.reason}. Try again later; if it persists, "
            "tell an administrator."
        ) from None
    except (asyncssh.ConnectionLost, ConnectionResetError):  # cut: sshd's MaxStartups
        raise HandshakeCut(
            f"The {role} {target.host}:{target.port} closed the connection before the SSH "
            "handshake: its sshd takes only so many new connections at once (MaxStartups). "
            "Try again in a moment; if it persists, tell an administrator (raise MaxStartups "
            "in its sshd_config)."
        ) from None
    except (OSError, asyncio.TimeoutError) as error:  # refused, unreachable, no answer
        reason = str(error) or type(error).__name__
        raise LoginNodeDown(
            f"Cannot reach the {role} {target.host}:{target.port}: {reason}. "
            "Try again later; if it persists, tell an administrator."
        ) from None
    except asyncssh.Error as error:  # it answered, then broke off
        reason = str(error) or type(error).__name__
        raise ClusterUnreachable(
            f"Cannot reach the {role} {target.host}:{target.port}: {reason}. "
            "Try again later; if it persists, tell an administrator."
        ) from None
    if not warm:  # a bastion: it carries the connection, it runs nothing (it may not let us)
        log.info("SSH connection to the bastion %s established", where)
        return connection
    # Start one session: OpenSSH sets TCP_NODELAY only then (the 44 ms stall). What the login
    # shell prints is thrown away as it comes, so start-up files that print for ever cost
    # nothing but the timeout.
    try:
        await connection.run("true", check=False, timeout=target.connect_timeout,
                             stdout=asyncssh.DEVNULL, stderr=asyncssh.DEVNULL)
    except asyncssh.TimeoutError:
        connection.close()
        raise ClusterUnreachable(
            f"{where} accepted us, but its login shell did not run even `true` within "
            f"{target.connect_timeout:g} s. Check {target.username}'s start-up files on the "
            "cluster (~/.bashrc, ~/.profile) for commands that wait or print for ever, or tell "
            "an administrator."
        ) from None
    except (asyncssh.Error, OSError) as error:
        connection.close()
        raise ClusterUnreachable(f"{where} accepted us but cannot run commands: {error}") from None
    log.info("SSH connection to %s established", where)
    return connection


def client_identity(target: SSHTarget) -> asyncssh.SSHKey | tuple:
    """What ``target`` logs in with: its key file (refused when group or others can read it,
    as OpenSSH does), or, in certificate mode, a fresh key and a certificate from the CA."""
    if target.key_text:
        return identity.import_identity(target.key_text, target.certificate_text)
    if target.ca_key_path:
        ca_key = identity.read_private_key_file(target.ca_key_path, "SSH CA key")
        certified = identity.mint(ca_key, target.username, target.key_id,
                                  target.certificate_minutes)
        return certified.key, certified.certificate
    if not os.path.exists(target.key_path):
        raise LoginRefused(
            f"No SSH key for {target.username} at {target.key_path}. "
            "Ask an administrator to provision one."
        )
    return identity.read_private_key_file(target.key_path)

