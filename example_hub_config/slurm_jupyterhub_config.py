"""JupyterHub config for a real Slurm cluster reached over SSH. Copy, then edit the marked lines.

Cluster-side requirements (login node):
- sshd accepts the hub's per-user keys (each user's ~/.ssh/authorized_keys holds the public key
  of /etc/hub_spawner/keys/<cluster user>);
- sshd_config has ``AllowTcpForwarding yes`` and ``GatewayPorts clientspecified`` (the reverse
  tunnel that lets compute nodes call the hub API listens on the login node's cluster-side
  address), unless you set ``hub_connect_url`` to an address compute nodes can reach directly;
- compute nodes can reach the login node on that address, and the login node can reach compute
  nodes on any port (the tunnel to each server goes login -> node:port);
- jupyterhub (same major version as the hub) and jupyterlab are installed where jobs can run
  them; ``python3`` is on the job's PATH (after ``job_prologue``).
"""

import sys

c = get_config()  # noqa: F821 - provided by JupyterHub

c.JupyterHub.spawner_class = "slurm-ssh"
# A hub restart (config change, upgrade) must drop no user connection: jobs keep running, the
# tunnel service (started by the spawner, or your own unit: see README) keeps their forwards,
# and the proxy runs as its own service. (cleanup_proxy = False alone is not enough: a hub that
# finds the proxy it started last time still running stops it.)
c.JupyterHub.cleanup_servers = False
c.ConfigurableHTTPProxy.should_start = False
c.ConfigurableHTTPProxy.api_url = "https://127.0.0.1:8001"
# TLS on every internal hop. The hub-API reverse forward listens on a login-node port every
# cluster user can see; while it is down (an SSH drop) whoever takes that port gets a TLS
# handshake from the server, never its token. JupyterHub makes the certificates here
# (`jupyterhub --generate-certs` once, before the proxy's first start: its unit needs them, see
# README "The proxy as its own service"); the hub's must name the login node as compute nodes
# see it (hub_api_tunnel_host below).
c.JupyterHub.internal_ssl = True
c.JupyterHub.internal_certs_location = "/srv/jupyterhub/internal-ssl"
c.JupyterHub.trusted_alt_names = ["DNS:login-ib0.cluster.example.org"]  # EDIT, as below
# The proxy's unit sets the same CONFIGPROXY_AUTH_TOKEN (the hub reads it from its environment).
c.SSHBatchSpawner.tunnel_service_dir = "/srv/jupyterhub/tunnels"
# The tunnel service runs in a unit of its own (example_hub_config/systemd/), so the hub never
# starts it: a service the hub started would belong to the hub's unit and end with
# `systemctl restart jupyterhub`. Without such a unit, remove this line (the spawner then
# starts the service itself, in its own session).
c.SSHBatchSpawner.tunnel_service_start = False

# Who may log in: your identity provider (EDIT the URLs and group names). Its client id and
# secret come from the hub unit's EnvironmentFile (OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET,
# OAUTH_CALLBACK_URL); its groups become JupyterHub groups, which the partitions' and
# presets' "groups" and group_limits below refer to.
c.JupyterHub.authenticator_class = "generic-oauth"
c.GenericOAuthenticator.authorize_url = "https://sso.example.org/realms/hpc/protocol/openid-connect/auth"
c.GenericOAuthenticator.token_url = "https://sso.example.org/realms/hpc/protocol/openid-connect/token"
c.GenericOAuthenticator.userdata_url = "https://sso.example.org/realms/hpc/protocol/openid-connect/userinfo"
c.GenericOAuthenticator.scope = ["openid", "profile", "groups"]
c.GenericOAuthenticator.username_claim = "preferred_username"
c.GenericOAuthenticator.auth_state_groups_key = "oauth_user.groups"
c.GenericOAuthenticator.manage_groups = True
c.GenericOAuthenticator.allowed_groups = {"hpc-users"}
c.GenericOAuthenticator.admin_groups = {"hpc-admins"}

c.SlurmSSHSpawner.login_host = "login.cluster.example.org"  # EDIT
c.SlurmSSHSpawner.known_hosts_path = "/etc/hub_spawner/known_hosts"  # ssh-keyscan, then verify
c.SlurmSSHSpawner.ssh_key_path_template = "/etc/hub_spawner/keys/{username}"
c.SlurmSSHSpawner.cluster_username = "{username}"  # or e.g. "hpc_{username}", or a callable
# One account lists every user's jobs for the status watch: one scheduler listing per cycle
# for the whole hub instead of one per user (EDIT: an account whose key is in the key directory
# like the users'; it only needs to see jobs).
c.SlurmSSHSpawner.status_cluster_username = "jupyterhub-status"
# The login node's name as compute nodes see it (often its internal interface).  # EDIT
c.SlurmSSHSpawner.hub_api_tunnel_host = "login-ib0.cluster.example.org"

c.SlurmSSHSpawner.job_prologue = "module load jupyter"  # EDIT: whatever puts it on PATH
c.SlurmSSHSpawner.cmd = ["jupyterhub-singleuser"]
c.SlurmSSHSpawner.default_url = "/lab"

# What users choose on the spawn form. EDIT: your partitions, who sees them, their limits.
c.SlurmSSHSpawner.partitions = [
    {"name": "interactive", "description": "interactive work, starts fast"},
    {"name": "gpu", "description": "GPU nodes", "groups": ["gpu"], "max_gpus": 2,
     "default_gpus": 1},
]
c.SlurmSSHSpawner.presets = [  # EDIT: named sets, shown first ("Custom" opens the advanced part)
    {"name": "small", "display_name": "Small", "description": "1 core, 4 GB, 8 h", "cpus": 1,
     "memory": "4G", "walltime": "08:00:00"},
    {"name": "medium", "display_name": "Medium", "description": "4 cores, 16 GB, 8 h",
     "cpus": 4, "memory": "16G", "walltime": "08:00:00"},
    {"name": "gpu", "display_name": "GPU", "description": "1 GPU, 8 cores, 32 GB, 4 h",
     "partition": "gpu", "gpus": 1, "cpus": 8, "memory": "32G", "walltime": "04:00:00",
     "groups": ["gpu"]},
]
# c.SlurmSSHSpawner.accounts = ["proj-a", "proj-b"]  # a select instead of a text field
# c.SlurmSSHSpawner.group_limits = {"power-users": {"max_cpus": 32}}
c.SlurmSSHSpawner.default_partition = "interactive"
c.SlurmSSHSpawner.max_cpus = 16
c.SlurmSSHSpawner.max_memory = "128G"
c.SlurmSSHSpawner.default_walltime = "08:00:00"
c.SlurmSSHSpawner.max_walltime = "1-00:00:00"
c.SlurmSSHSpawner.max_gpus = 2  # 0 hides the GPU field; N GPUs become --gres=gpu:N
c.SlurmSSHSpawner.gpu_gres = "gpu"
c.SlurmSSHSpawner.qos = ""  # EDIT: e.g. "interactive" for a QOS with a short queue wait

# A second cluster on the same form (e.g. a Grid Engine GPU farm for the group "gpu"): each
# entry has its scheduler and its own options over the ones above (README "Several clusters").
# c.SlurmSSHSpawner.clusters = [
#     {"name": "hpc", "display_name": "HPC (Slurm)", "scheduler": "slurm", "config": {}},
#     {"name": "farm", "display_name": "GPU farm", "scheduler": "sge", "groups": ["gpu"],
#      "settings": {"parallel_environment": "smp"},
#      "config": {"login_host": "farm-login.example.org", "partitions": ["gpu.q"],
#                 "default_partition": "gpu.q", "presets": []}},
# ]

# Queue waits count against start_timeout: allow for a busy cluster.
c.SlurmSSHSpawner.start_timeout = 600
c.SlurmSSHSpawner.http_timeout = 120

# Idle servers are stopped (and their jobs cancelled) after an hour without use.
c.JupyterHub.services = [
    {
        "name": "idle-culler",
        # With internal_ssl the culler talks TLS to the hub with the hub's certificates.
        "command": [sys.executable, "-m", "jupyterhub_idle_culler", "--timeout=3600",
                    "--ssl-enabled=true",
                    "--internal-certs-location=/srv/jupyterhub/internal-ssl"],
    }
]
c.JupyterHub.load_roles = [
    {
        "name": "idle-culler",
        "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
        "services": ["idle-culler"],
    }
]
