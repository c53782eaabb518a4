"""Forwards as data, and the OpenSSH command lines that make them. Pure: no I/O but the table file
and the listing of the masters' control sockets.

Requirements:
- a forward is named (``alice/restart``, ``alice/restart/hub-api``) and fully described by its
  spec: asking again with the same spec is a no-op that returns the same port;
- every value that reaches an ``ssh`` command line is validated here; no secret is ever on one
  (a key is named by its path, which the service reads, never its contents);
- host keys stay strict: only the configured known_hosts file is used, unknown keys are refused;
- a master may reach its host through another master (``Login.jump``: the node hop, a
  bastion in front of the login nodes, or both): each hop is a stdio forward over the
  previous master's connection, never a new login to the host before it, and as strict as
  the first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shlex
import stat
from pathlib import Path

CIPHERS = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com"
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:-]{0,252}$")
_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")
_NAME = re.compile(r"^[A-Za-z0-9_.@/:+-]{1,200}$")
#: A Unix socket a forward may connect to: an absolute path of plain characters, short enough
#: for sockaddr_un (107 bytes), with no ``..``.
_SOCKET = re.compile(r"/[A-Za-z0-9_.+-]+(/[A-Za-z0-9_.+-]+)*")
MAX_SOCKET_PATH = 100
KINDS = ("local", "reverse")


@dataclasses.dataclass(frozen=True)
class Login:
    """Where and as whom a master connects."""

    host: str
    port: int
    username: str
    key_path: str
    known_hosts_path: str
    #: Reach ``host`` through this login's master (a compute node via its login node, a
    #: login node via the site's bastion; a node via its login node via the bastion).
    jump: Login | None = None

    def __post_init__(self) -> None:
        _check(_HOST.fullmatch(self.host), f"login host {self.host!r}")
        _check(0 < self.port < 65536, f"login port {self.port!r}")
        _check(_USER.fullmatch(self.username), f"cluster username {self.username!r}")
        _check(os.path.isabs(self.key_path), f"key path {self.key_path!r} (must be absolute)")
        _check(
            os.path.isabs(self.known_hosts_path),
            f"known_hosts path {self.known_hosts_path!r} (must be absolute)",
        )
        _check(len(self.chain()) <= 3, "login: two hops at most")

    @property
    def key(self) -> str:
        """A short stable id of this master (its control socket's file name)."""
        fields = dataclasses.asdict(self)
        if self.jump is None:
            del fields["jump"]  # as before the node hop existed: running masters keep their id
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def chain(self) -> list[Login]:
        """This login and each one it is reached through, nearest first."""
        return [self, *(self.jump.chain() if self.jump is not None else [])]

    def describe(self) -> str:
        via = f" via {self.jump.describe()}" if self.jump is not None else ""
        return f"{self.username}@{self.host}:{self.port}{via}"

    @classmethod
    def from_json(cls, data: dict) -> Login:
        jump = data.get("jump")
        return cls(**dict(data, jump=cls.from_json(jump) if jump else None))


@dataclasses.dataclass(frozen=True)
class Forward:
    """One forward. ``local``: listen on the service's host at ``listen_host:listen_port`` and
    connect to ``dest_host:dest_port`` as seen from the login's host (or, with ``dest_socket``,
    to that Unix socket there). ``reverse``: the login's host listens on
    ``listen_host:listen_port`` and connects to ``dest_host:dest_port`` here. ``listen_port`` 0
    means "any free port" (chosen once, then kept)."""

    name: str
    kind: str
    login: Login
    listen_host: str
    dest_host: str
    dest_port: int
    listen_port: int = 0
    dest_socket: str = ""

    def __post_init__(self) -> None:
        _check(_NAME.fullmatch(self.name), f"forward name {self.name!r}")
        _check(self.kind in KINDS, f"forward kind {self.kind!r}")
        _check(_HOST.fullmatch(self.listen_host), f"listen host {self.listen_host!r}")
        _check(_HOST.fullmatch(self.dest_host), f"destination host {self.dest_host!r}")
        _check(0 <= self.listen_port < 65536, f"listen port {self.listen_port!r}")
        if self.dest_socket:
            _check(is_socket_path(self.dest_socket), f"destination socket {self.dest_socket!r}")
            _check(self.kind == "local", "forward: only a local forward reaches a socket")
            _check(self.dest_port == 0, "forward: a socket destination has no port")
        else:
            _check(0 < self.dest_port < 65536, f"destination port {self.dest_port!r}")

    def same_route(self, other: Forward) -> bool:
        """Whether ``other`` asks for what this forward already does (the port may differ only
        if ``other`` leaves it to us)."""
        return dataclasses.replace(other, listen_port=0) == dataclasses.replace(
            self, listen_port=0
        ) and other.listen_port in (0, self.listen_port)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Forward:
        return cls(**dict(data, login=Login.from_json(data["login"])))

    def describe_destination(self) -> str:
        return self.dest_socket or f"{self.dest_host}:{self.dest_port}"


def is_socket_path(path: str) -> bool:
    """Whether ``path`` may name a forward's destination socket (see ``_SOCKET``)."""
    return (
        isinstance(path, str)
        and len(path) <= MAX_SOCKET_PATH
        and _SOCKET.fullmatch(path) is not None
        and ".." not in path.split("/")
        and "." not in path.split("/")
    )


def forward_spec(forward: Forward, port: int) -> str:
    """The ``-L``/``-R`` argument for ``forward`` listening on ``port``."""
    listen = f"[{forward.listen_host}]" if ":" in forward.listen_host else forward.listen_host
    if forward.dest_socket:
        return f"{listen}:{port}:{forward.dest_socket}"
    dest = f"[{forward.dest_host}]" if ":" in forward.dest_host else forward.dest_host
    return f"{listen}:{port}:{dest}:{forward.dest_port}"


def master_command(login: Login, control_path: str, jump_control_path: str = "") -> list[str]:
    """Start a master in the foreground. It runs one long remote ``sleep``: OpenSSH's sshd
    before 10.1 sets TCP_NODELAY only when a session starts, and without it forwarded traffic
    sees ~44 ms delayed-ACK stalls (shared/notes/tunnel-perf.md).

    With ``login.jump``, the connection to ``login.host`` is a ``-W`` stdio forward through
    the jump's running master (``jump_control_path``): the login node's sshd dials the node,
    and the node's host key is checked against the same known_hosts file."""
    proxy = []
    if login.jump is not None:
        if not jump_control_path:
            raise ValueError("a master with a jump needs the jump master's control path")
        hop = [
            "ssh", *_common_options(), "-S", jump_control_path, "-o", "ControlMaster=no",
            # Should the jump master be gone, ssh would log in itself: as strictly as a master.
            *_identity_options(login.jump), "-W", "%h:%p", "-p", str(login.jump.port), "--",
            f"{login.jump.username}@{login.jump.host}",
        ]
        # ssh expands %-tokens in ProxyCommand, then runs it through a shell.
        command = " ".join(
            word if word == "%h:%p" else shlex.quote(word).replace("%", "%%") for word in hop
        )
        proxy = ["-o", f"ProxyCommand={command}"]
    return [
        "ssh",
        *_common_options(),
        "-M",
        "-S",
        control_path,
        "-o",
        "ControlMaster=yes",
        "-o",
        "ControlPersist=no",
        *_identity_options(login),
        *proxy,
        "-o",
        f"Ciphers={CIPHERS}",
        "-o",
        "Compression=no",
        "-o",
        "ServerAliveInterval=2",
        "-o",
        "ServerAliveCountMax=3",
        "-o",
        "ConnectTimeout=15",
        "-o",
        "ExitOnForwardFailure=no",
        "-T",
        "-n",
        "-p",
        str(login.port),
        "--",
        f"{login.username}@{login.host}",
        "exec sleep 2147483647",
    ]


def run_command(login: Login, command: str) -> list[str]:
    """Run one remote command as ``login`` (its own connection, as strict as a master's)."""
    return [
        "ssh", *_common_options(), *_identity_options(login), "-o", "ConnectTimeout=15",
        "-T", "-n", "-p", str(login.port), "--", f"{login.username}@{login.host}", command,
    ]


def _identity_options(login: Login) -> list[str]:
    """Only this key, only this known_hosts file, never a question."""
    return [
        "-i",
        login.key_path,
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        f"UserKnownHostsFile={login.known_hosts_path}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
    ]


def control_command(login: Login, control_path: str, operation: str, *args: str) -> list[str]:
    """``ssh -O operation`` on an existing master (``ControlMaster=no``: never become one)."""
    return [
        "ssh",
        *_common_options(),
        "-S",
        control_path,
        "-o",
        "ControlMaster=no",
        "-O",
        operation,
        *args,
        "-p",
        str(login.port),
        "--",
        f"{login.username}@{login.host}",
    ]


def _common_options() -> list[str]:
    # -F /dev/null: the service user's ~/.ssh/config must not change what we connect to or how.
    return ["-F", "/dev/null", "-o", "LogLevel=ERROR"]


# --- the table on disk ---------------------------------------------------------------------------


@dataclasses.dataclass
class Entry:
    """A forward and the port it holds (0 until it first succeeded)."""

    forward: Forward
    port: int = 0

    def to_json(self) -> dict:
        return {"forward": self.forward.to_json(), "port": self.port}


def master_socket_keys(directory: Path) -> list[str]:
    """The login keys with a master's control socket in ``<directory>/m`` (the service's
    directory)."""
    try:
        names = os.listdir(directory / "m")
    except FileNotFoundError:
        return []
    keys = []
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(directory / "m" / name).st_mode):
                keys.append(name)
    return sorted(keys)


def load_table(path: Path) -> dict[str, Entry]:
    """The saved table; empty if there is none. A damaged file is an error (never silently
    forget forwards whose servers still run)."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {
        item["forward"]["name"]: Entry(Forward.from_json(item["forward"]), int(item["port"]))
        for item in data["forwards"]
    }


def save_table(path: Path, table: dict[str, Entry]) -> None:
    """Write atomically, mode 0600."""
    write_private_json(path, {"version": 1, "forwards": [e.to_json() for e in table.values()]})


def write_private_json(path: Path, data: object) -> None:
    """Replace ``path`` atomically with ``data`` as JSON, mode 0600."""
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(data, indent=1))
    os.replace(temporary, path)


def _check(ok: object, what: str) -> None:
    if not ok:
        raise ValueError(f"invalid {what}")
