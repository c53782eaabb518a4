"""The scheduler-independent part of every job: secrets, port, server start, ready line.

Requirements:
- the job chooses its own free port on the node, starts the single-user server there and, once
  the server accepts connections, prints exactly one ready line to its output:
  ``HUB_SPAWNER_READY {"host": "cn017", "port": 43211}``; in socket mode (no open port) the
  server listens on a Unix socket in a fresh 0700 directory and the line names it instead:
  ``HUB_SPAWNER_READY {"host": "cn017", "socket": "/tmp/hub-spawner.x1Y2z3/server.sock"}``;
- secrets (the API token and friends) reach the job only through a 0600 file that the job
  reads and deletes at once; never through the command line or the scheduler's environment;
- every value put into the script is shell-quoted with ``shlex.quote`` and used only as a whole
  shell word (a quoted value is never pasted inside double quotes, where its quotes would end
  them); environment variable names are validated. ``prologue`` is the one exception: it is
  admin-written shell code and inserted verbatim by design;
- the ready line is trusted for its port (1024-65535) or socket path only: the tunnel dials the
  node the *scheduler* reports, and a ready line that names another host is refused. Its
  ``host`` is the node's own name (``hostname``); ``node``, where the scheduler tells the job
  (Slurm's ``SLURMD_NODENAME``), is the scheduler's name for it; either may match (``same_host``).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from typing import Any

import jinja2

from .tunnels.forwards import MAX_SOCKET_PATH, is_socket_path

READY_MARKER = "HUB_SPAWNER_READY"

#: Ports a ready line may name: a job's server runs as the user, who cannot bind below 1024.
MIN_PORT, MAX_PORT = 1024, 65535

# Used with ``fullmatch``: the whole value must match.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*")

LAUNCH_TEMPLATE = """\
# --- hub_spawner launcher: load secrets, choose a port, start the server, report readiness ---
set -u
# Times (seconds since the epoch) in the output: when the job began, when the server was
# started and when it listened; the first line also tells a hub that follows the output that
# the job runs.
echo "hub_spawner: job started on $(hostname) at $(date +%s.%N)"
{% if walltime_seconds -%}
# When the scheduler will end the job (seconds since the epoch), for the user's own code.
export HUB_SPAWNER_WALLTIME_END=$(( $(date +%s) + {{ walltime_seconds }} ))
{% endif -%}
umask 077
hub_spawner_secrets={{ secrets_path }}
if [ ! -r "$hub_spawner_secrets" ]; then
    echo "hub_spawner: cannot read the server's environment file $hub_spawner_secrets" >&2
    exit 1
fi
set -a
. "$hub_spawner_secrets"
set +a
rm -f -- "$hub_spawner_secrets"
hub_spawner_python={{ python }}
{{ prologue }}
{% if socket -%}
# No open port: the server listens on a Unix socket in a fresh 0700 directory of the user's on
# this node, which the tunnel reaches over SSH to the node (nobody else can create or open it).
# TMPDIR as an absolute, canonical path (a trailing slash, "." or a symlink would make a
# path the hub refuses); /tmp if it is unusable.
hub_spawner_tmp=$(cd -- "${TMPDIR:-/tmp}" 2>/dev/null && pwd -P) || hub_spawner_tmp=/tmp
hub_spawner_socket_dir=$(mktemp -d "$hub_spawner_tmp/hub-spawner.XXXXXXXX") || {
    echo "hub_spawner: cannot make a private directory for the server's socket in" \
        "$hub_spawner_tmp on $(hostname)" >&2
    exit 1
}
chmod 700 "$hub_spawner_socket_dir"
hub_spawner_socket=$hub_spawner_socket_dir/server.sock
case $hub_spawner_socket in
    *[!A-Za-z0-9_./+-]*)
        echo "hub_spawner: the socket path $hub_spawner_socket has characters other than" \
            "letters, digits and ._+-; set TMPDIR to a plainer directory" >&2
        rm -rf -- "$hub_spawner_socket_dir"
        exit 1 ;;
esac
if [ "$(printf %s "$hub_spawner_socket" | wc -c)" -gt {{ max_socket_path }} ]; then
    echo "hub_spawner: the socket path $hub_spawner_socket is longer than" \
        "{{ max_socket_path }} bytes; set TMPDIR to a shorter directory" >&2
    rm -rf -- "$hub_spawner_socket_dir"
    exit 1
fi
# jupyter-server refuses --sock beside a port of its own; 8888 is its default, which it drops.
export JUPYTERHUB_SERVICE_URL="{{ scheme }}://127.0.0.1:8888/"
echo "hub_spawner: starting the server at $(date +%s.%N)"
{{ command }} --sock="$hub_spawner_socket" --sock-mode=0600 &
hub_spawner_server=$!
trap 'kill -TERM "$hub_spawner_server" 2>/dev/null' TERM INT HUP
"$hub_spawner_python" - "$hub_spawner_socket" "$hub_spawner_server" \
    {{ ready_timeout_tenths }} <<'HUB_SPAWNER_PY'
import socket, sys, time
path, server, tenths = sys.argv[1], sys.argv[2], int(sys.argv[3])
def server_alive():
    try:
        return open(f"/proc/{server}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
for _ in range(tenths):
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
            sys.exit(0)
        except OSError:
            pass
    if not server_alive():
        sys.exit(2)
    time.sleep(0.1)
sys.exit(3)
HUB_SPAWNER_PY
hub_spawner_waited=$?
if [ "$hub_spawner_waited" -ne 0 ]; then
    if [ "$hub_spawner_waited" -eq 2 ]; then
        wait "$hub_spawner_server"
        hub_spawner_status=$?
        echo "hub_spawner: the server exited with status $hub_spawner_status before it listened" >&2
    else
        echo "hub_spawner: the server did not listen on $hub_spawner_socket in time" >&2
        kill -TERM "$hub_spawner_server" 2>/dev/null
        hub_spawner_status=1
    fi
    rm -rf -- "$hub_spawner_socket_dir"
    exit "$hub_spawner_status"
fi
echo "hub_spawner: the server listens at $(date +%s.%N)"
echo "{{ ready_marker }} {\\"host\\": \\"$(hostname)\\"," \\
    "\\"node\\": \\"${SLURMD_NODENAME:-}\\", \\"socket\\": \\"$hub_spawner_socket\\"}"
wait "$hub_spawner_server"
hub_spawner_status=$?
rm -rf -- "$hub_spawner_socket_dir"
exit "$hub_spawner_status"
{% else -%}
# The address: the one this node uses towards the login node (which dials us), or all of them.
# A port another process takes between our pick and the server's bind (jobs on one node pick
# at the same time) is given up for another pick, up to 3 tries, within one ready timeout.
hub_spawner_route_to={{ route_to }}
hub_spawner_waited=0
hub_spawner_try=1
while :; do
hub_spawner_address=$("$hub_spawner_python" - "$hub_spawner_route_to" {{ listen_ip }} \
    <<'HUB_SPAWNER_PY'
import socket, sys
route_to, ip = sys.argv[1], sys.argv[2]
if route_to:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.connect((route_to, 22))  # UDP: no packet is sent, the kernel only picks a route
    ip = probe.getsockname()[0]
port = socket.socket()
port.bind((ip, 0))
print(ip, port.getsockname()[1])
HUB_SPAWNER_PY
) || {
    hub_spawner_hint=${hub_spawner_route_to:+" (does $hub_spawner_route_to resolve here?)"}
    echo "hub_spawner: could not choose a free port on $(hostname)" \
        "(is $hub_spawner_python on PATH?)$hub_spawner_hint" >&2
    exit 1
}
hub_spawner_ip=${hub_spawner_address% *}
hub_spawner_port=${hub_spawner_address#* }
export JUPYTERHUB_SERVICE_URL="{{ scheme }}://${hub_spawner_ip}:${hub_spawner_port}/"
echo "hub_spawner: starting the server at $(date +%s.%N)"
{{ command }} &
hub_spawner_server=$!
trap 'kill -TERM "$hub_spawner_server" 2>/dev/null' TERM INT HUP
hub_spawner_dial=$hub_spawner_ip
[ "$hub_spawner_dial" = 0.0.0.0 ] && hub_spawner_dial=127.0.0.1
hub_spawner_taken=0
until (exec 3<>"/dev/tcp/$hub_spawner_dial/$hub_spawner_port") 2>/dev/null; do
    if ! kill -0 "$hub_spawner_server" 2>/dev/null; then
        wait "$hub_spawner_server"
        hub_spawner_status=$?
        if (exec 3<>"/dev/tcp/$hub_spawner_dial/$hub_spawner_port") 2>/dev/null; then
            hub_spawner_taken=1  # it could not bind: another process holds the port
            break
        fi
        echo "hub_spawner: the server exited with status $hub_spawner_status before it listened" >&2
        exit "$hub_spawner_status"
    fi
    if [ "$hub_spawner_waited" -ge {{ ready_timeout_tenths }} ]; then
        echo "hub_spawner: the server did not listen on port $hub_spawner_port in time" >&2
        kill -TERM "$hub_spawner_server" 2>/dev/null
        exit 1
    fi
    sleep 0.1
    hub_spawner_waited=$((hub_spawner_waited + 1))
done
if [ "$hub_spawner_taken" -eq 0 ]; then
# Whoever answers must be our server: another user may have taken the port in between.
"$hub_spawner_python" - "$hub_spawner_port" "$hub_spawner_server" <<'HUB_SPAWNER_PY'
import os, sys
port, root = int(sys.argv[1]), sys.argv[2]
if not os.path.exists("/proc/net/tcp"):
    sys.exit(0)  # no /proc to ask: the port check above is all we have
inodes = set()
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        rows = open(table).read().splitlines()[1:]
    except OSError:
        continue
    for row in rows:
        fields = row.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
            inodes.add(f"socket:[{fields[9]}]")
pids, seen = [root], set()
while pids:
    pid = pids.pop()
    seen.add(pid)
    try:
        pids += [p for p in open(f"/proc/{pid}/task/{pid}/children").read().split()
                 if p not in seen]
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        continue
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                sys.exit(0)
        except OSError:
            pass
sys.exit(1)
HUB_SPAWNER_PY
[ $? -eq 0 ] || hub_spawner_taken=1
fi
[ "$hub_spawner_taken" -eq 0 ] && break
kill -TERM "$hub_spawner_server" 2>/dev/null
wait "$hub_spawner_server" 2>/dev/null
if [ "$hub_spawner_try" -ge 3 ]; then
    echo "hub_spawner: port $hub_spawner_port answers, but not from the server's own" \
        "process: another process took it; giving up after $hub_spawner_try tries" >&2
    exit 1
fi
echo "hub_spawner: port $hub_spawner_port was taken by another process; trying another port" >&2
hub_spawner_try=$((hub_spawner_try + 1))
done
echo "hub_spawner: the server listens at $(date +%s.%N)"
echo "{{ ready_marker }} {\\"host\\": \\"$(hostname)\\"," \\
    "\\"node\\": \\"${SLURMD_NODENAME:-}\\", \\"port\\": $hub_spawner_port}"
wait "$hub_spawner_server"
{% endif -%}
"""


@dataclass(frozen=True)
class ReadyLine:
    """Where the job's server listens, as the job reported it: a TCP port, or (socket mode,
    then ``port`` is 0) a Unix socket's path on the node."""

    host: str
    port: int
    socket: str = ""
    node: str = ""  # the scheduler's name for the node, where the job knows it (else "")


def render_launch(
    command: list[str],
    secrets_path: str,
    prologue: str = "",
    python: str = "python3",
    listen_ip: str = "0.0.0.0",
    ready_timeout_seconds: int = 600,
    tls: bool = False,
    route_to: str = "",
    socket: bool = False,
    walltime_seconds: int = 0,
) -> str:
    """The launcher part of the job script; every argument is quoted for bash.

    ``prologue`` is admin-written shell (``module load ...``) and inserted verbatim: it is code,
    never a place for values from users. ``python`` is one word (a path or a command name); it
    is assigned, quoted, to a variable before the prologue runs and only used as ``"$var"``.
    ``socket``: the server listens on a Unix socket (``--sock``, jupyter-server's) instead of
    a TCP port; ``listen_ip`` and ``route_to`` are then unused. ``walltime_seconds`` (when
    not 0) sets ``HUB_SPAWNER_WALLTIME_END`` (when the job's time is up, seconds since the
    epoch) in the server's environment.
    """
    if not command:
        raise ValueError("the server command is empty")
    return _render(
        LAUNCH_TEMPLATE,
        secrets_path=shlex.quote(secrets_path),
        prologue=prologue,
        python=shlex.quote(python),
        listen_ip=_checked_ip(listen_ip),
        route_to=shlex.quote(_checked_route(route_to)),
        scheme="https" if tls else "http",
        command=shlex.join(command),
        ready_timeout_tenths=int(ready_timeout_seconds * 10),
        ready_marker=READY_MARKER,
        socket=socket,
        max_socket_path=MAX_SOCKET_PATH,
        walltime_seconds=int(walltime_seconds),
    )


def _checked_route(host: str) -> str:
    """``route_to``: a host name or IP address (the login node as nodes see it), or empty."""
    if host and not (_HOSTNAME.fullmatch(host) or re.fullmatch(r"[0-9a-fA-F:.]+", host)):
        raise ValueError(f"not a host name or address: {host!r}")
    return host


def render_job_script(template: str, **variables: Any) -> str:
    """Render a scheduler's job-script template (Jinja2, undefined names are errors)."""
    return _render(template, **variables)


def render_env_file(env: dict[str, str]) -> str:
    """``NAME='value'`` lines for bash to source; raises ``ValueError`` on a bad name."""
    lines = []
    for name, value in sorted(env.items()):
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"not a valid environment variable name: {name!r}")
        lines.append(f"{name}={shlex.quote(str(value))}")
    return "\n".join(lines) + "\n"


def parse_ready_line(output: str) -> ReadyLine | None:
    """The last ready line in a job's output, or ``None`` if there is none yet.

    Raises ``ValueError`` if a ready line is there but malformed (bad JSON, a host that is not a
    hostname, a port outside 1024-65535, a socket path that is not a plain absolute path, or
    both a port and a socket): the job is then not one of ours to trust.
    """
    ready = None
    for line in output.splitlines():
        if line.startswith(READY_MARKER + " "):
            ready = line[len(READY_MARKER) + 1 :]
    if ready is None:
        return None
    try:
        fields = json.loads(ready)
        host = fields["host"]
        if ("port" in fields) == ("socket" in fields):
            raise KeyError("port or socket")
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"malformed ready line: {ready!r}") from None
    if not isinstance(host, str) or not _HOSTNAME.fullmatch(host):
        raise ValueError(f"ready line names an invalid host: {host!r}")
    node = fields.get("node")
    node = node if isinstance(node, str) and is_hostname(node) else ""  # optional: else unused
    if "socket" in fields:
        path = fields["socket"]
        if not is_socket_path(path):
            raise ValueError(
                f"ready line names an invalid socket: {path!r} (an absolute path of letters, "
                f"digits and ._+-, at most {MAX_SOCKET_PATH} bytes)"
            )
        return ReadyLine(host=host, port=0, socket=path, node=node)
    port = fields["port"]
    if not isinstance(port, int) or isinstance(port, bool) or not MIN_PORT <= port <= MAX_PORT:
        raise ValueError(
            f"ready line names an invalid port: {port!r} (a server port is {MIN_PORT}-{MAX_PORT})"
        )
    return ReadyLine(host=host, port=port, node=node)


def last_lines(output: str, count: int = 10) -> str:
    """The last ``count`` non-empty lines of a job's output, for error messages."""
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    return "\n".join(lines[-count:])


def same_host(reported: str, scheduled: str) -> bool:
    """Whether a name the job gave for its node is the node the scheduler placed it on.

    The same name (ignoring case), or the same first label when one of the two names has no
    domain: Grid Engine usually knows a node by its full name (``cn017.cluster.example``) while
    the node calls itself ``cn017``, or the other way round. Two full names that differ
    (``cn017.a.example``, ``cn017.b.example``) are not the same host. The job's name is never
    dialled in any case: this only refuses a ready line that did not come from the job's node.
    """
    mine, theirs = reported.lower(), scheduled.lower()
    if mine == theirs:
        return True
    return ("." not in mine or "." not in theirs) and mine.split(".")[0] == theirs.split(".")[0]


def server_address(ready: ReadyLine, scheduled_node: str) -> ReadyLine:
    """Where the tunnel connects: the node the *scheduler* placed the job on, at the port of the
    ready line. The ready line is the job's output, so the user can write anything into it; its
    host name (or the scheduler's name for the node, ``node``) only has to agree with the
    scheduler (``same_host``), it is never dialled.

    Raises ``ValueError`` when the scheduler's node is not a plain host name, or the ready line
    names another host.
    """
    if not is_hostname(scheduled_node):
        raise ValueError(f"the scheduler reports the job on {scheduled_node!r}, not a host name")
    if not same_host(ready.host, scheduled_node) and not (
            ready.node and same_host(ready.node, scheduled_node)):
        raise ValueError(
            f"the job says its server is on {ready.host!r}, but the scheduler placed it on "
            f"{scheduled_node!r}"
        )
    return ReadyLine(host=scheduled_node, port=ready.port, socket=ready.socket)


def is_hostname(name: str) -> bool:
    """Whether ``name`` is a plain DNS host name (labels of letters, digits and ``-``)."""
    return isinstance(name, str) and _HOSTNAME.fullmatch(name) is not None


def _checked_ip(ip: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F:.]+", ip):
        raise ValueError(f"not an IP address: {ip!r}")
    return ip


_environment = jinja2.Environment(
    undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
)


def _render(template: str, **variables: Any) -> str:
    return _environment.from_string(template).render(**variables)
