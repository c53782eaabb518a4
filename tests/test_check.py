"""``python -m hub_spawner check`` without the lab: the config and key steps, and that every
broken input is a FAIL line with advice, never a traceback. The login node is a local port
where nothing listens (so "reachable" fails and the steps needing it are skipped); the steps
that talk to a real sshd and scheduler are tested in tests/integration/test_check.py."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hub_spawner.check import Checklist, run_check
from hub_spawner.sshlib import asyncssh


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_config(tmp_path: Path, *lines: str, spawner_class: str = "slurm-ssh") -> Path:
    config = tmp_path / "jupyterhub_config.py"
    config.write_text("\n".join([
        "c = get_config()",
        f"c.JupyterHub.spawner_class = {spawner_class!r}",
        "c.SSHBatchSpawner.login_host = '127.0.0.1'",
        f"c.SSHBatchSpawner.login_port = {closed_port()}",
        "c.SSHBatchSpawner.ssh_connect_timeout = 2",
        f"c.SSHBatchSpawner.known_hosts_path = '{tmp_path}/known_hosts'",
        f"c.SSHBatchSpawner.ssh_key_path_template = '{tmp_path}/keys/{{username}}'",
        *lines,
    ]) + "\n")
    return config


def check(config: Path, user: str = "alice", cluster: str = "") -> tuple[bool, str]:
    out = io.StringIO()
    passed = asyncio.run(run_check(str(config), user, checks=Checklist(out), cluster=cluster))
    return passed, out.getvalue()


def a_key(tmp_path: Path, mode: int = 0o600) -> Path:
    keys = tmp_path / "keys"
    keys.mkdir(exist_ok=True)
    path = keys / "alice"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(path))
    os.chmod(path, mode)
    return path


def test_a_missing_config_file(tmp_path):
    passed, output = check(tmp_path / "nope.py")
    assert not passed
    assert "FAIL  config     " in output and "does not exist" in output
    assert "-> pass the hub's config file with -f" in output


@pytest.mark.parametrize("body,expected", [
    ("raise RuntimeError('no database')", "does not load: RuntimeError: no database"),
    ("import sys; sys.exit(0)", "does not load: SystemExit"),
    ("c.JupyterHub.spawner_class = 'simple'", "not one of hub_spawner's spawners"),
    ("c.JupyterHub.spawner_class = 'no.such.Spawner'", "cannot be loaded"),
    ("c.SlurmSSHSpawner.login_hots = 'x'", "unknown option(s): c.SlurmSSHSpawner.login_hots"),
    ("c.SlurmSSHSpawner.max_cpus = 'many'", "a value is invalid"),
    ("c.SSHBatchSpawner.ssh_key_path_template = '/keys/{user}'", "unknown field 'user'"),
    ("c.SSHBatchSpawner.default_cpus = 8\nc.SSHBatchSpawner.max_cpus = 4",
     "the job script for the default resources cannot be built"),
    ("c.SSHBatchSpawner.cluster_username = lambda spawner: spawner.user.get_auth_state()",
     "the cluster user name cannot be worked out: AttributeError"),
    ("c.SSHBatchSpawner.auth_state_ssh_key = 'ssh_key'", "comes from each login's auth_state"),
])
def test_a_broken_config_is_one_fail_line(tmp_path, body, expected):
    passed, output = check(write_config(tmp_path, body))
    assert not passed
    assert expected in output, output
    assert output.count("FAIL") == 1 and "Traceback" not in output
    assert "skip  login" in output


def test_a_config_that_exits_does_not_end_the_check(tmp_path):
    """sys.exit(0) in the config must not end the command with status 0."""
    config = write_config(tmp_path, "import sys; sys.exit(0)")
    result = subprocess.run([sys.executable, "-m", "hub_spawner", "check", "-f", str(config),
                             "--user", "alice"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "does not load: SystemExit" in result.stdout


def test_a_hostile_user_name_is_refused_as_config(tmp_path):
    passed, output = check(write_config(tmp_path), user="alice; touch /tmp/x")
    assert not passed
    assert "is not a valid Unix user name" in output


def test_a_missing_key_and_an_unreachable_login_node(tmp_path):
    passed, output = check(write_config(tmp_path))
    assert not passed
    assert f"FAIL  key        no key file at {tmp_path}/keys/alice" in output
    assert "-> create one (ssh-keygen -t ed25519" in output
    assert "FAIL  reachable  cannot connect to 127.0.0.1:" in output
    assert "skip  host key   needs reachable" in output
    assert "skip  login      needs key, reachable" in output
    assert "skip  scheduler  needs login" in output


def test_a_key_readable_by_others(tmp_path):
    path = a_key(tmp_path, 0o640)
    passed, output = check(write_config(tmp_path))
    assert "readable by group or others (mode 0640)" in output
    assert f"-> chmod 600 {path}" in output


def test_a_key_that_is_a_directory_or_garbage(tmp_path):
    (tmp_path / "keys" / "alice").mkdir(parents=True)
    _, output = check(write_config(tmp_path))
    assert "is not a regular file" in output
    (tmp_path / "keys" / "alice").rmdir()
    (tmp_path / "keys" / "alice").write_text("not a key\n")
    os.chmod(tmp_path / "keys" / "alice", 0o600)
    _, output = check(write_config(tmp_path))
    assert "is not a usable private key" in output
    assert "-> the hub needs an unencrypted OpenSSH private key" in output


def test_a_good_key_shows_its_fingerprint(tmp_path):
    path = a_key(tmp_path)
    fingerprint = asyncssh.read_private_key(str(path)).get_fingerprint()
    _, output = check(write_config(tmp_path))
    assert f"ok    key        {path}: ssh-ed25519 {fingerprint}, mode 0600" in output
    assert "skip  login      needs reachable" in output


# --- several clusters ----------------------------------------------------------------------------


def two_clusters(tmp_path: Path, *lines: str) -> Path:
    """Two clusters, each with a login node where nothing listens; Grid Engine only for a group."""
    return write_config(tmp_path, "c.SSHBatchSpawner.clusters = [", *lines,
                        "  {'name': 'main', 'scheduler': 'slurm', 'display_name': 'Main',",
                        f"   'config': {{'login_port': {closed_port()}}}}},",
                        "  {'name': 'ge', 'scheduler': 'sge', 'display_name': 'Old GE',",
                        "   'groups': ['grid'], 'settings': {'parallel_environment': 'smp'},",
                        f"   'config': {{'login_port': {closed_port()}, 'max_cpus': 2}}}},",
                        "]")


def test_each_cluster_is_checked_under_its_own_heading(tmp_path):
    a_key(tmp_path)
    passed, output = check(two_clusters(tmp_path))
    assert not passed and "Traceback" not in output
    main, ge = output.split("\ncluster main (Main): Slurm\n")[1].split(
        "\ncluster ge (Old GE): Grid Engine; offered to the group(s) grid\n")
    for part in (main, ge):
        assert "ok    config     " in part and "ok    key        " in part
        assert "FAIL  reachable  cannot connect to 127.0.0.1:" in part
        assert "skip  login      needs reachable" in part
    assert "Slurm cluster main: alice is cluster user alice" in main
    assert "Grid Engine cluster ge: alice is cluster user alice" in ge
    # each cluster's own login port, and the failures named by cluster in the summary
    assert main.split("127.0.0.1:")[1][:5] != ge.split("127.0.0.1:")[1][:5]
    assert "checks failed: main: reachable, ge: reachable" in output


def test_cluster_picks_one(tmp_path):
    _, output = check(two_clusters(tmp_path), cluster="ge")
    assert "cluster ge (Old GE)" in output and "cluster main" not in output
    assert "checks failed: ge: key, ge: reachable" in output


@pytest.mark.parametrize("cluster,lines,expected,advice", [
    ("nope", (), "no cluster 'nope' in clusters", "-> pass one of: main, ge"),
    ("", ("  {'name': 'main', 'scheduler': 'lsf'},",),
     "clusters[0]: 'scheduler' must be slurm, sge or torque ('lsf')",
     "-> fix that entry of c.SSHBatchSpawner.clusters"),
    ("x", ("  {'name': 'x', 'scheduler': 'slurm', 'config': {'default_cpus': 4, 'max_cpus': 2}},",),
     "the job script for the default resources cannot be built", "-> check the default_*"),
])
def test_a_bad_cluster_choice_or_entry_is_a_config_failure(tmp_path, cluster, lines, expected,
                                                           advice):
    passed, output = check(two_clusters(tmp_path, *lines), cluster=cluster)
    assert not passed and "Traceback" not in output
    assert expected in output, output
    assert advice in output, output


def test_cluster_on_a_hub_with_one_cluster(tmp_path):
    passed, output = check(write_config(tmp_path), cluster="main")
    assert not passed
    assert "--cluster main: this hub has one cluster" in output
    assert "skip  login" in output
