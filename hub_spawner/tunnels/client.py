"""What the spawner uses to talk to the tunnel service (and to start it when it is not running).

Requirements:
- one request is one JSON line on the service's Unix socket; a service that is not running is
  started (``python -m hub_spawner.tunnels --dir DIR``, in its own session, so that it outlives
  the hub) and asked again, as JupyterHub does with configurable-http-proxy;
- every failure is a ``TunnelError`` whose message says what happened.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from ..errors import SpawnError
from .forwards import Forward, Login, master_socket_keys

log = logging.getLogger(__name__)

START_TIMEOUT = 15.0
REQUEST_TIMEOUT = 60.0


#: What connecting to a service that is not (or no longer) running raises.
_NOT_RUNNING = (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, BrokenPipeError)


class TunnelError(SpawnError):
    """The tunnel service could not do what was asked (or could not be reached)."""


#: The longest answer read: a listing of every forward (~200 bytes each; 400 at 200 servers is
#: 80 KB, past asyncio's default line limit of 64 KiB).
MAX_REPLY_BYTES = 16 << 20


class TunnelClient:
    """Requests to the tunnel service that keeps its state in ``directory`` (over its Unix
    socket; started when not running, unless ``start`` is False: then something else, such as
    a systemd unit, runs it), or, with ``address`` (``host:port``), to one that runs elsewhere
    (over TCP with ``token``; never started from here)."""

    def __init__(
        self,
        directory: str | Path,
        python: str = sys.executable,
        address: str = "",
        token: str = "",
        start: bool = True,
    ) -> None:
        self.directory = Path(directory).resolve()
        self.python = python
        self.address = address
        self.token = token
        self.start = start
        self._start_lock = asyncio.Lock()
        self._listed: dict[str, dict] | None = None
        self._listed_at = 0.0
        self._listing: asyncio.Future | None = None

    async def ensure(self, forward: Forward) -> int:
        """Make sure ``forward`` is up; returns its port (the same one for the same spec)."""
        reply = await self.request({"op": "ensure", "forward": forward.to_json()})
        return int(reply["port"])

    async def ensure_local(
        self, name: str, login: Login, listen_host: str, dest_host: str, dest_port: int,
        listen_port: int = 0, dest_socket: str = "",
    ) -> int:
        """A local forward to ``dest_host:dest_port``, or to the Unix socket ``dest_socket``
        (then ``dest_port`` is 0), as ``login``'s host sees them."""
        return await self.ensure(
            Forward(name, "local", login, listen_host, dest_host, dest_port, listen_port,
                    dest_socket)
        )

    async def ensure_reverse(
        self, name: str, login: Login, listen_host: str, dest_host: str, dest_port: int,
        listen_port: int = 0,
    ) -> int:
        return await self.ensure(
            Forward(name, "reverse", login, listen_host, dest_host, dest_port, listen_port)
        )

    async def close(self, name: str) -> None:
        """Drop ``name``. A local service that is not running and has no table holds nothing:
        it is not started just for this."""
        start = bool(self.address) or (self.directory / "forwards.json").exists()
        try:
            await self.request({"op": "close", "name": name}, start=start)
        except TunnelError:
            if start:
                raise

    async def store_identity(
        self, host: str, port: int, username: str, key: str, certificate: str
    ) -> str:
        """Hand the service an ephemeral key and its certificate for ``username@host:port``;
        returns the key's path on the service's side, for ``Login.key_path``."""
        reply = await self.request({
            "op": "identity", "login": {"host": host, "port": port, "username": username},
            "key": key, "certificate": certificate,
        })
        return str(reply["path"])

    async def warm(self, login: Login) -> int:
        """Have the service start ``login``'s master now (it stops it again if no forward
        takes it within a few minutes); returns the master's pid."""
        return int((await self.request({"op": "warm", "login": dataclasses.asdict(login)}))["pid"])

    async def forwards(self) -> dict[str, dict]:
        return (await self.request({"op": "list"}))["forwards"]

    async def recent_forwards(self, max_age: float) -> dict[str, dict]:
        """The service's forward table as listed at most ``max_age`` seconds ago: one
        ``list`` for every spawner's poll of a cycle, instead of two ``ensure`` each."""
        loop = asyncio.get_running_loop()
        if self._listed is not None and loop.time() - self._listed_at <= max_age:
            return self._listed
        if self._listing is None or self._listing.done():
            self._listing = asyncio.ensure_future(self.forwards())
        listing = await asyncio.shield(self._listing)
        self._listed, self._listed_at = listing, loop.time()
        return listing

    def forget_listing(self) -> None:
        """The next ``recent_forwards`` asks the service again (a forward changed)."""
        self._listed = None

    def masters_left(self) -> list[str]:
        """The ssh masters whose control socket is in a local service's directory (none for a
        service reached by ``address``): a service that is not running left them."""
        return [] if self.address else master_socket_keys(self.directory)

    async def health(self) -> dict:
        return await self.request({"op": "health"}, start=False)

    async def request(self, request: dict, start: bool = True) -> dict:
        try:
            reply = await self._send(request)
        except OSError as error:
            if self.address:
                raise TunnelError(
                    f"the tunnel service at {self.address} cannot be reached: {error}"
                ) from None
            if not isinstance(error, _NOT_RUNNING):
                raise TunnelError(f"the tunnel service's socket failed: {error}") from None
            if not start:
                raise TunnelError(
                    f"the tunnel service for {self.directory} is not running"
                ) from None
            if not self.start:
                raise TunnelError(
                    f"the tunnel service for {self.directory} is not running, and the hub does "
                    "not start it (tunnel_service_start is off): start the service's own unit "
                    "(e.g. systemctl start hub-spawner-tunnels)"
                ) from None
            await self._start_service()
            reply = await self._send(request)
        if not reply.get("ok"):
            raise TunnelError(reply.get("error") or "the tunnel service refused the request")
        return reply

    async def _send(self, request: dict) -> dict:
        if self.address:
            host, _, port = self.address.rpartition(":")
            reader, writer = await asyncio.open_connection(
                host.strip("[]"), int(port), limit=MAX_REPLY_BYTES
            )
            request = dict(request, token=self.token)
        else:
            reader, writer = await asyncio.open_unix_connection(
                str(self.directory / "ctl"), limit=MAX_REPLY_BYTES
            )
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
        except asyncio.TimeoutError:
            raise TunnelError(
                f"the tunnel service did not answer within {REQUEST_TIMEOUT:.0f} s"
            ) from None
        except ValueError:  # asyncio: a line beyond the reader's limit
            raise TunnelError(
                f"the tunnel service's answer is longer than {MAX_REPLY_BYTES >> 20} MiB"
            ) from None
        finally:
            writer.close()
        if not line:
            raise TunnelError("the tunnel service closed the connection without an answer")
        return json.loads(line)

    async def _start_service(self) -> None:
        async with self._start_lock:
            try:
                await self._send({"op": "health"})
                return  # another request started it meanwhile
            except _NOT_RUNNING:
                pass
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            log_path = self.directory / "service.log"
            log.info("starting the tunnel service (%s); its log: %s", self.directory, log_path)
            with open(log_path, "ab") as log_file:
                process = subprocess.Popen(
                    [self.python, "-m", "hub_spawner.tunnels", "--dir", str(self.directory)],
                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    start_new_session=True,  # outlives the hub, like a proxy it started
                    env=_service_environment(),
                )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + START_TIMEOUT
            while loop.time() < deadline:
                await asyncio.sleep(0.1)
                try:
                    await self._send({"op": "health"})
                    return
                except _NOT_RUNNING:
                    if process.poll() not in (None, 0):
                        break
            raise TunnelError(
                f"the tunnel service did not start (exit status {process.poll()}); see {log_path}"
            )


def _service_environment() -> dict[str, str]:
    """Only what the service needs: the hub's environment holds secrets (proxy token, ...)."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV",
            "HUB_TUNNEL_WARM_SECONDS")
    return {name: os.environ[name] for name in keep if name in os.environ}
