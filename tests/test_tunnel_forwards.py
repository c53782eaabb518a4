"""The tunnel service's pure parts: forward validation, OpenSSH command lines, the table file."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import time
from pathlib import Path

import pytest

from hub_spawner.tunnels.forwards import (
    Entry,
    Forward,
    Login,
    control_command,
    forward_spec,
    load_table,
    master_command,
    save_table,
)
from hub_spawner.tunnels.service import (
    _port_candidates,
    identities_directory,
    remove_unused_identities,
    store_identity,
)
from hub_spawner.tunnels.service import main as service_main

LOGIN = Login("login.example.org", 22, "alice", "/srv/keys/alice", "/srv/known_hosts")


def _forward(**changes) -> Forward:
    values = dict(name="alice/x", kind="local", login=LOGIN, listen_host="127.0.0.1",
                  dest_host="cn017", dest_port=43211)
    values.update(changes)
    return Forward(**values)


@pytest.mark.parametrize("changes", [
    {"dest_host": "cn017 -oProxyCommand=touch /tmp/x"},
    {"dest_host": "-oProxyCommand=x"},
    {"listen_host": "127.0.0.1;id"},
    {"name": "alice/x\nrm"},
    {"kind": "dynamic"},
    {"dest_port": 0},
    {"listen_port": 70000},
])
def test_hostile_or_bad_forward_values_are_refused(changes):
    with pytest.raises(ValueError, match="invalid"):
        _forward(**changes)


@pytest.mark.parametrize("changes", [
    {"username": "$(id)"}, {"username": "-oProxyCommand=x"}, {"host": "login;id"},
    {"key_path": "relative/key"}, {"port": 0},
])
def test_hostile_or_bad_login_values_are_refused(changes):
    values = dict(host="login", port=22, username="alice", key_path="/k", known_hosts_path="/kh")
    values.update(changes)
    with pytest.raises(ValueError, match="invalid"):
        Login(**values)


def test_commands_keep_host_keys_strict_and_end_options_before_the_destination():
    master = master_command(LOGIN, "/d/m/abc")
    assert master[:3] == ["ssh", "-F", "/dev/null"]
    assert "StrictHostKeyChecking=yes" in master and "BatchMode=yes" in master
    assert "UserKnownHostsFile=/srv/known_hosts" in master
    assert master[master.index("--") + 1] == "alice@login.example.org"
    control = control_command(LOGIN, "/d/m/abc", "forward", "-L", "127.0.0.1:5:cn017:6")
    assert control[control.index("-O") + 1] == "forward"
    assert "ControlMaster=no" in control
    assert control[-2:] == ["--", "alice@login.example.org"]


def test_forward_spec_and_same_route():
    forward = _forward(listen_port=5000)
    assert forward_spec(forward, 5000) == "127.0.0.1:5000:cn017:43211"
    assert forward_spec(_forward(dest_host="fe80::1"), 7) == "127.0.0.1:7:[fe80::1]:43211"
    assert forward.same_route(_forward())  # "any port" matches the port it holds
    assert forward.same_route(_forward(listen_port=5000))
    assert not forward.same_route(_forward(listen_port=5001))
    assert not forward.same_route(_forward(dest_port=1))


def test_master_key_is_stable_and_short():
    assert LOGIN.key == Login(**vars(LOGIN)).key
    assert len(LOGIN.key) == 12
    bob = Login("login.example.org", 22, "bob", "/srv/keys/bob", "/srv/known_hosts")
    assert LOGIN.key != bob.key


def test_table_round_trip_is_private(tmp_path):
    path = tmp_path / "forwards.json"
    table = {"alice/x": Entry(_forward(), 5000)}
    save_table(path, table)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    loaded = load_table(path)
    assert loaded["alice/x"].forward == _forward() and loaded["alice/x"].port == 5000
    assert load_table(tmp_path / "absent.json") == {}


def test_local_forward_ports_come_from_the_configured_range():
    """``--forward-ports``: a NetworkPolicy opens one range, so every local port is in it."""
    ports = _port_candidates(_forward(), (20000, 20999))
    assert 1 <= len(ports) <= 5 and len(set(ports)) == len(ports)
    assert all(20000 <= port <= 20999 for port in ports)
    reverse = _port_candidates(_forward(kind="reverse"), (20000, 20999))
    assert all(32768 <= port < 60999 for port in reverse)  # the range is for local ones only


def test_a_taken_port_in_the_range_is_not_offered():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert _port_candidates(_forward(), (port, port)) == []


@pytest.mark.parametrize("value", ["80-90", "20000", "2000-1000", "a-b", "20000-70000"])
def test_bad_forward_ports_are_refused_before_anything_starts(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        service_main(["--dir", str(tmp_path / "t"), "--forward-ports", value])
    assert exit_info.value.code == 2
    assert "--forward-ports wants LOW-HIGH within 1024-65535" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


@pytest.fixture(autouse=True)
def _no_identities_left(tmp_path):
    """Each test's keys in /dev/shm go with it."""
    yield
    shutil.rmtree(identities_directory(tmp_path), ignore_errors=True)


def _identity():
    import asyncssh

    from hub_spawner.identity import mint

    ca = asyncssh.generate_private_key("ssh-ed25519")
    return mint(ca, "alice", "hub_spawner:alice", 10)


def test_an_identity_is_stored_private_and_replaced_in_place(tmp_path):
    certified = _identity()
    key = certified.private_key_text()  # each export differs (OpenSSH's random check word)
    path = store_identity(tmp_path, "alice", "login.example.org", 22, key,
                          certified.certificate_text())
    # In memory (/dev/shm), never on the state directory's disk, in a directory of its own.
    assert path.parent == identities_directory(tmp_path)
    assert str(path).startswith(f"/dev/shm/hub-spawner-{os.geteuid()}-")
    assert not (tmp_path / "identities").exists()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    for file in (path, Path(f"{path}-cert.pub")):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert path.read_text() == key
    again = _identity()
    key = again.private_key_text()
    assert store_identity(tmp_path, "alice", "login.example.org", 22, key,
                          again.certificate_text()) == path
    assert path.read_text() == key
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, f"{path.name}-cert.pub"]


@pytest.mark.parametrize("changes", [
    {"username": "alice; id"}, {"host": "-oProxyCommand=x"}, {"port": 0},
    {"key": "not a key"}, {"certificate": "ssh-ed25519 AAAA"},
    {"key": "-----BEGIN OPENSSH PRIVATE KEY-----\n$(id)\n-----END OPENSSH PRIVATE KEY-----\n"},
])
def test_a_bad_identity_is_refused(tmp_path, changes):
    certified = _identity()
    values = dict(username="alice", host="login.example.org", port=22,
                  key=certified.private_key_text(), certificate=certified.certificate_text())
    values.update(changes)
    with pytest.raises(ValueError):
        store_identity(tmp_path, values["username"], values["host"], values["port"],
                       values["key"], values["certificate"])
    assert not list(identities_directory(tmp_path).glob("*"))


def test_keys_no_forward_uses_are_deleted_after_the_grace_and_in_use_ones_kept(tmp_path):
    certified = _identity()
    kept = store_identity(tmp_path, "alice", "login.example.org", 22,
                          certified.private_key_text(), certified.certificate_text())
    unused = store_identity(tmp_path, "bob", "login.example.org", 22,
                            certified.private_key_text(), "")
    legacy = tmp_path / "identities" / "0123456789abcdef"  # where older versions wrote
    legacy.parent.mkdir(mode=0o700)
    legacy.write_text("old key\n")
    assert remove_unused_identities(tmp_path, {str(kept)}) == []  # all newer than the grace
    old = time.time() - 60
    for path in (kept, unused, legacy):
        os.utime(path, (old, old))
    assert sorted(remove_unused_identities(tmp_path, {str(kept)})) == sorted([unused, legacy])
    assert kept.exists() and Path(f"{kept}-cert.pub").exists()
    assert not unused.exists() and not legacy.exists()
    assert remove_unused_identities(tmp_path, set(), grace=-1) == [kept]
    assert not list(identities_directory(tmp_path).iterdir())


def test_a_file_in_place_of_the_identities_directory_is_no_sweep_failure(tmp_path):
    planted = identities_directory(tmp_path)
    planted.write_text("not a directory")
    try:
        assert remove_unused_identities(tmp_path, set()) == []
    finally:
        planted.unlink()


def test_a_planted_identities_directory_is_refused(tmp_path):
    """``/dev/shm`` is shared: a directory there that is not ours, or not private, is not
    used."""
    certified = _identity()
    planted = identities_directory(tmp_path)
    planted.mkdir(mode=0o755)
    os.chmod(planted, 0o755)
    try:
        with pytest.raises(ValueError, match="not a private directory"):
            store_identity(tmp_path, "alice", "login.example.org", 22,
                           certified.private_key_text(), "")
    finally:
        planted.rmdir()


# --- the node hop and socket destinations ----------------------------------------------------

NODE = Login("cn017", 22, "alice", "/srv/keys/alice", "/srv/known_hosts", jump=LOGIN)


def test_a_node_hop_master_goes_through_the_login_masters_connection_as_strictly():
    master = master_command(NODE, "/d/m/node", "/d/m/login%x")
    assert master[master.index("--") + 1] == "alice@cn017"
    assert "StrictHostKeyChecking=yes" in master and "UserKnownHostsFile=/srv/known_hosts" in master
    proxy = next(o for o in master if o.startswith("ProxyCommand="))[len("ProxyCommand="):]
    words = proxy.split()
    assert words[:3] == ["ssh", "-F", "/dev/null"]
    # the jump master's control path (a '%' doubled for ssh's token expansion), a stdio forward
    # to the node, never a session of its own; strict should it ever have to log in itself
    assert words[words.index("-S") + 1] == "/d/m/login%%x"
    assert words[words.index("-W") + 1] == "%h:%p"
    assert "ControlMaster=no" in words and "StrictHostKeyChecking=yes" in words
    assert words[-2:] == ["--", "alice@login.example.org"]
    with pytest.raises(ValueError, match="control path"):
        master_command(NODE, "/d/m/node")


def test_a_node_hop_has_its_own_master_and_leaves_plain_logins_ids_alone():
    assert NODE.key not in (LOGIN.key, Login(**dict(vars(NODE), jump=None)).key)
    assert NODE.describe() == "alice@cn017:22 via alice@login.example.org:22"
    # The id of a login without a hop is what it was before hops existed (a running master
    # of an older service is adopted, not replaced).
    assert LOGIN.key == "a49e90d69edd"  # as computed before this change
    # Behind a bastion, a node hop has two: node via login node via bastion; never three.
    bastion = Login("bastion.example.org", 22, "alice", "/k", "/kh")
    behind = Login("login", 22, "alice", "/k", "/kh", jump=bastion)
    node = Login("cn1", 22, "alice", "/k", "/kh", jump=behind)
    assert [each.host for each in node.chain()] == ["cn1", "login", "bastion.example.org"]
    assert node.describe() == "alice@cn1:22 via alice@login:22 via alice@bastion.example.org:22"
    with pytest.raises(ValueError, match="two hops at most"):
        Login("cn2", 22, "alice", "/k", "/kh", jump=node)


def test_a_socket_forward_round_trips_through_the_table(tmp_path):
    forward = _forward(login=NODE, dest_host="127.0.0.1", dest_port=0,
                       dest_socket="/tmp/hub-spawner.aB3/server.sock")
    assert forward_spec(forward, 5000) == "127.0.0.1:5000:/tmp/hub-spawner.aB3/server.sock"
    assert forward.describe_destination() == "/tmp/hub-spawner.aB3/server.sock"
    save_table(tmp_path / "f.json", {"alice/x": Entry(forward, 5000)})
    assert load_table(tmp_path / "f.json")["alice/x"].forward == forward


@pytest.mark.parametrize("changes", [
    {"dest_socket": "relative.sock", "dest_port": 0},
    {"dest_socket": "/tmp/../x.sock", "dest_port": 0},
    {"dest_socket": "/tmp/x.sock:1", "dest_port": 0},
    {"dest_socket": "/tmp/x y.sock", "dest_port": 0},
    {"dest_socket": "/tmp/x.sock"},  # and a port
    {"dest_socket": "/tmp/x.sock", "dest_port": 0, "kind": "reverse"},
])
def test_a_bad_socket_destination_is_refused(changes):
    with pytest.raises(ValueError, match="invalid"):
        _forward(**changes)


# --- the data plane knows forwards, not schedulers -------------------------------------------


def test_the_tunnel_service_does_not_import_the_scheduler_modules():
    """Cancelling jobs is the reconciler's (hub side); the service only holds forwards."""
    import subprocess
    import sys

    probe = ("import sys, hub_spawner.tunnels.service; "
             "print(sorted(m for m in sys.modules if m.startswith('hub_spawner.schedulers')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_a_listing_longer_than_asyncios_default_line_limit_is_read(tmp_path):
    """200 servers make 400 forwards: an ~80 KB answer, past asyncio's default 64 KiB."""
    import asyncio
    import json

    from hub_spawner.tunnels.client import TunnelClient

    forwards = {f"user{n}/server{n}": {"up": True, "port": 40000 + n, "kind": "local",
                                       "login": "u@login:22", "destination": "cn1:8888",
                                       "master_pid": 1234, "problem": ""} for n in range(1000)}

    async def serve_and_ask():
        async def answer(reader, writer):
            await reader.readline()
            writer.write(json.dumps({"ok": True, "forwards": forwards}).encode() + b"\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(answer, str(tmp_path / "ctl"))
        async with server:
            return await TunnelClient(tmp_path).forwards()

    listed = asyncio.run(serve_and_ask())
    assert len(json.dumps(listed)) > 64 * 1024 and listed == forwards


def test_a_hub_that_does_not_start_the_service_says_to_start_its_unit(tmp_path):
    """``tunnel_service_start = False`` (a systemd unit runs the service): with none running,
    the request fails with what to do, and no service process is started."""
    import asyncio

    from hub_spawner.tunnels.client import TunnelClient, TunnelError

    client = TunnelClient(tmp_path / "tunnels", start=False)
    with pytest.raises(TunnelError, match="not running, and the hub does not start it .*"
                                          "systemctl start hub-spawner-tunnels"):
        asyncio.run(client.forwards())
    assert not (tmp_path / "tunnels").exists()  # nothing made, nothing started
@pytest.mark.parametrize(("said", "cut"), [
    ("kex_exchange_identification: Connection closed by remote host", True),
    ("kex_exchange_identification: read: Connection reset by peer", True),
    ("Connection reset by 10.77.1.2 port 22", True),
    ("ssh: connect to host 10.77.1.2 port 22: Connection refused", False),
    ("alice@10.77.1.2: Permission denied (publickey).", False),
])
def test_only_a_connection_cut_before_the_handshake_is_tried_again(said, cut):
    """What OpenSSH says when sshd is beyond its MaxStartups (tried again) and what it says
    otherwise (not)."""
    from hub_spawner.tunnels.service import _HANDSHAKE_CUT

    assert bool(_HANDSHAKE_CUT.search(f"cannot connect to alice@10.77.1.2:22: {said}")) is cut
