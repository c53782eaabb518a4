"""SSH to the login node: one kept connection per (login host, cluster user), with strict host keys.

Requirements:
- one live connection per target, shared by commands, SFTP and tunnels, re-made when it dies;
  never a new connection per command (each costs ~0.15 CPU-s on the login node);
- host keys are checked against the configured known_hosts file only; an unknown or changed key
  is a ``ClusterUnreachable`` error that says so, never silently accepted;
- AES-GCM is preferred (half the CPU of chacha20 on AES-NI machines), compression is off, and
  every new connection runs one trivial command (OpenSSH < 10.1 sets TCP_NODELAY only when a
  session starts: without it forwarded traffic sees ~44 ms delayed-ACK stalls);
- secrets travel only as file contents over SFTP, written with mode 0600 before any byte of
  content; commands and their standard input are free of secrets (callers' duty) and are only
  ever logged at debug level.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncssh

from . import identity
from .errors import ClusterUnreachable
from .schedulers import CommandOutput

log = logging.getLogger(__name__)

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

    def describe(self) -> str:
        return f"{self.username}@{self.host}:{self.port}"


class SSHCommandError(ClusterUnreachable):
    """A command could not be run to completion (connection lost, timeout)."""


class LoginConnection:
    """One live SSH connection to a login node, as one cluster user."""

    def __init__(self, target: SSHTarget, connection: asyncssh.SSHClientConnection) -> None:
        self.target = target
        self.connection = connection
        self._home: str | None = None

    def is_closed(self) -> bool:
        return self.connection.is_closed()

    async def run(
        self, command: str, stdin: str | None = None, timeout: float = 60
    ) -> CommandOutput:
        """Run ``command`` in the user's login shell; return its exit status and output.

        Raises ``SSHCommandError`` when the command could not complete (a non-zero exit status is
        *not* an error here: the caller reads it).
        """
        log.debug("ssh %s: %s", self.target.describe(), command)
        try:
            result = await self.connection.run(command, input=stdin, check=False, timeout=timeout)
        except asyncssh.TimeoutError:
            raise SSHCommandError(
                f"The command {command.split()[0]!r} on {self.target.host} did not finish "
                f"within {timeout:.0f} s."
            ) from None
        except (asyncssh.Error, OSError) as error:
            raise SSHCommandError(
                f"Lost the SSH connection to {self.target.host} while running "
                f"{command.split()[0]!r}: {error}"
            ) from None
        exit_status = result.exit_status if result.exit_status is not None else -1
        return CommandOutput(exit_status, str(result.stdout or ""), str(result.stderr or ""))

    async def home(self) -> str:
        """The user's home directory on the cluster (absolute path)."""
        if self._home is None:
            async with self._sftp() as sftp:
                self._home = await sftp.realpath(".")
        return self._home

    async def make_private_dir(self, path: str) -> None:
        """Create ``path`` (and parents) and make it mode 0700."""
        async with self._sftp() as sftp:
            await sftp.makedirs(path, exist_ok=True)
            await sftp.chmod(path, 0o700)

    async def write_private_file(self, path: str, content: str) -> None:
        """Write ``content`` to ``path`` with mode 0600, set before the content is written."""
        async with self._sftp() as sftp:
            attrs = asyncssh.SFTPAttrs(permissions=0o600)
            async with sftp.open(path, "w", attrs=attrs) as remote_file:
                await remote_file.chmod(0o600)
                await remote_file.write(content)

    async def read_file(self, path: str, max_bytes: int = 256 * 1024) -> str | None:
        """The last ``max_bytes`` of a file, or ``None`` if it does not exist (yet)."""
        async with self._sftp() as sftp:
            try:
                async with sftp.open(path, "rb") as remote_file:
                    size = (await remote_file.stat()).size or 0
                    if size > max_bytes:
                        await remote_file.seek(size - max_bytes)
                    data = await remote_file.read(max_bytes)
            except asyncssh.SFTPNoSuchFile:
                return None
        return data.decode("utf-8", errors="replace")

    @contextlib.asynccontextmanager
    async def _sftp(self) -> AsyncIterator[asyncssh.SFTPClient]:
        """An SFTP session on this connection; failures become ``SSHCommandError``."""
        try:
            async with self.connection.start_sftp_client() as sftp:
                yield sftp
        except (asyncssh.Error, OSError) as error:
            raise SSHCommandError(f"SFTP on {self.target.host} failed: {error}") from None

    def close(self) -> None:
        self.connection.close()


class ConnectionPool:
    """Keeps one ``LoginConnection`` per ``SSHTarget``; re-connects when one has died."""

    def __init__(self) -> None:
        self._connections: dict[SSHTarget, LoginConnection] = {}
        self._locks: dict[SSHTarget, asyncio.Lock] = {}

    async def get(self, target: SSHTarget) -> LoginConnection:
        """A live connection for ``target``; raises ``ClusterUnreachable`` with the reason."""
        lock = self._locks.setdefault(target, asyncio.Lock())
        async with lock:
            existing = self._connections.get(target)
            if existing is not None and not existing.is_closed():
                return existing
            connection = LoginConnection(target, await connect(target))
            self._connections[target] = connection
            return connection

    def close_all(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()


async def connect(
    target: SSHTarget, client_key: asyncssh.SSHKey | tuple | None = None
) -> asyncssh.SSHClientConnection:
    """Open and warm up one SSH connection; every failure becomes a ``ClusterUnreachable``.
    ``client_key``: log in with this (key, or key and certificate) instead of the target's."""
    where = target.describe()
    client_key = client_key or client_identity(target)
    try:
        connection = await asyncssh.connect(
            target.host,
            target.port,
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
            "add the login node's key to that known_hosts file."
        ) from None
    except asyncssh.PermissionDenied:
        if target.ca_key_path:
            raise ClusterUnreachable(
                f"{where} refused the hub's SSH certificate for {target.username} (signed by "
                f"{target.ca_key_path}). Check that the login node's sshd trusts that CA "
                "(TrustedUserCAKeys) and accepts the principal "
                f"{target.username}, and that the hub's clock is right."
            ) from None
        raise ClusterUnreachable(
            f"{where} refused the SSH key {target.key_path}. Check that its public key is in "
            f"{target.username}'s ~/.ssh/authorized_keys on the cluster."
        ) from None
    except (asyncssh.Error, OSError, asyncio.TimeoutError) as error:
        reason = str(error) or type(error).__name__
        raise ClusterUnreachable(
            f"Cannot reach the login node {target.host}:{target.port}: {reason}. "
            "Try again later; if it persists, tell an administrator."
        ) from None
    # Start one session: OpenSSH sets TCP_NODELAY only then (the 44 ms stall).
    try:
        await connection.run("true", check=False, timeout=target.connect_timeout)
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
        raise ClusterUnreachable(
            f"No SSH key for {target.username} at {target.key_path}. "
            "Ask an administrator to provision one."
        )
    return identity.read_private_key_file(target.key_path)


default_pool = ConnectionPool()
