"""Tunnels between the hub host and the cluster, behind a narrow interface.

Requirements:
- the spawner only ever calls ``open_local``, ``open_reverse``, ``close``, ``is_alive`` and
  ``names``: this first version forwards inside the hub process over the pooled asyncssh
  connection; a later one can move the same interface into a long-lived tunnel process beside
  the hub without touching the spawner;
- a local tunnel can be re-opened on the same local port (the proxy's route stays valid);
- closing is idempotent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncssh

from .errors import SpawnError
from .ssh import LoginConnection

log = logging.getLogger(__name__)


class TunnelError(SpawnError):
    """A forward could not be opened."""


@dataclass
class Tunnel:
    """One open forward. ``port`` is the listening port (hub side for local, login side for
    reverse)."""

    kind: str
    port: int
    destination: str
    listener: asyncssh.SSHListener
    connection: LoginConnection


class Tunnels:
    """The set of open tunnels, by name (e.g. ``alice/:server``)."""

    def __init__(self) -> None:
        self._tunnels: dict[str, Tunnel] = {}

    async def open_local(
        self,
        name: str,
        connection: LoginConnection,
        bind_ip: str,
        dest_host: str,
        dest_port: int,
        bind_port: int = 0,
    ) -> int:
        """Listen on ``bind_ip:bind_port`` (0 = any free port) here and forward to
        ``dest_host:dest_port`` as seen from the login node. Returns the local port."""
        self.close(name)
        try:
            listener = await connection.connection.forward_local_port(
                bind_ip, bind_port, dest_host, dest_port
            )
        except (asyncssh.Error, OSError) as error:
            raise TunnelError(
                f"Could not open a tunnel on {bind_ip}:{bind_port} to {dest_host}:{dest_port}: "
                f"{error}"
            ) from None
        port = listener.get_port()
        self._tunnels[name] = Tunnel(
            "local", port, f"{dest_host}:{dest_port}", listener, connection
        )
        log.info("tunnel %s: %s:%d -> %s:%d", name, bind_ip, port, dest_host, dest_port)
        return port

    async def open_reverse(
        self,
        name: str,
        connection: LoginConnection,
        listen_host: str,
        dest_host: str,
        dest_port: int,
        listen_port: int = 0,
    ) -> int:
        """Ask the login node to listen on ``listen_host:listen_port`` (0 = any free port) and
        forward to ``dest_host:dest_port`` here. Returns the port on the login node.

        Listening on an address other than the login node's loopback needs
        ``GatewayPorts clientspecified`` in its sshd_config.
        """
        self.close(name)
        try:
            listener = await connection.connection.forward_remote_port(
                listen_host, listen_port, dest_host, dest_port
            )
        except (asyncssh.Error, OSError) as error:
            listener, reason = None, str(error)
        else:
            reason = "the login node's sshd refused the request"
        if listener is None:
            raise TunnelError(
                f"Could not open the reverse tunnel for the hub API on {listen_host} of the login "
                f"node: {reason}. The login node's sshd needs 'AllowTcpForwarding yes' and "
                "'GatewayPorts clientspecified'."
            )
        port = listener.get_port()
        self._tunnels[name] = Tunnel(
            "reverse", port, f"{dest_host}:{dest_port}", listener, connection
        )
        log.info(
            "reverse tunnel %s: login %s:%d -> %s:%d", name, listen_host, port, dest_host, dest_port
        )
        return port

    def is_alive(self, name: str) -> bool:
        """Whether the named tunnel exists and its SSH connection is up."""
        tunnel = self._tunnels.get(name)
        return tunnel is not None and not tunnel.connection.is_closed()

    def close(self, name: str) -> None:
        """Stop forwarding; nothing happens if there is no such tunnel."""
        tunnel = self._tunnels.pop(name, None)
        if tunnel is not None:
            tunnel.listener.close()
            log.info("tunnel %s closed", name)

    def names(self) -> list[str]:
        return sorted(self._tunnels)


default_tunnels = Tunnels()
