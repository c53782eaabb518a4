"""The test hub: the demo's lab config plus a service token and failure scenarios.

Scenarios are named servers of alice whose command is swapped in ``pre_spawn_hook``:
- ``dies-early``: the server exits with status 3 after printing a line, before listening;
- ``never-ready``: the server never listens; ``start_timeout`` is 15 s;
- ``login-down``: the spawner points at a login-node port where nothing listens;
- ``unknown-host-key``: the spawner's known_hosts file is empty;
- ``short-walltime``: polled every 3 s (the test asks for a one-minute walltime);
- ``error-state`` (Grid Engine): the job's working directory does not exist, so Grid Engine puts
  it in error state ``Eqw``;
- ``held``: the job is submitted on hold (``-h``);
- ``wrong-host``: the server prints a ready line of its own naming another host
  (``elsewhere.127.0.0.1.nip.io``) and a port;
- ``full-host-name``: the node calls itself ``compute.lab.example`` (``hostname`` in the job
  says so), the scheduler ``compute``; ``other-host-name``: the node calls itself
  ``node-a17``, a name the scheduler does not use (Slurm also tells the job its NodeName);
- ``unit-managed-service``: ``tunnel_service_start = False`` with a tunnel service directory
  where none runs (the systemd layout with the service's unit stopped);
- ``socket`` (any name starting with it): ``server_transport = "socket"``, no open port on the
  node; ``socket-unknown-node-key`` also gives the spawner a known_hosts without the compute
  host's key.

``HUB_FAULT`` injects a failure into this hub process (a deliberate fault, not a stand-in for a
real part; every part around it is real):
- ``reopen-raises-once``: the first hub-side tunnel the hub asks for raises ``RuntimeError``;
- ``stop-raises-once``: the first ``stop()`` raises ``RuntimeError`` before it does anything.
``HUB_INTERNAL_SSL=1`` turns on JupyterHub's internal_ssl. ``HUB_SSH_CA=PATH``: certificate mode
(``ssh_ca_key_path``), with no key file for anyone (``HUB_SSH_CERT_MINUTES``: the
certificates' life in minutes). ``HUB_AUTH_STATE_KEYS=1``: an authenticator hands each user's
SSH key over in auth_state (``auth_state_ssh_key``).
``HUB_POLL_INTERVAL`` sets ``Spawner.poll_interval`` (seconds),
``HUB_CLUSTER_STATUS_INTERVAL`` ``cluster_status_interval``, ``HUB_STATUS_USER``
``status_cluster_username``, ``HUB_SSH_IDLE_TIMEOUT`` ``ssh_idle_timeout``, ``HUB_RECONCILE``
``reconcile``, ``HUB_RECONCILE_GRACE`` ``reconcile_grace``, ``HUB_ID`` ``hub_id``.
``CONFIGPROXY_AUTH_TOKEN`` set: the proxy runs as its own process (the test starts it) and the
hub does not start or stop it.
"""

import logging
import os

c = get_config()  # noqa: F821
load_subconfig(os.environ["HUB_LAB_CONFIG"])  # noqa: F821

# Beside the lab config's own services and roles (the idle culler).
c.JupyterHub.services = list(c.JupyterHub.services) + [
    {"name": "lab-tests", "api_token": os.environ["HUB_TEST_TOKEN"]}
]
c.JupyterHub.load_roles = list(c.JupyterHub.load_roles) + [
    {
        "name": "lab-tests",
        "scopes": ["admin:users", "admin:servers", "admin:server_state", "access:servers", "tokens",
                   "read:users"],
        "services": ["lab-tests"],
    }
]
c.JupyterHub.allow_named_servers = True
# HUB_SSH_CA: certificate mode, with that CA key and no key file for anyone.
if os.environ.get("HUB_SSH_CA"):
    c.SSHBatchSpawner.ssh_ca_key_path = os.environ["HUB_SSH_CA"]
    c.SSHBatchSpawner.ssh_key_path_template = "/nonexistent/hub-spawner-keys/{username}"
    # HUB_SSH_CERT_MINUTES: how long each minted certificate lives.
    c.SSHBatchSpawner.ssh_certificate_minutes = float(os.environ.get("HUB_SSH_CERT_MINUTES", 10))
# HUB_AUTH_STATE_KEYS=1: the key comes from the authenticator's auth_state (below), none from files.
if os.environ.get("HUB_AUTH_STATE_KEYS"):
    from jupyterhub.auth import Authenticator

    class LabIdentityProvider(Authenticator):
        """Logs a lab user in with the demo password and hands over that user's SSH key in
        auth_state, as an identity provider that issues keys at login would."""

        async def authenticate(self, handler, data):
            name = data.get("username", "")
            if name not in ("alice", "bob") or data.get("password") != "lab-demo-password":
                return None
            lab_dir = os.environ.get("HUB_SPAWNER_LAB_DIR", "/run/hub-spawner-lab")
            with open(f"{lab_dir}/keys/{name}") as key_file:
                return {"name": name, "auth_state": {"ssh_key": key_file.read()}}

    c.JupyterHub.authenticator_class = LabIdentityProvider
    c.Authenticator.enable_auth_state = True  # JUPYTERHUB_CRYPT_KEY comes from the test
    c.SSHBatchSpawner.auth_state_ssh_key = "ssh_key"
    c.SSHBatchSpawner.ssh_key_path_template = "/nonexistent/hub-spawner-keys/{username}"
    # HUB_SSH_CERT_MINUTES: how long each minted certificate lives.
    c.SSHBatchSpawner.ssh_certificate_minutes = float(os.environ.get("HUB_SSH_CERT_MINUTES", 10))
if not os.environ.get("HUB_DEMO_FORM"):  # HUB_DEMO_FORM=1: the demo's spawn form as it is
    c.SSHBatchSpawner.partitions = []  # let any well-formed queue name reach the scheduler
    c.SSHBatchSpawner.presets = []  # the form's fields as the tests post them
    c.SSHBatchSpawner.max_memory = "100G"  # so a test can ask for more than the node has
    c.SSHBatchSpawner.max_walltime = "7-00:00:00"
    c.SSHBatchSpawner.max_gpus = 2  # so a test can ask for GPUs the lab does not have


def scenario(spawner):
    if spawner.name == "dies-early":
        spawner.cmd = ["/bin/sh", "-c", "echo 'lab scenario: giving up on purpose' >&2; exit 3"]
    elif spawner.name == "never-ready":
        spawner.cmd = ["/bin/sh", "-c", "echo 'lab scenario: sleeping'; exec sleep 600"]
        spawner.start_timeout = 15
    elif spawner.name == "login-down":
        spawner.login_port = 2299  # nothing listens there
    elif spawner.name == "unknown-host-key":
        spawner.known_hosts_path = "/dev/null"
    elif spawner.name == "short-walltime":
        spawner.poll_interval = 3
    elif spawner.name == "error-state":
        spawner.job_extra_directives = ["-wd /nonexistent-dir"]
    elif spawner.name == "held":
        spawner.job_extra_directives = ["-h"]
    elif spawner.name == "slow-polling":  # only the job's output can wake the spawn in time
        spawner.status_interval = 20
        spawner.status_interval_max = 60
    elif spawner.name == "poll-only":  # bench/spawn_latency.py's reference: no output follower
        spawner._follow_job_output = False
    elif spawner.name == "wrong-host":
        spawner.cmd = ["/bin/sh", "-c", "echo 'HUB_SPAWNER_READY {\"host\": "
                       "\"elsewhere.127.0.0.1.nip.io\", \"port\": 2222}'; exec sleep 600"]
    elif spawner.name == "full-host-name":
        spawner.job_prologue = 'hostname() { echo "$(command hostname).lab.example"; }'
    elif spawner.name == "other-host-name":
        spawner.job_prologue = "hostname() { echo node-a17; }"
    if spawner.name.startswith("light-"):  # bench/scale_bench.py: many servers on 2 cores
        spawner.cmd = [spawner.job_python, "-m", "jupyterhub.tests.mocksu"]
    if spawner.name.startswith("socket"):
        spawner.server_transport = "socket"
    if spawner.name == "unit-managed-service":  # as under systemd, with that unit stopped
        spawner.tunnel_service_start = False
        spawner.tunnel_service_dir = os.path.join(os.environ["HUB_STATE_DIR"], "tunnels-unit")
    if spawner.name == "socket-unknown-node-key":
        login_only = os.path.join(os.environ["HUB_STATE_DIR"], "known_hosts-login-only")
        with open(spawner.known_hosts_path) as full, open(login_only, "w") as part:
            part.writelines(line for line in full  # no name of the compute host's
                            if not line.split(None, 1)[0].split(",")[0].startswith("compute"))
        spawner.known_hosts_path = login_only


c.Spawner.pre_spawn_hook = scenario

# With several clusters: a third, for alice only, whose server never listens and whose own
# start_timeout (130 s) is longer than the hub's (120 s): JupyterHub must wait the cluster's.
if os.environ.get("HUB_MULTI_CLUSTER") == "1":
    c.SSHBatchSpawner.clusters = [*c.SSHBatchSpawner.clusters, {
        "name": "patient", "display_name": "Never ready (a test)", "scheduler": "slurm",
        "groups": ["grid-engine"],
        "config": {"login_port": 22, "start_timeout": 130,
                   "cmd": ["/bin/sh", "-c", "echo 'lab scenario: sleeping'; exec sleep 600"]}}]

# Return 202 at once from POST /users/:name/server, so the tests follow the progress stream.
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}

# The hub-restart test keeps servers running across a restart, as production configs do.
if os.environ.get("HUB_KEEP_SERVERS") == "1":
    c.JupyterHub.cleanup_servers = False

# The proxy as its own process (z2jh's shape): the test starts configurable-http-proxy itself.
if os.environ.get("CONFIGPROXY_AUTH_TOKEN"):
    c.ConfigurableHTTPProxy.should_start = False
    c.ConfigurableHTTPProxy.auth_token = os.environ["CONFIGPROXY_AUTH_TOKEN"]

# internal_ssl: the hub API (and every internal hop) is TLS; compute nodes reach the hub by the
# login node's cluster-side name, so the hub's certificate must name it.
if os.environ.get("HUB_INTERNAL_SSL") == "1":
    c.JupyterHub.internal_ssl = True
    c.JupyterHub.trusted_alt_names = ["DNS:login"]
    c.JupyterHub.internal_certs_location = os.path.join(os.environ["HUB_STATE_DIR"], "certs")
    c.ConfigurableHTTPProxy.api_url = f"https://127.0.0.1:{int(os.environ['HUB_PORT']) + 1}"

if os.environ.get("HUB_POLL_INTERVAL"):
    c.Spawner.poll_interval = int(os.environ["HUB_POLL_INTERVAL"])
if os.environ.get("HUB_CLUSTER_STATUS_INTERVAL"):
    c.SSHBatchSpawner.cluster_status_interval = float(os.environ["HUB_CLUSTER_STATUS_INTERVAL"])
if os.environ.get("HUB_LOGIN_HOSTS"):  # e.g. "login,login2" (the lab's add_login2)
    c.SSHBatchSpawner.login_hosts = os.environ["HUB_LOGIN_HOSTS"].split(",")
if os.environ.get("HUB_JUMP_HOST"):  # the lab's bastion (add_bastion)
    c.SSHBatchSpawner.jump_host = os.environ["HUB_JUMP_HOST"]
if os.environ.get("HUB_SSH_CONNECT_TIMEOUT"):
    c.SSHBatchSpawner.ssh_connect_timeout = float(os.environ["HUB_SSH_CONNECT_TIMEOUT"])
if os.environ.get("HUB_STATUS_USER"):
    c.SSHBatchSpawner.status_cluster_username = os.environ["HUB_STATUS_USER"]
if os.environ.get("HUB_SSH_IDLE_TIMEOUT"):
    c.SSHBatchSpawner.ssh_idle_timeout = float(os.environ["HUB_SSH_IDLE_TIMEOUT"])
if os.environ.get("HUB_RECONCILE"):
    c.SSHBatchSpawner.reconcile = os.environ["HUB_RECONCILE"]
if os.environ.get("HUB_RECONCILE_GRACE"):
    c.SSHBatchSpawner.reconcile_grace = float(os.environ["HUB_RECONCILE_GRACE"])
if os.environ.get("HUB_ID"):
    c.SSHBatchSpawner.hub_id = os.environ["HUB_ID"]


def _raise_once(cls, method_name: str, message: str) -> None:
    original = getattr(cls, method_name)
    fired = []

    async def faulty(self, *args, **kwargs):
        if not fired:
            fired.append(True)
            # Logged here because JupyterHub drops what stop() raises without a log line.
            logging.getLogger("JupyterHub").warning("%s (raised now)", message)
            raise RuntimeError(message)
        return await original(self, *args, **kwargs)

    setattr(cls, method_name, faulty)


if os.environ.get("HUB_FAULT") == "reopen-raises-once":
    from hub_spawner.tunnels.client import TunnelClient

    _raise_once(TunnelClient, "ensure_local", "lab fault: injected into the tunnel re-open path")

    async def _no_listing(self, max_age):  # so that each poll takes the re-open path
        raise RuntimeError("lab fault: no forward listing")

    TunnelClient.recent_forwards = _no_listing
elif os.environ.get("HUB_FAULT") == "stop-raises-once":
    from hub_spawner.spawner import SSHBatchSpawner

    _raise_once(SSHBatchSpawner, "stop", "lab fault: injected into stop()")

if os.environ.get("HUB_DEBUG") == "1":
    c.JupyterHub.log_level = "DEBUG"
