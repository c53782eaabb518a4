"""A hub restart (cleanup_servers = False) keeps the job, and the tunnel service keeps both
forwards on their ports, so the proxy's route and the server's hub API URL stay valid.

When the tunnel service went down too (the hub host rebooted) and something is in the way when
it comes back (another login-node user on the reverse-forward port, another process on the
hub-side port), or an exception nobody foresaw hits the spawner, the hub still knows the server
and its job: it recovers within a poll interval, or cancels the job and says why; never a
running job the hub has forgotten.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import socket
import time

import pytest

from hub_spawner.tunnels.client import TunnelClient

from .conftest import (
    active_jobs,
    connect_kernel,
    execute,
    open_kernel,
    squat_on_login,
    start_hub,
    start_proxy,
    stop_hub,
    wait_for,
)

PORT = 28000
POLL_INTERVAL = 5


@pytest.fixture(autouse=True)
def _no_job_left(lab, tmp_path):
    """Whatever a test leaves (it failed half-way), alice's jobs and the test's tunnel service
    go before the next test."""
    yield
    lab.stop_tunnel_service(tmp_path / "tunnels")
    lab.in_namespace("login", ["scancel", "--user=alice"], check=False)
    assert wait_for(lambda: not active_jobs("alice"), 30), active_jobs("alice")


def _spawn_and_stop_hub(tmp_path, env: dict) -> tuple[str, dict, list[str]]:
    """Start a hub, spawn alice's ``restart`` server, stop the hub; returns the hub token, the
    spawner's stored state and the job listing."""
    token = secrets.token_hex(24)
    hub, process = start_hub(tmp_path, PORT, token, env)
    try:
        job = _spawn_restart_server(hub)
        state = hub.api("GET", "/users/alice").json()["servers"]["restart"]["state"]
    finally:
        stop_hub(process)
    assert active_jobs("alice") == job  # the hub (and its proxy) are gone; the job is not
    return token, state, job


def _spawn_restart_server(hub) -> list[str]:
    """Spawn alice's ``restart`` server; returns its one job's listing."""
    hub.api("POST", "/users/alice")
    events, _ = hub.spawn("alice", "restart")
    assert events[-1].get("ready"), events
    job = active_jobs("alice")
    assert len(job) == 1, job
    return job


def _tunnel_service(tmp_path) -> TunnelClient:
    return TunnelClient(tmp_path / "tunnels")


def _kill_tunnel_service(tmp_path) -> None:
    """As if the hub host rebooted: SIGKILL the tunnel service and its SSH masters, so every
    forward is gone; its table on disk stays."""
    client = _tunnel_service(tmp_path)
    masters = {entry["master_pid"] for entry in asyncio.run(client.forwards()).values()}
    for pid in {asyncio.run(client.health())["pid"], *masters} - {0}:
        os.kill(pid, signal.SIGKILL)


def _restart_log(hub) -> str:
    return hub.log().split("Running JupyterHub version")[-1]


def _reachable(hub) -> bool:
    try:
        return hub.get("/user/alice/restart/api/status").status_code == 200
    except Exception:
        return False


def _stop_and_check_gone(hub) -> None:
    hub.stop("alice", "restart")
    assert wait_for(lambda: not active_jobs("alice"), 20), active_jobs("alice")


def _port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _fresh_token_works(hub) -> bool:
    """A token the server has never seen: accepting it means asking the hub API (through the
    reverse tunnel); a cached answer cannot pass this."""
    token = hub.api("POST", "/users/alice/tokens", json={"expires_in": 600}).json()["token"]
    response = hub.get("/user/alice/restart/api/kernels", token=token)
    return response.status_code == 200


def test_server_survives_a_hub_restart_on_the_tunnel_services_forwards(lab, tmp_path):
    env = {"HUB_KEEP_SERVERS": "1"}
    token, state, _ = _spawn_and_stop_hub(tmp_path, env)
    service_pid = asyncio.run(_tunnel_service(tmp_path).health())["pid"]
    hub, process = start_hub(tmp_path, PORT, token, env)
    try:
        assert _reachable(hub)
        stored = hub.api("GET", "/users/alice").json()["servers"]["restart"]["state"]
        assert stored["tunnel_port"] == state["tunnel_port"]
        assert stored["api_tunnel_port"] == state["api_tunnel_port"]
        # The same service held the forwards all along: nothing had to be re-opened.
        assert asyncio.run(_tunnel_service(tmp_path).health())["pid"] == service_pid
        assert "cannot re-open" not in _restart_log(hub)
        assert _fresh_token_works(hub)
        _stop_and_check_gone(hub)
    finally:
        stop_hub(process)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
def test_open_kernel_websocket_survives_a_hub_restart(lab, tmp_path, signum):
    """Proxy as its own process, cleanup_servers = False: a kernel websocket opened before the
    hub goes down keeps running code while it is down and after it is back (same connection,
    same variables); a new request through the proxy works as soon as the hub answers."""
    proxy_token = secrets.token_hex(24)
    env = {"HUB_KEEP_SERVERS": "1", "CONFIGPROXY_AUTH_TOKEN": proxy_token}
    proxy = start_proxy(PORT, proxy_token, tmp_path)
    try:
        token = secrets.token_hex(24)
        hub, process = start_hub(tmp_path, PORT, token, env)
        try:
            _spawn_restart_server(hub)
            kernel_id, kernel = open_kernel(hub, "alice", "restart")
            assert execute(kernel, "x = 41; print('set')").strip() == "set"
        finally:
            if signum == signal.SIGKILL:
                process.kill()
                process.wait()
            else:
                stop_hub(process)
        assert wait_for(lambda: not _port_in_use(PORT + 81), 10)  # the hub API is down
        assert execute(kernel, "x += 1; print(x)").strip() == "42"
        hub, process = start_hub(tmp_path, PORT, token, env)
        try:
            assert _reachable(hub)
            assert execute(kernel, "print(x)").strip() == "42"
            kernel.close()
            hub.api_server("DELETE", "alice", f"/api/kernels/{kernel_id}", server="restart")
            _stop_and_check_gone(hub)
        finally:
            stop_hub(process)
    finally:
        lab.stop_pid(proxy.pid)


def test_tunnel_service_killed_under_a_running_hub_is_invisible(lab, tmp_path):
    """SIGKILL the tunnel service: its masters outlive it and the next one (started on the
    hub's next request) adopts them; the server is never marked stopped and a new websocket
    works."""
    env = {"HUB_KEEP_SERVERS": "1", "HUB_POLL_INTERVAL": str(POLL_INTERVAL)}
    token = secrets.token_hex(24)
    hub, process = start_hub(tmp_path, PORT, token, env)
    try:
        job = _spawn_restart_server(hub)
        kernel_id, kernel = open_kernel(hub, "alice", "restart")
        assert execute(kernel, "y = 7; print(y)").strip() == "7"
        service = _tunnel_service(tmp_path)
        before = asyncio.run(service.forwards())
        old_pid = asyncio.run(service.health())["pid"]
        os.kill(old_pid, signal.SIGKILL)
        assert execute(kernel, "print(y * 6)").strip() == "42"  # same connection
        kernel.close()
        time.sleep(POLL_INTERVAL + 1)  # a poll asks the service (and starts a new one)
        assert asyncio.run(service.health())["pid"] != old_pid
        after = asyncio.run(service.forwards())
        assert {n: e["port"] for n, e in after.items()} == {n: e["port"] for n, e in before.items()}
        assert all(entry["up"] for entry in after.values()), after
        assert hub.api("GET", "/users/alice").json()["servers"]["restart"]["ready"]
        assert active_jobs("alice") == job
        again = connect_kernel(hub, "alice", kernel_id, "restart")  # a reconnecting browser
        assert execute(again, "print(y)").strip() == "7"
        again.close()
        hub.api_server("DELETE", "alice", f"/api/kernels/{kernel_id}", server="restart")
        assert "Failed to poll" not in _restart_log(hub)
        _stop_and_check_gone(hub)
    finally:
        stop_hub(process)


def test_taken_reverse_port_keeps_the_server_known_and_recovers_once_freed(lab, tmp_path):
    env = {"HUB_KEEP_SERVERS": "1", "HUB_POLL_INTERVAL": str(POLL_INTERVAL)}
    token, state, job = _spawn_and_stop_hub(tmp_path, env)
    api_port = state["api_tunnel_port"]
    _kill_tunnel_service(tmp_path)
    # bob, an ordinary login-node user, takes the freed port while the hub is down.
    squatter = squat_on_login("bob", lab.LOGIN_CLUSTER_IP, api_port)
    try:
        hub, process = start_hub(tmp_path, PORT, token, env)
        try:
            message = (f"alice:restart: cannot re-open the hub API tunnel of job "
                       f"{state['job_id']} on login port {api_port}")
            assert wait_for(lambda: message in _restart_log(hub), 20), _restart_log(hub)[-3000:]
            assert "The server cannot reach the hub until this succeeds" in _restart_log(hub)
            # Still known, still running, and the same job.
            time.sleep(POLL_INTERVAL + 1)
            model = hub.api("GET", "/users/alice").json()["servers"]
            assert model.get("restart", {}).get("ready"), model
            assert active_jobs("alice") == job
            lab.stop_pid(squatter.pid)
            assert wait_for(lambda: "re-opened the hub API tunnel" in _restart_log(hub),
                            POLL_INTERVAL + 3), _restart_log(hub)[-3000:]
            assert _reachable(hub)
            assert _fresh_token_works(hub)
            _stop_and_check_gone(hub)
        finally:
            stop_hub(process)
    finally:
        lab.stop_pid(squatter.pid)


def test_taken_hub_port_moves_the_tunnel_and_the_route(lab, tmp_path):
    env = {"HUB_KEEP_SERVERS": "1", "HUB_POLL_INTERVAL": str(POLL_INTERVAL)}
    token, state, job = _spawn_and_stop_hub(tmp_path, env)
    old_port = state["tunnel_port"]
    _kill_tunnel_service(tmp_path)
    assert wait_for(lambda: not _port_in_use(old_port), 10)
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", old_port))
    squatter.listen()
    try:
        hub, process = start_hub(tmp_path, PORT, token, env)
        try:
            assert wait_for(lambda: _reachable(hub), POLL_INTERVAL + 5), _restart_log(hub)[-3000:]
            moved = re.search(rf"alice:restart: hub port {old_port} is taken by another process; "
                              rf"the tunnel of job {state['job_id']} moved to hub port (\d+)",
                              _restart_log(hub))
            assert moved, _restart_log(hub)[-3000:]
            new_port = int(moved.group(1))
            assert new_port != old_port
            stored = hub.api("GET", "/users/alice").json()["servers"]["restart"]
            assert stored["state"]["tunnel_port"] == new_port
            assert stored["url"] == "/user/alice/restart/"
            assert active_jobs("alice") == job
            assert _fresh_token_works(hub)
            _stop_and_check_gone(hub)
        finally:
            stop_hub(process)
    finally:
        squatter.close()


def test_unexpected_error_in_reopen_is_retried_within_a_poll_interval(lab, tmp_path):
    """JupyterHub polls again only once the server answers (at start-up it waits http_timeout,
    then stops it): the background retry must bring the tunnel back before that."""
    env = {"HUB_KEEP_SERVERS": "1", "HUB_POLL_INTERVAL": str(POLL_INTERVAL)}
    token, state, job = _spawn_and_stop_hub(tmp_path, env)
    env = dict(env, HUB_FAULT="reopen-raises-once")
    hub, process = start_hub(tmp_path, PORT, token, env)
    try:
        assert wait_for(lambda: _reachable(hub), POLL_INTERVAL), _restart_log(hub)[-3000:]
        log = _restart_log(hub)
        assert (f"alice:restart: cannot re-open the tunnel of job {state['job_id']} "
                f"(hub port {state['tunnel_port']} -> ") in log, log[-3000:]
        assert "lab fault: injected into the tunnel re-open path" in log
        reopened = f"re-opened the tunnel: hub port {state['tunnel_port']} -> "
        assert wait_for(lambda: reopened in _restart_log(hub), POLL_INTERVAL), log[-3000:]
        log = _restart_log(hub)
        assert "Failed to poll spawner" not in log
        assert active_jobs("alice") == job
        _stop_and_check_gone(hub)
    finally:
        stop_hub(process)


def test_hub_that_drops_a_server_after_a_failed_stop_still_cancels_its_job(lab, tmp_path):
    """stop() raising (any reason) makes JupyterHub clear the spawner's state; the job must
    still be cancelled."""
    env = {"HUB_KEEP_SERVERS": "1", "HUB_FAULT": "stop-raises-once"}
    token = secrets.token_hex(24)
    hub, process = start_hub(tmp_path, PORT, token, env)
    try:
        _spawn_restart_server(hub)
        hub.stop("alice", "restart")
        assert wait_for(lambda: not active_jobs("alice"), 30), active_jobs("alice")
        log = _restart_log(hub)
        assert "lab fault: injected into stop() (raised now)" in log
        assert "alice:restart: the hub forgets the server while job " in log
    finally:
        stop_hub(process)


@pytest.mark.parametrize("stage", ["pending", "starting"])
def test_a_hub_killed_mid_spawn_cancels_the_job_when_it_is_back(lab, tmp_path, stage):
    """SIGKILL the hub while alice's job waits in the queue (bob's job holds both cores) or
    runs without its ready line yet (the ``never-ready`` scenario): JupyterHub has not saved
    the spawner's state by then (it does once start() returns), but the spawner did, early.
    The restarted hub sees a spawn that never finished, says so in its log and cancels the
    job; nothing of alice's is left running."""
    env = {"HUB_KEEP_SERVERS": "1", "HUB_POLL_INTERVAL": str(POLL_INTERVAL)}
    token = secrets.token_hex(24)
    server = "restart" if stage == "pending" else "never-ready"
    blocker = ""
    if stage == "pending":
        blocker = lab.in_namespace("login", [
            "runuser", "-u", "bob", "--", "sbatch", "--parsable", "--cpus-per-task=2",
            "--output=/dev/null", "--wrap=sleep 300"]).stdout.strip()
        assert wait_for(lambda: any(" RUNNING " in job for job in active_jobs("bob")), 20)
    try:
        hub, process = start_hub(tmp_path, PORT, token, env)
        hub.api("POST", "/users/alice")
        response = hub.api("POST", f"/users/alice/servers/{server}", json={"cpus": 1})
        assert response.status_code in (201, 202), response.text
        state = " PENDING " if stage == "pending" else " RUNNING "
        assert wait_for(lambda: any(state in job for job in active_jobs("alice")), 30), \
            active_jobs("alice")
        process.kill()
        process.wait()
        assert active_jobs("alice"), "the job outlives the hub until the hub is back"
        hub, process = start_hub(tmp_path, PORT, token, env)
        try:
            assert wait_for(lambda: not active_jobs("alice"), 30), active_jobs("alice")
            log = _restart_log(hub)
            assert "the hub stopped while job" in log and "is cancelled" in log, log[-3000:]
            model = hub.api("GET", "/users/alice").json()
            assert server not in model["servers"], model["servers"]
        finally:
            stop_hub(process)
    finally:
        if blocker:
            lab.in_namespace("login", ["scancel", blocker], check=False)
