"""Identity modes against the lab's real sshd: SSH user certificates from one CA key (the lab's
sshd has ``TrustedUserCAKeys``), and key files refused when others can read them."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hub_spawner.errors import ClusterUnreachable
from hub_spawner.identity import mint
from hub_spawner.ssh import ConnectionPool, SSHTarget, connect
from hub_spawner.sshlib import asyncssh
from hub_spawner.tunnels.service import identities_directory

from .conftest import (
    REPO,
    active_jobs,
    execute,
    login,
    open_kernel,
    run_in_kernel,
    start_hub,
    stop_hub,
    wait_for,
)

PORT = 28800


def target(lab, **changes) -> SSHTarget:
    fields = dict(host=lab.LOGIN_IP, port=22, username="alice", key_path="",
                  known_hosts_path=str(lab.KNOWN_HOSTS), connect_timeout=5,
                  ca_key_path=str(lab.USER_CA), key_id="hub_spawner:alice")
    fields.update(changes)
    return SSHTarget(**fields)


def sshd_log(lab) -> str:
    return (lab.LAB_DIR / "sshd-22.log").read_text(errors="replace")


async def test_a_certificate_from_the_ca_logs_in_with_no_key_file(lab):
    before = len(sshd_log(lab))
    pool = ConnectionPool()
    try:
        connection = await pool.get(target(lab))
        result = await connection.run("id -un; ls ~/.ssh 2>/dev/null | wc -l")
        assert result.stdout.split()[0] == "alice"
    finally:
        pool.close_all()
    logged = sshd_log(lab)[before:]
    assert "Accepted publickey for alice" in logged
    assert 'ID hub_spawner:alice' in logged  # the key id names the hub user


@pytest.mark.parametrize("case", ["expired", "wrong principal", "another CA"])
async def test_a_bad_certificate_is_refused_with_a_clear_message(lab, tmp_path, case):
    ca_key = asyncssh.read_private_key(str(lab.USER_CA))
    if case == "expired":
        certified = mint(ca_key, "alice", "hub_spawner:alice", 10, start=time.time() - 7200)
    elif case == "wrong principal":
        certified = mint(ca_key, "bob", "hub_spawner:alice", 10)
    else:
        certified = mint(asyncssh.generate_private_key("ssh-ed25519"), "alice", "x", 10)
    with pytest.raises(ClusterUnreachable, match="refused the hub's SSH certificate for alice"):
        await connect(target(lab), client_key=(certified.key, certified.certificate))


async def test_a_ca_key_that_others_can_read_is_refused(lab, tmp_path):
    loose = tmp_path / "user_ca"
    shutil.copy(lab.USER_CA, loose)
    os.chmod(loose, 0o644)
    with pytest.raises(ClusterUnreachable,
                       match=rf"SSH CA key {loose} is readable by group or others \(mode 0644\).*"
                       rf"chmod 600 {loose}"):
        await ConnectionPool().get(target(lab, ca_key_path=str(loose)))


async def test_a_key_file_that_others_can_read_is_refused(lab, tmp_path):
    loose = tmp_path / "alice"
    shutil.copy(lab.KEY_DIR / "alice", loose)
    os.chmod(loose, 0o640)
    with pytest.raises(ClusterUnreachable,
                       match=rf"SSH key {loose} is readable by group or others \(mode 0640\)"):
        await ConnectionPool().get(target(lab, ca_key_path="", key_path=str(loose)))


def test_a_hub_in_certificate_mode_spawns_and_tunnels_with_no_key_files(lab, tmp_path):
    """The hub and the tunnel service log in with certificates only: a kernel runs through
    the proxy and the tunnel, and the service's identity files are private."""
    before = len(sshd_log(lab))
    hub, process = start_hub(tmp_path, PORT, secrets.token_hex(24),
                             {"HUB_SSH_CA": str(lab.USER_CA)})
    try:
        hub.api("POST", "/users/alice")
        events, _ = hub.spawn("alice")
        assert events[-1].get("ready"), events
        assert run_in_kernel(hub, "alice", "print(6 * 7)").strip() == "42"
        stored = identities_directory(tmp_path / "tunnels")
        assert str(stored).startswith("/dev/shm/")  # in memory, not on the state volume
        identities = list(stored.iterdir())
        assert len(identities) == 2  # the key and its -cert.pub
        for path in identities:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        hub.stop("alice")
        assert wait_for(lambda: not active_jobs("alice"), 30), active_jobs("alice")
        # No forward uses them now: deleted (at the close, or the next sweep after the grace).
        assert wait_for(lambda: not list(stored.iterdir()), 60), list(stored.iterdir())
    finally:
        stop_hub(process)
        lab.stop_tunnel_service(tmp_path / "tunnels")
        lab.in_namespace("login", ["scancel", "--user=alice"], check=False)
    logged = sshd_log(lab)[before:]
    # Every login of this hub (its own and the tunnel service's OpenSSH master) used a
    # certificate: sshd logs "ID hub_spawner:alice" for each and never a plain key.
    accepted = [row for row in logged.splitlines() if "Accepted publickey for alice" in row]
    assert len(accepted) >= 2, logged[-2000:]
    assert all("ID hub_spawner:alice" in row for row in accepted), accepted
    assert not Path("/nonexistent/hub-spawner-keys").exists()


def test_check_in_certificate_mode_passes_and_names_the_ca(lab, tmp_path):
    config = tmp_path / "jupyterhub_config.py"
    config.write_text(
        "c = get_config()\n"
        f"load_subconfig({str(REPO / 'example_hub_config' / 'lab_jupyterhub_config.py')!r})\n"
        f"c.SSHBatchSpawner.ssh_ca_key_path = {str(lab.USER_CA)!r}\n"
        "c.SSHBatchSpawner.ssh_key_path_template = '/nonexistent/{username}'\n")
    result = subprocess.run(
        [sys.executable, "-m", "hub_spawner", "check", "-f", str(config), "--user", "alice",
         "--submit"], cwd=tmp_path, env=dict(os.environ, HUB_STATE_DIR=str(tmp_path)),
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ok    key        CA key {lab.USER_CA}: ssh-ed25519 SHA256:" in result.stdout
    assert "all 11 checks passed" in result.stdout



def test_certificate_mode_never_signs_for_root_or_below_the_sites_uid(lab, tmp_path):
    """Issue 28: the hub signed a certificate for any principal, ``root`` included. Through
    ``check`` (the same ``Cluster.ssh_target`` a spawn uses) against the lab's sshd: refused
    before anything is signed, saying why; sshd sees no login as that user."""
    for username, extra, said in (
            ("root", "", "ssh_certificate_denied_principals"),
            ("daemon", "c.SSHBatchSpawner.ssh_certificate_min_uid = 1000\n",
             "has uid 1, and ssh_certificate_min_uid is 1000")):
        config = tmp_path / f"jupyterhub_config_{username}.py"
        config.write_text(
            "c = get_config()\n"
            f"load_subconfig({str(REPO / 'example_hub_config' / 'lab_jupyterhub_config.py')!r})\n"
            f"c.SSHBatchSpawner.ssh_ca_key_path = {str(lab.USER_CA)!r}\n"
            f"c.SSHBatchSpawner.cluster_username = {username!r}\n" + extra)
        sshd_log = lab.LAB_DIR / "sshd-22.log"
        logged_before = sshd_log.stat().st_size
        result = subprocess.run(
            [sys.executable, "-m", "hub_spawner", "check", "-f", str(config), "--user",
             "alice"], cwd=tmp_path, env=dict(os.environ, HUB_STATE_DIR=str(tmp_path)),
            capture_output=True, text=True, timeout=240)
        assert result.returncode != 0, result.stdout
        assert said in result.stdout and "Traceback" not in result.stdout + result.stderr, (
            result.stdout + result.stderr)
        with open(sshd_log, errors="replace") as log:
            log.seek(logged_before)
            assert f"for {username} " not in log.read()


def test_a_key_from_auth_state_spawns_with_no_key_files(lab, tmp_path):
    """A small authenticator (tests/integration/hub_config.py) hands alice's key over at
    login; the spawner logs in with it, the tunnel service gets it as a private file. bob, who
    never logged in, has no key: his spawn fails with a clear message and leaves no job."""
    env = {"HUB_AUTH_STATE_KEYS": "1", "JUPYTERHUB_CRYPT_KEY": secrets.token_hex(32)}
    hub, process = start_hub(tmp_path, PORT + 10, secrets.token_hex(24), env)
    try:
        login(hub, "alice", "lab-demo-password")
        events, _ = hub.spawn("alice")
        assert events[-1].get("ready"), events
        state = hub.api("GET", "/users/alice").json()["servers"][""]["state"]
        assert "PRIVATE KEY" not in str(state)  # kept in memory and auth_state, not in state
        assert run_in_kernel(hub, "alice", "print(6 * 7)").strip() == "42"
        stored = identities_directory(tmp_path / "tunnels")
        identities = list(stored.iterdir())
        assert len(identities) == 1  # the key, no certificate
        assert stat.S_IMODE(identities[0].stat().st_mode) == 0o600
        assert not (tmp_path / "tunnels" / "identities").exists()  # never on the state disk
        hub.stop("alice")
        assert wait_for(lambda: not list(stored.iterdir()), 60), list(stored.iterdir())

        hub.api("POST", "/users/bob")
        events, _ = hub.spawn("bob")
        assert not events[-1].get("ready")
        assert "There is no SSH key for bob from the login" in events[-1]["message"]
        assert active_jobs("bob") == []
        key_body = (lab.KEY_DIR / "alice").read_text().splitlines()[1]
        assert "PRIVATE KEY" not in hub.log() and key_body not in hub.log()
    finally:
        stop_hub(process)
        lab.stop_tunnel_service(tmp_path / "tunnels")
        lab.in_namespace("login", ["scancel", "--user=alice"], check=False)
    assert wait_for(lambda: not active_jobs("alice"), 30), active_jobs("alice")


RESTRICTED = 'restrict,port-forwarding,from="{hub},{login}",permitlisten="login:*" {key}'


def _ssh_as_alice(lab, *args: str, namespace: str = "") -> subprocess.CompletedProcess:
    command = ["ssh", "-F", "/dev/null", "-i", str(lab.KEY_DIR / "alice"), "-o",
               "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={lab.KNOWN_HOSTS}", "-o",
               "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
               *args, f"alice@{lab.LOGIN_IP}", "true"]
    if namespace:
        return lab.in_namespace(namespace, command, check=False)
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


def test_the_readmes_restricted_authorized_keys_line_is_enough_and_restricts(lab, tmp_path):
    """README's advice for key-file mode, as alice's only authorized_keys line: a fresh hub
    spawns over it in both transports (TCP, and socket mode's node hop, which the compute host
    sees coming from the login host), while a pty, a reverse forward on another address and a
    login from another address are refused."""
    authorized = Path("/home/alice/.ssh/authorized_keys")
    original = authorized.read_text()
    public = (lab.KEY_DIR / "alice.pub").read_text().strip()
    authorized.write_text(RESTRICTED.format(hub=lab.HUB_IP, login=lab.LOGIN_CLUSTER_IP,
                                            key=public) + "\n")
    hub, process = start_hub(tmp_path, PORT + 20, secrets.token_hex(24))
    try:
        hub.api("POST", "/users/alice")
        for server in ("", "socket"):
            events, _ = hub.spawn("alice", server)
            assert events[-1].get("ready"), (server, events)
            kernel_id, connection = open_kernel(hub, "alice", server)
            try:
                assert execute(connection, "print(6 * 7)").strip() == "42"
            finally:
                connection.close()
        pty = _ssh_as_alice(lab, "-tt")
        assert "PTY allocation request failed" in pty.stderr, pty.stderr
        elsewhere = _ssh_as_alice(lab, "-N", "-o", "ExitOnForwardFailure=yes", "-R",
                                  "127.0.0.1:40123:127.0.0.1:9")
        assert elsewhere.returncode == 255, elsewhere
        assert "remote port forwarding failed for listen port 40123" in elsewhere.stderr
        other_address = _ssh_as_alice(lab, namespace="login")  # from 10.77.1.2 itself
        assert other_address.returncode == 255 and "Permission denied" in other_address.stderr
        for server in ("", "socket"):
            hub.stop("alice", server)
        assert wait_for(lambda: not active_jobs("alice"), 30), active_jobs("alice")
    finally:
        authorized.write_text(original)
        stop_hub(process)
        lab.stop_tunnel_service(tmp_path / "tunnels")
        lab.in_namespace("login", ["scancel", "--user=alice"], check=False)
