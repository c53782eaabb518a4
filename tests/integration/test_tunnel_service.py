"""The tunnel service (hub_spawner.tunnels) on the real lab: OpenSSH masters to the login host's
real sshd, forwards to the compute host and back, restarts and SSH drops. No hub involved."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from hub_spawner.tunnels.client import TunnelClient, TunnelError
from hub_spawner.tunnels.forwards import Login

from .conftest import active_jobs, processes_on, wait_for

ECHO_PORT = 18950
#: An echo server (one thread per connection) on the compute host.
ECHO = """
import socket, sys, threading
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen()
print("listening", flush=True)
def serve(conn):
    while data := conn.recv(65536):
        conn.sendall(data)
while True:
    threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
"""


def _login(lab, user: str = "alice", known_hosts: str | None = None) -> Login:
    return Login(lab.LOGIN_IP, 22, user, str(lab.KEY_DIR / user),
                 known_hosts or str(lab.KNOWN_HOSTS))


def _run(coroutine):
    return asyncio.run(coroutine)


def _echo(port: int, data: bytes = b"ping", conn: socket.socket | None = None) -> bytes:
    own = conn is None
    conn = conn or socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        conn.sendall(data)
        return conn.recv(65536)
    finally:
        if own:
            conn.close()


def _echo_works(port: int) -> bool:
    try:
        return _echo(port) == b"ping"
    except OSError:
        return False


def _service_pid(client: TunnelClient) -> int:
    return _run(client.health())["pid"]


@pytest.fixture
def echo_server(lab):
    process = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{lab.NAMESPACES['compute']}", sys.executable, "-c", ECHO,
         lab.COMPUTE_IP, str(ECHO_PORT)],
        stdout=subprocess.PIPE, text=True,
    )
    assert process.stdout.readline().strip() == "listening"
    yield
    lab.stop_pid(process.pid)


@pytest.fixture
def client(lab, tmp_path_factory):
    """A client on a fresh service directory; the service it starts is stopped at the end,
    with everything it holds."""
    directory = tmp_path_factory.mktemp("tun", numbered=True)
    tunnels = TunnelClient(directory)
    yield tunnels
    try:
        pid = _service_pid(tunnels)
    except TunnelError:
        return
    _run(tunnels.request({"op": "stop-everything"}, start=False))
    lab.stop_pid(pid)


def test_local_forward_reaches_compute_and_is_idempotent(lab, client, echo_server):
    login = _login(lab)
    port = _run(client.ensure_local("alice/a", login, "127.0.0.1", lab.COMPUTE_IP, ECHO_PORT))
    assert _echo(port) == b"ping"
    again = _run(client.ensure_local("alice/a", login, "127.0.0.1", lab.COMPUTE_IP, ECHO_PORT))
    assert again == port
    listing = _run(client.forwards())
    assert listing["alice/a"]["port"] == port and listing["alice/a"]["up"]
    assert oct(os.stat(client.directory / "forwards.json").st_mode & 0o777) == "0o600"
    assert oct(os.stat(client.directory / "ctl").st_mode & 0o777) == "0o600"
    _run(client.close("alice/a"))
    assert not _echo_works(port)
    assert "alice/a" not in _run(client.forwards())


def test_reverse_forward_lets_the_compute_host_reach_the_hub_side(lab, client):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    login = _login(lab)
    port = _run(client.ensure_reverse("alice/a/hub-api", login, lab.LOGIN_CLUSTER_IP,
                                      "127.0.0.1", server.getsockname()[1]))
    probe = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{lab.NAMESPACES['compute']}", sys.executable, "-c",
         "import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), 10);"
         "s.sendall(b'hello'); print(s.recv(10).decode())",
         lab.LOGIN_CLUSTER_IP, str(port)],
        stdout=subprocess.PIPE, text=True,
    )
    conn, _ = server.accept()
    assert conn.recv(10) == b"hello"
    conn.sendall(b"back")
    assert probe.communicate(timeout=10)[0].strip() == "back"
    conn.close()
    server.close()


def test_service_killed_keeps_connections_and_comes_back_on_the_same_ports(lab, client,
                                                                          echo_server):
    login = _login(lab)
    port = _run(client.ensure_local("alice/a", login, "127.0.0.1", lab.COMPUTE_IP, ECHO_PORT))
    open_connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert _echo(port, b"before", open_connection) == b"before"
    os.kill(_service_pid(client), signal.SIGKILL)
    # The forward is the master's, not the service's: the open connection does not notice.
    assert _echo(port, b"during", open_connection) == b"during"
    started = time.monotonic()
    # A new service starts: it answers at once and adopts the master in the background.
    assert _run(client.forwards())["alice/a"]["port"] == port
    assert wait_for(lambda: _run(client.forwards())["alice/a"]["up"], 5), (
        _run(client.forwards()))
    assert time.monotonic() - started < 5
    assert _run(client.forwards())["alice/a"]["port"] == port
    assert _echo(port, b"after", open_connection) == b"after"
    assert _echo_works(port)
    open_connection.close()


def test_ssh_drop_is_repaired_within_seconds(lab, client, echo_server):
    login = _login(lab)
    port = _run(client.ensure_local("alice/a", login, "127.0.0.1", lab.COMPUTE_IP, ECHO_PORT))
    assert _echo_works(port)
    master = _run(client.forwards())["alice/a"]["master_pid"]
    assert master
    # alice's sshd session process on the login host: killing it drops the SSH connection.
    sessions = lab.in_namespace("login", ["pgrep", "-u", "alice", "-x", "sshd"], check=False)
    pids = sessions.stdout.split()
    assert pids, "no sshd session of alice on the login host"
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)
    started = time.monotonic()

    def repaired() -> bool:
        entry = _run(client.forwards())["alice/a"]
        return entry["master_pid"] not in (0, master) and entry["up"] and _echo_works(port)

    assert wait_for(repaired, 5, 0.2), _run(client.forwards())
    assert time.monotonic() - started < 5
    assert _run(client.forwards())["alice/a"]["port"] == port


def test_unknown_host_key_is_refused_with_a_clear_error(lab, client, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(TunnelError, match="[Hh]ost key verification failed"):
        _run(client.ensure_local("alice/a", _login(lab, known_hosts=str(empty)), "127.0.0.1",
                                 lab.COMPUTE_IP, ECHO_PORT))
    assert "alice/a" not in _run(client.forwards())


def test_tcp_control_needs_the_token(lab, echo_server, tmp_path_factory):
    """A service in another pod: control over TCP (loopback here), every request with the token;
    a wrong token is refused, and so is a TCP listener without a token."""
    directory = tmp_path_factory.mktemp("tun", numbered=True)
    address = "127.0.0.1:18960"
    command = [sys.executable, "-m", "hub_spawner.tunnels", "--dir", str(directory),
               "--listen", address]
    refused = subprocess.run(command, env=dict(os.environ, HUB_SPAWNER_TUNNEL_TOKEN=""),
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "token" in refused.stderr
    token = secrets.token_hex(16)
    service = subprocess.Popen(command, env=dict(os.environ, HUB_SPAWNER_TUNNEL_TOKEN=token),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = TunnelClient(directory, address=address, token=token)
    try:
        assert wait_for(lambda: _healthy(client), 10)
        port = _run(client.ensure_local("alice/a", _login(lab), "127.0.0.1", lab.COMPUTE_IP,
                                        ECHO_PORT))
        assert _echo(port) == b"ping"
        intruder = TunnelClient(directory, address=address, token="x" * 32)
        with pytest.raises(TunnelError, match="refused the token"):
            _run(intruder.ensure_local("alice/b", _login(lab), "127.0.0.1", lab.COMPUTE_IP,
                                       ECHO_PORT))
        assert "alice/b" not in _run(client.forwards())
    finally:
        _run(client.request({"op": "stop-everything"}))
        lab.stop_pid(service.pid)
    with pytest.raises(TunnelError, match="cannot be reached"):
        _run(client.health())


def _healthy(client: TunnelClient) -> bool:
    try:
        return bool(_run(client.health()))
    except TunnelError:
        return False


def test_a_warmed_master_waits_for_a_forward_and_then_goes(lab, tmp_path):
    """``warm`` (the spawn form is shown): the master logs in at once; when no forward takes
    it within HUB_TUNNEL_WARM_SECONDS (5 in the tests), it logs out again."""
    client = TunnelClient(tmp_path / "tunnels")
    before = len(processes_on("login", "bob", "sshd"))
    try:
        pid = _run(client.warm(_login(lab, "bob")))
        assert os.path.exists(f"/proc/{pid}")
        assert len(processes_on("login", "bob", "sshd")) == before + 1
        assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 15)
        assert wait_for(lambda: len(processes_on("login", "bob", "sshd")) == before, 10)
    finally:
        lab.stop_tunnel_service(tmp_path / "tunnels")


def test_a_master_a_killed_service_left_unused_is_ended_by_the_next(lab, tmp_path,
                                                                   echo_server):
    """A service killed while a master it warmed had no forward yet (the spawn form was open,
    or a spawn was on its way) leaves that master logged in, and no forward of its table names
    it: the next service ends it at start-up, and keeps (adopts) the master a forward uses."""
    client = TunnelClient(tmp_path / "tunnels")
    before = len(processes_on("login", "bob", "sshd"))
    try:
        port = _run(client.ensure_local("alice/kept", _login(lab), "127.0.0.1", lab.COMPUTE_IP,
                                        ECHO_PORT))
        used = _run(client.forwards())["alice/kept"]["master_pid"]
        warmed = _run(client.warm(_login(lab, "bob")))
        assert len(processes_on("login", "bob", "sshd")) == before + 1
        os.kill(_service_pid(client), signal.SIGKILL)
        _run(client.request({"op": "list"}))  # starts the next service
        assert wait_for(lambda: not os.path.exists(f"/proc/{warmed}"), 15), (
            f"bob's master {warmed} still runs after the service was restarted")
        assert wait_for(lambda: len(processes_on("login", "bob", "sshd")) == before, 10)
        assert wait_for(lambda: _run(client.forwards())["alice/kept"]["up"], 15)
        assert _run(client.forwards())["alice/kept"]["master_pid"] == used
        assert _echo_works(port)
    finally:
        lab.stop_tunnel_service(tmp_path / "tunnels")


class SwitchableLogin:
    """A TCP relay on the hub side to the login host's sshd, as a login node that can go
    dark: ``black_hole()`` drops every connection it carries and then takes new ones without
    a word (a host whose packets are dropped: each SSH attempt waits for its timeout)."""

    def __init__(self, lab) -> None:
        self.target = (lab.LOGIN_IP, 22)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.dark = False
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(client)
            if self.dark:
                continue  # held open, never answered
            server = socket.create_connection(self.target, timeout=10)
            server.settimeout(None)
            self.connections.append(server)
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while not self.dark and (data := source.recv(65536)):
                sink.sendall(data)
        except OSError:
            pass

    def black_hole(self) -> None:
        self.dark = True
        for each in self.connections:
            with contextlib.suppress(OSError):
                each.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        for each in self.connections:
            each.close()


def test_a_dark_login_node_delays_no_other_and_a_restart_answers_at_once(lab, client,
                                                                        echo_server, tmp_path):
    """Issue 28: masters were made one at a time under one lock, so a login node that does not
    answer (15 s per try) held up every other login's forwards, and a restarted service
    opened its control socket only after every restore."""
    relay = SwitchableLogin(lab)
    known_hosts = tmp_path / "known_hosts"
    host_key = (lab.LAB_DIR / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    known_hosts.write_text(f"[127.0.0.1]:{relay.port} {' '.join(host_key)}\n")
    dark = Login("127.0.0.1", relay.port, "alice", str(lab.KEY_DIR / "alice"), str(known_hosts))
    try:
        # Without a dark login node: bob's master and forward, from nothing.
        started = time.monotonic()
        _run(client.ensure_local("bob/a", _login(lab, "bob"), "127.0.0.1", lab.COMPUTE_IP,
                                 ECHO_PORT))
        alone = time.monotonic() - started
        _run(client.close("bob/a"))  # its master goes with it
        # alice's forward through the relay; then the relay's login node goes dark.
        port = _run(client.ensure_local("alice/dark", dark, "127.0.0.1", lab.COMPUTE_IP,
                                        ECHO_PORT))
        assert _echo_works(port)
        relay.black_hole()
        assert wait_for(lambda: not _run(client.forwards())["alice/dark"]["up"], 15, 0.3)
        time.sleep(1)  # the service is trying the dark node again by now
        started = time.monotonic()
        port = _run(client.ensure_local("bob/a", _login(lab, "bob"), "127.0.0.1",
                                        lab.COMPUTE_IP, ECHO_PORT))
        beside = time.monotonic() - started
        assert _echo_works(port)
        print(f"bob's new master and forward: {alone:.2f} s alone, {beside:.2f} s beside a "
              "dark login node", flush=True)
        assert beside < alone + 2, (alone, beside)

        # A restart: the control socket answers at once; the dark forward stays down, bob's
        # comes back on its port.
        os.kill(_service_pid(client), signal.SIGKILL)
        started = time.monotonic()
        health = _run(client.request({"op": "health"}))  # starts the new service
        answered = time.monotonic() - started
        print(f"a restarted service answered health in {answered:.2f} s", flush=True)
        assert answered < 2, answered
        assert "alice/dark" in health["down"]
        assert wait_for(lambda: _run(client.forwards())["bob/a"]["up"], 10, 0.3)
        assert _echo_works(port)
        assert not _run(client.forwards())["alice/dark"]["up"]
    finally:
        relay.close()


def test_a_hub_that_leaves_the_service_to_its_unit_fails_the_spawn_saying_so(lab, hub):
    """``tunnel_service_start = False`` (example_hub_config/systemd/) with the service's unit
    stopped: the spawn fails before any job exists, saying to start the unit, and the hub
    starts no service of its own (under systemd it would die with the hub's unit)."""
    events, _ = hub.spawn("alice", "unit-managed-service")
    assert events[-1].get("failed"), events
    message = events[-1]["message"]
    assert "the hub does not start it (tunnel_service_start is off)" in message, message
    assert "systemctl start hub-spawner-tunnels" in message, message
    assert not active_jobs("alice"), active_jobs("alice")
    running = subprocess.run(["pgrep", "-af", "hub_spawner.tunnels --dir .*tunnels-unit"],
                             capture_output=True, text=True).stdout
    assert running == "", running
