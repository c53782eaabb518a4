"""Fixtures shared by the integration tests: one lab and one real hub (+ CHP) per session."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.lab import lab as lab_module

REPO = Path(__file__).resolve().parents[2]
HUB_PORT = 18000
HUB_URL = f"http://127.0.0.1:{HUB_PORT}"


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def lab():
    """The three-host lab (tests/lab/lab.py), up for the whole session."""
    lab_module.up()
    yield lab_module
    lab_module.down()


@dataclass
class Hub:
    url: str
    token: str
    log_path: Path

    def api(self, method: str, path: str, token: str | None = None, **kwargs):
        headers = {"Authorization": f"token {token or self.token}"}
        return requests.request(method, f"{self.url}/hub/api{path}", headers=headers,
                                timeout=kwargs.pop("timeout", 60), **kwargs)

    def get(self, path: str, token: str | None = None, **kwargs):
        headers = {"Authorization": f"token {token or self.token}"}
        return requests.get(f"{self.url}{path}", headers=headers, timeout=30, **kwargs)

    def api_server(self, method: str, user: str, path: str, server: str = "", **kwargs):
        """A request to the user's single-user server, through the proxy."""
        prefix = f"/user/{user}/{server + '/' if server else ''}"
        headers = {"Authorization": f"token {self.token}"}
        response = requests.request(method, f"{self.url}{prefix.rstrip('/')}{path}",
                                    headers=headers, timeout=60, **kwargs)
        response.raise_for_status()
        return response

    def spawn(self, user: str, server: str = "", options: dict | None = None,
              timeout: float = 150) -> tuple[list[dict], float]:
        """Start a server over the REST API and follow its progress stream to the end.

        Returns the progress events and the seconds from request to the last event. Options
        are always sent: JupyterHub re-uses a server's last ``user_options`` when given none.
        """
        server_path = f"/users/{user}/servers/{server}" if server else f"/users/{user}/server"
        started = time.monotonic()
        response = self.api("POST", server_path, json=options or {"cpus": 1}, timeout=timeout)
        events: list[dict] = []
        if response.status_code in (201, 202):
            progress = self.api("GET", f"{server_path}/progress", stream=True, timeout=timeout)
            for line in progress.iter_lines(decode_unicode=True):
                if line and line.startswith("data:"):
                    event = json.loads(line[5:])
                    events.append(event)
                    if event.get("ready") or event.get("failed"):
                        break
        else:
            events.append({"failed": True, "status": response.status_code,
                           "message": response.json().get("message", response.text)})
        return events, time.monotonic() - started

    def stop(self, user: str, server: str = "") -> None:
        server_path = f"/users/{user}/servers/{server}" if server else f"/users/{user}/server"
        response = self.api("DELETE", server_path)
        assert response.status_code in (202, 204, 400, 404), response.text
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            model = self.api("GET", f"/users/{user}").json()
            if server not in model.get("servers", {}):
                return
            time.sleep(0.5)
        raise AssertionError(f"{user}/{server} did not stop")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_hub(state_dir: Path, port: int, token: str, extra_env: dict | None = None):
    """Start a real JupyterHub (with its own configurable-http-proxy); wait until it answers."""
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),  # this checkout's hub_spawner, whatever the venv points at
        HUB_STATE_DIR=str(state_dir),
        HUB_PORT=str(port),
        HUB_TEST_TOKEN=token,
        HUB_LAB_CONFIG=str(REPO / "example_hub_config" / "lab_jupyterhub_config.py"),
        **(extra_env or {}),
    )
    log_path = state_dir / "hub.log"
    jupyterhub = Path(os.environ.get("LAB_PREFIX", "/opt/hub-spawner-lab")) / "venv/bin/jupyterhub"
    process = subprocess.Popen(
        [str(jupyterhub), "-f", str(REPO / "tests" / "integration" / "hub_config.py")],
        cwd=state_dir, env=env, stdout=open(log_path, "a"), stderr=subprocess.STDOUT,
    )
    hub = Hub(f"http://127.0.0.1:{port}", token, log_path)
    deadline = time.monotonic() + 60
    while True:
        try:
            if hub.api("GET", "/", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the test hub did not start:\n{hub.log()[-3000:]}")
        time.sleep(0.3)
    return hub, process


def stop_hub(process: subprocess.Popen) -> None:
    lab_module.stop_pid(process.pid, timeout=60)


@pytest.fixture(scope="session")
def hub(lab, tmp_path_factory):
    """A real JupyterHub with the real configurable-http-proxy and the slurm-ssh spawner."""
    hub, process = start_hub(tmp_path_factory.mktemp("hub"), HUB_PORT, secrets.token_hex(24))
    for user in lab_module.USERS:
        hub.api("POST", f"/users/{user}")
    yield hub
    stop_hub(process)  # cleanup_servers: the hub stops what is left


def active_jobs(user: str) -> list[str]:
    """The user's jobs that Slurm still lists as pending/running/completing."""
    result = lab_module.in_namespace(
        "login", ["squeue", "--noheader", f"--user={user}", "--format=%i %T %j"]
    )
    return [line for line in result.stdout.splitlines() if line.strip()]


def user_processes(user: str, pattern: str) -> list[str]:
    result = subprocess.run(["pgrep", "-a", "-u", user, "-f", pattern], capture_output=True,
                            text=True)
    return [line for line in result.stdout.splitlines() if line.strip()]


def wait_for(predicate, timeout: float = 20, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
