"""The tunnel service process: OpenSSH masters, the forward table, the control socket.

Requirements:
- ``ensure`` is idempotent: the same spec returns the same port, without touching the master;
- the table is on disk (0600) before ``ensure`` answers, so a restart of this process restores
  every forward on its old port: masters that outlived it are adopted (their forwards and open
  connections never went away), dead ones are started again and their forwards re-added;
- a master that dies (SSH drop, login node restart) is re-made and its forwards re-added within
  about a second of being noticed (a node hop's master after its login node's master); a
  forward that cannot come back (its port taken) is retried every second and reported by
  ``list``;
- a login node that does not answer delays only its own forwards: work is serialised per login
  target, at most ``MAX_MASTER_STARTS`` masters start at once (``MASTER_STARTS_PER_HOST`` to
  one host, below sshd's ``MaxStartups``; one it cut off is tried again), the control socket
  answers before any forward is restored, and forwards that are down come back in the
  background (one
  task per login target, with a back-off up to ``MAX_READD_BACK_OFF`` while it does not answer);
- one service per directory (a lock file); the control socket is in a 0700 directory, mode 0600;
  control over TCP (``--listen``, for a hub in another pod) needs the token in
  ``HUB_SPAWNER_TUNNEL_TOKEN``, compared in constant time on every request;
- a master nothing here uses (an earlier service was killed while it warmed or started one,
  so no forward of the table names it) is ended at start-up and on every sweep, never left
  logged in for ever;
- it knows forwards, not schedulers: cancelling jobs is the hub's reconciler's (a
  ``cancels.json`` an older version left is read by nobody).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .forwards import (
    Entry,
    Forward,
    Login,
    control_command,
    forward_spec,
    load_table,
    master_command,
    master_socket_keys,
    save_table,
)

log = logging.getLogger("hub_spawner.tunnels")

SUPERVISE_INTERVAL = 1.0
#: Seconds a master warmed for a spawn form waits for a forward before it is stopped (the
#: environment's HUB_TUNNEL_WARM_SECONDS, for tests, else 120).
WARM_SECONDS = float(os.environ.get("HUB_TUNNEL_WARM_SECONDS") or 120)
MASTER_START_TIMEOUT = 20.0
#: Masters being started at once (each is an ``ssh`` process logging in).
MAX_MASTER_STARTS = 16
#: Masters started to one login node at once: with the hub's own new connections
#: (``ssh.HANDSHAKES_PER_HOST``) at most 10, sshd's default ``MaxStartups`` start.
MASTER_STARTS_PER_HOST = 6
#: Tries of a master whose connection sshd closed before the SSH handshake: what a login node
#: does beyond its ``MaxStartups`` (10 unauthenticated connections at once by default).
HANDSHAKE_TRIES = 4
_HANDSHAKE_CUT = re.compile(r"kex_exchange_identification: (Connection closed by remote host|"
                            r"read: Connection reset by peer)|Connection reset by \S+ port \d+")
#: The longest wait between two tries to bring back the forwards of a login node that does
#: not answer (the wait doubles from 1 s).
MAX_READD_BACK_OFF = 30.0
#: Seconds a stored identity is kept before any forward uses it (the hub stores it, then asks
#: for the forward), and between two sweeps for identities no forward uses any more.
IDENTITY_GRACE_SECONDS = 10.0
IDENTITY_SWEEP_SECONDS = 30.0
#: Where a reverse forward with no port asked for looks for one on the login node.
REVERSE_PORT_RANGE = (32768, 60999)
_MASTER_PID = re.compile(r"pid=(\d+)")


class ForwardFailed(Exception):
    """A forward could not be made; the message says why."""


class Master:
    """One OpenSSH ControlMaster process (ours, or adopted from an earlier service)."""

    def __init__(self, login: Login, directory: Path) -> None:
        self.login = login
        self.control_path = str(directory / "m" / login.key)
        self.jump_control_path = str(directory / "m" / login.jump.key) if login.jump else ""
        self.log_path = directory / "m" / f"{login.key}.log"
        self.process: asyncio.subprocess.Process | None = None
        self.pid = 0

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.returncode is None
        if not self.pid:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    async def control(
        self, operation: str, *args: str, timeout: float = 20
    ) -> tuple[int, str, str]:
        """Run ``ssh -O operation ARGS`` against this master: (exit status, stdout, stderr)."""
        process = await asyncio.create_subprocess_exec(
            *control_command(self.login, self.control_path, operation, *args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()
            return 255, "", f"ssh -O {operation} did not answer in {timeout:.0f} s"
        return process.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    async def adopt(self) -> bool:
        """Take over a master an earlier service left running; False if there is none."""
        if not os.path.exists(self.control_path):
            return False
        code, _, err = await self.control("check", timeout=5)
        match = _MASTER_PID.search(err)
        if code != 0 or not match:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.control_path)  # stale: its master is gone
            return False
        self.process, self.pid = None, int(match.group(1))
        log.info("master %s: adopted (pid %d)", self.login.describe(), self.pid)
        return True

    async def start(self) -> None:
        """Start the master and wait until it is connected; ``ForwardFailed`` says why not.
        A connection sshd closed before the handshake (``MaxStartups``: too many at once) is
        tried again, ``HANDSHAKE_TRIES`` times in all, after a random pause."""
        for attempt in range(1, HANDSHAKE_TRIES + 1):
            try:
                return await self._start_once()
            except ForwardFailed as error:
                if attempt == HANDSHAKE_TRIES or not _HANDSHAKE_CUT.search(str(error)):
                    raise
                log.info("master %s: sshd closed the connection before the handshake (try "
                         "%d of %d; MaxStartups?); trying again", self.login.describe(),
                         attempt, HANDSHAKE_TRIES)
                await asyncio.sleep(random.uniform(0.2, 1.0) * attempt)

    async def _start_once(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control_path)
        with open(self.log_path, "ab") as log_file:
            start_offset = log_file.tell()
            self.process = await asyncio.create_subprocess_exec(
                *master_command(self.login, self.control_path, self.jump_control_path),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                start_new_session=True,  # a terminal's Ctrl-C to the service is not for it
            )
        self.pid = self.process.pid
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MASTER_START_TIMEOUT
        try:
            while loop.time() < deadline and self.process.returncode is None:
                # The control socket appears once the master has logged in (~0.1-0.2 s): a
                # spawn waits for this, so look often; each look is a stat until it exists.
                await asyncio.sleep(0.02)
                if self.process.returncode is None and os.path.exists(self.control_path):
                    code, _, _ = await self.control("check", timeout=5)
                    if code == 0:
                        log.info("master %s: connected (pid %d)", self.login.describe(),
                                 self.pid)
                        return
        except asyncio.CancelledError:  # nobody would own it: it must not linger
            if self.process.returncode is None:
                self.process.kill()
            raise
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        with open(self.log_path, "rb") as log_file:
            log_file.seek(start_offset)
            said = log_file.read().decode(errors="replace").strip()
        raise ForwardFailed(
            f"cannot connect to {self.login.describe()}: {said or 'no answer in time'}"
        )

    async def stop(self) -> None:
        if self.alive():
            await self.control("exit", timeout=5)
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.process.wait(), 5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control_path)


class TunnelService:
    """The forward table, kept true.

    Work on one login target (its master, its forwards) is serialised by that target's own
    lock; targets never wait for each other, so a login node that does not answer (15 s per
    connection attempt) delays only its own forwards. At most ``MAX_MASTER_STARTS`` masters
    are being started at once, and forwards that are down come back in the background, one
    task per login target, tried again with a back-off while it does not answer."""

    def __init__(self, directory: Path, forward_ports: tuple[int, int] | None = None) -> None:
        self.directory = directory
        self.forward_ports = forward_ports  # (low, high) for local forwards; None: any
        self.table_path = directory / "forwards.json"
        self.table: dict[str, Entry] = load_table(self.table_path)
        self.masters: dict[str, Master] = {}
        self.problems: dict[str, str] = {}  # name -> why it is not up right now
        self.warm_until: dict[str, float] = {}  # login key -> when a warmed master may go
        self._locks: dict[str, asyncio.Lock] = {}
        self._starts = asyncio.Semaphore(MAX_MASTER_STARTS)
        self._host_starts: dict[tuple[str, int], asyncio.Semaphore] = {}
        self._readding: dict[str, asyncio.Task] = {}  # login key -> its re-add task
        self._next_try: dict[str, tuple[float, float]] = {}  # login key -> (when, back-off)
        self._swept_at = 0.0
        self._masters_swept_at = time.monotonic()  # serve() looks once at start-up
        self._asked: dict[str, int] = {}  # key path or login key -> requests running with it
        # What --metrics exports as counters (hub_spawner_tunnel_*_total).
        self.counts = {"restores": 0, "master_starts": 0, "master_start_failures": 0}

    def _lock(self, login: Login) -> asyncio.Lock:
        return self._locks.setdefault(login.key, asyncio.Lock())

    async def ensure(self, forward: Forward) -> int:
        with self._asking(forward.login):
            return await self._ensure(forward)

    @contextlib.contextmanager
    def _asking(self, login: Login) -> Iterator[None]:
        """While a request with ``login`` waits or runs, its key is in use."""
        paths = [path for each in login.chain() for path in (each.key_path, each.key)]
        for path in paths:
            self._asked[path] = self._asked.get(path, 0) + 1
        try:
            yield
        finally:
            for path in paths:
                self._asked[path] -= 1
                if not self._asked[path]:
                    del self._asked[path]

    async def _ensure(self, forward: Forward) -> int:
        moved = self.table.get(forward.name)
        if moved is not None and moved.forward.login.key != forward.login.key:
            await self.close(forward.name)  # on another login node: under that one's own lock
        async with self._lock(forward.login):
            entry = self.table.get(forward.name)
            master = self.masters.get(forward.login.key)
            if (
                entry is not None
                and entry.forward.same_route(forward)
                and forward.name not in self.problems
                and master is not None
                and master.alive()
            ):
                return entry.port
            if entry is not None and not entry.forward.same_route(forward):
                await self._close(forward.name)
                entry = None
            port = entry.port if entry is not None else forward.listen_port
            try:
                master = await self._master(forward.login)
                port = await self._add(master, forward, port)
            except ForwardFailed as error:
                if entry is not None:  # a known forward stays in the table and is retried
                    self.problems[forward.name] = str(error)
                else:  # a master started only for this one (or its jump) must not linger
                    await self._stop_unused(forward.login)
                raise
            self.table[forward.name] = Entry(forward, port)
            self.problems.pop(forward.name, None)
            save_table(self.table_path, self.table)
            return port

    async def close(self, name: str) -> None:
        entry = self.table.get(name)
        if entry is None:
            return
        async with self._lock(entry.forward.login):
            await self._close(name)

    async def warm(self, login: Login) -> int:
        """Have ``login``'s master up before a forward needs it (a user looks at the spawn
        form); one that no forward takes in ``WARM_SECONDS`` is stopped. Returns its pid."""
        with self._asking(login):
            async with self._lock(login):
                master = await self._master(login)
                self.warm_until[login.key] = time.monotonic() + WARM_SECONDS
                return master.pid

    def listing(self) -> dict:
        def master_pid(entry: Entry) -> int:
            master = self.masters.get(entry.forward.login.key)
            return master.pid if master is not None and master.alive() else 0

        return {
            name: {
                "master_pid": master_pid(entry),
                "kind": entry.forward.kind,
                "port": entry.port,
                "login": entry.forward.login.describe(),
                "destination": entry.forward.describe_destination(),
                "up": name not in self.problems,
                "problem": self.problems.get(name, ""),
            }
            for name, entry in sorted(self.table.items())
        }

    async def stop_everything(self) -> None:
        """Cancel every forward, end every master and delete every stored key (teardown of a
        demo or a test, or a hub that stops for good)."""
        for task in self._readding.values():
            task.cancel()
        await asyncio.gather(*self._readding.values(), return_exceptions=True)
        self._readding.clear()
        for name in list(self.table):
            await self.close(name)
        for master in list(self.masters.values()):
            await master.stop()
        self.masters.clear()
        self.warm_until.clear()
        await self.end_unused_masters()
        remove_unused_identities(self.directory, set(), grace=-1)
        with contextlib.suppress(OSError):
            os.rmdir(identities_directory(self.directory))

    def keys_in_use(self) -> set[str]:
        """The key paths a forward in the table, or a warmed master, logs in with (a master
        that dies is made again with them)."""
        logins = [e.forward.login for e in self.table.values()]
        logins += [m.login for key, m in self.masters.items() if key in self.warm_until]
        return {each.key_path for login in logins for each in login.chain()} | set(self._asked)

    async def end_unused_masters(self) -> list[int]:
        """End every master whose control socket is in this directory but that no forward of
        the table, no warmed master and no request on its way uses: one an earlier service
        started or warmed and was killed before a forward named it (no restore would ever
        adopt it). Returns their pids."""
        ended = []
        for key in master_socket_keys(self.directory):
            async with self._locks.setdefault(key, asyncio.Lock()):
                in_use = {each.key for e in self.table.values()
                          for each in e.forward.login.chain()}
                if key in in_use or key in self.masters or key in self._asked:
                    continue
                pid = await end_master(str(self.directory / "m" / key))
                if pid:
                    log.warning("master pid %d: no forward uses it (left by an earlier "
                                "service); ended it", pid)
                    ended.append(pid)
        return ended

    def sweep_identities(self, grace: float = IDENTITY_GRACE_SECONDS) -> None:
        """Delete the handed-over keys no forward uses any more (after ``grace`` seconds)."""
        self._swept_at = time.monotonic()
        for key in remove_unused_identities(self.directory, self.keys_in_use(), grace):
            log.info("deleted the identity %s: no forward uses it", key.name)

    # --- keeping it true -------------------------------------------------------------------

    def restore(self) -> None:
        """At start-up: every forward of the table is down until its master is adopted or
        re-made and the forward re-added, which the supervisor does in the background (the
        control socket answers meanwhile)."""
        for entry in self.table.values():
            self.problems[entry.forward.name] = "being restored after the service started"
        self._readd_down()

    async def supervise(self) -> None:
        while True:
            await asyncio.sleep(SUPERVISE_INTERVAL)
            try:
                await self._supervise_once()
            except Exception as error:  # noqa: BLE001 - the supervisor must never stop
                log.error("supervising the forwards failed: %s", error, exc_info=True)

    async def _supervise_once(self) -> None:
        for key, master in list(self.masters.items()):
            if not master.alive() and not self._lock(master.login).locked():
                log.warning(
                    "master %s: gone (pid %d); re-making it and its forwards",
                    master.login.describe(),
                    master.pid,
                )
                del self.masters[key]
                for entry in self.table.values():
                    if entry.forward.login.key == key:
                        self.problems[entry.forward.name] = "its SSH connection dropped"
        self._readd_down()
        if time.monotonic() - self._swept_at >= IDENTITY_SWEEP_SECONDS:
            self.sweep_identities()
        if time.monotonic() - self._masters_swept_at >= IDENTITY_SWEEP_SECONDS:
            self._masters_swept_at = time.monotonic()
            await self.end_unused_masters()
        for key, until in list(self.warm_until.items()):
            master = self.masters.get(key)
            if until < time.monotonic() and (master is None or not
                                             self._lock(master.login).locked()):
                del self.warm_until[key]
                if master is not None:
                    async with self._lock(master.login):
                        await self._stop_unused(master.login)

    def _readd_down(self) -> None:
        """Start a re-add task for each login target with forwards down, unless one runs or
        its back-off has not ended."""
        now = time.monotonic()
        for login in {e.forward.login.key: e.forward.login for e in self.table.values()
                      if e.forward.name in self.problems}.values():
            task = self._readding.get(login.key)
            if (task is not None and not task.done()) or (
                    self._next_try.get(login.key, (0.0, 0.0))[0] > now):
                continue
            self._readding[login.key] = asyncio.ensure_future(self._readd_login(login))

    async def _readd_login(self, login: Login) -> None:
        async with self._lock(login):
            entries = [e for e in self.table.values()
                       if e.forward.login.key == login.key and e.forward.name in self.problems]
            for entry in entries:
                try:
                    await self._readd(entry)
                except Exception as error:  # noqa: BLE001 - logged; retried with back-off
                    log.error("forward %s: restoring it failed: %s", entry.forward.name, error,
                              exc_info=True)
        if any(e.forward.name in self.problems for e in entries):
            _, back_off = self._next_try.get(login.key, (0.0, 0.0))
            back_off = min(max(back_off * 2, 1.0), MAX_READD_BACK_OFF)
            self._next_try[login.key] = (time.monotonic() + back_off, back_off)
        else:
            self._next_try.pop(login.key, None)

    async def _readd(self, entry: Entry) -> None:
        name = entry.forward.name
        if self.table.get(name) is not entry:  # closed or replaced meanwhile
            return
        try:
            master = await self._master(entry.forward.login)
            if self.table.get(name) is not entry:  # closed or moved while the master started
                await self._stop_unused(entry.forward.login)
                return
            await self._add(master, entry.forward, entry.port)
        except ForwardFailed as error:
            if self.table.get(name) is not entry:
                return
            if self.problems.get(name) != str(error):
                log.warning("forward %s: cannot restore it on port %d: %s", name, entry.port, error)
            self.problems[name] = str(error)
        else:
            if self.table.get(name) is not entry:  # closed meanwhile: not ours to keep
                flag = "-L" if entry.forward.kind == "local" else "-R"
                await master.control("cancel", flag, forward_spec(entry.forward, entry.port))
                await self._stop_unused(entry.forward.login)
                return
            self.problems.pop(name, None)
            self.counts["restores"] += 1
            log.info("forward %s: up on port %d", name, entry.port)

    async def _master(self, login: Login) -> Master:
        master = self.masters.get(login.key)
        if master is not None and master.alive():
            return master
        if login.jump is not None:  # the node hop rides on the login node's master, that
            # (behind a bastion) on the bastion's
            async with self._lock(login.jump):
                await self._master(login.jump)
        master = Master(login, self.directory)
        if not await master.adopt():
            per_host = self._host_starts.setdefault(
                (login.host, login.port), asyncio.Semaphore(MASTER_STARTS_PER_HOST))
            async with self._starts, per_host:
                try:
                    await master.start()
                except ForwardFailed:
                    self.counts["master_start_failures"] += 1
                    raise
                self.counts["master_starts"] += 1
        self.masters[login.key] = master
        return master

    async def _add(self, master: Master, forward: Forward, port: int) -> int:
        """Add ``forward`` on ``port`` (0: choose one) to ``master``; returns the port."""
        flag = "-L" if forward.kind == "local" else "-R"
        candidates = [port] if port else _port_candidates(forward, self.forward_ports)
        error = "no free port" + (f" in {self.forward_ports[0]}-{self.forward_ports[1]}"
                                  if self.forward_ports and forward.kind == "local" else "")
        for candidate in candidates:
            code, _, err = await master.control("forward", flag, forward_spec(forward, candidate))
            if code == 0:
                return candidate
            error = err.strip() or f"ssh -O forward exited {code}"
        where = "here" if forward.kind == "local" else "on the login node"
        raise ForwardFailed(
            f"cannot listen on {forward.listen_host}:{port or 'any port'} {where}: {error}"
        )

    async def _close(self, name: str) -> None:
        entry = self.table.pop(name, None)
        self.problems.pop(name, None)
        if entry is None:
            return
        save_table(self.table_path, self.table)
        master = self.masters.get(entry.forward.login.key)
        if master is not None and master.alive():
            flag = "-L" if entry.forward.kind == "local" else "-R"
            await master.control("cancel", flag, forward_spec(entry.forward, entry.port))
        await self._stop_unused(entry.forward.login)
        self.sweep_identities()

    async def _stop_unused(self, login: Login) -> None:
        """End the master of ``login`` (and then of its jump) once no forward uses it."""
        in_use = {each.key for e in self.table.values() for each in e.forward.login.chain()}
        in_use |= set(self._asked)  # a request on its way (a node hop being made on it)
        if login.key in in_use or self.warm_until.get(login.key, 0) > time.monotonic():
            return
        master = self.masters.pop(login.key, None)
        if master is not None:
            await master.stop()
        if login.jump is not None:
            async with self._lock(login.jump):  # child, then jump: the one lock order
                await self._stop_unused(login.jump)


async def end_master(control_path: str) -> int:
    """Ask the master on ``control_path`` to exit (``ssh -O exit``), then end it by its pid
    if it is still there; returns its pid, 0 if no master answered (the socket is deleted)."""

    async def control(operation: str) -> tuple[int, str]:
        # The destination is a placeholder: with -S and -O, ssh only talks to the socket.
        process = await asyncio.create_subprocess_exec(
            "ssh", "-F", "/dev/null", "-o", "LogLevel=ERROR", "-S", control_path,
            "-o", "ControlMaster=no", "-O", operation, "--", "unused-master",
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(process.communicate(), 5)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()
            return 255, ""
        return process.returncode or 0, err.decode(errors="replace")

    code, said = await control("check")
    match = _MASTER_PID.search(said)
    if code != 0 or not match:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control_path)
        return 0
    pid = int(match.group(1))
    await control("exit")
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        await asyncio.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(control_path)
    return pid


def _port_candidates(forward: Forward, forward_ports: tuple[int, int] | None) -> list[int]:
    """Ports to try: for a local forward, free ones found by binding here (OpenSSH refuses
    ``-L`` with port 0), from ``forward_ports`` when given; for a reverse one, random ports in
    the login node's usual range."""
    if forward.kind != "local":
        return random.sample(range(*REVERSE_PORT_RANGE), 8)
    family = socket.AF_INET6 if ":" in forward.listen_host else socket.AF_INET
    if forward_ports is None:
        tries = [0] * 5
    else:
        low, high = forward_ports
        tries = random.sample(range(low, high + 1), min(32, high - low + 1))
    ports = []
    for port in tries:
        with socket.socket(family) as probe:
            try:
                probe.bind((forward.listen_host, port))
            except OSError:
                continue
            ports.append(probe.getsockname()[1])
        if len(ports) == 5:
            break
    return ports


# --- the control socket --------------------------------------------------------------------------


async def handle_client(
    service: TunnelService,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    token: str | None = None,
) -> None:
    """JSON lines: ``{"op": "ensure", "forward": {...}}`` -> ``{"ok": true, "port": N}``;
    ``close`` (``name``), ``list``, ``health``, ``stop-everything``. With ``token`` (TCP), every
    request must carry it as ``"token"``."""
    try:
        while line := await reader.readline():
            try:
                request = json.loads(line)
                if token is not None and not hmac.compare_digest(
                    str(request.get("token", "")).encode(), token.encode()
                ):
                    reply = {"ok": False, "error": "the tunnel service refused the token"}
                else:
                    reply = await _dispatch(service, request)
            except (ValueError, KeyError, TypeError, ForwardFailed) as error:
                reply = {"ok": False, "error": str(error)}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _dispatch(service: TunnelService, request: dict) -> dict:
    op = request.get("op")
    if op == "ensure":
        return {"ok": True, "port": await service.ensure(Forward.from_json(request["forward"]))}
    if op == "close":
        await service.close(str(request["name"]))
        return {"ok": True}
    if op == "list":
        return {"ok": True, "forwards": service.listing()}
    if op == "health":
        return {"ok": True, "pid": os.getpid(), "forwards": len(service.table),
                "down": sorted(service.problems)}
    if op == "stop-everything":
        await service.stop_everything()
        return {"ok": True}
    if op == "warm":
        return {"ok": True, "pid": await service.warm(Login.from_json(request["login"]))}
    if op == "identity":
        login = request["login"]
        path = store_identity(service.directory, str(login["username"]), str(login["host"]),
                              int(login["port"]), str(request["key"]), str(request["certificate"]))
        return {"ok": True, "path": str(path)}
    raise ValueError(f"unknown op {op!r}")


# --- identities (SSH certificate mode) ---------------------------------------------------------

_PRIVATE_KEY = re.compile(
    r"-----BEGIN OPENSSH PRIVATE KEY-----\n[A-Za-z0-9+/=\n]{1,8000}"
    r"-----END OPENSSH PRIVATE KEY-----\n?")
_CERTIFICATE = re.compile(
    r"[a-z0-9.-]{1,40}-cert-v01@openssh\.com [A-Za-z0-9+/=]{1,8000}( \S*)?\n?")


def identities_directory(directory: Path) -> Path:
    """Where the handed-over keys live: a 0700 directory of this service's own in
    ``/dev/shm`` (memory, never on the state directory's disk or volume), named after this
    user and the service's directory; ``<directory>/identities`` where there is no
    ``/dev/shm``. One that exists must be a real directory of ours, mode 0700."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return directory / "identities"
    digest = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
    return shm / f"hub-spawner-{os.geteuid()}-{digest}"


def _private_directory(path: Path) -> Path:
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    found = os.lstat(path)
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.geteuid() or (
            stat.S_IMODE(found.st_mode) != 0o700):
        raise ValueError(f"{path} is not a private directory of this user: not storing keys "
                         "there")
    return path


def store_identity(
    directory: Path, username: str, host: str, port: int, key: str, certificate: str
) -> Path:
    """Write a key and its certificate (if any) for ``username@host:port`` where the
    masters' ``ssh -i`` finds them (``<path>`` and ``<path>-cert.pub``, 0600, replaced
    atomically: a running master keeps its connection, the next one logs in with the new
    certificate), in ``identities_directory``. Returns the key's path."""
    Login(host, port, username, "/", "/")  # validates host, port and user name
    if not _PRIVATE_KEY.fullmatch(key):
        raise ValueError("the identity's key is not an OpenSSH private key")
    if certificate and not _CERTIFICATE.fullmatch(certificate):
        raise ValueError("the identity's certificate is not an OpenSSH certificate")
    identities = _private_directory(identities_directory(directory))
    name = hashlib.sha256(f"{username}@{host}:{port}".encode()).hexdigest()[:16]
    path = identities / name
    if not certificate:  # a plain key: a certificate left from before must not go with it
        Path(f"{path}-cert.pub").unlink(missing_ok=True)
    for target, text in ((Path(f"{path}-cert.pub"), certificate), (path, key)):
        if not text:
            continue
        temporary = target.with_name(f".{target.name}.{os.getpid()}")
        temporary.unlink(missing_ok=True)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                             0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(text if text.endswith("\n") else text + "\n")
        os.replace(temporary, target)
    return path


def remove_unused_identities(directory: Path, in_use: set[str],
                             grace: float = IDENTITY_GRACE_SECONDS) -> list[Path]:
    """Delete the stored keys (and their certificates) that no path in ``in_use`` names and
    that were stored more than ``grace`` seconds ago (``grace`` < 0: every one not in use),
    here and in the ``<directory>/identities`` of older versions. Returns the keys deleted."""
    deleted = []
    now = time.time()
    for identities in {identities_directory(directory), directory / "identities"}:
        try:
            names = os.listdir(identities)
        except FileNotFoundError:
            continue
        except OSError as error:  # not a directory (something else took the name)
            log.warning("not sweeping identities in %s: %s", identities, error)
            continue
        for name in names:
            key = identities / name
            if name.startswith(".") or name.endswith("-cert.pub") or str(key) in in_use:
                continue
            try:
                if grace >= 0 and now - os.lstat(key).st_mtime < grace:
                    continue
            except FileNotFoundError:
                continue
            for each in (key, Path(f"{key}-cert.pub")):
                each.unlink(missing_ok=True)
            deleted.append(key)
    return deleted


async def serve(
    directory: Path,
    listen: tuple[str, int] | None = None,
    token: str = "",
    forward_ports: tuple[int, int] | None = None,
    metrics: tuple[str, int] | None = None,
) -> None:
    service = TunnelService(directory, forward_ports)
    if metrics is not None:
        serve_metrics(service, *metrics)
    control_path = directory / "ctl"
    with contextlib.suppress(FileNotFoundError):
        control_path.unlink()
    old_umask = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(
            lambda r, w: handle_client(service, r, w), path=str(control_path)
        )
    finally:
        os.umask(old_umask)
    servers = [server]
    if listen is not None:
        servers.append(await asyncio.start_server(
            lambda r, w: handle_client(service, r, w, token), host=listen[0], port=listen[1]
        ))
        log.info("tunnel service %d: control also on TCP %s:%d (token required)", os.getpid(),
                 *listen)
    log.info("tunnel service %d: listening on %s (%d forwards)", os.getpid(), control_path,
             len(service.table))
    service.restore()  # in the background: the control socket answers meanwhile
    cleanup = asyncio.ensure_future(service.end_unused_masters())
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    supervisor = asyncio.ensure_future(service.supervise())
    await stopping.wait()
    for each in servers:
        each.close()
    supervisor.cancel()
    cleanup.cancel()
    # Masters and forwards are left running on purpose: a new service adopts them.
    log.info("tunnel service %d: stopping; forwards stay up for the next service", os.getpid())


def prepare_directory(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    (directory / "m").mkdir(mode=0o700, exist_ok=True)
    # A socket path holds at most 107 bytes; OpenSSH adds ".<16 random chars>" while it binds.
    longest = len(str(directory / "m" / ("x" * 12))) + 17
    if longest > 107:
        raise SystemExit(f"tunnel service: {directory} is too long for Unix socket paths")


def serve_metrics(service: TunnelService, host: str, port: int) -> None:
    """Prometheus metrics on ``http://HOST:PORT/metrics`` (a thread of prometheus_client's):
    masters, forwards up and down, and counters of restores and master starts. They say
    nothing about users, so they need no token."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class ServiceCollector:
        def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
            masters = GaugeMetricFamily(
                "hub_spawner_tunnel_masters",
                "OpenSSH masters the service holds (one logged-in SSH connection each)")
            masters.add_metric([], sum(1 for m in list(service.masters.values()) if m.alive()))
            yield masters
            forwards = GaugeMetricFamily(
                "hub_spawner_tunnel_forwards", "Forwards in the service's table, by state",
                labels=["state"])
            total, down = len(service.table), len(service.problems)
            forwards.add_metric(["up"], max(0, total - down))
            forwards.add_metric(["down"], down)
            yield forwards
            for name, text in (
                    ("restores", "Forwards brought back (after a restart or an SSH drop)"),
                    ("master_starts", "OpenSSH masters started (logins)"),
                    ("master_start_failures", "OpenSSH masters that failed to log in")):
                counter = CounterMetricFamily(f"hub_spawner_tunnel_{name}", text)
                counter.add_metric([], service.counts[name])
                yield counter

    registry = CollectorRegistry()
    registry.register(ServiceCollector())
    start_http_server(port, addr=host, registry=registry)
    log.info("tunnel service %d: metrics on http://%s:%d/metrics", os.getpid(), host or "*",
             port)


def build_parser() -> argparse.ArgumentParser:
    """The service's command line (also rendered into docs/configuration.md)."""
    parser = argparse.ArgumentParser(
        prog="python -m hub_spawner.tunnels", description="hub_spawner's tunnel service"
    )
    parser.add_argument("--dir", required=True, type=Path,
                        help="state directory: control socket, forward table, master sockets")
    parser.add_argument("--listen", default="", metavar="HOST:PORT",
                        help="also take control requests over TCP (token required, from "
                        "HUB_SPAWNER_TUNNEL_TOKEN)")
    parser.add_argument("--metrics", default="", metavar="HOST:PORT",
                        help="serve Prometheus metrics on http://HOST:PORT/metrics (masters, "
                        "forwards, restores; no user data, no token); HOST may be empty for "
                        "every address")
    parser.add_argument("--forward-ports", default="", metavar="LOW-HIGH",
                        help="take the local port of each forward from this range (e.g. "
                        "20000-20999, for a firewall or NetworkPolicy); default: any free port")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    forward_ports = None
    if args.forward_ports:
        low, _, high = args.forward_ports.partition("-")
        if not (low.isdigit() and high.isdigit() and 1024 <= int(low) <= int(high) <= 65535):
            parser.error(f"--forward-ports wants LOW-HIGH within 1024-65535, not "
                         f"{args.forward_ports!r}")
        forward_ports = (int(low), int(high))
    listen, token = None, os.environ.get("HUB_SPAWNER_TUNNEL_TOKEN", "")
    if args.listen:
        host, _, port = args.listen.rpartition(":")
        if not host or not port.isdigit():
            parser.error(f"--listen wants HOST:PORT, not {args.listen!r}")
        if len(token) < 16:
            parser.error("--listen needs a token of 16 or more characters in "
                         "HUB_SPAWNER_TUNNEL_TOKEN: anyone who can reach the port could "
                         "otherwise open tunnels as any cluster user")
        listen = (host.strip("[]"), int(port))
    logging.basicConfig(level=logging.INFO,
                        format="[%(levelname)1.1s %(asctime)s tunnels] %(message)s")
    directory = args.dir.resolve()
    prepare_directory(directory)
    lock = open(directory / "lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"tunnel service: already running for {directory}", file=sys.stderr)
        return 0
    metrics = None
    if args.metrics:
        host, _, port = args.metrics.rpartition(":")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            parser.error(f"--metrics wants HOST:PORT (HOST may be empty), not {args.metrics!r}")
        metrics = (host.strip("[]"), int(port))
    asyncio.run(serve(directory, listen, token, forward_ports, metrics))
    return 0
