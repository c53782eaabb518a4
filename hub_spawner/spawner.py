"""The spawners: JupyterHub's lifecycle as glue between schedulers, SSH and tunnels.

``SSHBatchSpawner`` holds everything that does not depend on the scheduler; ``SlurmSSHSpawner``
(entry point ``slurm-ssh``), ``SGESSHSpawner`` (``sge-ssh``) and ``TorqueSSHSpawner``
(``torque-ssh``) name the scheduler module and add that scheduler's own settings. The
lifecycle follows DESIGN.md: connect, write secrets (0600, over SFTP), submit, wait for the
ready line, tunnel, return the tunnel's URL. Every way out of ``start()`` other than success
reaches the same cleanup, which cancels the job.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
import sys
import time
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any, ClassVar

from jupyterhub.spawner import Spawner
from jupyterhub.utils import url_path_join
from traitlets import (
    Bool,
    Callable,
    CaselessStrEnum,
    Dict,
    Float,
    Integer,
    List,
    TraitError,
    Unicode,
    Union,
    default,
    validate,
)

from . import jobfiles, jobscript, metrics
from . import state as saved_state
from .certificates import alt_name
from .choices import Choices, Request, resolve
from .cluster import Cluster, Where, configured_clusters
from .errors import (
    BadOptions,
    ClusterUnreachable,
    JobRejected,
    NotReadyInTime,
)
from .hub import hub_of, start_with_the_hub
from .job import Cleanup, JobCalls, JobFiles, ReadyWait, iso_time
from .reconciler import MODES as RECONCILE_MODES
from .schedulers import JobState, JobStatus, SubmitRejected, read_output, sge, slurm, torque
from .server_path import ServerPath
from .spawn_form import SpawnForm
from .ssh import LoginConnection, SSHTarget
from .tunnels.client import TunnelError
from .watch import Watch, watch_for

#: ``start_timeout``'s default here (JupyterHub's is 60 s, less than many queue waits).
START_TIMEOUT_DEFAULT = 600


class SSHBatchSpawner(Spawner):
    """Start each single-user server as a batch job on a cluster whose login node we reach by SSH.

    Subclasses set ``scheduler`` to one of the ``hub_spawner.schedulers`` modules.
    """

    scheduler: ClassVar[ModuleType]
    _follow_job_output = True  # False in bench/spawn_latency.py's reference: status checks only

    # --- where and as whom -------------------------------------------------------------------

    login_host = Unicode(
        "",
        config=True,
        help="""Host name or address of the cluster's login node, as the hub host reaches it.

        Example: ``c.SlurmSSHSpawner.login_host = "login.cluster.example.org"``.
        """,
    )
    login_hosts = List(
        Unicode(),
        config=True,
        help="""The cluster's login nodes, as the hub host reaches them, when it has several
        (``login_host`` is then not used). The first is the cluster's name for the hub (one
        status listing, one reconciler); every connection goes to the first that answers,
        and a node that did not answer (a refused or timed-out connection) is passed over for
        a minute. A spawn submits, and opens the hub API's reverse tunnel, through one node;
        its server's tunnel, status listings and cancels move to another node when that one
        goes down. All must share the scheduler and the users' home directories, and each
        needs its host key in ``known_hosts_path``.

        Example: ``c.SlurmSSHSpawner.login_hosts = ["login1.hpc.example.org",
        "login2.hpc.example.org"]``.
        """,
    )
    login_port = Integer(22, config=True, help="SSH port of the login node(s).")
    jump_host = Unicode(
        "",
        config=True,
        help="""The site's bastion (jump host) in front of the login nodes, as the hub host
        reaches it; empty: the hub reaches the login nodes directly.

        Every connection goes through it: the hub's own (asyncssh), the tunnel service's
        masters (and, in socket mode, their node hops) and ``check``'s. The login nodes'
        names (``login_host``, ``login_hosts``) are then as the bastion reaches them. The
        user logs in to the bastion with the same identity as to the login node (key,
        certificate or ``auth_state`` key), as ``jump_username``; its host key must be in
        ``known_hosts_path`` beside the login nodes'. It needs ``AllowTcpForwarding yes``
        (at least ``local``); the tunnel service's master there holds one session that
        runs ``sleep`` (a bastion with no shell at all is not supported yet).

        Example: ``c.SlurmSSHSpawner.jump_host = "bastion.hpc.example.org"``.
        """,
    )
    jump_port = Integer(22, config=True, help="SSH port of the bastion (``jump_host``).")
    jump_username = Unicode(
        "{username}",
        config=True,
        help="""The account on the bastion: a template with ``{username}``, the cluster user
        (default: the same account).""",
    )
    known_hosts_path = Unicode(
        "/etc/hub_spawner/known_hosts",
        config=True,
        help="""OpenSSH known_hosts file that holds the login node's host key.

        Host keys are always checked: a login node whose key is missing from this file, or does
        not match it, is refused with an error that says so. Create it with
        ``ssh-keyscan -H login.cluster.example.org > /etc/hub_spawner/known_hosts`` and check the
        fingerprints with your cluster's admins.
        """,
    )
    ssh_key_path_template = Unicode(
        "/etc/hub_spawner/keys/{username}",
        config=True,
        help="""Path of the private key to log in with, per user.

        ``{username}`` is the cluster username (see ``cluster_username``). The key must be
        readable by the hub only (mode 0600: a key that group or others can read is refused,
        as OpenSSH does) and unencrypted; its public half goes into the user's
        ``~/.ssh/authorized_keys`` on the cluster. Not used when ``ssh_ca_key_path`` is set.
        """,
    )
    ssh_ca_key_path = Unicode(
        "",
        config=True,
        help="""Path of an SSH user-CA private key that the login nodes trust: certificate mode.

        For each new SSH connection (the hub's own, and each of the tunnel service's), the
        spawner then makes a new ed25519 key and signs a certificate for it with this CA:
        principal = the cluster username, valid for ``ssh_certificate_minutes``, key id
        ``hub_spawner:<hub username>`` (sshd logs it). No key file per user is needed; the
        CA key is the only long-lived secret (mode 0600, refused otherwise). On the login
        node: ``TrustedUserCAKeys /etc/ssh/hub_ca.pub`` in sshd_config (and, if principals
        differ from user names, ``AuthorizedPrincipalsFile``). Empty: one key file per user
        (``ssh_key_path_template``).
        """,
    )
    auth_state_ssh_key = Unicode(
        "",
        config=True,
        help="""Key of the user's ``auth_state`` that holds an OpenSSH private key (text): the
        identity an identity provider hands over at login. Needs
        ``c.Authenticator.enable_auth_state = True`` (and ``JUPYTERHUB_CRYPT_KEY``): the key is
        stored encrypted in the hub's database and lives in memory only. The tunnel service
        gets it as a 0600 file. Wins over ``ssh_key_path_template`` and ``ssh_ca_key_path``.
        Empty: not used.""",
    )
    auth_state_ssh_certificate = Unicode(
        "",
        config=True,
        help="""Key of the user's ``auth_state`` that holds an OpenSSH certificate for the
        ``auth_state_ssh_key`` (optional).""",
    )
    ssh_certificate_denied_principals = List(
        Unicode(),
        default_value=["root"],
        config=True,
        help="""Cluster user names the hub never signs a certificate for (certificate mode):
        a spawn or check as one of them fails with a clear message before anything is signed.
        Add the site's service and admin accounts.""",
    )
    ssh_certificate_min_uid = Integer(
        0,
        min=0,
        config=True,
        help="""Certificate mode: the lowest uid the hub signs a certificate for, looked up
        in the hub's own user database (NSS, e.g. the LDAP or SSSD it shares with the
        cluster); a name it cannot find there is refused too. 0: no uid rule (only
        ``ssh_certificate_denied_principals``). Sites usually set 1000.""",
    )
    ssh_certificate_minutes = Float(
        10,
        min=1,
        max=24 * 60,
        config=True,
        help="""How long each minted certificate is valid (certificate mode). It is checked
        only when a connection logs in: open connections outlive it. A tunnel service
        connection that drops after it expired logs in again with a new one at the spawner's
        next poll.""",
    )
    cluster_username = Union(
        [Unicode(), Callable()],
        default_value="{username}",
        config=True,
        help="""The user's name on the cluster.

        A template with ``{username}`` (the hub username), or a callable taking the spawner and
        returning the name (may be a coroutine). Example: ``"hpc_{username}"``. The result must
        be a plain Unix user name.
        """,
    )
    ssh_connect_timeout = Float(
        15, config=True, help="Seconds to wait for the SSH connection to the login node."
    )
    warm_up_on_form = Bool(
        True,
        config=True,
        help="""When the spawn form is shown, open the user's SSH connection to the login node
        and have the tunnel service log in for the hub API's path, so that Start waits for
        neither (about 0.2 s). A login that no spawn uses is closed again after
        ``ssh_idle_timeout`` (the hub's) and 2 minutes (the tunnel service's).""",
    )
    ssh_max_sessions = Integer(
        10,
        min=2,
        config=True,
        help="""Sessions (commands, SFTP, the job-output follower) one SSH connection may have
        open at once: the login node's sshd ``MaxSessions`` (OpenSSH's default is 10). Many
        spawns of one cluster user at once (named servers) queue for a session instead of
        being refused by sshd. One session is kept for following the jobs' output.""",
    )
    command_timeout = Float(
        60,
        config=True,
        help="Seconds a scheduler command (sbatch, squeue, scancel) may take before we give up.",
    )

    # --- how the server and the hub reach each other -----------------------------------------

    tunnel_bind_ip = Unicode(
        "127.0.0.1",
        config=True,
        help="""Address on the hub host where the tunnel to each server listens.

        The tunnel service listens there and the proxy routes to
        ``http://<tunnel_bind_ip>:<tunnel port>``. Keep the default when the proxy runs on the
        same host; in Kubernetes, with the proxy in another pod, use the tunnel service pod's IP.
        """,
    )
    tunnel_connect_host = Unicode(
        "",
        config=True,
        help="""Host the proxy connects to for the tunnel to each server: ``start()`` returns
        ``http://<tunnel_connect_host>:<tunnel port>``.

        Empty: ``tunnel_bind_ip``, or ``127.0.0.1`` when that is ``0.0.0.0`` or empty. Set it
        when the tunnel service listens on all addresses of another host or pod, e.g. the
        Kubernetes Service name of the tunnel service's pods (a headless Service, so every
        port reaches the pod).
        """,
    )
    tunnel_service_dir = Unicode(
        "tunnels",
        config=True,
        help="""The tunnel service's directory: its control socket, forward table and SSH
        control sockets (made 0700). Relative paths are relative to the hub's working directory.

        The spawner starts the service (``python -m hub_spawner.tunnels --dir DIR``) when it is
        not running and never stops it: forwards and open connections outlive hub restarts. Run
        it yourself (systemd, a sidecar) with the same directory to manage it separately. Unix
        socket paths are short: keep the absolute path under ~80 characters.
        """,
    )
    tunnel_service_address = Unicode(
        "",
        config=True,
        help="""``host:port`` of a tunnel service that runs elsewhere (``python -m
        hub_spawner.tunnels --dir DIR --listen HOST:PORT``, e.g. its own pod), controlled over
        TCP with ``tunnel_service_token``. Empty: the service on ``tunnel_service_dir``'s Unix
        socket, started by the spawner when it is not running.""",
    )
    tunnel_service_token = Unicode(
        config=True,
        help="""The token a TCP tunnel service requires (its ``HUB_SPAWNER_TUNNEL_TOKEN``).
        Defaults to this process's ``HUB_SPAWNER_TUNNEL_TOKEN``. Anyone holding it can open
        tunnels as any cluster user whose key the service can read: keep it secret.""",
    )

    @default("tunnel_service_token")
    def _tunnel_service_token_default(self) -> str:
        return os.environ.get("HUB_SPAWNER_TUNNEL_TOKEN", "")

    tunnel_service_python = Unicode(
        sys.executable,
        config=True,
        help="The Python that runs the tunnel service when the spawner starts it.",
    )
    tunnel_service_start = Bool(
        True,
        config=True,
        help="""Start the tunnel service (on ``tunnel_service_dir``) when it is not running.
        Turn it off when a unit of its own runs it (``example_hub_config/systemd/``): a
        service the hub started belongs to the hub's unit, and ``systemctl restart
        jupyterhub`` (``KillMode=control-group``) would end it and every forward with it. Off,
        a spawn while the service is down fails, saying to start the service's unit.""",
    )
    hub_api_tunnel_host = Unicode(
        "",
        config=True,
        help="""Where compute nodes reach the hub API: the login node's name or address as
        *compute nodes* see it.

        The spawner asks the login node's sshd to listen there (a reverse tunnel) and forwards
        to the hub API; the server is given ``http://<hub_api_tunnel_host>:<port>/hub/api``.
        This needs ``GatewayPorts clientspecified`` (and ``AllowTcpForwarding yes``) in the login
        node's sshd_config. Empty means the login node's loopback, which only works when jobs run
        on the login node itself.

        Not used when ``hub_connect_url`` is set: then compute nodes reach the hub directly.
        With several login nodes (``login_hosts``), see ``hub_api_tunnel_hosts``.
        """,
    )
    hub_api_tunnel_hosts = Dict(
        key_trait=Unicode(),
        value_trait=Unicode(),
        config=True,
        help="""With several login nodes: each one's name as compute nodes see it, by its
        name in ``login_hosts`` (a node not listed here uses ``hub_api_tunnel_host``).

        A job is told the hub API address of the login node it was submitted through, so its
        server reaches the hub only while that node is up: when it goes down, the server's
        own tunnel moves to another login node and keeps answering (the hub checks logins
        it has seen recently from its cache), but it cannot reach the hub for new logins,
        activity or its end until that node is back. ``hub_connect_url`` (compute nodes reach
        the hub directly) has no such tie.

        Example: ``{"login1.hpc.example.org": "login1-ib0", "login2.hpc.example.org":
        "login2-ib0"}``.
        """,
    )

    server_listens_on_all_addresses = Bool(
        False,
        config=True,
        help="""Let the server listen on all of the compute node's addresses (``0.0.0.0``).

        Default: only on the address the node uses towards the login node (the route to
        ``hub_api_tunnel_host``), which is where the tunnel connects from; other networks of
        the node cannot reach the server. Set this when the node's name resolves, on the login
        node, to an address of another interface than that one. Always all addresses when
        ``hub_api_tunnel_host`` is empty or ``hub_connect_url`` is set.
        """,
    )

    server_transport = CaselessStrEnum(
        ["tcp", "socket"],
        "tcp",
        config=True,
        help="""How the tunnel reaches the job's server on its compute node.

        ``tcp`` (default): the server listens on a free TCP port of the node (see
        ``server_listens_on_all_addresses``) and the tunnel connects to it from the login node.
        Any process on the cluster network can connect to that port (Jupyter's own token check
        still applies).

        ``socket``: no open port. The server listens on a Unix socket (jupyter-server's
        ``--sock``, mode 0600) in a fresh 0700 directory under the job's ``$TMPDIR`` (or
        ``/tmp``), and the tunnel reaches it through a second SSH hop: from the login node to
        the node, as the same cluster user with the same identity (``node_ssh_port``). Needs an
        sshd on the compute nodes that lets the user in while the job runs (e.g.
        ``pam_slurm_adopt``) with ``AllowStreamLocalForwarding yes`` (the default), each node's
        host key in ``known_hosts_path`` under the name the scheduler reports, and a
        single-user server built on jupyter-server (``jupyterhub-singleuser`` is).
        """,
    )
    node_ssh_port = Integer(
        22,
        config=True,
        help="SSH port of the compute nodes' sshd (``server_transport = 'socket'`` only).",
    )

    # --- the job -----------------------------------------------------------------------------

    job_script_template = Unicode(
        "",
        config=True,
        help="""Jinja2 template of the job script; empty means the scheduler's default.

        Variables: ``job_name``, ``output_path``, ``resources`` (``partition``, ``cpus``,
        ``memory_mb``, ``gpus``, ``account``), ``time_limit`` (already in the scheduler's format),
        ``extra_directives``, ``launch`` (the part that starts the server; always include it),
        and the scheduler's own: Slurm ``gres``, ``qos``; Grid Engine ``slots``,
        ``parallel_environment``, ``memory_request``, ``gpu_request``; Torque/PBS ``nodes``,
        ``memory``. Values are validated before rendering. The defaults are the
        ``JOB_SCRIPT_TEMPLATE`` of ``hub_spawner.schedulers.slurm``, ``sge`` and ``torque``.
        """,
    )
    job_prologue = Unicode(
        "",
        config=True,
        help="""Shell lines run in the job before the server starts, e.g.
        ``module load jupyter`` or ``source /opt/conda/bin/activate lab``.

        This is admin-written shell *code*, inserted verbatim (not quoted) and run as the user
        on the compute node: never build it from anything a user controls (names, form
        values, auth_state). Every other value the spawner puts into the job script is quoted.
        """,
    )
    job_extra_directives = List(
        Unicode(),
        config=True,
        help="""Extra scheduler directives, without the prefix: ``["--constraint=skylake"]``
        becomes ``#SBATCH --constraint=skylake`` (``#$`` for Grid Engine, ``#PBS`` for
        Torque/PBS). Admin-set, inserted verbatim; an entry with a line break is refused (it
        would start a shell line).
        """,
    )

    @validate("job_extra_directives")
    def _validate_job_extra_directives(self, proposal: Any) -> list[str]:
        for index, directive in enumerate(proposal["value"]):
            if any(ch in directive for ch in "\r\n\0"):
                raise TraitError(
                    f"job_extra_directives[{index}] ({directive[:40]!r}) contains a line break: "
                    "give one directive per entry, without line breaks."
                )
        return proposal["value"]

    job_python = Unicode(
        "python3",
        config=True,
        help="""Python on the compute node (after ``job_prologue``), used to pick a free port:
        a command name on the job's PATH or an absolute path. It is one word, quoted as a whole
        (``/opt/my python/bin/python3`` works; arguments do not).""",
    )
    remote_state_dir = Unicode(
        ".hub-spawner",
        config=True,
        help="""Directory for the jobs' files, relative to the user's home on the cluster (or
        absolute). Created with mode 0700. Each job gets its own directory in it,
        ``<job name>/`` (mode 0700, created fresh: never one that exists already), holding the
        job script ``job.sh``, its output ``job.out`` and, until the job reads it, the
        server's environment file ``server.env`` (created exclusively, mode 0600). Old job
        directories are removed at submit time (``job_files_keep``).
        """,
    )
    job_files_keep = Integer(
        10,
        min=0,
        config=True,
        help="""How many past jobs' directories (their script and output) to keep per cluster
        user in ``remote_state_dir``, besides the one being submitted. At each submit, the
        user's older ones are deleted with
        one ``rm -rf --`` of exact paths: only directories named like ours
        (``jupyterhub-...-<8 hex digits>``), owned by that user, and older than the longest a
        job can still run (``max_walltime`` plus ``start_timeout``), so a running or waiting
        job's files are never touched. ``0`` keeps only the directory of the job being
        submitted. Files of the earlier layout (``<job name>.out``, ``.sh``, ``.env``
        directly in ``remote_state_dir``) count and are removed the same way.
        """,
    )

    hub_id = Unicode(
        "",
        config=True,
        help="""This hub's mark in the name of every job it submits:
        ``jupyterhub-<hub_id>-<user>-<server>-<8 hex digits>``. It tells this hub's jobs from
        another hub's on the same cluster (a staging and a production hub) and from a user's
        own batch jobs, so that what the hub does to "its" jobs by name (cancelling a job whose
        id never came back) never touches anyone else's. 1 to 8 lower-case letters or digits,
        e.g. ``"prod"``.

        Default (empty): 8 hex digits derived from the hub's cookie secret, so it stays the
        same across restarts as long as the secret does, and differs between hubs (the secret
        cannot be recovered from it). Set it when the cookie secret is rotated while jobs run,
        or to have readable job names.
        """,
    )

    @validate("hub_id")
    def _valid_hub_id(self, proposal):
        value = proposal["value"]
        if value and not re.fullmatch(r"[a-z0-9]{1,8}", value):
            raise TraitError(
                f"hub_id must be 1 to 8 lower-case letters or digits (it is part of every "
                f"job's name), not {value!r}"
            )
        return value

    # --- resources offered -------------------------------------------------------------------

    partitions = List(
        Union([Unicode(), Dict()]),
        config=True,
        help="""Partitions (queues) users may choose, in the order the form lists them. Empty:
        any valid name, or the cluster's default when left blank.

        Each is a name, or a dict with ``name``, ``description`` (shown on the form), ``groups``
        (JupyterHub groups that see it; empty: everyone) and any of ``default_cpus``,
        ``max_cpus``, ``default_memory``, ``max_memory``, ``default_gpus``, ``max_gpus``,
        ``default_walltime``, ``max_walltime``, which hold when it is chosen (they win over
        ``group_limits``). Example::

            c.SSHBatchSpawner.partitions = [
                {"name": "short", "description": "up to 4 h, starts fast",
                 "max_walltime": "04:00:00"},
                {"name": "gpu", "description": "A100 nodes", "groups": ["gpu"],
                 "max_gpus": 2, "default_gpus": 1},
            ]
        """,
    )
    presets = List(
        Dict(),
        config=True,
        help="""Named sets of resources offered at the top of the form, in this order; the
        first is selected by default, and "Custom" (the advanced fields) comes last. Each is a
        dict with ``name`` (its key in ``user_options["preset"]``), ``display_name``,
        ``description``, ``groups`` (who sees it; empty: everyone) and any resource options:
        ``partition``, ``cpus``, ``memory``, ``gpus``, ``walltime``, ``account``. They are
        checked against the limits like any request. Example::

            c.SSHBatchSpawner.presets = [
                {"name": "small", "display_name": "Small", "description": "1 core, 4 GB, 8 h",
                 "cpus": 1, "memory": "4G", "walltime": "08:00:00"},
                {"name": "gpu", "display_name": "GPU", "description": "1 GPU, 8 cores",
                 "partition": "gpu", "gpus": 1, "cpus": 8, "groups": ["gpu"]},
            ]
        """,
    )
    accounts = List(
        Union([Unicode(), Dict()]),
        config=True,
        help="""Accounts users may charge, shown as a select (the first is the default unless
        ``default_account`` is listed). Each is a name or a dict with ``name``,
        ``description`` and ``groups`` (who sees it). Empty: a text field (any valid name;
        empty means the user's default account).""",
    )
    group_limits = Dict(
        config=True,
        help="""Limits per JupyterHub group: group name -> a dict of ``default_cpus``,
        ``max_cpus``, ``default_memory``, ``max_memory``, ``default_gpus``, ``max_gpus``,
        ``default_walltime``, ``max_walltime``. They replace the spawner's own for members;
        for a user in several such groups the largest value wins; a partition's own settings
        win over them. Example: ``{"power-users": {"max_cpus": 32, "max_walltime":
        "3-00:00:00"}}``.""",
    )
    clusters = List(
        Dict(),
        config=True,
        help="""Several clusters behind one hub: the form offers a choice of cluster, and each
        spawn goes to the chosen one (``user_options["cluster"]``). Each is a dict with
        ``name`` (its key: letters, digits, ``_``, ``-``), ``display_name``, ``description``,
        ``groups`` (JupyterHub groups that see it; empty: everyone), ``scheduler`` (``slurm``,
        ``sge`` or ``torque``), ``settings`` (that scheduler's own: ``qos``, ``gpu_gres``;
        ``parallel_environment``, ``memory_resource``, ``gpu_resource``) and ``config``: any
        of this spawner's options for that cluster (``login_host``, ``login_port``,
        ``known_hosts_path``, ``partitions``, ``presets``, limits, ``hub_api_tunnel_host``,
        and JupyterHub's own such as ``start_timeout`` or ``cmd``...), over the spawner's
        own and checked as they are. The hub's own options (``hub_id``, ``tunnel_*``) are
        refused there. The first the user may see is the default. Empty: one cluster, this
        spawner's. Example::

            c.SSHBatchSpawner.clusters = [
                {"name": "hpc", "display_name": "HPC (Slurm)", "scheduler": "slurm",
                 "config": {"login_host": "login.hpc.example.org", "partitions": ["cpu"]}},
                {"name": "gpu", "display_name": "GPU farm (Grid Engine)", "scheduler": "sge",
                 "groups": ["gpu"], "settings": {"parallel_environment": "smp"},
                 "config": {"login_host": "gpu-login.example.org", "max_gpus": 4}},
            ]""",
    )
    cluster_display_name = Unicode(
        "",
        config=True,
        help="""The cluster's name for people (the admin page's server state, the hub log).
        Empty: the login node's host name.""",
    )
    walltime_warning = Float(
        600.0,
        config=True,
        help="""Seconds before a running job's walltime ends at which the hub log says so (once
        per job; 0: never). The user's server sees the end as ``HUB_SPAWNER_WALLTIME_END``
        (seconds since the epoch) in its environment.""",
    )
    cluster_load_interval = Float(
        30.0,
        config=True,
        help="""Seconds the live free/total cores per partition shown on the spawn form are
        reused (one scheduler call per cluster per interval, shared by every user: ``sinfo``,
        ``qstat -g c``, ``pbsnodes -a``). 0 hides the table.""",
    )
    default_partition = Unicode("", config=True, help="Partition used when the user names none.")
    default_cpus = Integer(1, config=True, help="Cores requested when the user names none.")
    max_cpus = Integer(64, config=True, help="Most cores a user may request.")
    default_memory = Unicode(
        "", config=True, help="Memory requested by default, e.g. ``4G``; empty: the scheduler's."
    )
    max_memory = Unicode("1024G", config=True, help="Most memory a user may request, e.g. ``64G``.")
    default_gpus = Integer(0, config=True, help="GPUs requested when the user names none.")
    max_gpus = Integer(
        0,
        config=True,
        help="""Most GPUs a user may request; 0 hides the GPU field and refuses GPU requests.
        How a GPU request reaches the scheduler: Slurm ``--gres=<gpu_gres>:N``, Grid Engine
        ``-l <gpu_resource>=N``, Torque/PBS ``-l nodes=1:ppn=C:gpus=N``.""",
    )
    default_walltime = Unicode(
        "08:00:00", config=True, help="Walltime requested by default (``HH:MM:SS``)."
    )
    max_walltime = Unicode(
        "7-00:00:00", config=True, help="Longest walltime a user may request (``D-HH:MM:SS``)."
    )
    default_account = Unicode("", config=True, help="Account charged when the user names none.")

    # --- polling -----------------------------------------------------------------------------

    ssh_idle_timeout = Float(
        300.0,
        config=True,
        help="""Close the hub's SSH connection of a cluster user when nothing used it for this
        many seconds (0: keep it open). It carries commands and SFTP only (tunnels are the
        tunnel service's), so it is re-opened when needed: with ``status_cluster_username``
        set, a running server needs none, and the login node holds one sshd for the hub's
        status listings instead of one per user.""",
    )
    cluster_status_interval = Float(
        10.0,
        config=True,
        help="""Seconds between the scheduler listings that answer every server's ``poll()``.

        One watch per cluster lists all of the hub's running jobs in one scheduler command
        per cycle (``squeue --jobs=...``, ``qstat -xml -u ...``, ``qstat -f ...``), through
        one connection of ``status_cluster_username`` if set, else one per cluster user;
        ``poll()`` reads the result from memory. A listing older than three intervals (and a
        second) makes the job's state "unknown" (the server is kept), never
        "gone". Failed listings back off to 120 s. Keep it below ``poll_interval``.
        """,
    )
    status_cluster_username = Unicode(
        "",
        config=True,
        help="""A cluster account that lists every user's jobs for the status watch (one
        scheduler command and one SSH connection per cluster per cycle, whatever the number
        of users). It logs in like any user (``ssh_key_path_template`` or ``ssh_ca_key_path``;
        not with keys from ``auth_state``) and needs only to see jobs: Slurm and PBS show every
        user's jobs unless the site hides them (Slurm ``PrivateData=jobs``), Grid Engine with
        ``qstat -u``. Empty: each user's jobs are listed over that user's own connection (one
        command per user per cycle).
        """,
    )
    status_interval = Float(
        0.5,
        config=True,
        help="""Seconds between status checks right after submission; the interval grows by half
        each check up to ``status_interval_max`` while the job waits.""",
    )
    status_interval_max = Float(
        5, config=True, help="Longest interval between status checks while a spawn waits."
    )
    stop_wait = Float(
        20,
        config=True,
        help="""Seconds ``stop()`` waits for the scheduler to confirm the job has ended, while
        the scheduler answers (a job it cannot list is the reconciler's at once).""",
    )
    stop_cancel_timeout = Float(
        5,
        config=True,
        help="""Seconds ``stop()`` tries to send the job's cancel (connection included). A
        cancel that does not get through in that time is left to the reconciler, so a stop
        answers promptly while the login node or the scheduler's controller is down.""",
    )

    reconcile = Unicode(
        "cancel",
        config=True,
        help="""What the reconciler does with a job of this hub that no running or starting
        server owns (a stop whose cancel did not get through, a hub that died, a job submitted
        by hand with this hub's job name): ``"cancel"`` (the default) cancels it as its owner
        and sends the cancel again, backing off, until a listing no longer shows the job;
        ``"log"`` only logs, once per job, what it would cancel: for a cautious first week on
        a real site. Jobs of other hubs (see ``hub_id``) and users' own jobs are never
        touched.""",
    )
    reconcile_grace = Float(
        30,
        config=True,
        help="""Seconds a job of this hub must go unowned, in every listing, before the
        reconciler cancels it (covers the moment between a submission and its state being
        saved).""",
    )

    @validate("reconcile")
    def _valid_reconcile(self, proposal: Any) -> str:
        if proposal["value"] not in RECONCILE_MODES:
            raise TraitError(f"reconcile must be one of {RECONCILE_MODES}, not "
                             f"{proposal['value']!r}")
        return proposal["value"]

    @default("start_timeout")
    def _start_timeout_default(self) -> int:
        # JupyterHub's 60 s counts the queue wait too: on a busy cluster most spawns would be
        # cancelled while waiting. The spawn page shows the queue's reason and place meanwhile.
        return START_TIMEOUT_DEFAULT

    @default("env_keep")
    def _env_keep_default(self) -> list[str]:
        # The hub host's PATH, VIRTUAL_ENV, ... mean nothing on a compute node.
        return []

    @default("ssl_alt_names")
    def _ssl_alt_names_default(self) -> list[str]:
        # With internal_ssl the proxy and the hub reach the server at the tunnel service's
        # address and check that its certificate names it (loopback is named anyway).
        names = list(self.trusted_alt_names)
        host = self.server_path.connect_ip
        if host not in ("127.0.0.1", "localhost") and alt_name(host) not in names:
            names.append(alt_name(host))
        return names

    @default("apply_user_options")
    def _apply_user_options_default(self) -> Any:
        # user_options are validated in start(), which turns a bad value into a clean error on
        # the spawn page; this only tells JupyterHub (>= 5.3) that they are handled.
        return lambda spawner, user_options: None

    @default("options_form")
    def _options_form_default(self) -> Any:
        async def form(spawner: SSHBatchSpawner) -> str:
            if spawner.cluster.warm_up_on_form:
                spawner.server_path.warm_up(spawner._connection)
            return await spawner.render_form()

        return form

    # --- state -------------------------------------------------------------------------------

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._progress_events: list[dict[str, Any]] = []
        self._progress_changed = asyncio.Event()
        self._background_release: asyncio.Task | None = None  # see _release_in_background
        self._start_task: asyncio.Future | None = None  # _start_job, see _start_job_in_time
        self.server_path = ServerPath(self)  # its two forwards in the tunnel service
        self.cluster_username_on_record = ""  # who this user last was on the cluster (kept)
        self.configured_hub_options: dict[str, Any] = {}  # see use()
        self.cluster = Cluster(self)  # the cluster this server runs on (see use())
        self._reset_job()
        hub_of().register(self)

    def _reset_job(self) -> None:
        self.job_id = ""
        self.job_name = ""
        self.job_host = ""
        self.job_cluster_username = ""  # who the job runs as (from state, or at submit)
        self.job_login_host = ""  # the cluster it was submitted to (its first login node)
        self.job_submit_host = ""  # the login node it went through (its hub API path is there)
        self.job_login_port = 0
        self.remote_port = 0
        self.remote_socket = ""
        self.tunnel_port = 0
        self.api_tunnel_port = 0
        self.output_path = ""
        self.secrets_path = ""
        self.certs_dir = ""
        self._submission_sent = False
        self.job_submitted_at = 0.0  # time.time() of the submission
        self.job_started_at = 0.0  # time.time() when the job was first seen running
        self.walltime_seconds = 0  # the job's walltime (0: the scheduler's default)
        self._walltime_warned = False
        self._end_reported = ""
        self._starting = False  # a start() is between submission and its return
        self._cleanup_taken = ""  # the job name whose cancel a cleanup has taken over
        self._start_interrupted = False  # the state says a start never returned: a dead hub's

    def get_state(self) -> dict[str, Any]:
        """What finds, polls, reaches and cancels the job after a restart
        (``hub_spawner.state``)."""
        return {**super().get_state(), **saved_state.of(self)}

    def cluster_record(self) -> tuple[str, str, int, str]:
        """(scheduler, login host, login port, cluster user) this spawner has on record:
        its job's, or its last job's; the user part is empty when it never had one."""
        return (self.cluster.scheduler.NAME, self.job_login_host or self.cluster.login_host,
                self.job_login_port or self.cluster.login_port,
                self.job_cluster_username or self.cluster_username_on_record)

    def load_state(self, state: dict[str, Any]) -> None:
        """The job this server had (``hub_spawner.state``)."""
        super().load_state(state)
        saved_state.load(self, state)

    def use(self, cluster: Cluster) -> None:
        """Put this server on ``cluster`` (its scheduler, settings and options; the same
        cluster again changes nothing). JupyterHub reads its own options from the spawner's
        traits, so those the cluster sets (``start_timeout``, ``cmd``, ...) are set here, the
        configured values kept; those the previous cluster set go back to them, unless
        something else (a hook, ``group_overrides``) changed them since. Every other option is
        read through ``self.cluster``."""
        if cluster.key == self.cluster.key:
            return
        before = self.cluster.hub_options
        for name in set(before) | set(cluster.hub_options):
            if name not in cluster.hub_options and getattr(self, name) != before[name]:
                continue  # not the previous cluster's value any more: not ours to undo
            self.configured_hub_options.setdefault(name, getattr(self, name))
            setattr(self, name, cluster.hub_options.get(name, self.configured_hub_options[name]))
        self.cluster = cluster

    def run_pre_spawn_hook(self) -> Any:
        """Put the server on the cluster the user chose before the admin's ``pre_spawn_hook``,
        ``move_certs`` and JupyterHub reading ``start_timeout`` (a bad choice: ``start()`` says
        what is wrong)."""
        options = self.user_options if isinstance(self.user_options, dict) else {}
        try:
            self.use(SpawnForm(self).choose(options.get("cluster")))
        except ValueError:
            pass
        return super().run_pre_spawn_hook()

    # --- the form ----------------------------------------------------------------------------

    def offered_clusters(self) -> list[Cluster]:
        """The clusters this user may choose (``clusters``, by their groups), checked; empty
        when the hub has one cluster. ``ValueError`` for a bad entry."""
        groups = self._user_groups()
        return [entry for entry in configured_clusters(self) if entry.offered_to(groups)]

    def user_choices(self, cluster: Cluster | None = None) -> Choices:
        """What this user may choose on ``cluster`` (default: this server's); their JupyterHub
        groups decide partitions, presets, accounts and limits. ``ValueError`` for a bad
        setting."""
        return (cluster or self.cluster).choices(self._user_groups())

    def _user_groups(self) -> set[str]:
        try:
            return {group.name for group in self.user.groups}
        except AttributeError:  # no hub user (the config reference, some tests)
            return set()

    async def render_form(self) -> str:
        """The spawn form for this user (``spawn_form.SpawnForm``)."""
        return await SpawnForm(self).render()

    def options_from_form(self, formdata: dict[str, list[str]]) -> dict[str, Any]:
        return SpawnForm(self).options(formdata)

    def _show_request(self, request: Request) -> None:
        """Keep ``user_options`` as validated, with the ``profile`` summary the admin page
        shows (``debug · 2 cores · 4 GB · 8 h``, or the preset's name)."""
        options = request.to_user_options()
        if self.cluster.key:
            options["cluster"] = self.cluster.key
            options["profile"] = f"{self.cluster.title} · {options.get('profile', '')}".rstrip(
                " ·")
        self.user_options = options
        if self.orm_spawner is not None:
            self.orm_spawner.user_options = options  # committed with the spawn's state
        self.walltime_seconds = request.resources.walltime_seconds

    def scheduler_settings(self) -> dict[str, Any]:
        """The admin's settings for this scheduler, as ``template_variables`` takes them."""
        return {}

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> str:
        """Submit the job, wait for its ready line, open the tunnel; return the tunnel's URL."""
        self._progress_events = []
        options = dict(self.user_options or {}) if isinstance(self.user_options, dict) else {}
        cluster_key = options.pop("cluster", None)
        try:
            cluster = SpawnForm(self).choose(cluster_key)
            request = resolve(options, self.user_choices(cluster))
            resources = request.resources
            cluster.template_variables(resources)
        except ValueError as error:
            raise BadOptions(str(error)) from None
        self.use(cluster)
        certs_dir = self.certs_dir  # move_certs ran just before start()
        self._reset_job()
        self.certs_dir = certs_dir
        self._show_request(request)
        self._starting = True
        try:
            url = await self._start_job_in_time(resources)
            self._starting = False  # JupyterHub saves the state now
            return url
        except NotReadyInTime:
            self._release_in_background("the server was not ready within start_timeout")
            raise
        except asyncio.CancelledError:
            # Stop pressed during the spawn (or start_timeout): JupyterHub cancels start(),
            # waits one second, then calls stop(). A start() still cleaning up by then makes
            # that stop fail ("pending spawn", a 500) and leaves the server listed as running.
            # So end now: the job and tunnels go to a cleanup in the background, taken from
            # the state at once, and the stop() that follows finds nothing left to do.
            self._release_in_background("the spawn was cancelled")
            raise
        except BaseException:
            # JupyterHub logs the error itself (one line for our SpawnErrors); we clean up.
            cleanup = asyncio.ensure_future(self._release("the spawn failed or was cancelled"))
            try:
                await asyncio.shield(cleanup)
            except asyncio.CancelledError:
                pass  # the cleanup goes on by itself
            except Exception:  # noqa: S110 - logged by _release; the spawn's own error wins
                pass
            raise

    async def _start_job_in_time(self, resources: Any) -> str:
        """``_start_job``, ended by us a moment before JupyterHub's ``start_timeout`` would
        cancel it (whose error reads only "Spawn failed: "), with what the job was doing and
        what to do about it."""
        limit = float(self.start_timeout)
        task = self._start_task = asyncio.ensure_future(self._start_job(resources))
        task.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            done, _ = await asyncio.wait(
                {task}, timeout=max(limit - min(2.0, max(0.5, limit / 20)), 0.1))
        except BaseException:
            task.cancel()  # start() itself was cancelled (Stop pressed)
            raise
        if task in done:
            return task.result()
        task.cancel()  # its cleanup is start()'s, in the background (after the task's own)
        last = self._progress_events[-1]["message"] if self._progress_events else ""
        raise NotReadyInTime.after(limit, last, self.job_id, self.output_path)

    async def _start_job(self, resources: Any) -> str:
        scheduler = self.cluster.scheduler
        cluster = metrics.cluster_label(scheduler.NAME, self.cluster.login_host)
        steps = _Steps(cluster)
        connection = await self._connection()
        steps.done("connect")
        # The login node that answered takes the job and the hub API's path (the job is told
        # that node's address). That path (the tunnel service starting its own master, ~0.2 s)
        # is made while the job's directories are: only the secrets file needs it.
        self.job_submit_host = connection.target.host
        api_path = asyncio.ensure_future(self.server_path.open_hub_api())
        try:
            paths = await self._prepare_job_dir(connection, steps)
        except BaseException:
            # Let the service finish what it was asked (the cleanup then closes it by name).
            try:
                await asyncio.wait({api_path})
            except asyncio.CancelledError:  # cancelled again: close it when it is made
                api_path.add_done_callback(self.server_path.close_late_api_path)
                raise
            if not api_path.cancelled():
                api_path.exception()  # the spawn's own error wins
            raise
        api_url = await api_path
        steps.done("hub API path")
        await connection.write_private_file(
            self.secrets_path, jobscript.render_env_file(self._job_env(api_url))
        )

        # The script stays beside the job's output: what was submitted, for whoever debugs it.
        await connection.write_private_file(paths.script, self._job_script(resources))
        steps.done("files")
        self._submission_sent = True
        saved_state.save_now(self)  # the job's name: a hub that dies now cancels it by name
        # From now on a job may exist: the cluster's watch and reconciler run (in the
        # background), so a spawn that fails and cannot cancel leaves nothing behind even on a
        # hub where no server of this cluster has run yet.
        hub_of().keep(asyncio.ensure_future(self.watch_cluster()))
        output = await connection.run(
            scheduler.submit_command(paths.script, self.output_path),
            timeout=self.cluster.command_timeout,
        )
        steps.done("submit")
        try:
            self.job_id = read_output(scheduler.parse_submit_output, output)
            self.job_submitted_at = time.time()
        except SubmitRejected as error:
            self._submission_sent = output.exit_status == 0  # rejected: there is no job
            raise JobRejected(
                f"{scheduler.DISPLAY_NAME} rejected the job: {error}. "
                "Check the resources you asked for and try again."
            ) from None
        saved_state.save_now(self)
        self.log.info(
            "%s: submitted %s job %s in %s", self._log_name, scheduler.NAME, self.job_id, steps
        )
        self._emit(20, f"Submitted job {self.job_id} to {scheduler.DISPLAY_NAME}")

        ready = await self._wait_for_ready_line()  # host: the scheduler's node, never the job's
        steps.done("ready line")
        if self.job_started_at and self.job_submitted_at:
            metrics.QUEUE_WAIT_SECONDS.labels(cluster).observe(
                max(0.0, self.job_started_at - self.job_submitted_at))
        self.job_host, self.remote_port, self.remote_socket = ready.host, ready.port, ready.socket
        self._emit(80, f"Server listening on {self.server_path.destination}; opening the tunnel")
        try:
            self.tunnel_port = await self.server_path.open_server()
        except TunnelError as error:
            if not self.remote_socket:
                raise
            raise TunnelError(
                f"{error}. In socket mode the hub reaches the job's node over SSH through the "
                f"login node: {ready.host}'s host key must be in "
                f"{self.cluster.known_hosts_path} under the name {ready.host!r}, and the node's "
                f"sshd must let {connection.target.username} in while the job runs."
            ) from None
        steps.done("tunnel")
        self._emit(90, f"Tunnel open: hub port {self.tunnel_port} -> "
                       f"{self.server_path.destination}")
        await self._track_running_job()
        scheme = "https" if self.internal_ssl else "http"
        return f"{scheme}://{self.server_path.connect_ip}:{self.tunnel_port}"

    async def _prepare_job_dir(self, connection: LoginConnection,
                               steps: _Steps) -> jobfiles.JobPaths:
        """Make the job's own fresh directory (old ones beyond the kept number are removed);
        the job's name and file paths are set."""
        self._emit(5, f"Connected to {connection.target.host} as {connection.target.username}")
        self.job_cluster_username = connection.target.username
        self.cluster_username_on_record = connection.target.username
        # The cluster's name (its first login node) is on record: any of its nodes serves.
        self.job_login_host, self.job_login_port = self.cluster.login_host, connection.target.port
        self.job_name = job_name(self._hub_id, self.user.name, self.name, secrets.token_hex(4))
        files = self._files(connection)
        paths, state_dir, job_dir = await files.make_job_dir(self.job_name)
        self.output_path, self.secrets_path = paths.output, paths.secrets
        steps.done("directories")
        # Older than any job can still run: its longest walltime plus the longest wait.
        min_age = self.cluster.limits().max_walltime_seconds + float(self.start_timeout)
        await files.remove_old(state_dir, job_dir, self.cluster.job_files_keep, min_age)
        steps.done("old files")
        return paths

    def _files(self, connection: LoginConnection) -> JobFiles:
        return JobFiles(connection, self.cluster.remote_state_dir, self.cluster.command_timeout,
                        self.log, self._log_name)

    async def _wait_for_ready_line(self) -> jobscript.ReadyLine:
        """Follow the job until it prints its ready line (``job.ReadyWait``); fail at once if
        the job ends first."""
        def started() -> None:
            self.job_started_at = self.job_started_at or time.time()

        return await ReadyWait(
            self._calls, self.job_id, self.output_path,
            self.cluster.server_transport == "socket", self.cluster.status_interval,
            self.cluster.status_interval_max, self._emit, started,
            keep_paths=self.server_path.keep_hub_api, follow_output=self._follow_job_output,
            submitted_at=self.job_submitted_at,
        ).run()

    async def poll(self) -> int | None:
        """``None`` while the job runs (or its state is unknown), ``1`` once it has ended.

        Never raises: JupyterHub treats a raising poll as "not running" and forgets the server
        while its job runs on. Only the scheduler saying the job ended makes it ``1``; an SSH or
        scheduler error, a tunnel that cannot be re-opened, or any exception we did not foresee
        is logged and the answer stays ``None`` (asked again at the next poll).
        """
        if self._start_interrupted:
            if self._end_reported != "interrupted":
                self._end_reported = "interrupted"
                self.log.warning(
                    "%s: the hub stopped while job %s was starting; the spawn cannot go on, "
                    "so the job is cancelled. Start the server again.",
                    self._log_name, self.job_id or self.job_name,
                )
            return 1
        if not self.job_id:
            return 0
        try:
            return await self._poll_job()
        except Exception:
            self.log.error(
                "%s: polling job %s failed unexpectedly; treating it as still running and "
                "asking again in %s s (the job is not cancelled).",
                self._log_name,
                self.job_id,
                self.poll_interval,
                exc_info=True,
            )
            return None

    async def _poll_job(self) -> int | None:
        job_id = self.job_id
        status = await self._listed_status()
        if self.job_id != job_id:  # stopped while the listing was awaited: not ours to touch
            return 0
        if status.ended:
            if self._end_reported != self.job_id:  # JupyterHub polls again while stopping
                self._end_reported = self.job_id
                try:
                    why = await self._calls.explain_end(self.job_id, status)
                except Exception as error:
                    why = f"(cannot say why: {error})"
                self.log.warning("%s: job %s has ended: %s", self._log_name, self.job_id, why)
            return 1
        if status.state is JobState.UNKNOWN:
            self.log.warning(
                "%s: cannot tell whether job %s runs: %s",
                self._log_name,
                self.job_id,
                status.reason,
            )
            return None
        if status.state is JobState.RUNNING:
            self._warn_near_walltime()
        if status.state is JobState.RUNNING and self.job_host and self.tunnel_port:
            if not await self.server_path.reopen():
                self.server_path.retry_soon()
        return None

    @property
    def _walltime_end(self) -> float:
        """When the job's walltime ends (``time.time()``), or 0 when unknown."""
        if not (self.job_started_at and self.walltime_seconds):
            return 0.0
        return self.job_started_at + self.walltime_seconds

    def _warn_near_walltime(self) -> None:
        """Log once when the job has less than ``walltime_warning`` seconds left."""
        end = self._walltime_end
        if not end or self._walltime_warned or not self.cluster.walltime_warning:
            return
        left = end - time.time()
        if left <= self.cluster.walltime_warning:
            self._walltime_warned = True
            self.log.warning(
                "%s: job %s reaches its walltime at %s (in %d min); %s will stop the server "
                "then", self._log_name, self.job_id, iso_time(end), max(0, left) // 60,
                self.cluster.scheduler.DISPLAY_NAME,
            )

    async def _watch(self) -> Watch:
        """This cluster's shared status watch (and its reconciler), with our job tracked."""
        job_id, owner = self.job_id, await self._ssh_target()
        hub, cluster = hub_of(), self.cluster
        watch = watch_for(hub.watches, cluster.scheduler, owner.host, owner.port,
                          cluster.status_target(owner), hub.pool, cluster.cluster_status_interval,
                          cluster.command_timeout, self.log)
        hub.register(self)
        hub.reconcile(watch, (cluster.scheduler.NAME, owner.host, owner.port), {
            "hub_id": self._hub_id, "mode": cluster.reconcile, "grace": cluster.reconcile_grace,
            "command_timeout": cluster.command_timeout, "log": self.log,
            "state_dir": cluster.remote_state_dir,
        })
        hub.start_from_database()
        if job_id and job_id == self.job_id:  # not released while we awaited
            watch.track(job_id, owner)  # refreshed every poll (keys from auth_state change)
        elif not watch.users:  # the reconciler's listings of the users on record
            watch.list_users(await hub.users_to_list(
                (cluster.scheduler.NAME, owner.host, owner.port), watch))
        return watch

    async def _track_running_job(self) -> None:
        """The job runs (its ready line came): from now on the cluster's watch follows it, and
        knows it runs until its next listing, so the first poll answers from memory."""
        try:
            watch = await self._watch()
        except (ClusterUnreachable, ValueError) as error:
            self.log.warning("%s: cannot watch job %s yet: %s", self._log_name, self.job_id,
                             error)
            return
        watch.seed(self.job_id, JobStatus(JobState.RUNNING, state_name="RUNNING",
                                          node=self.job_host))

    async def watch_cluster(self) -> None:
        """Start this cluster's watch and reconciler (at the hub's start, for the clusters
        on record); a failure is logged, and the next poll or spawn tries again."""
        try:
            await self._watch()
        except Exception as error:
            self.log.warning("%s: cannot watch %s yet: %s", self._log_name,
                             self.cluster.scheduler.DISPLAY_NAME, error)

    async def ssh_target(self, where: tuple[str, int, str]) -> SSHTarget:
        """How to reach the cluster at ``where`` (login host, port, cluster user) with this
        user's identity; ``ClusterUnreachable`` when there is none now."""
        return await self._ssh_target(where)

    async def _listed_status(self) -> JobStatus:
        """The job's status from the cluster's shared listing: no SSH round trip of its own
        (the first poll after a submit or a hub restart waits for the next listing)."""
        try:
            watch = await self._watch()
        except (ClusterUnreachable, ValueError) as error:
            return JobStatus(JobState.UNKNOWN, reason=str(error))
        if self.job_id not in watch.owners:  # released while we awaited
            return JobStatus(JobState.UNKNOWN, reason="the job is being released")
        # JupyterHub polls once before it stops a server: answer from what is listed, at
        # once (a controller that is down must not hold the stop; the job is the reconciler's).
        wait = 0 if getattr(self, "_stop_pending", False) else None
        return await watch.status(self.job_id, wait=wait)

    def _untrack(self, job_id: str) -> None:
        for watch in list(hub_of().watches.values()):
            if job_id in watch.owners and watch.owners[job_id].host == self.cluster.login_host:
                watch.untrack(job_id)

    async def move_certs(self, paths: dict[str, str]) -> dict[str, str]:
        """With ``internal_ssl``: copy the server's key, certificate and CA bundle to the cluster
        (mode 0600 in a 0700 directory under ``remote_state_dir``, over SFTP) and return their
        paths there; the server then serves TLS and verifies the hub's certificate on every hub
        API call (so a process that takes the reverse forward's port learns nothing). The
        directory is removed with the job."""
        files = self._files(await self._connection())
        self.certs_dir, remote = await files.put_certs(
            f"certs-{_slug(self.user.name)}-{_slug(self.name) or 'default'}", paths)
        return remote

    async def stop(self, now: bool = False) -> None:
        """Cancel the job, close the tunnels, delete the secrets file. Idempotent.

        A cleanup still running in the background (a cancelled ``start()`` handed it there)
        is waited for too: when ``stop()`` returns, the job has been cancelled either way."""
        await self._release("the server was stopped", wait=not now)
        background = self._background_release
        if background is not None and not background.done():
            await asyncio.shield(background)

    async def progress(self) -> AsyncIterator[dict[str, Any]]:
        """Progress events of the current spawn, as they happen."""
        sent = 0
        while True:
            while sent < len(self._progress_events):
                yield self._progress_events[sent]
                sent += 1
            self._progress_changed.clear()
            try:
                await asyncio.wait_for(self._progress_changed.wait(), timeout=1)
            except asyncio.TimeoutError:
                pass

    # --- helpers -----------------------------------------------------------------------------

    @property
    def _hub_id(self) -> str:
        """``hub_id``, or the one derived from the hub's cookie secret."""
        if self.hub_id:
            return self.hub_id
        settings = getattr(self.user, "settings", None) or {}
        return derived_hub_id(settings.get("cookie_secret"))

    def _emit(self, progress: int, message: str) -> None:
        self.log.info("%s: %s", self._log_name, message)
        self._progress_events.append({"progress": progress, "message": message})
        self._progress_changed.set()

    def _job_where(self) -> tuple[str, int, str]:
        """(login host, port, cluster user) of the current job: where it was submitted and
        as whom, even if the config changed since; empty when there is no job."""
        if not self.job_id or not self.job_cluster_username:
            return ("", 0, "")
        return (self.job_login_host or self.cluster.login_host,
                self.job_login_port or self.cluster.login_port, self.job_cluster_username)

    async def _ssh_target(self, where: Where | None = None) -> SSHTarget:
        """How to reach the cluster as this user: at ``where`` (a job's login node and
        cluster user, see ``_job_where``; default: the current job's), else per the config."""
        return await self.cluster.ssh_target(where if where and where[2] else self._job_where())

    @property
    def _calls(self) -> JobCalls:
        """The scheduler calls about this spawner's job (``hub_spawner.job``)."""
        return JobCalls(self.cluster.scheduler, self._connection, self._ssh_target,
                        self.cluster.command_timeout, self.log, self._log_name,
                        hub_of().queue_listings)

    async def _connection(self, where: tuple[str, int, str] | None = None) -> LoginConnection:
        pool = hub_of().pool
        pool.idle_timeout = self.cluster.ssh_idle_timeout
        pool.max_sessions = self.cluster.ssh_max_sessions
        return await pool.get(await self._ssh_target(where))

    def _job_env(self, api_url: str) -> dict[str, str]:
        env = self.get_env()
        env.pop("JUPYTERHUB_SERVICE_URL", None)  # the job sets it once it has chosen a port
        env["JUPYTERHUB_API_URL"] = api_url
        if isinstance(self.user_options, dict) and self.user_options.get("profile"):
            env["HUB_SPAWNER_PROFILE"] = str(self.user_options["profile"])
        env["JUPYTERHUB_ACTIVITY_URL"] = url_path_join(
            api_url, "users", getattr(self.user, "escaped_name", self.user.name), "activity"
        )
        return env

    def _job_script(self, resources: Any) -> str:
        return self.cluster.job_script(
            resources, job_name=self.job_name, output_path=self.output_path,
            secrets_path=self.secrets_path, command=self.cmd + self.get_args(),
            ready_timeout=int(self.start_timeout), tls=self.internal_ssl,
            hub_api_direct=bool(self.hub_connect_url), login_node=self.job_submit_host)

    async def _release(self, why: str, wait: bool = True) -> None:
        """Cancel the job (by id, or by its unique name if the id never came back), close the
        tunnels and delete the secrets file.

        One try, bounded: if the cancel does not get through (login node or controller
        down), the job is the reconciler's, which cancels every job of this hub that no server
        owns until a listing no longer shows it (``hub_spawner.reconciler``).
        """
        cleanup = self._take_cleanup(why)
        await self.server_path.close()
        await self._carry_out(cleanup, wait)

    def _release_in_background(self, why: str) -> None:
        """``_release`` without waiting for it: what to clean up is taken from the state now
        (so a ``stop()`` or a new ``start()`` after this finds nothing of it), the work goes on
        in a task kept until it is done."""
        cleanup = self._take_cleanup(why)
        start_task = self._start_task

        async def release() -> None:
            if start_task is not None and not start_task.done():
                # A cancelled start's own cleanup first: a hub API path it asked for is
                # made (or not) before the close below, which then closes it by name.
                await asyncio.wait({start_task})
            await self.server_path.close()
            await self._carry_out(cleanup, wait=True)

        try:
            task = asyncio.get_running_loop().create_task(release())
        except RuntimeError:  # no event loop (not inside a hub): nothing can send it
            if cleanup is not None:
                self.log.error("%s: cannot cancel %s: no event loop", self._log_name,
                               cleanup.label)
            return
        hub_of().keep(task)
        self._background_release = task

    def _take_cleanup(self, why: str) -> Cleanup | None:
        """What to cancel and delete, taken out of the state (synchronously: no other
        coroutine can take it too); None if there is nothing."""
        self.server_path.stop_retry()
        cleanup = self._cleanup_plan()
        if cleanup is None:
            return None
        if cleanup.job_id:
            self._untrack(cleanup.job_id)  # no poll will ask again; the cancel has its own path
        if cleanup.job_id or cleanup.by_name:
            self.log.info("%s: cancelling %s (%s)", self._log_name, cleanup.label, why)
        self._cleanup_taken = cleanup.job_name  # its cancel has its own path now
        self.job_id = ""
        self._submission_sent = False
        self.secrets_path = ""
        self.certs_dir = ""
        return cleanup

    async def _carry_out(self, cleanup: Cleanup | None, wait: bool) -> None:
        """Send the cancel and deletions of ``cleanup``; with ``wait``, wait (``stop_wait``)
        for the scheduler to stop listing the job."""
        if cleanup is None:
            return
        said = await self._calls.cancel(cleanup, self.cluster.stop_cancel_timeout)
        if said:
            hub_of().release(cleanup.job_name)
            self.log.warning(
                "%s: the cancel of %s did not get through (%s); the reconciler cancels it "
                "once the cluster answers (reconcile = %r)", self._log_name, cleanup.label, said,
                self.cluster.reconcile,
            )
        elif cleanup.job_id and wait:
            await self._calls.wait_until_gone(cleanup.job_id, cleanup.where, self.cluster.stop_wait)

    def _cleanup_plan(self) -> Cleanup | None:
        """What cancelling this spawner's job and deleting its secrets file takes, as a
        snapshot that outlives the spawner's state; None if there is nothing to clean up."""
        if not (self.job_id or self._submission_sent or self.secrets_path or self.certs_dir):
            return None
        return Cleanup(
            job_id=self.job_id,
            job_name=self.job_name,
            by_name=not self.job_id and self._submission_sent,
            secrets_path=self.secrets_path,
            certs_dir=self.certs_dir,
            label=f"job {self.job_id or self.job_name} of {self._log_name}",
            where=self._job_where() if self.job_id else (
                self.job_login_host, self.job_login_port, self.job_cluster_username),
        )

    def clear_state(self) -> None:
        """JupyterHub forgets this server. A job still known here (the hub dropped the server
        without a ``stop()``) is no server's any more: the reconciler cancels it."""
        if self.job_id or self.job_name and self.job_name != self._cleanup_taken:
            hub_of().release(self.job_name)
            self.log.warning(
                "%s: the hub forgets the server while job %s may still exist; the reconciler "
                "cancels it (reconcile = %r)", self._log_name, self.job_id or self.job_name,
                self.cluster.reconcile,
            )
        if self.job_id:
            self._untrack(self.job_id)
        super().clear_state()
        self._reset_job()



class _Steps:
    """How long each step of a spawn took, for the log (``0.21 s (connect 0.15, ...)``) and
    the metric ``hub_spawner_spawn_step_seconds``."""

    def __init__(self, cluster: str) -> None:
        self._cluster = cluster
        self._start = self._last = time.monotonic()
        self._steps: list[tuple[str, float]] = []

    def done(self, name: str) -> None:
        now = time.monotonic()
        self._steps.append((name, now - self._last))
        metrics.SPAWN_STEP_SECONDS.labels(self._cluster, name).observe(now - self._last)
        self._last = now

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {seconds:.3f}" for name, seconds in self._steps)
        return f"{self._last - self._start:.3f} s ({parts})"


class SlurmSSHSpawner(SSHBatchSpawner):
    """Single-user servers as Slurm jobs (``sbatch``/``squeue``/``scancel`` over SSH)."""

    scheduler = slurm

    qos = Unicode("", config=True, help="Slurm QOS for every job (``--qos``); empty: none.")
    gpu_gres = Unicode(
        "gpu",
        config=True,
        help="Generic resource name for GPUs: a request for N GPUs becomes ``--gres=<name>:N``.",
    )

    def scheduler_settings(self) -> dict[str, Any]:
        return {"qos": self.qos, "gpu_gres": self.gpu_gres}


class SGESSHSpawner(SSHBatchSpawner):
    """Single-user servers as Grid Engine jobs (``qsub``/``qstat``/``qdel`` over SSH)."""

    scheduler = sge

    parallel_environment = Unicode(
        "smp",
        config=True,
        help="""Parallel environment that gives a job several cores on one host
        (``-pe <name> N``, allocation rule ``$pe_slots``). Empty: jobs get one core and a
        request for more is refused.""",
    )
    memory_resource = Unicode(
        "h_vmem",
        config=True,
        help="""Resource that requests memory (``-l <name>=...``), e.g. ``h_vmem``,
        ``mem_free`` or ``m_mem_free``. Grid Engine counts it per slot: the user's memory is
        divided by the number of cores.""",
    )
    gpu_resource = Unicode(
        "gpu",
        config=True,
        help="Consumable complex that counts GPUs: N GPUs become ``-l <name>=N``.",
    )

    def scheduler_settings(self) -> dict[str, Any]:
        return {
            "parallel_environment": self.parallel_environment,
            "memory_resource": self.memory_resource,
            "gpu_resource": self.gpu_resource,
        }


class TorqueSSHSpawner(SSHBatchSpawner):
    """Single-user servers as Torque/PBS jobs (``qsub``/``qstat``/``qdel`` over SSH)."""

    scheduler = torque


def job_name(hub_id: str, user_name: str, server_name: str, nonce: str) -> str:
    """The scheduler's name for a job: ``jupyterhub-<hub id>-<user>-<server>-<nonce>``.

    Guarantees: it fullmatches ``jobfiles.JOB_NAME`` (for a valid ``hub_id`` and an 8-hex-digit
    ``nonce``), every character is a letter, digit or one of ``_.-`` (safe in a job directive
    and a file name), and the default server is named ``default``.
    """
    return f"jupyterhub-{hub_id}-{_slug(user_name)}-{_slug(server_name) or 'default'}-{nonce}"


def derived_hub_id(cookie_secret: bytes | str | None) -> str:
    """8 hex digits that name a hub: a hash of its cookie secret (stable while the secret is,
    different between hubs, and saying nothing about the secret), or ``"00000000"`` outside a
    hub (no secret: ``python -m hub_spawner check``, unit tests)."""
    if not cookie_secret:
        return "00000000"
    secret = cookie_secret.encode() if isinstance(cookie_secret, str) else bytes(cookie_secret)
    return hashlib.sha256(b"hub_spawner hub id\0" + secret).hexdigest()[:8]


def _slug(name: str) -> str:
    """A job-name-safe form of a hub user or server name (``[A-Za-z0-9_.-]``, <= 24 chars)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:24]


# In a JupyterHub: reconcile the clusters on record once the hub has started.
start_with_the_hub()
