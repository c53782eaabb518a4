"""The chart's image, built here from the repository's Dockerfile with Debian's podman (on a
Debian 12 base made by mmdebstrap: no registry is reachable), started as the chart starts it
(read-only root, uid 1000), and the rendered chart's hub running *from that image* against the
lab: it spawns alice's server on Slurm and a kernel runs code through the proxy.

The hub and the tunnel service run in containers of the image, the proxy as a process
(test_helm_lab.py runs all three as processes). The containers share this machine's network
(``--network=host``) where Kubernetes would give each pod its own: Service names become
127.0.0.1 ports, as in test_helm_lab.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import helm_chart
from tests.lab import image as image_builder

from .conftest import Hub, active_jobs, execute, open_kernel, wait_for
from .test_helm_lab import PORT, ChartOnThisMachine, _answers, _port_open, lab_values

UID = 1000
HUB_CONTAINER = "hub-spawner-test-hub"
TUNNELS_CONTAINER = "hub-spawner-test-tunnels"


@pytest.fixture(scope="module")
def image() -> str:
    return image_builder.build()


def run_in_image(image: str, *command: str) -> subprocess.CompletedProcess:
    """``command`` in a throw-away container, as the chart runs the image."""
    return image_builder.podman(
        "run", "--rm", "--network=host", "--read-only", "--user", f"{UID}:{UID}",
        "--tmpfs", "/tmp", image, *command, check=False, timeout=120)


def test_the_image_runs_read_only_as_uid_1000_with_everything_the_pods_run(image):
    version = run_in_image(image, "jupyterhub", "--version")
    assert version.returncode == 0 and version.stdout.strip() == "6.1.1", version
    check = run_in_image(image, "python", "-m", "hub_spawner", "check", "--help")
    assert check.returncode == 0 and "--submit" in check.stdout, check
    tunnels = run_in_image(image, "python", "-m", "hub_spawner.tunnels", "--help")
    assert tunnels.returncode == 0 and "--forward-ports" in tunnels.stdout, tunnels
    culler = run_in_image(image, "python", "-m", "jupyterhub_idle_culler", "--help")
    assert culler.returncode == 0 and "--timeout" in culler.stdout, culler
    who = run_in_image(image, "sh", "-c", "id -u; ssh -V 2>&1; tini --version; "
                       "touch /srv/jupyterhub/x 2>&1 || echo read-only")
    lines = who.stdout.splitlines()
    assert lines[0] == str(UID), who
    assert lines[1].startswith("OpenSSH_") and lines[2].startswith("tini version"), who
    assert lines[-1] == "read-only", who  # the root, /srv/jupyterhub included, is read-only


class ChartHubInImage(ChartOnThisMachine):
    """The rendered chart with its hub in a container of the image: the pod's own paths for
    its config, keys, known_hosts and certificates (mounted there), the pod's securityContext
    (uid 1000, read-only root), and the rendered environment with only the addresses changed."""

    def start_hub_in_image(self, image: str) -> Hub:
        command = helm_chart.hub_command(self.manifests)
        assert command[:2] == ["jupyterhub", "-f"], command
        env = {k: v for k, v in self.rendered_env.items() if v is not None}
        for name in ("HUB_SPAWNER_HUB_BIND_URL", "HUB_SPAWNER_HUB_CONNECT_IP",
                     "HUB_SPAWNER_PROXY_API_URL", "HUB_SPAWNER_TUNNEL_ADDRESS",
                     "HUB_SPAWNER_TUNNEL_CONNECT_HOST"):
            env[name] = self.local[name]
        env.update(HUB_SPAWNER_TUNNEL_BIND_IP="127.0.0.1", HUB_TEST_TOKEN=self.token)
        # Secrets go in a 0600 file, never on podman's command line.
        env_file = self.directory / "hub.env"
        env_file.touch(mode=0o600)
        env_file.write_text("".join(f"{k}={v}\n" for k, v in sorted(env.items())))

        mounts = {
            self._owned_copy(self.config_dir, "config"): "/usr/local/etc/jupyterhub",
            self._owned_copy(self.ca_dir, "ca"): env["HUB_SPAWNER_INTERNAL_SSL_CA_DIR"],
            self._owned_copy(self.lab.KNOWN_HOSTS, "known_hosts"):
                env["HUB_SPAWNER_KNOWN_HOSTS_PATH"],
            self._owned_copy(self.lab.KEY_DIR / "alice", "keys/alice").parent:
                str(Path(env["HUB_SPAWNER_SSH_KEY_PATH_TEMPLATE"]).parent),
        }
        data = self.directory / "hub-data"
        data.mkdir(mode=0o700, exist_ok=True)
        os.chown(data, UID, UID)
        certificates = env["HUB_SPAWNER_INTERNAL_CERTS_LOCATION"]  # memory, as in the pod
        arguments = ["run", "--detach", "--name", HUB_CONTAINER, "--network=host",
                     "--read-only", "--user", f"{UID}:{UID}", "--env-file", str(env_file),
                     "--tmpfs", "/tmp", "--tmpfs", f"{certificates}:rw,U",
                     "-v", f"{data}:/srv/jupyterhub"]
        for source, target in mounts.items():
            arguments += ["-v", f"{source}:{target}:ro"]
        image_builder.podman("rm", "--force", "--ignore", HUB_CONTAINER)
        image_builder.podman(*arguments, image, *command)
        hub = Hub(f"http://127.0.0.1:{PORT}", self.token, self.directory / "hub.log")
        if not wait_for(lambda: _answers(hub), 90):
            raise AssertionError(self.hub_container_log()[-4000:])
        return hub

    def start_tunnel_service_in_image(self, image: str) -> None:
        """The chart's tunnels pod: the same image, its command with the addresses changed,
        the keys and known_hosts where the hub's paths name them (both pods mount them so)."""
        command = helm_chart.tunnels_command(self.manifests)
        command[command.index("--listen") + 1] = f"127.0.0.1:{PORT + 2}"
        command[command.index("--metrics") + 1] = f"127.0.0.1:{PORT + 3}"
        env = {k: v for k, v in helm_chart.tunnels_env(self.manifests).items() if v is not None}
        env_file = self.directory / "tunnels.env"
        env_file.touch(mode=0o600)
        env_file.write_text("".join(f"{k}={v}\n" for k, v in sorted(env.items())))
        hub_env = self.rendered_env
        mounts = {
            self._owned_copy(self.lab.KNOWN_HOSTS, "tunnels/known_hosts"):
                hub_env["HUB_SPAWNER_KNOWN_HOSTS_PATH"],
            self._owned_copy(self.lab.KEY_DIR / "alice", "tunnels/keys/alice").parent:
                str(Path(hub_env["HUB_SPAWNER_SSH_KEY_PATH_TEMPLATE"]).parent),
        }
        arguments = ["run", "--detach", "--name", TUNNELS_CONTAINER, "--network=host",
                     "--read-only", "--user", f"{UID}:{UID}", "--env-file", str(env_file),
                     "--tmpfs", "/tmp", "--tmpfs", "/srv/tunnels:rw,U"]
        for source, target in mounts.items():
            arguments += ["-v", f"{source}:{target}:ro"]
        image_builder.podman("rm", "--force", "--ignore", TUNNELS_CONTAINER)
        image_builder.podman(*arguments, image, *command)
        if not wait_for(lambda: _port_open(PORT + 2), 30):
            raise AssertionError(image_builder.podman("logs", TUNNELS_CONTAINER,
                                                      check=False).stderr[-3000:])

    def hub_container_log(self) -> str:
        result = image_builder.podman("logs", HUB_CONTAINER, check=False)
        return result.stdout + result.stderr

    def stop_containers(self) -> None:
        (self.directory / "hub.log").write_text(self.hub_container_log())
        for name in (HUB_CONTAINER, TUNNELS_CONTAINER):  # the tunnels' masters end with theirs
            image_builder.podman("stop", "--time", "30", name, check=False, timeout=90)
            image_builder.podman("rm", "--force", "--ignore", name, check=False)

    def _owned_copy(self, source: Path, name: str) -> Path:
        """A copy of ``source`` that uid 1000 owns and alone reads (as the pod's keys-copy
        container and fsGroup arrange)."""
        target = self.directory / "for-the-container" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy(source, target)
        for path in [target, *(target.rglob("*") if target.is_dir() else [])]:
            os.chown(path, UID, UID)
            path.chmod(0o700 if path.is_dir() else 0o600)
        os.chown(target.parent, UID, UID)
        return target


@pytest.fixture
def chart_in_image(lab, tmp_path):
    running = ChartHubInImage(lab, helm_chart.render(lab_values(lab)), tmp_path)
    yield running
    running.stop_containers()
    running.stop("proxy")
    lab.in_namespace("login", ["scancel", "--user=alice"], check=False)
    assert wait_for(lambda: not active_jobs("alice"), 30), active_jobs("alice")


def test_the_rendered_charts_hub_from_the_image_spawns_on_the_lab(lab, image, chart_in_image):
    chart = chart_in_image
    chart.start_tunnel_service_in_image(image)
    chart.start_proxy()
    hub = chart.start_hub_in_image(image)
    hub.api("POST", "/users/alice")
    events, _ = hub.spawn("alice")
    assert events and events[-1].get("ready"), (events, chart.hub_container_log()[-3000:])
    kernel_id, kernel = open_kernel(hub, "alice")
    assert execute(kernel, "import os; print(os.uname().nodename)").strip() == "compute"
    kernel.close()
    hub.api_server("DELETE", "alice", f"/api/kernels/{kernel_id}")
    hub.stop("alice")
    assert wait_for(lambda: not active_jobs("alice"), 30), active_jobs("alice")
    # The hub ran in the container as uid 1000: its main process, seen from this side.
    pid = image_builder.podman("inspect", "--format", "{{.State.Pid}}", HUB_CONTAINER).stdout
    status = Path(f"/proc/{pid.strip()}/status").read_text()
    [uids] = [line.split()[1:] for line in status.splitlines() if line.startswith("Uid:")]
    assert set(uids) == {str(UID)}, status
