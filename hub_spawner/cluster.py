"""The clusters a hub's servers run on: ``Cluster``, one per configured cluster.

A hub has one cluster (the spawner's own options) or several (``clusters``: each entry names a
scheduler, that scheduler's settings, the groups it is offered to, and options that override
the spawner's own). A spawner holds the ``Cluster`` its server runs on; the spawn form makes one
per cluster it offers.

Rules this part owns:
- a ``Cluster`` reads the spawner's options through its entry's ``config`` and never changes
  the spawner: the form can show three clusters while the same spawner's server polls, and
  nothing the server reads moves;
- an entry of ``clusters`` is checked against the spawner's options (names and types) before it
  is used; a bad one is a ``ValueError`` that names the entry;
- who the user is on the cluster and how they log in (``ssh_target``: the cluster user, the key
  template, certificate mode or the ``auth_state`` key, the login node, strict host keys); a name
  that is not a plain Unix user name is refused;
- JupyterHub's own options (``start_timeout``, ``http_timeout``, ``poll_interval``, ``cmd``, ...)
  are read by JupyterHub from the spawner's traits, so those a cluster sets are in
  ``hub_options``, and the spawner sets them on itself when its server is put on the cluster
  (``SSHBatchSpawner.use``); the hub's own options (``HUB_WIDE``: its hub id, its one tunnel
  service) are refused in a cluster's ``config``;
- a value in a cluster's ``config`` passes the option's own checks (its validators), as the
  spawner's does.
"""

from __future__ import annotations

import dataclasses
import pwd
import re
from types import ModuleType
from typing import TYPE_CHECKING, Any

from jupyterhub.spawner import Spawner
from jupyterhub.utils import maybe_future
from traitlets import TraitError

from . import jobscript
from .choices import Choices, choices_for
from .errors import ClusterUnreachable
from .resources import Limits, Resources, parse_memory_mb, parse_name, parse_walltime_seconds
from .schedulers import sge, slurm, torque
from .ssh import SSHTarget

if TYPE_CHECKING:
    from .spawner import SSHBatchSpawner

SCHEDULERS = {"slurm": slurm, "sge": sge, "torque": torque}
# Each scheduler's own settings (its spawner class's options) and their defaults.
SCHEDULER_SETTINGS: dict[str, dict[str, Any]] = {
    "slurm": {"qos": "", "gpu_gres": "gpu"},
    "sge": {"parallel_environment": "smp", "memory_resource": "h_vmem", "gpu_resource": "gpu"},
    "torque": {},
}
_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,39}")
_FIELDS = {"name", "display_name", "description", "groups", "scheduler", "settings", "config"}
# Options of the whole hub (its job names, its one tunnel service), never a cluster's.
HUB_WIDE = {"clusters", "hub_id", "tunnel_bind_ip", "tunnel_connect_host", "tunnel_service_dir",
            "tunnel_service_address", "tunnel_service_token", "tunnel_service_python",
            "tunnel_service_start"}
_CLUSTER_USERNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}")
# (login host, port, cluster user) of a job: where it was submitted and as whom.
Where = tuple[str, int, str]


class Cluster:
    """One cluster a server may run on: its scheduler, the scheduler's settings, and the
    spawner's options as this cluster sets them (``cluster.login_host``, ``cluster.max_cpus``:
    its entry's ``config``, else the spawner's)."""

    def __init__(self, spawner: SSHBatchSpawner, key: str = "", title: str = "",
                 description: str = "", groups: frozenset[str] = frozenset(),
                 scheduler: ModuleType | None = None, settings: dict[str, Any] | None = None,
                 config: dict[str, Any] | None = None) -> None:
        self.spawner = spawner
        self.key = key  # "": the spawner's own (a hub with one cluster)
        self.title = title or key
        self.description = description
        self.groups = groups  # empty: offered to everyone
        self.scheduler: ModuleType = scheduler or getattr(type(spawner), "scheduler", None)
        self._settings = settings
        self.config = dict(config or {})

    def __getattr__(self, name: str) -> Any:
        """An option of the spawner, as this cluster sets it."""
        if name.startswith("_") or name in ("spawner", "config"):
            raise AttributeError(name)
        return self.option(name)

    def option(self, name: str) -> Any:
        """The spawner's option ``name``, as this cluster sets it."""
        if name in self.config:
            return self.config[name]
        spawner = self.spawner
        if not (spawner.has_trait(name) and spawner.trait_metadata(name, "config")):
            raise AttributeError(f"{type(self).__name__} has no option {name!r}")
        return spawner.configured_hub_options.get(name, getattr(spawner, name))

    def __repr__(self) -> str:
        return f"<Cluster {self.key or '(own)'} {self.scheduler.NAME}>"

    @property
    def login_nodes(self) -> list[str]:
        """The cluster's login nodes as the hub reaches them, in order: ``login_hosts``, else
        ``login_host``."""
        single = self.option("login_host")
        if "login_host" in self.config and "login_hosts" not in self.config:
            return [single] if single else []  # this cluster's own, over the spawner's list
        hosts = [str(host) for host in self.option("login_hosts") if host]
        return hosts or ([single] if single else [])

    @property
    def login_host(self) -> str:
        """The first login node: the cluster's name for the hub (its key: one watch, one
        reconciler), whichever node a job went through."""
        nodes = self.login_nodes
        return nodes[0] if nodes else ""

    def hub_api_host(self, node: str) -> str:
        """Where compute nodes reach the hub API through login node ``node``."""
        return self.option("hub_api_tunnel_hosts").get(node) or self.option("hub_api_tunnel_host")

    @property
    def settings(self) -> dict[str, Any]:
        """The scheduler's settings (``qos``, ``parallel_environment``, ...)."""
        if self._settings is not None:
            return self._settings
        return self.spawner.scheduler_settings()

    @property
    def hub_options(self) -> dict[str, Any]:
        """The options of JupyterHub's own ``Spawner`` this cluster sets."""
        own = Spawner.class_traits(config=True)
        return {name: value for name, value in self.config.items() if name in own}

    def offered_to(self, groups: set[str]) -> bool:
        return not self.groups or bool(self.groups & groups)

    # --- what a user may ask for ----------------------------------------------------------

    def limits(self) -> Limits:
        """The configured resource choices, checked (a bad config value is a clear error)."""
        max_memory_mb = parse_memory_mb(self.max_memory, 1 << 40)
        max_walltime = parse_walltime_seconds(self.max_walltime, 1 << 40)
        return Limits(
            default_partition=self.default_partition,
            partitions=tuple(
                str(entry.get("name", "")) if isinstance(entry, dict) else entry
                for entry in self.partitions
            ),
            default_cpus=self.default_cpus,
            max_cpus=self.max_cpus,
            default_memory_mb=(
                parse_memory_mb(self.default_memory, max_memory_mb) if self.default_memory else 0
            ),
            max_memory_mb=max_memory_mb,
            default_gpus=self.default_gpus,
            max_gpus=self.max_gpus,
            default_walltime_seconds=(
                parse_walltime_seconds(self.default_walltime, max_walltime)
                if self.default_walltime
                else 0
            ),
            max_walltime_seconds=max_walltime,
            default_account=self.default_account,
        )

    def choices(self, groups: set[str]) -> Choices:
        """What a member of ``groups`` may choose here (partitions, presets, accounts, limits);
        ``ValueError`` for a bad setting."""
        return choices_for(self.limits(), groups, partitions=self.partitions,
                           presets=self.presets, accounts=self.accounts,
                           group_limits=self.group_limits)

    def template_variables(self, resources: Resources) -> dict[str, Any]:
        """The scheduler's template variables; ``ValueError`` for a request it cannot take."""
        settings = {}
        for key, value in self.settings.items():
            try:
                settings[key] = parse_name(key, value) if isinstance(value, str) else value
            except ValueError as error:
                raise ValueError(f"Bad spawner setting: {error}") from None
        return self.scheduler.template_variables(resources, settings)

    def job_script(self, resources: Resources, *, job_name: str, output_path: str,
                   secrets_path: str, command: list[str], ready_timeout: int, tls: bool,
                   hub_api_direct: bool, login_node: str = "") -> str:
        """The job script as this cluster runs it: its scheduler's template (or the admin's),
        directives, prologue, Python and transport around the server's ``command``."""
        launch = jobscript.render_launch(
            command=command,
            secrets_path=secrets_path,
            prologue=self.job_prologue,
            python=self.job_python,
            ready_timeout_seconds=ready_timeout,
            tls=tls,
            route_to="" if self.server_listens_on_all_addresses or hub_api_direct
            else self.hub_api_host(login_node),
            socket=self.server_transport == "socket",
            walltime_seconds=resources.walltime_seconds,
        )
        return jobscript.render_job_script(
            self.job_script_template or self.scheduler.JOB_SCRIPT_TEMPLATE,
            job_name=job_name,
            output_path=output_path,
            resources=resources,
            extra_directives=self.job_extra_directives,
            launch=launch,
            **self.template_variables(resources),
        )

    # --- who the user is there ------------------------------------------------------------

    async def ssh_target(self, where: Where = ("", 0, "")) -> SSHTarget:
        """How the spawner's user reaches this cluster: at ``where`` (a job's login node and
        cluster user, even if the config changed since), else per the options;
        ``ClusterUnreachable`` when there is no valid name, login node or identity."""
        spawner = self.spawner
        host, port, username = where
        host, port = host or self.login_host, port or self.login_port
        # A job's node, or the first: the others (when it is one of them) if it does not answer.
        nodes = self.login_nodes
        alternates = tuple(node for node in nodes if node != host) if host in nodes else ()
        if not username:
            if callable(self.cluster_username):
                username = await maybe_future(self.cluster_username(spawner))
            else:
                username = self.cluster_username.format(username=spawner.user.name)
        if not _CLUSTER_USERNAME.fullmatch(username or ""):
            raise ClusterUnreachable(
                f"The cluster username {username!r} for {spawner.user.name} is not a valid Unix "
                "user name; check the cluster_username setting."
            )
        if not host:
            raise ClusterUnreachable("No login node is configured (login_host is empty).")
        key_text, certificate_text = await self._auth_state_identity()
        if self.ssh_ca_key_path and not key_text:
            self.check_principal(username)
        target = SSHTarget(
            host=host,
            port=port,
            username=username,
            alternates=alternates,
            key_path=(
                "" if self.ssh_ca_key_path or self.auth_state_ssh_key
                else self.ssh_key_path_template.format(username=username)
            ),
            known_hosts_path=self.known_hosts_path,
            connect_timeout=self.ssh_connect_timeout,
            ca_key_path=self.ssh_ca_key_path,
            certificate_minutes=self.ssh_certificate_minutes,
            key_id=f"hub_spawner:{spawner.user.name}",
            key_text=key_text,
            certificate_text=certificate_text,
        )
        return self.behind_bastion(target)

    def behind_bastion(self, target: SSHTarget) -> SSHTarget:
        """``target`` reached through the cluster's bastion (``jump_host``), if it has one:
        the same identity, as ``jump_username``."""
        if not self.jump_host:
            return target
        username = self.jump_username.format(username=target.username)
        if not _CLUSTER_USERNAME.fullmatch(username):
            raise ClusterUnreachable(
                f"The bastion username {username!r} is not a valid Unix user name; check the "
                "jump_username setting.")
        if self.ssh_ca_key_path and not target.key_text and username != target.username:
            self.check_principal(username)
        jump = dataclasses.replace(
            target, host=self.jump_host, port=self.jump_port, username=username,
            alternates=(), jump=None,
            key_path=target.key_path and self.ssh_key_path_template.format(username=username))
        return dataclasses.replace(target, jump=jump)

    def check_principal(self, username: str) -> None:
        """Certificate mode: ``ClusterUnreachable`` for a cluster user the hub must not sign
        a certificate for (``ssh_certificate_denied_principals``, ``ssh_certificate_min_uid``),
        before anything is signed."""
        if username in self.ssh_certificate_denied_principals:
            raise ClusterUnreachable(
                f"The hub does not sign SSH certificates for {username!r} (it is in "
                "ssh_certificate_denied_principals); check cluster_username, or tell an "
                "administrator.")
        if self.ssh_certificate_min_uid:
            uid = _uid_of(username)
            if uid is None or uid < self.ssh_certificate_min_uid:
                found = "is not in the hub's user database" if uid is None else f"has uid {uid}"
                raise ClusterUnreachable(
                    f"The hub does not sign SSH certificates for {username!r}: it {found}, "
                    f"and ssh_certificate_min_uid is {self.ssh_certificate_min_uid}. Tell an "
                    "administrator.")

    def status_target(self, owner: SSHTarget) -> SSHTarget | None:
        """The status identity's target (``status_cluster_username``) beside ``owner``'s, or
        None when every user lists their own jobs."""
        if not self.status_cluster_username or self.auth_state_ssh_key:
            return None
        if self.ssh_ca_key_path:
            try:
                self.check_principal(self.status_cluster_username)
            except ClusterUnreachable as error:  # every user lists their own jobs instead
                self.spawner.log.warning("status_cluster_username not used: %s", error)
                return None
        return self.behind_bastion(dataclasses.replace(
            owner,
            username=self.status_cluster_username,
            key_path="" if self.ssh_ca_key_path
            else self.ssh_key_path_template.format(username=self.status_cluster_username),
            key_id="hub_spawner:status",
            jump=None,
        ))

    async def _auth_state_identity(self) -> tuple[str, str]:
        """The key (and certificate) from the user's auth_state, if that is configured."""
        if not self.auth_state_ssh_key:
            return "", ""
        user = self.spawner.user
        auth_state = await user.get_auth_state() or {}
        key_text = auth_state.get(self.auth_state_ssh_key)
        if not isinstance(key_text, str) or not key_text.strip():
            raise ClusterUnreachable(
                f"There is no SSH key for {user.name} from the login (auth_state "
                f"{self.auth_state_ssh_key!r}). Log out and log in again; if it persists, tell "
                "an administrator (enable_auth_state and the authenticator must provide it)."
            )
        certificate = auth_state.get(self.auth_state_ssh_certificate, "") if (
            self.auth_state_ssh_certificate) else ""
        return key_text, certificate if isinstance(certificate, str) else ""


def configured_clusters(spawner: SSHBatchSpawner) -> list[Cluster]:
    """Every entry of the spawner's ``clusters``, checked, whoever may use it; empty when the
    hub has one cluster. ``ValueError`` naming a bad entry."""
    found: list[Cluster] = []
    for index, entry in enumerate(spawner.clusters):
        where = f"Bad spawner setting clusters[{index}]"
        key = entry.get("name")
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(f"{where}: 'name' must be letters, digits, '_' or '-' ({key!r})")
        if key in {c.key for c in found}:
            raise ValueError(f"{where}: a second cluster named {key!r}")
        unknown = sorted(set(entry) - _FIELDS)
        if unknown:
            raise ValueError(f"{where}: unknown field {unknown[0]!r}; known: "
                             f"{', '.join(sorted(_FIELDS))}")
        kind = entry.get("scheduler")
        if kind not in SCHEDULERS:
            raise ValueError(f"{where}: 'scheduler' must be slurm, sge or torque ({kind!r})")
        settings = dict(SCHEDULER_SETTINGS[kind])
        for name, value in dict(entry.get("settings") or {}).items():
            if name not in settings:
                raise ValueError(f"{where}: {kind} has no setting {name!r}; it has: "
                                 f"{', '.join(settings) or 'none'}")
            settings[name] = value
        config = dict(entry.get("config") or {})
        for name, value in config.items():
            trait = spawner.traits().get(name)
            if trait is None or not trait.metadata.get("config"):
                raise ValueError(f"{where}: 'config' names {name!r}, which is not an option "
                                 "of this spawner")
            if name in HUB_WIDE:
                raise ValueError(f"{where}: 'config' names {name!r}, which is the hub's "
                                 "option, the same for every cluster; set it on the spawner")
            try:  # the option's own checks too (e.g. no line break in a job directive)
                config[name] = trait._validate(spawner, value)
            except TraitError as error:
                raise ValueError(f"{where}: config {name!r}: {error}") from None
        groups = frozenset(str(group) for group in entry.get("groups") or [])
        found.append(Cluster(spawner, key, str(entry.get("display_name") or key),
                             str(entry.get("description") or ""), groups, SCHEDULERS[kind],
                             settings, config))
    return found


def cluster_named(spawner: SSHBatchSpawner, key: str) -> Cluster:
    """The cluster ``key`` names (``""``: the spawner's own); ``ValueError`` when there is no
    such cluster."""
    if not key:
        return Cluster(spawner)
    for entry in configured_clusters(spawner):
        if entry.key == key:
            return entry
    raise ValueError(f"no cluster {key!r} is configured")


def _uid_of(username: str) -> int | None:
    """The uid of ``username`` in this machine's user database (NSS), or None."""
    try:
        return pwd.getpwnam(username).pw_uid
    except KeyError:
        return None
