"""The Helm chart's three pods as three processes on this machine, against the lab.

From the rendered manifests (values: the README's Slurm example, pointed at the lab) this takes
the hub's jupyterhub_config.py (its ConfigMap) and values.json (its values Secret), the hub's
environment (its Deployment, secrets resolved from the rendered Secret), and the proxy's and
the tunnel service's command lines (their Deployments). It replaces only what a cluster would
provide: the Kubernetes Service names become 127.0.0.1 ports, the pod's mount paths become the
lab's key and known_hosts paths, and the tunnel service listens on 127.0.0.1 instead of its pod
IP (``HUB_SPAWNER_TUNNEL_BIND_IP``, which the pod leaves at 0.0.0.0). internal_ssl is on, as
the chart's default: the hub and the proxy get the certificates the chart generated (its
Secret ``<fullname>-internal-ssl``, written where the pods mount it). Then: spawn, open a
kernel websocket through the proxy, restart the hub, and the websocket lives on, as the chart
promises; every internal hop is TLS with the chart's authorities.

No Kubernetes runs here: DNS, NetworkPolicy enforcement and volume modes are not exercised
(tests/test_helm_chart.py checks the manifests offline).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from hub_spawner.tunnels.client import TunnelClient
from tests import helm_chart

from .conftest import REPO, Hub, active_jobs, execute, open_kernel, wait_for

PORT = 28600  # proxy; +1 proxy API; +2 tunnel service control; +81 hub


def lab_values(lab) -> dict:
    """The README's Slurm values, pointed at the lab, with an API token for the test."""
    values = helm_chart.load_values()
    values["cluster"].update(loginHost=lab.LOGIN_IP, knownHosts=lab.KNOWN_HOSTS.read_text(),
                             hubApiTunnelHost="login")
    prefix = lab.LAB_PREFIX
    values["spawner"] = {
        "partitions": ["debug"], "defaultPartition": "debug", "maxCpus": 2,
        "maxMemory": "900M", "defaultWalltime": "01:00:00", "startTimeout": 120,
        "jobPython": f"{prefix}/venv/bin/python",
        "cmd": [f"{prefix}/venv/bin/jupyterhub-singleuser"], "defaultUrl": "/lab",
    }
    values["hub"] = {
        "config": {"JupyterHub": {"authenticator_class": "dummy"},
                   "Authenticator": {"allowed_users": ["alice"]}},
        # Beside the chart's own service (the idle culler), not instead of it.
        "extraConfig": {"lab-tests": (
            "import os\n"
            "c.JupyterHub.services.append({'name': 'lab-tests',"
            " 'api_token': os.environ['HUB_TEST_TOKEN']})\n"
            "c.JupyterHub.load_roles.append({'name': 'lab-tests', 'services': ['lab-tests'],"
            " 'scopes': ['admin:users', 'admin:servers', 'access:servers', 'read:users',"
            " 'read:metrics']})\n"
        )},
    }
    return values


class ChartOnThisMachine:
    """The rendered hub, proxy and tunnel service, started as local processes."""

    def __init__(self, lab, manifests: list, directory: Path) -> None:
        self.lab, self.manifests, self.directory = lab, manifests, directory
        self.processes: dict[str, subprocess.Popen] = {}
        name = helm_chart.fullname(manifests)
        self.rendered_env = helm_chart.hub_env(manifests)
        # Only what Kubernetes would provide changes: Service names, pod paths, the pod IP.
        self.ca_dir = self._write_mounted(helm_chart.hub_deployment(manifests), "hub",
                                          "/etc/hub_spawner/internal-ssl-ca", "internal-ssl-ca")
        self.proxy_tls = self._write_mounted(helm_chart.proxy_deployment(manifests), "chp",
                                             "/etc/chp/tls", "chp-tls")
        self.local = {
            "HUB_SPAWNER_HUB_BIND_URL": f"https://127.0.0.1:{PORT + 81}",
            "HUB_SPAWNER_HUB_CONNECT_IP": "127.0.0.1",
            "HUB_SPAWNER_PROXY_API_URL": f"https://127.0.0.1:{PORT + 1}",
            "HUB_SPAWNER_INTERNAL_SSL_CA_DIR": str(self.ca_dir),
            "HUB_SPAWNER_INTERNAL_CERTS_LOCATION": str(directory / "internal-ssl"),
            "HUB_SPAWNER_TUNNEL_ADDRESS": f"127.0.0.1:{PORT + 2}",
            "HUB_SPAWNER_TUNNEL_CONNECT_HOST": "127.0.0.1",
            "HUB_SPAWNER_DB_URL": f"sqlite:///{directory}/jupyterhub.sqlite",
            "HUB_SPAWNER_SSH_KEY_PATH_TEMPLATE": f"{lab.KEY_DIR}/{{username}}",
            "HUB_SPAWNER_KNOWN_HOSTS_PATH": str(lab.KNOWN_HOSTS),
        }
        self.hub_target = f"{name}-hub:8081"
        self.config_dir = directory / "etc"
        self.config_path = helm_chart.write_hub_config(manifests, self.config_dir)
        self.token = secrets.token_hex(24)

    def start_tunnel_service(self) -> None:
        command = helm_chart.tunnels_command(self.manifests)
        assert command[:3] == ["python", "-m", "hub_spawner.tunnels"], command
        command = [sys.executable, *command[1:]]
        command[command.index("--dir") + 1] = str(self.directory / "tunnels")
        command[command.index("--listen") + 1] = f"127.0.0.1:{PORT + 2}"
        command[command.index("--metrics") + 1] = f"127.0.0.1:{PORT + 3}"
        env = {k: v for k, v in helm_chart.tunnels_env(self.manifests).items() if v is not None}
        self._start("tunnels", command, env)
        assert wait_for(lambda: _port_open(PORT + 2), 20)

    def start_proxy(self) -> None:
        command = helm_chart.command_line(
            helm_chart.proxy_deployment(self.manifests), "chp")
        assert command[0] == "configurable-http-proxy", command
        replaced = {"--ip=": "--ip=127.0.0.1", "--api-ip=": "--api-ip=127.0.0.1",
                    "--port=8000": f"--port={PORT}", "--api-port=8001": f"--api-port={PORT + 1}"}
        command = [str(self.lab.LAB_PREFIX / "node_modules/.bin/configurable-http-proxy")] + [
            replaced.get(arg, arg.replace(self.hub_target, f"127.0.0.1:{PORT + 81}")
                         .replace("=/etc/chp/tls/", f"={self.proxy_tls}/"))
            for arg in command[1:]
        ]
        assert not any("/etc/chp/" in arg for arg in command), command
        assert not any(self.hub_target in arg for arg in command), command
        token = self.rendered_env["CONFIGPROXY_AUTH_TOKEN"]
        self._start("proxy", command, {"CONFIGPROXY_AUTH_TOKEN": token})
        assert wait_for(lambda: _port_open(PORT + 1), 20)

    def start_hub(self) -> Hub:
        command = helm_chart.hub_command(self.manifests)
        assert command[:2] == ["jupyterhub", "-f"], command
        command = [str(self.lab.LAB_PREFIX / "venv/bin/jupyterhub"), "-f",
                   str(self.config_path)]
        env = {k: v for k, v in self.rendered_env.items() if v is not None}
        env.update(self.local, HUB_SPAWNER_TUNNEL_BIND_IP="127.0.0.1",
                   HUB_TEST_TOKEN=self.token, PYTHONPATH=str(REPO))
        self._start("hub", command, env)
        hub = Hub(f"http://127.0.0.1:{PORT}", self.token, self.directory / "hub.log")
        assert wait_for(lambda: _answers(hub), 60), hub.log()[-3000:]
        return hub

    def stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is not None:
            self.lab.stop_pid(process.pid, timeout=60)

    def stop_all(self) -> None:
        """Everything started here, the tunnel service's SSH masters included."""
        self.stop("hub")
        self.stop("proxy")
        self.lab.stop_tunnel_service(self.directory / "tunnels")
        self.stop("tunnels")

    def tunnel_client(self) -> TunnelClient:
        return TunnelClient(self.directory / "tunnels", address=f"127.0.0.1:{PORT + 2}",
                            token=helm_chart.tunnels_env(self.manifests)["HUB_SPAWNER_TUNNEL_TOKEN"])

    def _write_mounted(self, deployment: dict, container: str, mount_path: str,
                       name: str) -> Path:
        """The files the pod sees at ``mount_path``, written into a private directory."""
        directory = self.directory / name
        directory.mkdir(mode=0o700)
        for path, content in helm_chart.mounted_files(self.manifests, deployment, container,
                                                      mount_path).items():
            (directory / path).write_text(content)
            (directory / path).chmod(0o600)
        return directory

    def _start(self, name: str, command: list[str], env: dict[str, str]) -> None:
        log = open(self.directory / f"{name}.log", "a")
        self.processes[name] = subprocess.Popen(
            command, cwd=self.directory, env=dict(os.environ, **env), stdout=log,
            stderr=subprocess.STDOUT)


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _answers(hub: Hub) -> bool:
    try:
        return hub.api("GET", "/", timeout=2).status_code == 200
    except Exception:
        return False


def check_every_internal_hop_is_tls_with_the_charts_authorities(chart, forward_port: int) -> None:
    """The hub's port and the proxy's API speak TLS and want a client certificate; alice's
    server, through its forward, presents a certificate that the chart's authorities (the
    proxy's trust bundle) verify for the proxy's client certificate, i.e. the hub signed it
    with the chart's notebooks-ca (external_ssl_authorities), not an authority of its own."""
    for port in (PORT + 81, PORT + 1):
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/", timeout=5)  # plain HTTP: no answer
        # TLS, but without a client certificate: refused in (or, TLS 1.3, right after) the
        # handshake
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"https://127.0.0.1:{port}/", timeout=5,
                         verify=str(chart.proxy_tls / "proxy-client-ca_trust.crt"))
    context = ssl.create_default_context(cafile=str(chart.proxy_tls / "proxy-client-ca_trust.crt"))
    context.load_cert_chain(str(chart.proxy_tls / "proxy-client.crt"),
                            str(chart.proxy_tls / "proxy-client.key"))
    with socket.create_connection(("127.0.0.1", forward_port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        issuer = dict(pair[0] for pair in tls.getpeercert()["issuer"])
    assert issuer["commonName"] == f"{helm_chart.fullname(chart.manifests)} notebooks-ca", issuer


def metric_values(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric in Prometheus' text format."""
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line[len(name):].rpartition(" ")
            found[labels] = float(value)
    return found


def check_the_metrics_after_a_spawn(hub, lab) -> None:
    """The hub's /hub/metrics has ours beside JupyterHub's; the tunnel service's own
    endpoint (--metrics, as the chart runs it) counts its master and alice's two forwards."""
    text = hub.get("/hub/metrics").text
    cluster = f'cluster="slurm@{lab.LOGIN_IP}"'
    steps = metric_values(text, "hub_spawner_spawn_step_seconds_count")
    for step in ("connect", "submit", "ready line", "tunnel"):
        assert steps.get(f'{{{cluster},step="{step}"}}') == 1.0, (step, steps)
    assert metric_values(text, "hub_spawner_queue_wait_seconds_count") == {f"{{{cluster}}}": 1.0}
    assert wait_for(lambda: metric_values(hub.get("/hub/metrics").text,
                                          "hub_spawner_scheduler_listing_seconds_count").get(
                                              f"{{{cluster}}}", 0) >= 1, 30)
    assert "jupyterhub_server_spawn_duration_seconds" in text  # JupyterHub's own, same registry
    service = requests.get(f"http://127.0.0.1:{PORT + 3}/metrics", timeout=10).text
    assert metric_values(service, "hub_spawner_tunnel_masters") == {"": 1.0}, service
    assert metric_values(service, "hub_spawner_tunnel_forwards") == {
        '{state="up"}': 2.0, '{state="down"}': 0.0}, service
    assert metric_values(service, "hub_spawner_tunnel_master_starts_total") == {"": 1.0}


@pytest.fixture
def chart(lab, tmp_path):
    running = ChartOnThisMachine(lab, helm_chart.render(lab_values(lab)), tmp_path)
    yield running
    running.stop_all()
    lab.in_namespace("login", ["scancel", "--user=alice"], check=False)
    assert wait_for(lambda: not active_jobs("alice"), 30), active_jobs("alice")


def test_the_rendered_chart_spawns_and_an_open_websocket_survives_a_hub_restart(lab, chart):
    # What we replace exists in the rendered env: we change addresses, we do not add settings.
    assert set(chart.local) <= set(chart.rendered_env), set(chart.local) - set(chart.rendered_env)
    chart.start_tunnel_service()
    chart.start_proxy()
    hub = chart.start_hub()

    # The chart's idle culler runs as the hub's managed service and reads the users list.
    assert "'--timeout=3600', '--cull-every=600', '--ssl-enabled=true'" in hub.log(), (
        hub.log()[-3000:])
    assert wait_for(lambda: "200 GET /hub/api/users" in hub.log()
                    and "(idle-culler@" in hub.log(), 30), hub.log()[-3000:]
    hub.api("POST", "/users/alice")
    events, seconds = hub.spawn("alice")
    assert events and events[-1].get("ready"), events
    forwards = asyncio.run(chart.tunnel_client().forwards())
    local = forwards["alice/"]
    low, high = helm_chart.tunnels_command(chart.manifests)[-1].split("-")
    assert int(low) <= local["port"] <= int(high), local  # --forward-ports, as the NetworkPolicy
    assert "alice//hub-api" in forwards
    check_the_metrics_after_a_spawn(hub, lab)
    kernel_id, kernel = open_kernel(hub, "alice")
    assert execute(kernel, "x = 41; print('set')").strip() == "set"
    check_every_internal_hop_is_tls_with_the_charts_authorities(chart, local["port"])

    chart.stop("hub")  # SIGTERM, as a rollout does
    assert wait_for(lambda: not _port_open(PORT + 81), 10)
    assert execute(kernel, "x += 1; print(x)").strip() == "42"  # while the hub is down
    hub = chart.start_hub()
    assert execute(kernel, "print(x)").strip() == "42"  # same connection, same kernel
    status = hub.get("/user/alice/api/status", allow_redirects=False)  # new requests work too
    assert status.status_code == 200 and "started" in status.json(), status.text
    kernel.close()
    hub.api_server("DELETE", "alice", f"/api/kernels/{kernel_id}")
    hub.stop("alice")
    assert wait_for(lambda: not active_jobs("alice"), 30), active_jobs("alice")
    left = asyncio.run(chart.tunnel_client().forwards())
    assert "alice/" not in left and "alice//hub-api" not in left, left
