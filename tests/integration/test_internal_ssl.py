"""internal_ssl on the lab: the server serves TLS through the tunnel service and calls the hub
API over TLS it verifies, through the reverse forward. A login-node user who takes that forward's
port while it is down receives a TLS handshake, never a token; the server keeps running and
reaches the hub again once the forward is back."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess

import pytest
import requests

from hub_spawner.tunnels.client import TunnelClient

from .conftest import (
    REPO,
    active_jobs,
    execute,
    open_kernel,
    squat_on_login,
    start_hub,
    stop_hub,
    wait_for,
)

PORT = 28200


def _fresh_token_status(hub, server: str) -> int:
    """A token the server has never seen, so it must ask the hub API; the HTTP status."""
    token = hub.api("POST", "/users/alice/tokens", json={"expires_in": 600}).json()["token"]
    try:
        return hub.get(f"/user/alice/{server}/api/kernels", token=token).status_code
    except Exception:
        return 0


def test_tls_hub_api_and_a_squatter_on_the_reverse_port_learns_nothing(lab, tmp_path):
    env = {"HUB_INTERNAL_SSL": "1", "HUB_POLL_INTERVAL": "5"}
    hub, process = start_hub(tmp_path, PORT, secrets.token_hex(24), env)
    squatter = None
    try:
        hub.api("POST", "/users/alice")
        events, _ = hub.spawn("alice", "tls")
        assert events[-1].get("ready"), events
        job = active_jobs("alice")
        model = hub.api("GET", "/users/alice").json()["servers"]["tls"]
        api_port = model["state"]["api_tunnel_port"]
        kernel_id, kernel = open_kernel(hub, "alice", "tls")  # proxy -> tunnel -> TLS server
        seen = execute(kernel, "import os; print(os.environ['JUPYTERHUB_API_URL'], "
                               "os.environ['JUPYTERHUB_SERVICE_URL'])").split()
        kernel.close()
        hub.api_server("DELETE", "alice", f"/api/kernels/{kernel_id}", server="tls")
        assert seen[0] == f"https://login:{api_port}/hub/api", seen
        assert seen[1].startswith("https://"), seen
        assert _fresh_token_status(hub, "tls") == 200  # asked the hub over TLS
        # bob connects to the hub-API port as a client: the hub (internal_ssl) wants a client
        # certificate from its own CA, so he cannot even complete the TLS handshake.
        answer = _as_bob_on_login(lab, api_port)
        assert answer.startswith("refused") and "certificate required" in answer, answer

        # The reverse forward goes down (its SSH connection dies while the service is paused),
        # and bob takes the port before the service can re-make it.
        service = TunnelClient(tmp_path / "tunnels")
        forwards = asyncio.run(service.forwards())
        service_pid = asyncio.run(service.health())["pid"]
        os.kill(service_pid, signal.SIGSTOP)
        try:
            os.kill(forwards["alice/tls/hub-api"]["master_pid"], signal.SIGKILL)
            squatter = squat_on_login("bob", lab.LOGIN_CLUSTER_IP, api_port)
        finally:
            os.kill(service_pid, signal.SIGCONT)

        def state() -> dict:
            return asyncio.run(service.forwards())

        assert wait_for(lambda: state()["alice/tls"]["up"]
                        and not state()["alice/tls/hub-api"]["up"], 15), state()
        token = hub.api("POST", "/users/alice/tokens", json={"expires_in": 600}).json()["token"]
        status = hub.get("/user/alice/tls/api/kernels", token=token).status_code
        assert status != 200
        captured = bytes.fromhex(squatter.stdout.readline().strip())
        assert captured[:1] == b"\x16", captured[:64]  # a TLS handshake record
        assert token.encode() not in captured and b"uthorization" not in captured

        lab.stop_pid(squatter.pid)
        assert wait_for(lambda: state()["alice/tls/hub-api"]["up"], 10), state()
        assert wait_for(lambda: _fresh_token_status(hub, "tls") == 200, 20)
        assert hub.api("GET", "/users/alice").json()["servers"]["tls"]["ready"]
        assert active_jobs("alice") == job

        hub.stop("alice", "tls")
        assert wait_for(lambda: not active_jobs("alice"), 20), active_jobs("alice")
        left = lab.in_namespace("login", ["ls", "-a", "/home/alice/.hub-spawner"], check=False)
        assert "certs-" not in left.stdout, left.stdout
    finally:
        if squatter is not None:
            lab.stop_pid(squatter.pid)
        stop_hub(process)
        lab.stop_tunnel_service(tmp_path / "tunnels")


BOB_CLIENT = """
import socket, ssl, sys
port = int(sys.argv[1])
context = ssl.create_default_context()
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
try:
    with socket.create_connection((sys.argv[2], port), timeout=10) as raw:
        with context.wrap_socket(raw) as tls:
            tls.sendall(b"GET /hub/api/users/alice HTTP/1.1\\r\\nHost: login\\r\\n\\r\\n")
            reply = tls.recv(4096).decode(errors="replace")
    print(reply.split()[1] if reply.startswith("HTTP/") else "refused", reply[:300])
except (ssl.SSLError, OSError) as error:
    print("refused", error)
"""


def _as_bob_on_login(lab, port: int) -> str:
    """What bob, on the login host, gets from the hub-API port without a token."""
    python = str(lab.LAB_PREFIX / "venv/bin/python")
    result = lab.in_namespace("login", ["runuser", "-u", "bob", "--", python, "-c", BOB_CLIENT,
                                        str(port), lab.LOGIN_CLUSTER_IP], check=False)
    return result.stdout.strip() or result.stderr.strip()


PROXY_PORT = 28300


def _proxy_with_internal_certs(lab, tmp_path, port: int, token: str) -> subprocess.Popen:
    """configurable-http-proxy as its own process (the README's unit, z2jh's shape) with the
    certificates JupyterHub makes for internal_ssl (``jupyterhub --generate-certs``, run as
    the admin would before the proxy's first start): TLS on its API (a client certificate
    from the hub's CA required) and towards the hub and the servers."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HUB_STATE_DIR=str(tmp_path),
               HUB_PORT=str(port), HUB_TEST_TOKEN=token, HUB_INTERNAL_SSL="1",
               CONFIGPROXY_AUTH_TOKEN=token,
               HUB_LAB_CONFIG=str(REPO / "example_hub_config" / "lab_jupyterhub_config.py"))
    jupyterhub = lab.LAB_PREFIX / "venv/bin/jupyterhub"
    made = subprocess.run([str(jupyterhub), "-f", str(REPO / "tests/integration/hub_config.py"),
                           "--generate-certs"], cwd=tmp_path, env=env, check=True, timeout=120,
                          capture_output=True, text=True)
    assert "Traceback" not in made.stdout + made.stderr, made.stdout + made.stderr
    certs = tmp_path / "certs"
    command = [str(lab.LAB_PREFIX / "node_modules/.bin/configurable-http-proxy"),
               "--ip", "127.0.0.1", "--port", str(port),
               "--api-ip", "127.0.0.1", "--api-port", str(port + 1),
               "--error-target", f"https://127.0.0.1:{port + 81}/hub/error"]
    for side in ("api", "client"):
        name = f"proxy-{side}"
        command += [f"--{side}-ssl-key", str(certs / name / f"{name}.key"),
                    f"--{side}-ssl-cert", str(certs / name / f"{name}.crt"),
                    f"--{side}-ssl-ca", str(certs / f"{name}-ca_trust.crt"),
                    f"--{side}-ssl-request-cert", f"--{side}-ssl-reject-unauthorized"]
    return subprocess.Popen(command, env=dict(os.environ, CONFIGPROXY_AUTH_TOKEN=token),
                            cwd=tmp_path, stdout=open(tmp_path / "proxy.log", "a"),
                            stderr=subprocess.STDOUT)


def test_internal_ssl_with_the_proxy_as_its_own_process(lab, tmp_path):
    """Issue 28: TLS on the hub-API path is the example configs' default for real clusters,
    where the proxy runs as its own service; that combination works end to end: a kernel
    through proxy -> tunnel -> TLS server, a token checked over TLS, the proxy's API refusing
    a client without the hub's certificate."""
    token = secrets.token_hex(24)
    proxy = _proxy_with_internal_certs(lab, tmp_path, PROXY_PORT, token)
    process = None
    try:
        assert wait_for(lambda: _port_open(PROXY_PORT + 1), 20), (
            tmp_path / "proxy.log").read_text()
        # Without the hub's client certificate the proxy's API does not even answer.
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"https://127.0.0.1:{PROXY_PORT + 1}/api/routes", verify=False,
                         headers={"Authorization": f"token {token}"}, timeout=10)
        hub, process = start_hub(tmp_path, PROXY_PORT, token,
                                 {"HUB_INTERNAL_SSL": "1", "CONFIGPROXY_AUTH_TOKEN": token})
        hub.api("POST", "/users/alice")
        events, _ = hub.spawn("alice", "tls-proxy")
        assert events[-1].get("ready"), events
        kernel_id, kernel = open_kernel(hub, "alice", "tls-proxy")
        seen = execute(kernel, "import os; print(os.environ['JUPYTERHUB_API_URL'])").split()
        kernel.close()
        hub.api_server("DELETE", "alice", f"/api/kernels/{kernel_id}", server="tls-proxy")
        assert seen[0].startswith("https://login:"), seen
        assert _fresh_token_status(hub, "tls-proxy") == 200
        hub.stop("alice", "tls-proxy")
        assert wait_for(lambda: not active_jobs("alice"), 20), active_jobs("alice")
    finally:
        if process is not None:
            stop_hub(process)
        lab.stop_pid(proxy.pid)
        lab.stop_tunnel_service(tmp_path / "tunnels")


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0
