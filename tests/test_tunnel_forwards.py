"""The tunnel service's pure parts: forward validation, OpenSSH command lines, the table file."""

from __future__ import annotations

import os

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
