"""``make demo``: the lab, plus a JupyterHub on http://127.0.0.1:8000 using this spawner.

Runs in the foreground. Ctrl-C (SIGINT) or SIGTERM stops the hub (which stops every server and
so cancels its job), cancels any job left in the lab, and tears the lab down.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.lab import lab

REPO = Path(__file__).resolve().parents[2]
HUB_PORT = 8000
SCHEDULER_NAMES = {"slurm": "Slurm", "sge": "Grid Engine",
                   "torque": "Torque/PBS (Slurm's Torque wrappers)"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scheduler", default="slurm", choices=list(lab.SCHEDULERS),
                        help="the demo cluster's scheduler (default: slurm)")
    scheduler = parser.parse_args().scheduler
    for port in (HUB_PORT, HUB_PORT + 1, HUB_PORT + 81):
        if _port_in_use(port):
            print(f"demo: port {port} on 127.0.0.1 is in use; stop what holds it first",
                  file=sys.stderr)
            return 1

    stopping = False

    def request_stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    print(f"demo: bringing up the lab (login + compute hosts, sshd, {SCHEDULER_NAMES[scheduler]})"
          "...", flush=True)
    lab.up(("slurm", "torque") if scheduler == "torque" else (scheduler,))
    hub = None
    try:
        state_dir = lab.LAB_DIR / "demo-hub"
        state_dir.mkdir(exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(REPO), HUB_STATE_DIR=str(state_dir),
                   HUB_PORT=str(HUB_PORT), HUB_SCHEDULER=scheduler)
        hub = subprocess.Popen(
            [str(lab.LAB_PREFIX / "venv/bin/jupyterhub"), "-f",
             str(REPO / "example_hub_config" / "lab_jupyterhub_config.py")],
            cwd=state_dir, env=env, start_new_session=True,
        )
        _wait_for_hub(hub)
        print(_banner(scheduler), flush=True)
        while not stopping and hub.poll() is None:
            time.sleep(0.5)
    finally:
        print("\ndemo: stopping the hub (its servers' jobs are cancelled)...", flush=True)
        if hub is not None and hub.poll() is None:
            lab.stop_pid(hub.pid, timeout=60)
        lab.stop_tunnel_service(lab.LAB_DIR / "demo-hub" / "tunnels")
        print("demo: cancelling leftover jobs and tearing the lab down...", flush=True)
        lab.down()
        print("demo: stopped; nothing left running.", flush=True)
    return 0


def _banner(scheduler: str) -> str:
    return f"""
==========================================================================
 JupyterHub with hub_spawner ({scheduler}-ssh) is running: http://127.0.0.1:{HUB_PORT}/

 Log in as   bob    password: lab-demo-password
        or   alice  password: lab-demo-admin-password-for-alice-only  (hub admin)
 Click Start: the server runs as a {SCHEDULER_NAMES[scheduler]} job on the 'compute' host, which
 the hub can reach only through an SSH tunnel via the 'login' host.

 Ctrl-C stops the hub, cancels the jobs and tears the lab down.
==========================================================================
"""


def _wait_for_hub(hub: subprocess.Popen, timeout: float = 60) -> None:
    """Until the login page answers through the proxy: the proxy listens a moment before the
    hub has added its route, and a visitor then gets the proxy's 404."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if hub.poll() is not None:
            raise RuntimeError("demo: the hub exited during start-up (see its log above)")
        if _login_page_answers():
            return
        time.sleep(0.3)
    raise RuntimeError("demo: the hub's login page did not answer in time")


def _login_page_answers() -> bool:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no http_proxy
    try:
        with direct.open(f"http://127.0.0.1:{HUB_PORT}/hub/login", timeout=5) as page:
            return page.status == 200
    except (OSError, urllib.error.URLError):  # HTTPError (the proxy's 404) is a URLError
        return False


def _port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


if __name__ == "__main__":
    sys.exit(main())
