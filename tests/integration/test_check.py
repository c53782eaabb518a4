"""``python -m hub_spawner check`` against the real lab: every step passes, and each broken
part makes the right line fail with its advice (real sshd, real Slurm, Grid Engine, the Torque
wrappers, the real tunnel service, a real jupyterhub-singleuser on the compute host)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, active_jobs, wait_for

LAB_CONFIG = REPO / "example_hub_config" / "lab_jupyterhub_config.py"


def write_config(tmp_path: Path, *lines: str) -> Path:
    """The lab's hub config with ``lines`` added, as an admin would edit it."""
    config = tmp_path / "jupyterhub_config.py"
    config.write_text("\n".join(["c = get_config()", f"load_subconfig({str(LAB_CONFIG)!r})",
                                 *lines]) + "\n")
    return config


def check_command(config: Path, user: str = "alice", *extra: str) -> list[str]:
    return [sys.executable, "-m", "hub_spawner", "check", "-f", str(config), "--user", user,
            *extra]


def run_check(tmp_path: Path, config: Path, *extra: str, user: str = "alice",
              scheduler: str = "slurm", **more_env: str) -> tuple[int, str]:
    env = dict(os.environ, HUB_STATE_DIR=str(tmp_path), HUB_SCHEDULER=scheduler, **more_env)
    result = subprocess.run(check_command(config, user, *extra), cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=240)
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    return result.returncode, result.stdout


def line(output: str, status: str, step: str) -> str:
    """The checklist line for ``step`` with ``status``, plus its advice line if any."""
    match = re.search(rf"^{status} +{step} .*(\n {{17}}-> .*)?", output, re.MULTILINE)
    assert match, f"no '{status} {step}' line in:\n{output}"
    return match.group(0)


def service_processes(tmp_path: Path) -> list[str]:
    result = subprocess.run(["pgrep", "-af", f"hub_spawner.tunnels --dir {tmp_path}"],
                            capture_output=True, text=True)
    return result.stdout.splitlines()


def test_everything_passes_and_the_test_job_leaves_nothing_behind(lab, tmp_path):
    code, output = run_check(tmp_path, write_config(tmp_path), "--submit")
    assert code == 0, output
    for step in ("config", "key", "reachable", "host key", "login", "scheduler", "status",
                 "job", "tunnel", "server", "cleanup"):
        line(output, "ok", step)
    assert "no status identity: one scheduler listing per user" in line(output, "ok", "status")
    assert "all 11 checks passed" in output
    assert re.search(r"ssh-ed25519 SHA256:\S+ matches ", output)
    assert "Slurm slurm-wlm 22.05" in line(output, "ok", "scheduler")
    assert "checked our token with the hub API" in line(output, "ok", "server")
    assert not re.search(r"[0-9a-f]{64}", output)  # the check's token is never printed
    # Nothing left: no job, no forward, and no tunnel service (the check started this one).
    assert active_jobs("alice") == []
    assert wait_for(lambda: service_processes(tmp_path) == [], timeout=10)
    table = (tmp_path / "tunnels" / "forwards.json").read_text()
    assert "hub-spawner-check" not in table


@pytest.mark.parametrize("scheduler,user,expected", [
    ("sge", "bob", "Grid Engine SGE 8.1"),
    ("torque", "bob", "Torque/PBS qstat"),
])
def test_the_other_schedulers_answer(lab, tmp_path, scheduler, user, expected):
    code, output = run_check(tmp_path, write_config(tmp_path), user=user, scheduler=scheduler)
    assert code == 0, output
    assert expected in line(output, "ok", "scheduler")


def test_a_changed_host_key_fails_with_both_fingerprints(lab, tmp_path):
    bob_public = (lab.KEY_DIR / "bob.pub").read_text().split()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"{lab.LOGIN_IP} {bob_public[0]} {bob_public[1]}\n")
    config = write_config(tmp_path, f"c.SSHBatchSpawner.known_hosts_path = {str(known_hosts)!r}")
    code, output = run_check(tmp_path, config)
    assert code == 1
    failed = line(output, "FAIL", "host key")
    assert re.search(r"shows ssh-ed25519 SHA256:\S+, but .* has ssh-ed25519 SHA256:\S+", failed)
    assert "do not connect" in failed
    assert "needs host key" in line(output, "skip", "login")


def test_an_unknown_host_key_says_how_to_add_it(lab, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    config = write_config(tmp_path, f"c.SSHBatchSpawner.known_hosts_path = {str(known_hosts)!r}")
    code, output = run_check(tmp_path, config)
    assert code == 1
    failed = line(output, "FAIL", "host key")
    assert f"{lab.LOGIN_IP}:22 is not in {known_hosts}; it shows ssh-ed25519 SHA256:" in failed
    assert f"ssh-keyscan -p 22 {lab.LOGIN_IP}" in failed


def test_a_missing_key_fails_and_login_is_skipped(lab, tmp_path):
    config = write_config(
        tmp_path, f"c.SSHBatchSpawner.ssh_key_path_template = '{tmp_path}/keys/{{username}}'")
    code, output = run_check(tmp_path, config, "--submit")
    assert code == 1
    failed = line(output, "FAIL", "key")
    assert f"no key file at {tmp_path}/keys/alice" in failed
    assert "ssh-keygen -t ed25519" in failed and "authorized_keys" in failed
    line(output, "ok", "reachable")  # what does not need the key still runs
    line(output, "ok", "host key")
    assert "needs key" in line(output, "skip", "login")
    line(output, "skip", "job")


def test_a_key_readable_by_others_is_refused(lab, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    shutil.copy(lab.KEY_DIR / "alice", keys / "alice")
    os.chmod(keys / "alice", 0o644)
    config = write_config(tmp_path,
                          f"c.SSHBatchSpawner.ssh_key_path_template = '{keys}/{{username}}'")
    code, output = run_check(tmp_path, config)
    assert code == 1
    failed = line(output, "FAIL", "key")
    assert "readable by group or others (mode 0644)" in failed
    assert f"chmod 600 {keys}/alice" in failed


def test_a_login_node_that_is_down_fails_reachable(lab, tmp_path):
    config = write_config(tmp_path, "c.SSHBatchSpawner.login_port = 2299")
    code, output = run_check(tmp_path, config)
    assert code == 1
    failed = line(output, "FAIL", "reachable")
    assert f"cannot connect to {lab.LOGIN_IP}:2299" in failed
    assert "check login_host and login_port" in failed
    assert "needs reachable" in line(output, "skip", "host key")
    line(output, "skip", "scheduler")


def test_a_scheduler_that_is_down_fails_scheduler(lab, tmp_path):
    lab.stop_slurmctld()
    try:
        started = time.monotonic()
        code, output = run_check(tmp_path, write_config(tmp_path))
        seconds = time.monotonic() - started
    finally:
        lab.start_slurmctld()
    assert code == 1, output
    line(output, "ok", "login")
    failed = line(output, "FAIL", "scheduler")
    assert "Slurm does not answer" in failed and "slurm controller" in failed.lower()
    assert "check that its controller runs" in failed
    assert seconds < 120


def test_a_server_that_cannot_start_shows_the_jobs_last_output(lab, tmp_path):
    config = write_config(tmp_path,
                          "c.SSHBatchSpawner.cmd = ['/nonexistent/jupyterhub-singleuser']")
    code, output = run_check(tmp_path, config, "--submit")
    assert code == 1
    failed = line(output, "FAIL", "job")
    assert "ended before the server was ready" in failed
    assert re.search(r"-> read the job's output \(all of it: /home/alice/\S+\.out", output)
    assert "/nonexistent/jupyterhub-singleuser: No such file or directory" in output
    assert "exited with status 127" in output
    line(output, "ok", "cleanup")
    assert active_jobs("alice") == []


def test_a_hostile_user_name_is_refused_before_anything_runs(lab, tmp_path):
    canary = f"/tmp/check-canary-{os.getpid()}"
    code, output = run_check(tmp_path, write_config(tmp_path), user=f"alice;touch {canary}")
    assert code == 1
    assert "is not a valid Unix user name" in line(output, "FAIL", "config")
    line(output, "skip", "login")
    for host in ("login", "compute"):  # where an injected command would have run
        assert lab.in_namespace(host, ["test", "-e", canary], check=False).returncode == 1


def check_jobs() -> list[str]:
    return [job for job in active_jobs("alice") if "hub-spawner-check" in job]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_a_signal_during_the_test_job_cancels_it(lab, tmp_path, signum):
    """SIGINT (Ctrl-C) or SIGTERM once the job runs: the job (a short one: 10 minutes) is
    cancelled, its forwards closed, the tunnel service the check started stopped, exit 130."""
    env = dict(os.environ, HUB_STATE_DIR=str(tmp_path), HUB_SCHEDULER="slurm")
    # A server that never listens keeps the job running until we interrupt.
    config = write_config(tmp_path, "c.SSHBatchSpawner.cmd = ['/bin/sleep', '600']")
    process = subprocess.Popen(check_command(config, "alice", "--submit"), cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for output_line in process.stdout:
            seen.append(output_line)
            if "is running on compute" in output_line:
                break
        assert check_jobs(), "".join(seen)
        limit = lab.in_namespace("login", ["squeue", "-h", "-u", "alice", "-o", "%j %l"]).stdout
        assert [row.split()[1] for row in limit.splitlines() if "hub-spawner-check" in row] == [
            "10:00"]
        process.send_signal(signum)
        rest, errors = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    output = "".join(seen) + rest
    assert process.returncode == 130, output + errors
    line(output, "ok", "cleanup")
    assert "interrupted; the test job and its forwards are gone" in errors
    assert wait_for(lambda: check_jobs() == [], timeout=20)
    assert "hub-spawner-check" not in (tmp_path / "tunnels" / "forwards.json").read_text()
    assert wait_for(lambda: service_processes(tmp_path) == [], timeout=10)


# --- several clusters ----------------------------------------------------------------------------


def cluster_parts(output: str) -> dict[str, str]:
    """The checklist lines under each ``cluster KEY (...)`` heading."""
    parts = re.split(r"^cluster (\S+) \(.*\n", output, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_every_cluster_is_checked_and_a_broken_one_fails_alone(lab, tmp_path):
    """The lab's two clusters (Slurm, Grid Engine) pass each step on their own scheduler; a
    third whose login node does not answer fails its own "reachable" only."""
    config = write_config(
        tmp_path,
        "c.SSHBatchSpawner.clusters = c.SSHBatchSpawner.clusters + [",
        "  {'name': 'gone', 'scheduler': 'torque', 'config': {'login_port': 1,",
        "   'ssh_connect_timeout': 3}}]")
    code, output = run_check(tmp_path, config, HUB_MULTI_CLUSTER="1")
    assert code == 1, output
    parts = cluster_parts(output)
    assert list(parts) == ["slurm", "sge", "gone"], output
    for key, scheduler in (("slurm", "Slurm slurm-wlm 22.05"), ("sge", "Grid Engine SGE 8.1")):
        for step in ("config", "key", "reachable", "host key", "login"):
            line(parts[key], "ok", step)
        assert scheduler in line(parts[key], "ok", "scheduler")
    assert "cannot connect to" in line(parts["gone"], "FAIL", "reachable")
    line(parts["gone"], "skip", "scheduler")
    assert output.rstrip().endswith("1 of 17 checks failed: gone: reachable"), output


def test_a_test_job_on_the_chosen_cluster_leaves_nothing_behind(lab, tmp_path):
    code, output = run_check(tmp_path, write_config(tmp_path), "--submit", "--cluster", "sge",
                             HUB_MULTI_CLUSTER="1")
    assert code == 0, output
    assert list(cluster_parts(output)) == ["sge"]
    assert "Submitted job" in output and "to Grid Engine" in output, output
    line(output, "ok", "job")
    assert "checked our token with the hub API" in line(output, "ok", "server")
    line(output, "ok", "cleanup")
    assert "all 11 checks passed" in output
    assert active_jobs("alice", "sge") == [] and active_jobs("alice") == []
    assert wait_for(lambda: service_processes(tmp_path) == [], timeout=10)
