"""``python -m hub_spawner check``: is this site set up right, for this user?

Loads the hub's ``jupyterhub_config.py``, builds the spawner the hub would build for the user
(outside any hub), and walks the path a spawn takes, printing one line per step and, for a
failure, what to do. Later steps that need a failed one are skipped. With ``--submit`` it also
submits a short test job through the configured template and scheduler, waits for its ready
line, opens its tunnel through the tunnel service and asks the server for ``/api/status``; the
server checks our token against a small stand-in for the hub API that this command serves
(reached by the job through the same reverse tunnel the hub's API would be). Whatever happens,
Ctrl-C included, the job is cancelled and the forwards are closed before the command returns.
With several clusters (``clusters``) every step runs for each of them in turn, or for the one
``--cluster`` names; the check cannot know the user's hub groups, so it checks each cluster as a
member of the groups that cluster is offered to.

Exit status: 0 when every step passed, 1 otherwise, 130 when interrupted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pwd
import secrets
import signal
import stat
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TextIO
from urllib.parse import quote

from jinja2 import TemplateError
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from traitlets import TraitError
from traitlets.config import Config, PyFileConfigLoader
from traitlets.utils.importstring import import_item

from . import hub, identity
from .choices import resolve
from .cluster import Cluster, configured_clusters
from .errors import BadReadyLine, JobEndedEarly, SpawnError
from .resources import format_walltime
from .schedulers import SchedulerUnavailable, parse_check_output, read_output
from .spawner import SSHBatchSpawner
from .ssh import SSHTarget
from .sshlib import asyncssh

#: The named server the check's job and forwards use (``hub.CHECK_SERVER``): never one of the
#: user's real servers, and the hub's forward reconcile leaves its forwards to the check.
CHECK_SERVER = hub.CHECK_SERVER


# --- the checklist -------------------------------------------------------------------------------


@dataclass
class Checklist:
    """Results, printed as they come: ``ok``, ``FAIL`` (with advice) or ``skip``."""

    out: TextIO
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    passed_names: list[str] = field(default_factory=list)
    #: The cluster the steps are for (several clusters), recorded as ``"KEY: step"``.
    scope: str = ""

    @property
    def passed(self) -> int:
        return len(self.passed_names)

    def scoped(self, name: str) -> str:
        return f"{self.scope}: {name}" if self.scope else name

    def did_not_pass(self, name: str) -> bool:
        """Step ``name`` of the current scope failed or was skipped."""
        return self.scoped(name) in self.failed or self.scoped(name) in self.skipped

    def failed_here(self, but: tuple[str, ...] = ()) -> bool:
        """Anything failed that the current scope's steps depend on (its own, or global),
        other than the steps ``but``."""
        prefix = f"{self.scope}: " if self.scope else ""
        skip = {self.scoped(name) for name in but}
        return any((": " not in name or name.startswith(prefix)) and name not in skip
                   for name in self.failed)

    def ended(self, status: str, step: str) -> bool:
        """Step ``step`` of any scope has ``status`` (``"ok"`` or ``"FAIL"``)."""
        names = self.passed_names if status == "ok" else self.failed
        return any(name == step or name.endswith(f": {step}") for name in names)

    def ok(self, name: str, detail: str) -> None:
        self.passed_names.append(self.scoped(name))
        self._line("ok", name, detail)

    def fail(self, name: str, detail: str, advice: str = "") -> None:
        self.failed.append(self.scoped(name))
        self._line("FAIL", name, detail)
        if advice:
            print(f"{'':17}-> {advice}", file=self.out, flush=True)

    def skip(self, name: str, why: str) -> None:
        self.skipped.append(self.scoped(name))
        self._line("skip", name, why)

    def heading(self, text: str) -> None:
        print(f"\n{text}", file=self.out, flush=True)

    def note(self, text: str) -> None:
        print(f"{'':17}{text}", file=self.out, flush=True)

    def _line(self, status: str, name: str, detail: str) -> None:
        detail = detail.strip().replace("\n", "\n" + " " * 17)
        print(f"{status:<5} {name:<10} {detail}", file=self.out, flush=True)


# --- the command ---------------------------------------------------------------------------------


async def run_check(
    config_file: str,
    username: str,
    submit: bool = False,
    hub_ip: str = "127.0.0.1",
    hub_port: int = 0,
    checks: Checklist | None = None,
    cluster: str = "",
) -> bool:
    """Run every check for ``username`` (on each configured cluster, or on ``cluster``); True
    if all passed. Cancelling it (a signal) still cleans up the test job and its forwards before
    the cancellation goes on."""
    checks = checks or Checklist(sys.stdout)
    out = checks.out
    print(f"hub_spawner check: {username}, config {config_file}", file=out, flush=True)
    token = secrets.token_hex(32)
    spawner = _load_spawner(checks, config_file, username, token)
    clusters = _clusters_to_check(checks, spawner, cluster) if spawner is not None else [None]
    for entry in clusters:
        if entry is not None:
            checks.scope = entry.key
            spawner.use(entry)
            # Nor have we the user's groups: act as a member of those the cluster is offered to.
            spawner.user.groups = [SimpleNamespace(name=group) for group in entry.groups]
            groups = (f"; offered to the group(s) {', '.join(sorted(entry.groups))}"
                      if entry.groups else "")
            checks.heading(f"cluster {entry.key} ({entry.title}): "
                           f"{entry.scheduler.DISPLAY_NAME}{groups}")
        target = None
        if spawner is not None and _job_script_renders(checks, spawner):
            target = await _config_target(checks, spawner)
        usable = await _check_steps(checks, spawner, target)
        if submit:
            if not usable or any(": " not in name for name in checks.failed):
                for name in ("job", "tunnel", "server", "cleanup"):
                    checks.skip(name, "needs every step above")
            else:
                await _check_submit(checks, spawner, token, hub_ip, hub_port)
    checks.scope = ""
    total = checks.passed + len(checks.failed)
    if checks.failed:
        print(f"\n{len(checks.failed)} of {total} checks failed: {', '.join(checks.failed)}",
              file=out, flush=True)
    else:
        print(f"\nall {total} checks passed", file=out, flush=True)
    hub.hub_of().pool.close_all()
    return not checks.failed


async def _check_steps(checks: Checklist, spawner: SSHBatchSpawner | None,
                       target: SSHTarget | None) -> bool:
    """Key, login node, host key, login and scheduler, each skipped when one it needs did not
    pass; with several login nodes, on each (its own heading and scope). True if one login
    node passed them all (a submission can go through it)."""
    nodes = spawner.cluster.login_nodes if spawner is not None and target is not None else []
    if len(nodes) <= 1:
        await _check_node(checks, spawner, target)
        # Without the status identity the hub lists per user: a test job can still run.
        return not checks.failed_here(but=("status",))
    outer, passed = checks.scope, []
    for node in nodes:
        checks.scope = f"{outer} {node}".strip()
        checks.heading(f"login node {node}")
        await _check_node(checks, spawner, target.at(node))
        if not checks.did_not_pass("scheduler"):
            passed.append(node)
    checks.scope = outer
    checks.heading(f"{len(passed)} of {len(nodes)} login nodes pass"
                   + (f" ({', '.join(passed)})" if passed else ""))
    return bool(passed)


async def _check_node(checks: Checklist, spawner: SSHBatchSpawner | None,
                      target: SSHTarget | None) -> None:
    steps = [  # name, check, the steps it needs
        ("key", _check_key, ()),
        ("reachable", _check_reachable, ()),
        ("host key", _check_host_key, ("reachable",)),
        ("login", _check_login, ("key", "reachable", "host key")),
        ("scheduler", _check_scheduler, ("login",)),
        ("status", _check_status_identity, ("scheduler",)),
    ]
    for name, step, needs in steps:
        missing = [need for need in needs if checks.did_not_pass(need)]
        if target is None or missing:
            checks.skip(name, f"needs {', '.join(missing) or 'config'}")
            continue
        if target.jump is not None and name in ("reachable", "host key"):
            # Behind a bastion the hub reaches only the bastion: these two are its; the login
            # node's host key is checked (as strictly) when the login goes through it.
            checks.note(f"{name}: of the bastion {target.jump.host}:{target.jump.port}")
            await step(checks, spawner, target.jump)
            continue
        await step(checks, spawner, target)


def _clusters_to_check(checks: Checklist, spawner: SSHBatchSpawner,
                       wanted: str) -> list[Cluster | None]:
    """The entries of ``clusters`` to check (``[None]``: the spawner's own, one cluster)."""
    try:
        entries = configured_clusters(spawner)
    except ValueError as error:
        checks.fail("config", str(error), "fix that entry of c.SSHBatchSpawner.clusters "
                    "(docs/configuration.md)")
        return [None]
    if not entries:
        if wanted:
            checks.fail("config", f"--cluster {wanted}: this hub has one cluster (clusters is "
                        "not set)", "leave out --cluster")
        return [None]
    if not wanted:
        return entries
    chosen = [entry for entry in entries if entry.key == wanted]
    if not chosen:
        checks.fail("config", f"no cluster {wanted!r} in clusters",
                    f"pass one of: {', '.join(entry.key for entry in entries)}")
        return [None]
    return chosen


def _load_spawner(
    checks: Checklist, config_file: str, username: str, token: str
) -> SSHBatchSpawner | None:
    """The spawner the hub would build for ``username`` (with the check's server name)."""
    path = Path(config_file)
    if not path.is_file():
        checks.fail("config", f"{config_file} does not exist",
                    "pass the hub's config file with -f, as in `jupyterhub -f FILE`")
        return None
    try:
        config = PyFileConfigLoader(path.name, path=str(path.parent.resolve())).load_config()
    except (Exception, SystemExit) as error:  # a config file can raise (or exit) anything
        checks.fail("config", f"{config_file} does not load: {type(error).__name__}: {error}",
                    "fix the file; it is Python, run by JupyterHub at start-up")
        return None
    spawner_class, problem = _spawner_class(config)
    if spawner_class is None:
        checks.fail("config", problem, "set c.JupyterHub.spawner_class = \"slurm-ssh\" "
                    "(or \"sge-ssh\", \"torque-ssh\")")
        return None
    unknown = _unknown_options(config, spawner_class)
    if unknown:
        checks.fail("config", f"unknown option(s): {', '.join(unknown)}",
                    "check the spelling against docs/configuration.md")
        return None
    from jupyterhub.objects import Hub, Server

    user = SimpleNamespace(name=username, escaped_name=quote(username, safe=""),
                           url=f"/user/{quote(username, safe='')}/")
    # JupyterHub's Spawner.name reads the database row, which we have not got: the same class
    # (same name, so the same config sections apply) with the check's server name.
    checking_class = type(spawner_class.__name__, (spawner_class,),
                          {"name": property(lambda self: CHECK_SERVER)})
    try:
        spawner = checking_class(
            config=config, user=user, hub=Hub(ip="127.0.0.1", port=1, base_url="/hub/"),
            api_token=token,
            oauth_client_id=f"jupyterhub-user-{username}-check",
            oauth_access_scopes=[f"access:servers!user={username}"],
            oauth_client_allowed_scopes=[],
        )
    except TraitError as error:
        checks.fail("config", f"a value is invalid: {error}", "see docs/configuration.md")
        return None
    spawner._server = Server(base_url=f"{user.url}{CHECK_SERVER}/")  # no database row here
    spawner.log = logging.getLogger("hub_spawner.check.spawner")
    spawner._class_label = f"{spawner_class.__name__} ({config.JupyterHub.spawner_class})"
    return spawner


def _job_script_renders(checks: Checklist, spawner: SSHBatchSpawner) -> bool:
    """The job script for the default resources builds (on the cluster in use); else a
    failed ``config`` line."""
    try:
        resources = resolve({}, spawner.user_choices()).resources
        spawner.job_name, spawner.output_path = "check", "/tmp/check.out"
        spawner.secrets_path = "/tmp/check.env"
        spawner._job_script(resources)
    except TemplateError as error:
        checks.fail("config", f"job_script_template does not render: {error}",
                    "fix the Jinja2 template (variables: docs/configuration.md)")
        return False
    except Exception as error:  # ValueError from the resources, cmd, the settings, ...
        checks.fail("config", f"the job script for the default resources cannot be built: "
                    f"{type(error).__name__}: {error}",
                    "check the default_*, max_*, partitions, cmd and scheduler settings")
        return False
    finally:
        spawner._reset_job()
    return True


def _spawner_class(config: Config) -> tuple[type[SSHBatchSpawner] | None, str]:
    value = config.JupyterHub.get("spawner_class")
    if value is None:
        return None, "c.JupyterHub.spawner_class is not set (JupyterHub's default is not ours)"
    if isinstance(value, str):
        found = [ep for ep in entry_points(group="jupyterhub.spawners") if ep.name == value]
        try:
            value = found[0].load() if found else import_item(value)
        except Exception as error:
            return None, f"spawner_class {value!r} cannot be loaded: {error}"
    if not (isinstance(value, type) and issubclass(value, SSHBatchSpawner)):
        return None, f"spawner_class is {value!r}, not one of hub_spawner's spawners"
    return value, ""


def _unknown_options(config: Config, spawner_class: type) -> list[str]:
    """``c.Class.name`` settings of the spawner's classes that are no option of them."""
    known = set(spawner_class.class_trait_names(config=True))
    unknown = []
    for klass in spawner_class.mro():
        for name in config.get(klass.__name__, {}) if klass.__name__ in config else ():
            if name not in known and not name[0].isupper():
                unknown.append(f"c.{klass.__name__}.{name}")
    return sorted(unknown)


async def _config_target(checks: Checklist, spawner: SSHBatchSpawner) -> SSHTarget | None:
    if spawner.cluster.auth_state_ssh_key:
        checks.fail("config", "the SSH key comes from each login's auth_state "
                    f"(auth_state_ssh_key = {spawner.cluster.auth_state_ssh_key!r}): this check "
                    "has no login to take it from",
                    "check with a key file or the CA instead (-f a copy of the config), or log "
                    "in and read the spawn page and the hub log")
        return None
    try:
        target = await spawner._ssh_target()
    except SpawnError as error:
        checks.fail("config", str(error))
        return None
    except KeyError as error:
        checks.fail("config", f"ssh_key_path_template has an unknown field {error}",
                    "the only field is {username} (the cluster user name)")
        return None
    except Exception as error:  # a cluster_username callable, ...
        checks.fail("config", f"the cluster user name cannot be worked out: "
                    f"{type(error).__name__}: {error}",
                    "a cluster_username callable gets a spawner whose user has only .name "
                    "here; make it work with that, or check with the hub's own logs")
        return None
    label = (f"{spawner.cluster.scheduler.DISPLAY_NAME} cluster {checks.scope}" if checks.scope
             else spawner._class_label)
    checks.ok("config", f"{label}: {spawner.user.name} is cluster user "
              f"{target.username} on {target.host}:{target.port}")
    return target


# --- SSH -----------------------------------------------------------------------------------------


async def _check_key(checks: Checklist, spawner: SSHBatchSpawner, target: SSHTarget) -> None:
    if target.ca_key_path:
        await _check_ca_key(checks, target)
        return
    path = target.key_path
    try:
        info = os.stat(path)
    except FileNotFoundError:
        checks.fail("key", f"no key file at {path}",
                    f"create one (ssh-keygen -t ed25519 -N '' -f {path}) and put its .pub in "
                    f"{target.username}'s ~/.ssh/authorized_keys on the cluster")
        return
    except OSError as error:
        checks.fail("key", f"cannot read {path}: {error.strerror}",
                    "the hub's user must be able to read it")
        return
    mode = stat.S_IMODE(info.st_mode)
    if not stat.S_ISREG(info.st_mode):
        checks.fail("key", f"{path} is not a regular file")
        return
    if mode & 0o077:
        checks.fail("key", f"{path} is readable by group or others (mode {mode:04o})",
                    f"chmod 600 {path} (OpenSSH, which the tunnel service runs, refuses it too)")
        return
    if info.st_uid != os.geteuid():
        checks.fail("key", f"{path} belongs to {_owner(info.st_uid)}, but this check runs as "
                    f"{_owner(os.geteuid())}",
                    "run the check as the hub's user; the key must belong to that user")
        return
    try:
        key = asyncssh.read_private_key(path)
    except (OSError, asyncssh.KeyImportError) as error:
        checks.fail("key", f"{path} is not a usable private key: {error}",
                    "the hub needs an unencrypted OpenSSH private key")
        return
    checks.ok("key", f"{path}: {key.get_algorithm()} {key.get_fingerprint()}, mode "
              f"{mode:04o}, owner {_owner(info.st_uid)}")


async def _check_ca_key(checks: Checklist, target: SSHTarget) -> None:
    """Certificate mode: the CA key is the one secret; a certificate can be minted with it."""
    try:
        ca_key = identity.read_private_key_file(target.ca_key_path, "SSH CA key")
        identity.mint(ca_key, target.username, target.key_id, target.certificate_minutes)
    except SpawnError as error:
        checks.fail("key", str(error), "the hub needs the CA's unencrypted private key, mode 0600")
        return
    checks.ok("key", f"CA key {target.ca_key_path}: {ca_key.get_algorithm()} "
              f"{ca_key.get_fingerprint()}; certificates for {target.username} valid "
              f"{target.certificate_minutes:g} min")


async def _check_reachable(checks: Checklist, spawner: SSHBatchSpawner,
                           target: SSHTarget) -> None:
    where = f"{target.host}:{target.port}"
    started = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(target.host, target.port), target.connect_timeout)
    except asyncio.TimeoutError:
        checks.fail("reachable", f"{where} did not answer within {target.connect_timeout:.0f} s",
                    "a firewall may drop the packets; check the route from this host "
                    f"(nc -vz {target.host} {target.port})")
        return
    except OSError as error:
        checks.fail("reachable", f"cannot connect to {where}: {error.strerror or error}",
                    "check login_host and login_port, and that sshd runs there")
        return
    try:
        banner = await asyncio.wait_for(reader.readline(), target.connect_timeout)
    except (asyncio.TimeoutError, OSError, ValueError):  # ValueError: a line over 64 KiB
        banner = b""
    finally:
        writer.close()
    milliseconds = (time.monotonic() - started) * 1000
    if not banner.startswith(b"SSH-"):
        checks.fail("reachable", f"{where} accepts connections but is not an SSH server "
                    f"(it sent {banner[:40]!r})", "check login_port")
        return
    checks.ok("reachable", f"{where} answers in {milliseconds:.0f} ms "
              f"({banner.decode(errors='replace').strip()})")


async def _check_host_key(checks: Checklist, spawner: SSHBatchSpawner,
                          target: SSHTarget) -> None:
    where = f"{target.host}:{target.port}"
    add = (f"verify the fingerprint with the cluster's admins (ssh-keygen -lf "
           f"/etc/ssh/ssh_host_ed25519_key.pub on the login node), then add the line from "
           f"`ssh-keyscan -p {target.port} {target.host}` to {target.known_hosts_path}")
    try:
        known = asyncssh.read_known_hosts(target.known_hosts_path)
    except FileNotFoundError:
        known = None
    except (OSError, ValueError, asyncssh.KeyImportError) as error:
        checks.fail("host key", f"cannot read {target.known_hosts_path}: {error}", add)
        return
    trusted, authorities = [], []
    if known is not None:
        for address in await _addresses(target.host, target.port):
            matched = known.match(target.host, address, target.port)
            trusted += [key for key in matched[0] if key not in trusted]
            authorities += [key for key in matched[1] if key not in authorities]
    if authorities and not trusted:  # host certificates: asyncssh checks them at login
        listed = ", ".join(key.get_fingerprint() for key in authorities)
        checks.ok("host key", f"{target.known_hosts_path} trusts a host CA for {where} "
                  f"({listed}); its certificate is checked at login")
        return
    algorithms = [alg.decode() for key in trusted for alg in key.sig_algorithms]
    try:
        server_key = await _server_host_key(target, algorithms)
        if server_key is None and algorithms:
            server_key = await _server_host_key(target, [])
    except (asyncssh.Error, OSError, asyncio.TimeoutError) as error:
        checks.fail("host key", f"{where} did not show its host key: {error}")
        return
    if server_key is None:
        checks.fail("host key", f"{where} did not show a host key")
        return
    shown = f"{server_key.get_algorithm()} {server_key.get_fingerprint()}"
    if known is None:
        checks.fail("host key", f"{target.known_hosts_path} does not exist; {where} shows "
                    f"{shown}", add)
    elif not trusted:
        checks.fail("host key", f"{where} is not in {target.known_hosts_path}; it shows "
                    f"{shown}", add)
    elif not any(key.public_data == server_key.public_data for key in trusted):
        listed = ", ".join(f"{key.get_algorithm()} {key.get_fingerprint()}" for key in trusted)
        checks.fail("host key", f"{where} shows {shown}, but {target.known_hosts_path} has "
                    f"{listed} for it",
                    "if the login node was reinstalled, verify the new key with its admins and "
                    "replace the line; otherwise someone may be in the middle: do not connect")
    else:
        checks.ok("host key", f"{shown} matches {target.known_hosts_path}")


async def _addresses(host: str, port: int) -> list[str]:
    """The host's addresses (known_hosts lines may name only one of them), or ``[""]``."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port)
    except OSError:
        return [""]
    return sorted({info[4][0] for info in infos}) or [""]


async def _server_host_key(target: SSHTarget, algorithms: list[str]) -> asyncssh.SSHKey | None:
    """The host key the server shows for ``algorithms`` (empty: its own preference); None if
    it has none of them (a login node re-keyed with another key type)."""
    try:
        return await asyncio.wait_for(asyncssh.get_server_host_key(
            target.host, target.port, server_host_key_algs=algorithms or (),
        ), target.connect_timeout + 5)
    except asyncssh.KeyExchangeFailed:
        if algorithms:
            return None
        raise


async def _check_login(checks: Checklist, spawner: SSHBatchSpawner, target: SSHTarget) -> None:
    try:
        connection = await hub.hub_of().pool.get(target)
        output = await connection.run("hostname; id -un", timeout=spawner.cluster.command_timeout)
    except SpawnError as error:
        checks.fail("login", str(error))
        return
    words = output.stdout.split()  # the last two: start-up files may print banners first
    if output.exit_status != 0 or len(words) < 2:
        checks.fail("login", f"logged in, but `hostname; id -un` failed: "
                    f"{(output.stderr or output.stdout).strip()[-200:]}",
                    "check the user's shell start-up files on the login node")
        return
    host, user = words[-2], words[-1]
    if user != target.username:
        checks.fail("login", f"logged in, but as {user}, not {target.username}",
                    "check the login node's authorized_keys and sshd configuration")
        return
    via = f" through the bastion {target.jump.host}" if target.jump is not None else ""
    checks.ok("login", f"logged in as {user} on {host}{via}")


async def _check_scheduler(checks: Checklist, spawner: SSHBatchSpawner,
                           target: SSHTarget) -> None:
    scheduler = spawner.cluster.scheduler
    try:
        connection = await hub.hub_of().pool.get(target)
        output = await connection.run(scheduler.check_command(target.username),
                                      timeout=spawner.cluster.command_timeout)
        version = parse_check_output(output)
    except SpawnError as error:
        checks.fail("scheduler", str(error))
        return
    except SchedulerUnavailable as error:
        checks.fail("scheduler", f"{scheduler.DISPLAY_NAME} does not answer: {error}",
                    "check that its controller runs and that its commands are on the PATH of "
                    "a non-interactive SSH login (job_prologue does not apply there)")
        return
    checks.ok("scheduler", f"{scheduler.DISPLAY_NAME} {version}; it answers for "
              f"{target.username}")


async def _check_status_identity(checks: Checklist, spawner: SSHBatchSpawner,
                                 target: SSHTarget) -> None:
    """The status identity logs in and lists this user's jobs (one listing per cycle for all
    users); without one, a note that listings grow with users (not a failure)."""
    status = spawner.cluster.status_target(target)
    if status is None:
        checks.ok("status", "no status identity: one scheduler listing per user per "
                  f"{spawner.cluster.cluster_status_interval:g} s, each over the user's own "
                  "connection (listings and login-node sessions grow with users)")
        checks.note("-> set status_cluster_username to an account that may see every "
                    "user's jobs, for one listing per cycle")
        return
    scheduler = spawner.cluster.scheduler
    try:
        connection = await hub.hub_of().pool.get(status)
        output = await connection.run(scheduler.list_command([target.username]),
                                      timeout=spawner.cluster.command_timeout)
        jobs = read_output(scheduler.parse_list_output, output)
    except SpawnError as error:
        checks.fail("status", f"the status identity {status.username} cannot log in: {error}",
                    "give it a key (ssh_key_path_template) or let the CA sign for it; until "
                    "then the hub lists each user's jobs over their own connection")
        return
    except (SchedulerUnavailable, ValueError) as error:
        checks.fail("status", f"the status identity {status.username} cannot list jobs: "
                    f"{error}", f"check {scheduler.DISPLAY_NAME}'s commands for that account")
        return
    checks.ok("status", f"{status.username} lists every user's jobs in one command per "
              f"{spawner.cluster.cluster_status_interval:g} s ({len(jobs)} of "
              f"{target.username}'s now)")


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


# --- a test job ----------------------------------------------------------------------------------

#: The test job's walltime (or ``max_walltime``, if that is shorter).
CHECK_WALLTIME_SECONDS = 10 * 60


async def _check_submit(checks: Checklist, spawner: SSHBatchSpawner, token: str,
                        hub_ip: str, hub_port: int) -> None:
    """Submit, wait for ready, open the tunnel, ask the server; then clean everything up."""
    from jupyterhub.objects import Hub

    hub_api = _HubStandIn(spawner.user.name, token)
    server = HTTPServer(hub_api.application())
    try:
        sockets = bind_sockets(hub_port, address=hub_ip)
    except OSError as error:
        checks.fail("job", f"cannot serve the check's stand-in hub API on {hub_ip}:{hub_port}: "
                    f"{error.strerror or error}", "pick another --hub-ip / --hub-port")
        return
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    spawner.hub = Hub(ip=hub_ip, port=port, base_url="/hub/")
    if spawner.hub_connect_url:  # compute nodes call the hub directly: make that us
        spawner.hub_connect_url = f"http://{hub_ip}:{port}"
        checks.note(f"hub_connect_url is set: the job calls {spawner.hub_connect_url} directly "
                    "(compute nodes must reach it)")
    limits = spawner.cluster.limits()
    walltime = min(CHECK_WALLTIME_SECONDS, limits.max_walltime_seconds)
    spawner.user_options = {"walltime": format_walltime(walltime)}
    if checks.scope:  # start() goes to the cluster user_options names
        spawner.user_options["cluster"] = checks.scope
    tunnels = spawner.server_path.tunnels
    service_was_running = await _service_running(tunnels)
    if service_was_running:
        await _close_stale_forwards(checks, spawner, tunnels)
    started_at = time.monotonic()
    watch = _Watch()
    watcher = asyncio.ensure_future(_print_progress(checks, spawner, watch))
    try:
        try:
            url = await asyncio.wait_for(spawner.start(), spawner.start_timeout)
        except asyncio.TimeoutError:
            checks.fail("job", f"not ready within start_timeout ({spawner.start_timeout:.0f} s)",
                        "a busy queue or a slow server start; raise start_timeout, or look at "
                        "the job's output file on the cluster")
            return
        except (JobEndedEarly, BadReadyLine) as error:
            watch.update(spawner)
            where = f" (all of it: {watch.output_path} on the cluster)" if watch.output_path else ""
            checks.fail("job", str(error),
                        f"read the job's output{where}; check cmd and job_prologue: "
                        "jupyterhub-singleuser must start on a compute node")
            return
        except SpawnError as error:  # its message says what to do
            checks.fail("job", str(error))
            return
        except Exception as error:
            checks.fail("job", f"the spawn failed: {type(error).__name__}: {error}",
                        "run again with -v for the spawner's log")
            return
        finally:
            watcher.cancel()
            watch.update(spawner)
            for event in spawner._progress_events[watch.printed:]:
                checks.note(f"... {event['message']}")
        checks.ok("job", f"job {spawner.job_id} ready on {spawner.server_path.destination}"
                  f" after {time.monotonic() - started_at:.1f} s")
        checks.ok("tunnel", f"{url} -> {spawner.server_path.destination} "
                  "through the tunnel service")
        await _check_server(checks, url + spawner.server.base_url, token, hub_api)
    finally:
        watcher.cancel()
        # A signal cancels the check once (see __main__); the cleanup runs to its end anyway.
        cleanup = asyncio.ensure_future(
            _clean_up(checks, spawner, watch, tunnels, service_was_running))
        while not cleanup.done():
            try:
                await asyncio.shield(cleanup)
            except asyncio.CancelledError:
                checks.note("... still cleaning up")
        server.stop()


async def _close_stale_forwards(checks: Checklist, spawner: SSHBatchSpawner, tunnels) -> None:
    """Forwards an earlier check left (it was killed): close them first."""
    prefix = f"{spawner.user.name}/{CHECK_SERVER}"
    try:
        for name in await tunnels.forwards():
            if name.startswith(prefix):
                await tunnels.close(name)
                checks.note(f"... closed the forward {name} an earlier check left")
    except SpawnError as error:
        checks.note(f"... could not list the tunnel service's forwards: {error}")


@dataclass
class _Watch:
    """What the spawn has shown so far (``start()`` clears the job id when it fails)."""

    printed: int = 0
    job_id: str = ""
    job_name: str = ""
    output_path: str = ""

    def update(self, spawner: SSHBatchSpawner) -> None:
        self.job_id = spawner.job_id or self.job_id
        self.job_name = spawner.job_name or self.job_name
        self.output_path = spawner.output_path or self.output_path


async def _print_progress(checks: Checklist, spawner: SSHBatchSpawner, watch: _Watch) -> None:
    async for event in spawner.progress():
        watch.update(spawner)
        checks.note(f"... {event['message']}")
        watch.printed += 1


async def _check_server(checks: Checklist, base: str, token: str, hub_api: _HubStandIn) -> None:
    started = time.monotonic()
    try:
        response = await AsyncHTTPClient().fetch(
            base + "api/status", headers={"Authorization": f"token {token}"},
            request_timeout=30, validate_cert=False, follow_redirects=False)
        status = json.loads(response.body)
    except HTTPClientError as error:
        checks.fail("server", f"GET {base}api/status answered {error.code}",
                    "the server could not check our token with the hub API: see the job's "
                    "output" if error.code == 403 else "see the job's output file")
        return
    except (OSError, ValueError) as error:
        checks.fail("server", f"GET {base}api/status failed: {error}")
        return
    milliseconds = (time.monotonic() - started) * 1000
    checks.ok("server", f"/api/status answered in {milliseconds:.0f} ms (started "
              f"{status.get('started', '?')}); the server checked our token with the hub "
              f"API through the reverse tunnel ({hub_api.token_checks} request(s))")


async def _clean_up(checks: Checklist, spawner: SSHBatchSpawner, watch: _Watch, tunnels,
                    service_was_running: bool) -> None:
    """Cancel the job and close the forwards; say so, or say what is left and what to do."""
    watch.update(spawner)
    job_id, output_path = watch.job_id, watch.output_path
    left, advice = [], []
    try:
        await spawner.stop()
    except Exception as error:  # stop() logs what it could not do; say what we saw
        left.append(f"stop failed: {error}")
    by_hand = f"cancel job {job_id or watch.job_name} by hand on the cluster"
    if job_id:  # the check has no reconciler behind it: ask the scheduler
        try:
            status = await spawner._calls.status(job_id)
        except Exception as error:
            status = None
            left.append(f"cannot ask for job {job_id}'s status: {error}")
            advice.append(by_hand)
        if status is not None and not status.ended:
            left.append(f"job {job_id} is still {status.state_name or status.state.value}")
            advice.append(by_hand)
    try:
        forwards = await tunnels.forwards()
        prefix = f"{spawner.user.name}/{CHECK_SERVER}"
        stale = [name for name in forwards if name.startswith(prefix)]
        if stale:
            left.append(f"forwards {', '.join(stale)}")
            advice.append("the next check closes them; or restart the tunnel service")
        if not service_was_running and not forwards and not spawner.tunnel_service_address:
            _stop_local_service(await tunnels.health())  # we started it: nobody else uses it
    except SpawnError as error:
        left.append(f"the tunnel service: {error}")
    if left:
        checks.fail("cleanup", "; ".join(left), "; ".join(advice))
    else:
        what = f"job {job_id} no longer runs" if job_id else "no job was left"
        kept = f"; its output stays in {output_path}" if job_id and output_path else ""
        checks.ok("cleanup", f"{what}, its forwards closed, its secrets file deleted{kept}")


def _stop_local_service(health: dict) -> None:
    try:
        os.kill(int(health["pid"]), signal.SIGTERM)
    except (KeyError, ValueError, OSError):
        pass  # it is gone already, or not ours to stop: it stays, with no forward


async def _service_running(tunnels) -> bool:
    try:
        await tunnels.health()
        return True
    except SpawnError:
        return False


class _HubStandIn:
    """The part of the hub API a starting server calls, for one user and one token."""

    def __init__(self, username: str, token: str) -> None:
        self.username, self.token, self.token_checks = username, token, 0

    def application(self) -> web.Application:
        stand_in = self

        class Handler(web.RequestHandler):
            def check_xsrf_cookie(self) -> None:  # an API: token auth only
                pass

            def prepare(self) -> None:
                self.set_header("X-JupyterHub-Version", _jupyterhub_version())

            def get(self, path: str) -> None:
                if path in ("", "/"):
                    self.finish({"version": _jupyterhub_version()})
                elif path == "/user" and stand_in.authorized(self.request.headers):
                    stand_in.token_checks += 1
                    self.finish(stand_in.model())
                elif path == "/user":
                    raise web.HTTPError(403)
                else:
                    raise web.HTTPError(404)

            def post(self, path: str) -> None:
                if path == f"/users/{quote(stand_in.username, safe='')}/activity":
                    self.set_status(204)
                    self.finish()
                else:
                    raise web.HTTPError(404)

        return web.Application([(r"/hub/api(.*)", Handler)])

    def authorized(self, headers: Any) -> bool:
        given = headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        return scheme.lower() in ("token", "bearer") and secrets.compare_digest(
            value.encode(), self.token.encode())

    def model(self) -> dict[str, Any]:
        return {"kind": "user", "name": self.username, "admin": False, "groups": [],
                "scopes": [f"access:servers!user={self.username}"], "session_id": None}


def _jupyterhub_version() -> str:
    import jupyterhub

    return jupyterhub.__version__
