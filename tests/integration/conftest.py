"""Fixtures shared by the integration tests: one lab per session, and one real hub (+ CHP) per
scheduler (slurm-ssh, sge-ssh, torque-ssh), each started on first use."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import websocket

from tests.lab import lab as lab_module

REPO = Path(__file__).resolve().parents[2]
# A tunnel master warmed for a spawn form stays 5 s (not 120): a test that counts a user's
# sshd sessions on the login node must not see one that another test's form view left.
os.environ.setdefault("HUB_TUNNEL_WARM_SECONDS", "5")
HUB_PORTS = {"slurm": 18000, "sge": 18200, "torque": 18400}
SCHEDULERS = tuple(HUB_PORTS)
DEMO_HUB_PORT = 18600
CLUSTERS_HUB_PORT = 19200


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """The three-host lab (tests/lab/lab.py), up for the whole session. The tunnel services
    the test hubs started (they outlive hubs by design) are stopped before it goes down."""
    lab_module.up()
    yield lab_module
    stop_orphaned_services()
    for control in Path(tmp_path_factory.getbasetemp()).glob("*/tunnels/ctl"):
        lab_module.stop_tunnel_service(control.parent)
    lab_module.down()


@dataclass
class Hub:
    url: str
    token: str
    log_path: Path
    pid: int = 0  # the jupyterhub process

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
        if response.status_code in (201, 202):
            events = self.progress(user, server, timeout)
        else:
            events = [{"failed": True, "status": response.status_code,
                       "message": response.json().get("message", response.text)}]
        return events, time.monotonic() - started

    def progress(self, user: str, server: str = "", timeout: float = 150) -> list[dict]:
        """Follow a spawn's progress stream until it is ready or has failed."""
        server_path = f"/users/{user}/servers/{server}" if server else f"/users/{user}/server"
        events: list[dict] = []
        progress = self.api("GET", f"{server_path}/progress", stream=True, timeout=timeout)
        for line in progress.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                event = json.loads(line[5:])
                events.append(event)
                if event.get("ready") or event.get("failed"):
                    break
        return events

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
    hub = Hub(f"http://127.0.0.1:{port}", token, log_path, process.pid)
    started_hub_api_urls.add(f"http://127.0.0.1:{port + 81}/hub/api")  # hub_port: port + 81
    deadline = time.monotonic() + 60
    while True:
        try:
            if hub.api("GET", "/", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            lab_module.stop_pid(process.pid, timeout=30)  # TERM: the hub stops its proxy too
            raise RuntimeError(f"the test hub did not start:\n{hub.log()[-3000:]}")
        time.sleep(0.3)
    return hub, process


def start_proxy(port: int, token: str, log_dir: Path) -> subprocess.Popen:
    """configurable-http-proxy as its own process (z2jh's shape), where a test hub started
    with ``CONFIGPROXY_AUTH_TOKEN`` = ``token`` on ``port`` expects it (API on port + 1, errors
    to the hub on port + 81); returns once its API answers."""
    proxy = subprocess.Popen(
        [str(lab_module.LAB_PREFIX / "node_modules/.bin/configurable-http-proxy"),
         "--ip", "127.0.0.1", "--port", str(port), "--api-ip", "127.0.0.1",
         "--api-port", str(port + 1), "--error-target", f"http://127.0.0.1:{port + 81}/hub/error"],
        env=dict(os.environ, CONFIGPROXY_AUTH_TOKEN=token), cwd=REPO,
        stdout=open(log_dir / "proxy.log", "a"), stderr=subprocess.STDOUT,
    )

    def answers() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port + 1)) == 0

    if not wait_for(answers, 20):
        lab_module.stop_pid(proxy.pid)
        raise RuntimeError(f"configurable-http-proxy did not start; see {log_dir}/proxy.log")
    return proxy


def stop_hub(process: subprocess.Popen) -> None:
    lab_module.stop_pid(process.pid, timeout=60)


#: The hub API URLs of the hubs this session started (their services' JUPYTERHUB_API_URL).
started_hub_api_urls: set[str] = set()


def stop_orphaned_services() -> None:
    """Stop, by PID, the managed services (the idle culler) of this session's hubs that a
    SIGKILLed hub left running: it runs them in their own session and a killed hub cannot stop
    them (a SIGTERMed one does)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        urls = {line.split(b"=", 1)[1].decode(errors="replace") for line in environ
                if line.startswith(b"JUPYTERHUB_API_URL=")}
        if urls & started_hub_api_urls and b"JUPYTERHUB_SERVICE_NAME=idle-culler" in environ:
            lab_module.stop_pid(int(proc.name), timeout=10)


@pytest.fixture(scope="session")
def hub_for(lab, tmp_path_factory):
    """``hub_for(scheduler)``: the session's real JupyterHub for that scheduler's spawner;
    ``hub_for("demo")``: a Slurm one with the demo's spawn form as it is (the others widen the
    form's limits for their tests); ``hub_for("clusters")``: the demo's form with the lab's
    Slurm and Grid Engine as two clusters (``HUB_MULTI_CLUSTER=1``)."""
    hubs: dict[str, tuple[Hub, subprocess.Popen]] = {}

    def get(scheduler: str) -> Hub:
        if scheduler not in hubs:
            if scheduler == "demo":  # the demo's own spawn form: presets, partitions, groups
                port, env = DEMO_HUB_PORT, {"HUB_SCHEDULER": "slurm", "HUB_DEMO_FORM": "1"}
            elif scheduler == "clusters":  # the lab's Slurm and Grid Engine on one form
                port, env = CLUSTERS_HUB_PORT, {"HUB_SCHEDULER": "slurm", "HUB_DEMO_FORM": "1",
                                                "HUB_MULTI_CLUSTER": "1"}
            else:
                port, env = HUB_PORTS[scheduler], {"HUB_SCHEDULER": scheduler}
            hub, process = start_hub(tmp_path_factory.mktemp(f"hub-{scheduler}"), port,
                                     secrets.token_hex(24), env)
            for user in lab_module.USERS:
                hub.api("POST", f"/users/{user}")
            hubs[scheduler] = (hub, process)
        return hubs[scheduler][0]

    yield get
    for _, process in hubs.values():
        stop_hub(process)  # cleanup_servers: each hub stops what is left


@pytest.fixture(scope="session")
def hub(hub_for):
    """The real JupyterHub with the slurm-ssh spawner."""
    return hub_for("slurm")


def active_jobs(user: str, scheduler: str = "slurm") -> list[str]:
    """The user's jobs that the scheduler's own listing still shows as not finished.

    Slurm: ``squeue``; Grid Engine: ``qstat -u``; Torque/PBS: the wrappers' ``qstat`` (jobs
    in state C are finished).
    """
    if scheduler == "sge":
        result = lab_module.sge_command(f"qstat -u {user}")
        return [line for line in result.stdout.splitlines()[2:] if line.strip()]
    if scheduler == "torque":
        qstat = str(lab_module.TORQUE_WRAPPERS / "qstat")
        result = lab_module.in_namespace("login", [qstat, "-u", user])
        return [line for line in result.stdout.splitlines()
                if line[:1].isdigit() and line.split()[-2] != "C"]
    result = lab_module.in_namespace(
        "login", ["squeue", "--noheader", f"--user={user}", "--format=%i %T %j"]
    )
    return [line for line in result.stdout.splitlines() if line.strip()]


def login(hub, user: str, password: str) -> requests.Session:
    """A session logged in through the hub's login form, as a browser would be."""
    session = requests.Session()
    session.get(f"{hub.url}/hub/login", timeout=30).raise_for_status()
    response = session.post(
        f"{hub.url}/hub/login", timeout=30, allow_redirects=False,
        data={"username": user, "password": password, "_xsrf": session.cookies.get("_xsrf")})
    assert response.status_code == 302, response.text[-500:]
    return session


def run_in_kernel(hub, user: str, code: str) -> str:
    """Start a kernel through the proxy, run ``code`` over the websocket, return its stdout."""
    kernel_id, connection = open_kernel(hub, user)
    try:
        return execute(connection, code)
    finally:
        connection.close()
        hub.api_server("DELETE", user, f"/api/kernels/{kernel_id}")


def open_kernel(hub, user: str, server: str = "") -> tuple[str, websocket.WebSocket]:
    """A new kernel on the user's server and its channels websocket, both through the proxy."""
    kernel = hub.api_server("POST", user, "/api/kernels", server=server, json={}).json()
    return kernel["id"], connect_kernel(hub, user, kernel["id"], server)


def connect_kernel(hub, user: str, kernel_id: str, server: str = "") -> websocket.WebSocket:
    """A (new) channels websocket to an existing kernel, through the proxy."""
    prefix = f"/user/{user}/{server + '/' if server else ''}"
    ws_url = hub.url.replace("http", "ws") + f"{prefix}api/kernels/{kernel_id}/channels"
    return websocket.create_connection(
        ws_url, header=[f"Authorization: token {hub.token}"], timeout=60
    )


def execute(connection: websocket.WebSocket, code: str) -> str:
    """Run ``code`` in the kernel behind ``connection``; return its stdout."""
    msg_id = uuid.uuid4().hex
    connection.send(json.dumps({
        "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex,
                   "msg_type": "execute_request", "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": False,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
    }))
    output = []
    while True:
        message = json.loads(connection.recv())
        if message.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if message["msg_type"] == "stream":
            output.append(message["content"]["text"])
        elif message["msg_type"] == "error":
            raise AssertionError(f"kernel error: {message['content']}")
        elif message["msg_type"] == "status":
            if message["content"]["execution_state"] == "idle":
                break
    return "".join(output)


#: A login-node user holding a TCP port: prints "bound" once listening, then, for each caller,
#: the first bytes it sent (hex), and hangs up. SO_REUSEADDR as sshd does: TIME_WAIT is no bar.
_SQUATTER = """
import socket, sys, time
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
deadline = time.monotonic() + 20
while True:
    try:
        sock.bind((sys.argv[1], int(sys.argv[2])))
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
sock.listen()
print("bound", flush=True)
while True:
    conn, _ = sock.accept()
    conn.settimeout(10)
    try:
        print(conn.recv(65536).hex(), flush=True)
    except OSError:
        print("", flush=True)
    conn.close()
"""


def squat_on_login(user: str, ip: str, port: int) -> subprocess.Popen:
    """``user`` takes ``ip:port`` on the login host (waits up to 20 s for it to be free);
    returns once it listens. Read what callers sent from its stdout, one hex line each."""
    process = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{lab_module.NAMESPACES['login']}", "runuser", "-u", user,
         "--", "/usr/bin/python3", "-c", _SQUATTER, ip, str(port)],
        stdout=subprocess.PIPE, text=True,
    )
    if process.stdout.readline().strip() != "bound":
        lab_module.stop_pid(process.pid)
        raise AssertionError(f"{user} could not take {ip}:{port} on the login host")
    return process


def user_processes(user: str, pattern: str) -> list[str]:
    result = subprocess.run(["pgrep", "-a", "-u", user, "-f", pattern], capture_output=True,
                            text=True)
    return [line for line in result.stdout.splitlines() if line.strip()]


def processes_on(host: str, user: str, name: str) -> list[int]:
    """PIDs of ``user``'s processes called ``name`` in lab host ``host``'s network namespace
    (``login`` or ``compute``: the same user's processes on the other host are not counted)."""
    uid = pwd.getpwnam(user).pw_uid
    namespace = os.stat(f"/run/netns/{lab_module.NAMESPACES[host]}").st_ino
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if (os.stat(f"/proc/{pid}").st_uid == uid
                    and os.stat(f"/proc/{pid}/ns/net").st_ino == namespace
                    and open(f"/proc/{pid}/comm").read().strip() == name):
                found.append(int(pid))
        except OSError:
            continue
    return found


def wait_for(predicate, timeout: float = 20, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
