"""``python -m hub_spawner init``: a starting configuration, read off the cluster itself.

It connects to the login node as one cluster user (after the admin has confirmed the login
node's host key fingerprint), finds the scheduler, its partitions or queues with their limits,
GPUs and (Slurm) the user's accounts, the login node's name as compute nodes see it, and
whether ``jupyterhub-singleuser`` is found after the job prologue; then it writes a commented
``jupyterhub_config.py``, a chart ``values.yaml`` and the ``known_hosts`` file both name.
``python -m hub_spawner check -f jupyterhub_config.py --user U --submit`` is the next step.

The discovery is in the scheduler modules (``discovery_command``, ``parse_discovery_output``);
this module connects, asks, and writes (``render_config``, ``render_values`` are pure).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from .chart_schema import camel
from .errors import ClusterUnreachable
from .schedulers import ALL_NODES, CommandOutput, QueueLimits, sge, slurm, torque
from .ssh import ConnectionPool, SSHTarget
from .sshlib import asyncssh

SCHEDULERS: dict[str, ModuleType] = {"slurm": slurm, "sge": sge, "torque": torque}
#: The command that tells each scheduler apart, in the order they are tried (a Slurm site
#: with the Torque wrappers installed is Slurm: ``--scheduler torque`` says otherwise).
DETECT = (("sinfo", "slurm"), ("qconf", "sge"), ("pbsnodes", "torque"))
DEFAULT_WALLTIME_SECONDS = 8 * 3600


class InitError(Exception):
    """What stopped init, and what to do."""


@dataclass
class Found:
    """What init learnt of the cluster (and was told on its command line)."""

    login_host: str
    login_port: int
    username: str
    key_path_template: str
    known_hosts_line: str
    scheduler: str
    queues: list[QueueLimits]
    hub_api_tunnel_host: str
    job_prologue: str = ""
    accounts: list[str] = field(default_factory=list)
    parallel_environment: str = ""
    singleuser: str = ""  # where jupyterhub-singleuser was found after the prologue ("": not)
    notes: list[str] = field(default_factory=list)


# --- connecting and asking ----------------------------------------------------------------------


async def host_key_line(host: str, port: int) -> tuple[str, str]:
    """(known_hosts line, ``SHA256:...`` fingerprint) of the key the login node presents."""
    try:
        key = await asyncio.wait_for(asyncssh.get_server_host_key(host, port), 20)
    except (OSError, asyncssh.Error, asyncio.TimeoutError) as error:
        raise InitError(f"cannot reach {host}:{port}: {error or 'no answer in 20 s'}. Check "
                        "the name and port, and that this machine may connect there.") from None
    if key is None:
        raise InitError(f"{host}:{port} presented no host key")
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {key.export_public_key().decode().strip()}", key.get_fingerprint("sha256")


def confirm_fingerprint(fingerprint: str, expected: str, host: str, ask) -> None:
    """The admin's word that ``fingerprint`` is the login node's: ``expected`` (given on the
    command line) or a yes to ``ask``; ``InitError`` otherwise."""
    if expected:
        if expected.strip() != fingerprint:
            raise InitError(f"{host} presents {fingerprint}, not the {expected.strip()} given "
                            "with --fingerprint: do not trust this connection; ask the "
                            "cluster's admins which key is right.")
        return
    answer = ask(f"{host} presents the host key {fingerprint}.\nIs this the login node's key "
                 "(compare it with what your cluster's admins publish)? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        raise InitError("host key not confirmed: nothing written. Run again once you know the "
                        "fingerprint (or pass it with --fingerprint SHA256:...).")


async def discover(args: argparse.Namespace, known_hosts: Path, known_hosts_line: str) -> Found:
    pool = ConnectionPool()
    target = SSHTarget(args.login, args.port, args.user, str(args.key), str(known_hosts))
    try:
        connection = await pool.get(target)

        async def run(command: str) -> tuple[int, str]:
            output = await connection.run(command, timeout=60)
            return output.exit_status, output.stdout

        _, found = await run(" ".join(f"command -v {shlex.quote(c)} >/dev/null 2>&1 && echo {c};"
                                      for c, _ in DETECT))
        present = set(found.split())
        scheduler = args.scheduler or next((name for c, name in DETECT if c in present), "")
        if not scheduler:
            raise InitError(f"none of {', '.join(c for c, _ in DETECT)} is on {args.user}'s "
                            f"PATH on {args.login}: which scheduler runs there? Pass "
                            "--scheduler if its commands are elsewhere.")
        module = SCHEDULERS[scheduler]
        code, text = await run(module.discovery_command())
        queues = module.parse_discovery_output(CommandOutput(code, text, ""))
        notes: list[str] = []
        accounts: list[str] = []
        if scheduler == "slurm":
            code, text = await run("sacctmgr --noheader --parsable2 show associations "
                                   f"user={shlex.quote(args.user)} format=account")
            accounts = sorted({line.strip() for line in text.splitlines() if line.strip()})
            if code != 0:
                notes.append("sacctmgr did not answer (no accounting database?): no accounts "
                             "listed")
        environment = ""
        if scheduler == "sge":
            _, text = await run("qconf -spl")
            names = text.split()
            environment = "smp" if "smp" in names else (names[0] if names else "")
        _, text = await run("hostname -f 2>/dev/null || hostname")
        login_name = (text.split() or [args.login])[0]
        prologue = args.job_prologue
        # The prologue may span lines; commands to the login shell are one line each.
        script = base64.b64encode(f"{prologue}\ncommand -v jupyterhub-singleuser\n".encode())
        _, text = await run(f"echo {script.decode()} | base64 -d | sh")
        singleuser = text.strip().splitlines()[-1] if text.strip() else ""
    except ClusterUnreachable as error:
        raise InitError(f"cannot log in to {args.login}:{args.port} as {args.user} with "
                        f"{args.key}: {error}") from None
    finally:
        pool.close_all()
    key = str(args.key)
    template = (str(Path(key).parent / "{username}") if Path(key).name == args.user else key)
    return Found(args.login, args.port, args.user, template, known_hosts_line, scheduler,
                 queues, login_name, prologue, accounts, environment, singleuser, notes)


# --- writing ------------------------------------------------------------------------------------


def _memory(mb: int) -> str:
    return f"{mb // 1024}G" if mb >= 1024 and mb % 1024 == 0 else f"{mb}M"


def _walltime(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    clock = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{clock}" if days else clock


def _describe(queue: QueueLimits) -> str:
    parts = []
    if queue.cores:
        parts.append(f"up to {queue.cores} cores")
    if queue.memory_mb:
        parts.append(_memory(queue.memory_mb))
    if queue.gpus:
        parts.append(f"{queue.gpus} GPUs")
    parts.append(f"{_walltime(queue.max_walltime_seconds)} at most"
                 if queue.max_walltime_seconds else "no time limit")
    return ", ".join(parts)


def spawner_settings(found: Found) -> dict:
    """The spawner options init sets (snake_case), in the order they are written."""
    named = [q for q in found.queues if q.name != ALL_NODES]
    partitions = []
    for queue in named:
        entry: dict = {"name": queue.name, "description": _describe(queue)}
        if queue.cores:
            entry["max_cpus"] = queue.cores
        if queue.memory_mb:
            entry["max_memory"] = _memory(queue.memory_mb)
        entry["max_gpus"] = queue.gpus
        if queue.max_walltime_seconds:
            entry["max_walltime"] = _walltime(queue.max_walltime_seconds)
            entry["default_walltime"] = _walltime(min(queue.max_walltime_seconds,
                                                      DEFAULT_WALLTIME_SECONDS))
        partitions.append(entry)
    cores = max((q.cores or 1 for q in found.queues), default=1)
    memories = [q.memory_mb for q in found.queues if q.memory_mb]
    walltimes = [q.max_walltime_seconds for q in found.queues if q.max_walltime_seconds]
    unlimited = any(q.max_walltime_seconds is None for q in found.queues) or not walltimes
    longest = 7 * 86400 if unlimited else max(walltimes)
    settings: dict = {"login_host": found.login_host, "login_port": found.login_port,
                      "ssh_key_path_template": found.key_path_template,
                      "hub_api_tunnel_host": found.hub_api_tunnel_host}
    if found.job_prologue:
        settings["job_prologue"] = found.job_prologue
    if partitions:
        settings["partitions"] = partitions
        settings["default_partition"] = partitions[0]["name"]
    settings["max_cpus"] = cores
    if memories:
        settings["max_memory"] = _memory(max(memories))
    settings["max_gpus"] = max((q.gpus for q in found.queues), default=0)
    settings["max_walltime"] = _walltime(longest)
    settings["default_walltime"] = _walltime(min(longest, DEFAULT_WALLTIME_SECONDS))
    if found.accounts:
        settings["accounts"] = found.accounts
    return settings


def render_config(found: Found) -> str:
    """The commented ``jupyterhub_config.py`` for what init found."""
    module = SCHEDULERS[found.scheduler]
    settings = spawner_settings(found)
    lines = [
        f'"""JupyterHub config for {module.DISPLAY_NAME} at {found.login_host}, written by',
        f"`python -m hub_spawner init` as {found.username} on {time.strftime('%Y-%m-%d')}.",
        "",
        "Next: python -m hub_spawner check -f jupyterhub_config.py --user <a hub user> --submit",
        "Lines marked EDIT are guesses or site decisions; README 'Pointing it at a real cluster'",
        'and example_hub_config/ explain the rest (proxy, TLS, authenticator, systemd units)."""',
        "",
        "c = get_config()  # noqa: F821 - provided by JupyterHub",
        "",
        f'c.JupyterHub.spawner_class = "{found.scheduler}-ssh"',
        "# The login node's host key, confirmed when init ran (known_hosts beside this file).",
        'c.SSHBatchSpawner.known_hosts_path = "known_hosts"  # EDIT: an absolute path',
    ]
    comments = {
        "ssh_key_path_template": "one private key per cluster user (EDIT: or a user CA, "
                                 "ssh_ca_key_path)",
        "hub_api_tunnel_host": "the login node as compute nodes see it (EDIT if they use "
                               "another interface)",
        "job_prologue": "run in each job before the server starts",
        "partitions": "what sinfo/qconf/qstat said; EDIT descriptions and who sees which",
        "default_partition": "EDIT",
        "max_walltime": "the longest any queue allows" + (
            " (no limit found: EDIT)" if settings["max_walltime"] == "7-00:00:00" else ""),
    }
    for name, value in settings.items():
        comment = f"  # {comments[name]}" if name in comments else ""
        lines.append(f"c.SSHBatchSpawner.{name} = {value!r}{comment}")
    if found.scheduler == "sge":
        lines.append(f"c.SGESSHSpawner.parallel_environment = {found.parallel_environment!r}"
                     "  # several cores on one host; empty: one core per job")
    if not found.singleuser:
        lines.append("# EDIT: jupyterhub-singleuser was not found on the login node after the "
                     "job prologue: put what makes it available (module load ...) in "
                     "job_prologue")
    lines += [
        "",
        "# EDIT: an account that may see every user's jobs, for one listing per cycle for all:",
        '# c.SSHBatchSpawner.status_cluster_username = "jupyterhub-status"',
        "# With the systemd units of example_hub_config/systemd (the tunnel service's own unit):",
        "# c.SSHBatchSpawner.tunnel_service_start = False",
        "# EDIT: who may log in (see example_hub_config/*_jupyterhub_config.py for OAuth):",
        '# c.JupyterHub.authenticator_class = "generic-oauth"',
    ]
    lines += [f"# note: {note}" for note in found.notes]
    return "\n".join(lines) + "\n"


def render_values(found: Found) -> str:
    """A chart ``values.yaml`` for what init found (JSON is YAML: each value as JSON)."""
    settings = spawner_settings(found)
    cluster_keys = {"login_host", "login_port", "hub_api_tunnel_host", "ssh_key_path_template"}
    lines = [
        f"# Helm values for {SCHEDULERS[found.scheduler].DISPLAY_NAME} at {found.login_host},",
        "# written by `python -m hub_spawner init`. EDIT what the comments say, then:",
        "#   helm install hub helm/hub-spawner -f values.yaml",
        "cluster:",
        f"  scheduler: {found.scheduler}",
        f"  loginHost: {json.dumps(found.login_host)}",
        f"  loginPort: {found.login_port}",
        "  knownHosts: |",
        f"    {found.known_hosts_line}",
        f"  hubApiTunnelHost: {json.dumps(found.hub_api_tunnel_host)}",
        "# EDIT: one private key per cluster user in this Secret (README 'Install with Helm'):",
        "# kubectl create secret generic hub-ssh-keys --from-file=alice=./alice_key ...",
        "identity:",
        "  mode: keys",
        "  keysSecret: hub-ssh-keys",
        "spawner:",
    ]
    for name, value in settings.items():
        if name not in cluster_keys:
            lines.append(f"  {camel(name)}: {json.dumps(value)}")
    if found.scheduler == "sge":
        lines.append(f"  sge: {json.dumps({'parallelEnvironment': found.parallel_environment})}")
    lines += [
        "hub:",
        "  image:",
        "    name: registry.example.org/hub-spawner  # EDIT: where you pushed the image",
        '    tag: "0.1.0"',
    ]
    return "\n".join(lines) + "\n"


# --- the command --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--login", required=True, help="the login node's name or address")
    parser.add_argument("--port", type=int, default=22, help="its SSH port (default: 22)")
    parser.add_argument("--user", required=True, help="a cluster user to look as (you)")
    parser.add_argument("--key", required=True, type=Path,
                        help="that user's private key; named after the user (keys/alice), it "
                        "becomes the template keys/{username}")
    parser.add_argument("--fingerprint", default="",
                        help="the login node's host key fingerprint (SHA256:...), instead of "
                        "being asked")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="",
                        help="the scheduler, instead of detecting it")
    parser.add_argument("--job-prologue", default="",
                        help="shell lines each job runs first, e.g. 'module load jupyter'")
    parser.add_argument("--out", type=Path, default=Path("."),
                        help="where to write jupyterhub_config.py, values.yaml and known_hosts")
    parser.add_argument("--force", action="store_true", help="overwrite those files")


async def run_init(args: argparse.Namespace, ask=input, say=print) -> int:
    files = {name: args.out / name for name in ("jupyterhub_config.py", "values.yaml",
                                                "known_hosts")}
    existing = [str(path) for path in files.values() if path.exists()]
    try:
        if existing and not args.force:
            raise InitError(f"{', '.join(existing)} exist: pass --force to overwrite them")
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}", args.user):
            raise InitError(f"--user {args.user!r} is not a user name")
        if not args.key.is_file():
            raise InitError(f"--key {args.key}: no such file")
        line, fingerprint = await host_key_line(args.login, args.port)
        confirm_fingerprint(fingerprint, args.fingerprint, args.login, ask)
        args.out.mkdir(parents=True, exist_ok=True)
        files["known_hosts"].write_text(line + "\n")
        found = await discover(args, files["known_hosts"].resolve(), line)
    except (InitError, ValueError) as error:
        say(f"init: {error}", file=sys.stderr)
        return 1
    files["jupyterhub_config.py"].write_text(render_config(found))
    files["values.yaml"].write_text(render_values(found))
    queues = ", ".join(q.name for q in found.queues)
    say(f"{SCHEDULERS[found.scheduler].DISPLAY_NAME} at {found.login_host}: {queues}; "
        f"compute nodes reach the login node as {found.hub_api_tunnel_host}; "
        f"jupyterhub-singleuser: {found.singleuser or 'not found (EDIT job_prologue)'}")
    for note in found.notes:
        say(f"note: {note}")
    say(f"wrote {', '.join(str(p) for p in files.values())}\nnext: python -m hub_spawner check "
        f"-f {files['jupyterhub_config.py']} --user <a hub user> --submit")
    return 0
