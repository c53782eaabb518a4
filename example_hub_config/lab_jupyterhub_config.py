"""JupyterHub config for the local demo cluster (``make demo``) and the integration tests.

The three-host lab (tests/lab/lab.py) must be up. Everything cluster-specific for a real site is
in the spawner block; compare ``slurm_jupyterhub_config.py``, ``sge_jupyterhub_config.py`` and
``torque_jupyterhub_config.py`` for real clusters.
Environment: HUB_SCHEDULER (slurm, sge or torque; default slurm), HUB_STATE_DIR (database,
cookie secret), HUB_PORT (default 8000), HUB_SPAWNER_LAB_DIR, LAB_PREFIX, HUB_MULTI_CLUSTER=1
(the lab's Slurm and Grid Engine as two clusters on one form).
"""

import os
import sys

c = get_config()  # noqa: F821 - provided by JupyterHub

lab_dir = os.environ.get("HUB_SPAWNER_LAB_DIR", "/run/hub-spawner-lab")
lab_prefix = os.environ.get("LAB_PREFIX", "/opt/hub-spawner-lab")
state_dir = os.environ.get("HUB_STATE_DIR", os.getcwd())
port = int(os.environ.get("HUB_PORT", "8000"))
scheduler = os.environ.get("HUB_SCHEDULER", "slurm")

# --- the hub and the proxy ---------------------------------------------------------------------
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = port
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = port + 81
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{port + 1}"
c.ConfigurableHTTPProxy.command = [f"{lab_prefix}/node_modules/.bin/configurable-http-proxy"]
c.JupyterHub.db_url = f"sqlite:///{state_dir}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = f"{state_dir}/jupyterhub_cookie_secret"
c.JupyterHub.pid_file = f"{state_dir}/jupyterhub.pid"
# The demo cancels every job when the hub stops (Ctrl-C). A production hub keeps them running
# across restarts instead: see slurm_jupyterhub_config.py.
c.JupyterHub.cleanup_servers = True

# Demo users: real Unix users on the lab's login and compute hosts, with their own SSH keys.
c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.user_password = os.environ.get(
    "HUB_DEMO_PASSWORD", "lab-demo-password")
c.Authenticator.allowed_users = {"alice", "bob"}
# alice is also a hub admin (admin page): she logs in with the admin password.
c.Authenticator.admin_users = {"alice"}
c.SharedPasswordAuthenticator.admin_password = os.environ.get(
    "HUB_DEMO_ADMIN_PASSWORD", "lab-demo-admin-password-for-alice-only"
)

# --- the spawner -------------------------------------------------------------------------------
# Settings on SSHBatchSpawner apply to all three scheduler spawners.
c.JupyterHub.spawner_class = f"{scheduler}-ssh"
c.SSHBatchSpawner.login_host = "10.77.1.2"
# The lab's Torque/PBS commands are on a second sshd of the login host (see tests/lab/lab.py).
c.SSHBatchSpawner.login_port = 2222 if scheduler == "torque" else 22
c.SSHBatchSpawner.known_hosts_path = f"{lab_dir}/known_hosts"
# The tunnel service (started by the spawner, outlives the hub) keeps its state beside the hub's.
c.SSHBatchSpawner.tunnel_service_dir = f"{state_dir}/tunnels"
c.SSHBatchSpawner.ssh_key_path_template = f"{lab_dir}/keys/{{username}}"
# Compute nodes reach the hub API through a reverse tunnel on the login node's cluster-side name.
c.SSHBatchSpawner.hub_api_tunnel_host = "login"
# With the lab's second login host (`python -m tests.lab.lab up slurm --login-hosts 2`, then
# c.SSHBatchSpawner.login_hosts = ["login", "login2"]): each one's cluster-side name.
c.SSHBatchSpawner.hub_api_tunnel_hosts = {"login": "login", "login2": "login2"}
c.SSHBatchSpawner.job_python = f"{lab_prefix}/venv/bin/python"
c.SSHBatchSpawner.cmd = [f"{lab_prefix}/venv/bin/jupyterhub-singleuser"]
c.SSHBatchSpawner.default_url = "/lab"
# What users choose on the spawn form. Slurm: partitions "debug" and "long" (both on the lab's one
# node; "long" only for the group "long-jobs", which alice is in); the Torque wrappers' queue
# "debug" maps to the Slurm partition; Grid Engine: queue "all.q".
queue = "all.q" if scheduler == "sge" else "debug"
c.SSHBatchSpawner.partitions = [
    {"name": queue, "description": "quick interactive work, up to 8 h"},
] + ([
    {"name": "long", "description": "one core, up to 2 days", "groups": ["long-jobs"],
     "max_cpus": 1, "max_walltime": "2-00:00:00", "default_walltime": "1-00:00:00"},
] if scheduler == "slurm" else [])
c.SSHBatchSpawner.default_partition = queue
c.SSHBatchSpawner.presets = [
    {"name": "small", "display_name": "Small", "description": "1 core, 256 MB, 1 h",
     "cpus": 1, "memory": "256M", "walltime": "01:00:00"},
    {"name": "two-cores", "display_name": "Two cores", "description": "2 cores, 512 MB, 2 h",
     "cpus": 2, "memory": "512M", "walltime": "02:00:00"},
]
c.SSHBatchSpawner.max_cpus = 2
c.SSHBatchSpawner.max_memory = "900M"
c.SSHBatchSpawner.default_walltime = "01:00:00"
c.SSHBatchSpawner.max_walltime = "08:00:00"
c.SSHBatchSpawner.cluster_display_name = f"lab ({scheduler})"
c.JupyterHub.load_groups = {"long-jobs": {"users": ["alice"]}}
# Several servers per user (each its own job and tunnel), e.g. alice's "analysis" beside her
# default one.
c.JupyterHub.allow_named_servers = True
c.SSHBatchSpawner.start_timeout = 120
c.SSHBatchSpawner.http_timeout = 60
# Grid Engine: the lab's parallel environment for several cores on one host.
c.SGESSHSpawner.parallel_environment = "smp"

# --- several clusters behind one hub (HUB_MULTI_CLUSTER=1) -----------------------------------
# The form offers a choice of cluster: the lab's Slurm for everyone, its Grid Engine only for the
# group "grid-engine" (alice). Each has its own scheduler, login node and choices; what is not
# in a cluster's "config" is the spawner's own (above).
if os.environ.get("HUB_MULTI_CLUSTER") == "1":
    c.SSHBatchSpawner.clusters = [
        {"name": "slurm", "display_name": "Lab Slurm", "scheduler": "slurm",
         "description": "partitions debug and long",
         "config": {"login_port": 22, "cluster_display_name": "lab (slurm)",
                    "default_partition": "debug",
                    "partitions": [{"name": "debug", "description": "quick interactive work"}]}},
        {"name": "sge", "display_name": "Lab Grid Engine", "scheduler": "sge",
         "description": "queue all.q", "groups": ["grid-engine"],
         "settings": {"parallel_environment": "smp"},
         "config": {"login_port": 22, "cluster_display_name": "lab (sge)",
                    "default_partition": "all.q",
                    "partitions": [{"name": "all.q", "description": "the lab's one queue"}]}},
    ]
    c.JupyterHub.load_groups = {**c.JupyterHub.load_groups, "grid-engine": {"users": ["alice"]}}

# --- idle servers ------------------------------------------------------------------------------
# jupyterhub-idle-culler stops servers nobody has used for an hour (their jobs are cancelled like
# any stopped server's). HUB_CULL_TIMEOUT and HUB_CULL_EVERY (seconds) shorten it for tests.
c.JupyterHub.services = [
    {
        "name": "idle-culler",
        "command": [
            sys.executable, "-m", "jupyterhub_idle_culler",
            f"--timeout={int(os.environ.get('HUB_CULL_TIMEOUT', '3600'))}",
            f"--cull-every={int(os.environ.get('HUB_CULL_EVERY', '300'))}",
        ],
    }
]
c.JupyterHub.load_roles = [
    {
        "name": "idle-culler",
        "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
        "services": ["idle-culler"],
    }
]
