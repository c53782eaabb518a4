"""The three-host lab: hub (root network namespace), login and compute (their own namespaces).

    python -m tests.lab.lab up [SCHEDULER...] [--login-hosts 2]   # build it (tears down a
                                                # leftover one first); 2: with host login2
    python -m tests.lab.lab down    # tear it down: processes by PID, namespaces, routes, veths
    python -m tests.lab.lab status

Topology (see shared/notes/cluster-lab.md):
    hub      root netns      10.77.1.1                       (JupyterHub, proxy, spawner)
    login    netns hsl-login 10.77.1.2 | 10.77.2.1 "login"   (sshd :22 and :2222, slurmctld,
                                                             sge_qmaster)
    compute  netns hsl-compute          10.77.2.2 "compute"  (slurmd, sge_execd, sshd :22;
                                                             jobs run here; Grid Engine
                                                             knows it as compute.lab.example)
    login2   netns hsl-login2 10.77.3.2 | 10.77.2.3 "login2" (a second login node, when asked
                                                             for: sshd :22 and :2222, the same
                                                             controllers, homes and users)
The cluster side (10.77.2.0/24) is a bridge in the compute host's namespace (the cluster's
switch): both login hosts reach the compute host and the controllers on the first login host.
The hub reaches the login hosts by address, and, while login2 is up, also by the names
``login`` and ``login2`` (lines of the hub's /etc/hosts, removed when the lab goes down).
Three schedulers (``SCHEDULERS``): Slurm; Grid Engine (Debian's gridengine, cell ``default``,
queue ``all.q``, parallel environment ``smp``); and Torque/PBS command syntax through Slurm's
``slurm-wlm-torque`` wrappers, which a second sshd on port 2222 puts first on users' PATH (the
wrappers conflict with Grid Engine's qsub/qstat/qdel, so they cannot share one PATH).
The compute host's sshd is for the node hop (``server_transport = "socket"``): the login host
reaches it, the hub does not. The hub has no route to 10.77.2.0/24 (an ``unreachable
10.77.0.0/16`` route is installed before any veth exists, so test traffic can never leave for
the sandbox's egress), and the compute host has no route back to the hub. Only the login host
sees both.

This is test infrastructure: it runs as root, blocks, and uses subprocess freely.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

LAB_DIR = Path(os.environ.get("HUB_SPAWNER_LAB_DIR", "/run/hub-spawner-lab"))
LAB_PREFIX = Path(os.environ.get("LAB_PREFIX", "/opt/hub-spawner-lab"))
STATE_FILE = LAB_DIR / "lab.json"

SAFETY_ROUTE = "10.77.0.0/16"
HUB_IP, LOGIN_IP = "10.77.1.1", "10.77.1.2"
LOGIN_CLUSTER_IP, COMPUTE_IP = "10.77.2.1", "10.77.2.2"
HUB2_IP, LOGIN2_IP, LOGIN2_CLUSTER_IP = "10.77.3.1", "10.77.3.2", "10.77.2.3"
#: The bastion (``add_bastion``): the hub's side, and its link to the first login host.
HUB3_IP, BASTION_IP = "10.77.4.1", "10.77.4.2"
BASTION_INNER_IP, LOGIN_BASTION_SIDE_IP = "10.77.5.1", "10.77.5.2"
NAMESPACES = {"login": "hsl-login", "compute": "hsl-compute", "login2": "hsl-login2",
              "bastion": "hsl-bastion"}
#: Each host's address on the hub's side (the compute host's: on the cluster's side).
HOST_IPS = {"login": LOGIN_IP, "login2": LOGIN2_IP, "compute": COMPUTE_IP,
            "bastion": BASTION_IP}
HUB_HOSTS_MARK = "# hub_spawner lab: login hosts (tests/lab/lab.py)"
USERS = ("alice", "bob")
#: Benchmark users (``add_users``): hsu001, hsu002, ...; every lab sshd lets them in.
BENCH_USER_PREFIX = "hsu"
#: The compute host's full name: its canonical name in the lab's hosts files, so Grid Engine
#: (``ignore_fqdn false``) knows the node by it, as real cells usually do, while the node's
#: ``hostname`` (and Slurm's NodeName) is the short ``compute``.
COMPUTE_FQDN = "compute.lab.example"
HOSTS_FILE = (f"127.0.0.1 localhost\n{LOGIN_CLUSTER_IP} login\n"
              f"{COMPUTE_IP} {COMPUTE_FQDN} compute\n{LOGIN2_CLUSTER_IP} login2\n")

KNOWN_HOSTS = LAB_DIR / "known_hosts"
KEY_DIR = LAB_DIR / "keys"
USER_CA = LAB_DIR / "user_ca"  # the SSH user CA the login host's sshd trusts (certificates)
SLURM_CONF = Path("/etc/slurm/slurm.conf")
SCHEDULERS = ("slurm", "sge", "torque")
#: The login node's SSH port per scheduler: Torque/PBS commands are on the second sshd's PATH.
LOGIN_PORTS = {"slurm": 22, "sge": 22, "torque": 2222}
TORQUE_PORT = 2222
TORQUE_WRAPPERS = LAB_PREFIX / "torque-wrappers"  # made by install.sh

SGE_ROOT = Path("/var/lib/gridengine")
SGE_ENV = "env SGE_ROOT=/var/lib/gridengine SGE_CELL=default"
SGE_BOOTSTRAP_TEXT = """\
# Written by hub_spawner's test lab (tests/lab/lab.py).
admin_user              sgeadmin
default_domain          none
ignore_fqdn             false
spooling_method         berkeleydb
spooling_lib            libspoolb
spooling_params         {run}/sge/spooldb
binary_path             /usr/sbin
qmaster_spool_dir       {run}/sge/qmaster
security_mode           none
listener_threads        2
worker_threads          2
scheduler_threads       1
"""
SGE_EXEC_HOST_TEXT = """\
hostname              compute.lab.example
load_scaling          NONE
complex_values        NONE
user_lists            NONE
xuser_lists           NONE
projects              NONE
xprojects             NONE
usage_scaling         NONE
report_variables      NONE
"""
SGE_PE_TEXT = """\
pe_name            smp
slots              999
user_lists         NONE
xuser_lists        NONE
start_proc_args    NONE
stop_proc_args     NONE
allocation_rule    $pe_slots
control_slaves     FALSE
job_is_first_task  TRUE
urgency_slots      min
accounting_summary FALSE
qsort_args         NONE
"""
# Run by ``qconf -aq`` as $EDITOR on the default queue template.
SGE_QUEUE_EDITOR_TEXT = """\
#!/bin/sh
sed -i -e 's/^hostlist .*/hostlist compute.lab.example/' -e 's/^slots .*/slots 2/' \\
    -e 's/^pe_list .*/pe_list smp/' -e 's/^load_thresholds .*/load_thresholds NONE/' \\
    -e 's|^shell .*|shell /bin/bash|' "$1"
"""
# The scheduler's defaults wait 15 s between runs; the lab schedules every second.
SGE_SCHEDULER_EDITS = {
    "schedule_interval": "0:0:1",
    "flush_submit_sec": "1",
    "flush_finish_sec": "1",
    "job_load_adjustments": "NONE",
    "load_adjustment_decay_time": "0:0:0",
}

SLURM_CONF_TEXT = """\
# Written by hub_spawner's test lab (tests/lab/lab.py).
ClusterName=hslab
SlurmctldHost=login({login_ip})
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SchedulerParameters=sched_interval=1,bf_interval=5
MinJobAge=300
KillWait=5
StateSaveLocation={run}/slurm/state
SlurmdSpoolDir={run}/slurm/spool
SlurmctldPidFile={run}/slurm/slurmctld.pid
SlurmdPidFile={run}/slurm/slurmd.pid
SlurmctldLogFile={run}/slurm/log/slurmctld.log
SlurmdLogFile={run}/slurm/log/slurmd.log
{slurmd_parameters}NodeName=compute NodeAddr={compute_ip} CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=compute Default=YES MaxTime=INFINITE State=UP
PartitionName=long Nodes=compute MaxTime=INFINITE State=UP
"""

SSHD_CONFIG_TEXT = """\
# Written by hub_spawner's test lab (tests/lab/lab.py).
Port {port}
ListenAddress {listen_ip}
HostKey {run}/{host_key}
PidFile {run}/sshd-{name}.pid
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin no
AllowUsers {users}
AllowTcpForwarding yes
GatewayPorts clientspecified
TrustedUserCAKeys {run}/user_ca.pub
Subsystem sftp internal-sftp
LogLevel VERBOSE
"""


def up(schedulers: tuple[str, ...] = SCHEDULERS, login_hosts: int = 1) -> dict:
    """Build the lab with these schedulers (Torque/PBS needs Slurm) and one or two login hosts;
    returns its state (also written to ``STATE_FILE``)."""
    if STATE_FILE.exists():
        down()
    unknown = set(schedulers) - set(SCHEDULERS)
    if unknown:
        raise ValueError(f"unknown scheduler(s) {sorted(unknown)}; known: {SCHEDULERS}")
    state: dict = {"pids": {}, "schedulers": list(schedulers)}
    _runtime_dirs()
    try:
        _network()
        _users_and_keys()
        state["pids"]["munged"] = _start_munged()
        _configure_sshd()
        state["pids"]["sshd"] = _start_sshd()
        state["pids"]["sshd-compute"] = _start_sshd(host="compute")
        if "torque" in schedulers:
            state["pids"]["sshd-torque"] = _start_sshd(TORQUE_PORT)
        if "slurm" in schedulers or "torque" in schedulers:
            state["pids"].update(_start_slurm())
        if "sge" in schedulers:
            state["pids"].update(_start_sge())
        _write_state(state)
        if "slurm" in schedulers or "torque" in schedulers:
            _wait_for_slurm()
        if "sge" in schedulers:
            _wait_for_sge()
        _write_known_hosts()
    except BaseException:
        _write_state(state)
        down()
        raise
    if login_hosts >= 2:
        state = add_login2()
    return state


def add_login2() -> dict:
    """Add the second login host to the running lab (once): its namespace and links, its own
    host key and sshds (:22, and :2222 with the Torque/PBS wrappers when Torque is up), in the
    known_hosts file and, with the first, in the hub's /etc/hosts as ``login`` and
    ``login2``. Returns the lab's state."""
    state = json.loads(STATE_FILE.read_text())
    if state.get("login_hosts", 1) >= 2:
        return state
    namespace = NAMESPACES["login2"]
    try:
        _new_namespace(namespace, HOSTS_FILE)
        _link("", "hsl-hub2", HUB2_IP, namespace, "hsl-m1", LOGIN2_IP)
        _link(namespace, "hsl-m2", LOGIN2_CLUSTER_IP, NAMESPACES["compute"], "hsl-c3",
              bridge="hsl-br")
        _no_forwarding(namespace)
        key = _fresh_key(LAB_DIR / "ssh_host_login2_ed25519_key")
        ports = [22] + ([TORQUE_PORT] if "torque" in state["schedulers"] else [])
        for port in ports:
            _write_sshd_config(f"login2-{port}", LOGIN2_IP, port, key.name)
        state["login_hosts"] = 2
        for port in ports:
            state["pids"][f"sshd-login2-{port}"] = _start_sshd(port, host="login2")
        _write_state(state)
        _hub_hosts(True)
        _write_known_hosts()
    except BaseException:
        _write_state(state)
        down()
        raise
    return state

def down() -> None:
    """Cancel lab jobs, stop lab daemons by PID, remove namespaces, veths, routes and keys."""
    state = json.loads(STATE_FILE.read_text()) if STATE_FILE.exists() else {"pids": {}}
    pids = state.get("pids", {})
    if "slurmctld" in pids and _alive(pids["slurmctld"]):
        for user in USERS:
            try:
                in_namespace("login", ["scancel", f"--user={user}"], check=False, timeout=10)
            except subprocess.TimeoutExpired:
                print(f"lab: scancel --user={user} timed out", file=sys.stderr)
    if "sge_qmaster" in pids and _alive(pids["sge_qmaster"]):
        try:
            sge_command(f"qdel -u {','.join(USERS)}", check=False, timeout=10)
        except subprocess.TimeoutExpired:
            print("lab: qdel timed out", file=sys.stderr)
    for name in ("sshd", "sshd-torque", "sshd-compute", "sshd-login2-22", "sshd-login2-2222",
                 "sshd-bastion-22", "sshd-login-bastion-side", "slurmd", "slurmctld",
                 "sge_execd", "sge_qmaster", "munged"):
        pid = pids.get(name)
        if pid and _alive(pid):
            stop_pid(pid)
    # Whatever still runs inside the lab's namespaces (job steps, user servers) is the lab's.
    for namespace in NAMESPACES.values():
        for pid in _namespace_pids(namespace):
            stop_pid(pid, timeout=5)
    for namespace in NAMESPACES.values():
        subprocess.run(["ip", "netns", "del", namespace], check=False, stderr=subprocess.DEVNULL)
        shutil.rmtree(f"/etc/netns/{namespace}", ignore_errors=True)
    for link in ("hsl-hub", "hsl-hub2", "hsl-hub3"):
        subprocess.run(["ip", "link", "del", link], check=False, stderr=subprocess.DEVNULL)
    _hub_hosts(False)
    subprocess.run(["ip", "route", "del", "unreachable", SAFETY_ROUTE], check=False,
                   stderr=subprocess.DEVNULL)
    # Private keys do not outlive the lab (logs stay, for debugging).
    shutil.rmtree(KEY_DIR, ignore_errors=True)
    for key in [*LAB_DIR.glob("ssh_host_*_key*"), *LAB_DIR.glob("user_ca*")]:
        key.unlink()
    STATE_FILE.unlink(missing_ok=True)


def in_namespace(host: str, command: list[str], check: bool = True, timeout: float = 30,
                 **kwargs) -> subprocess.CompletedProcess:
    """Run a command inside the login or compute host's network namespace."""
    return subprocess.run(
        ["nsenter", f"--net=/run/netns/{NAMESPACES[host]}", *command],
        check=check, timeout=timeout, capture_output=True, text=True, **kwargs,
    )


def host_command(host: str, command: str, binds: dict[str, str] | None = None) -> list[str]:
    """argv that runs ``command`` as host ``host``: its netns, hostname and /etc/hosts.

    ``binds`` maps directories to bind-mount over others (source -> target), for this process
    tree only.
    """
    namespace = NAMESPACES[host]
    setup = f"mount --bind /etc/netns/{namespace}/hosts /etc/hosts && hostname {host} && "
    for source, target in (binds or {}).items():
        setup += f"mount --bind {source} {target} && "
    setup += "exec "
    return ["nsenter", f"--net=/run/netns/{namespace}", "unshare", "--uts", "--mount",
            "--propagation", "private", "sh", "-c", setup + command]


#: Directories the lab's daemons need, with owner and mode. Under /run (a tmpfs, empty after
#: every boot) nothing survives, and package scripts create nothing when service starts are
#: blocked (policy-rc.d), so the lab makes them all, every time.
RUNTIME_DIRS = (
    (LAB_DIR, "root", 0o755),
    (Path("/run/sshd"), "root", 0o755),  # sshd's privilege-separation directory
    (Path("/run/munge"), "munge", 0o755),  # munged's socket and pid file
    (Path("/var/lib/munge"), "munge", 0o700),  # munged's seed
    (Path("/var/log/munge"), "munge", 0o700),
)


def _runtime_dirs() -> None:
    """Create every runtime directory the lab relies on (Slurm's and Grid Engine's live under
    ``LAB_DIR``, made when they start)."""
    for path, owner, mode in RUNTIME_DIRS:
        path.mkdir(parents=True, exist_ok=True)
        shutil.chown(path, owner, owner)
        os.chmod(path, mode)


def _network() -> None:
    # Safety first: nothing in 10.77/16 may ever leave through the default route.
    _ip("route", "replace", "unreachable", SAFETY_ROUTE)
    login, compute = NAMESPACES["login"], NAMESPACES["compute"]
    for namespace in (login, compute):
        _new_namespace(namespace, HOSTS_FILE)
    _link("", "hsl-hub", HUB_IP, login, "hsl-l1", LOGIN_IP)
    # The cluster's switch: a bridge in the compute host's namespace (login2 joins it).
    _ip("-n", compute, "link", "add", "hsl-br", "type", "bridge")
    _ip("-n", compute, "addr", "add", f"{COMPUTE_IP}/24", "dev", "hsl-br")
    _ip("-n", compute, "link", "set", "hsl-br", "up")
    _link(login, "hsl-l2", LOGIN_CLUSTER_IP, compute, "hsl-c2", bridge="hsl-br")
    _no_forwarding(login)  # the login host must not route between its two sides


def _new_namespace(namespace: str, hosts: str) -> None:
    """A host's network namespace with its loopback up and its own hosts file."""
    _ip("netns", "add", namespace)
    _ip("-n", namespace, "link", "set", "lo", "up")
    Path(f"/etc/netns/{namespace}").mkdir(parents=True, exist_ok=True)
    Path(f"/etc/netns/{namespace}/hosts").write_text(hosts)


def _link(side: str, device: str, address: str, peer_side: str, peer_device: str,
          peer_address: str = "", bridge: str = "") -> None:
    """A veth pair, both ends up: ``device`` in namespace ``side`` ("": the hub's) with
    ``address``/24, ``peer_device`` in ``peer_side`` with ``peer_address``/24, or a port of
    the bridge ``bridge`` there."""
    def where(namespace: str) -> list[str]:
        return ["-n", namespace] if namespace else []

    _ip(*where(side), "link", "add", device, "type", "veth", "peer", "name", peer_device,
        "netns", peer_side)
    _ip(*where(side), "addr", "add", f"{address}/24", "dev", device)
    _ip(*where(side), "link", "set", device, "up")
    if bridge:
        _ip(*where(peer_side), "link", "set", peer_device, "master", bridge)
    else:
        _ip(*where(peer_side), "addr", "add", f"{peer_address}/24", "dev", peer_device)
    _ip(*where(peer_side), "link", "set", peer_device, "up")


def _no_forwarding(namespace: str) -> None:
    subprocess.run(["ip", "netns", "exec", namespace, "sysctl", "-qw",
                    "net.ipv4.ip_forward=0"], check=True)


def _users_and_keys() -> None:
    KEY_DIR.mkdir(mode=0o700, exist_ok=True)
    os.chmod(KEY_DIR, 0o700)
    for user in USERS:
        _user_with_a_key(user)


def _user_with_a_key(user: str) -> None:
    """Lab user ``user`` (made once, unlocked, no password) with a fresh key in ``KEY_DIR``
    whose public half is their ``authorized_keys``."""
    try:
        pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", user], check=True)
    subprocess.run(["usermod", "-p", "*", user], check=True)  # unlocked, no password
    entry = pwd.getpwnam(user)
    key = _fresh_key(KEY_DIR / user, comment=f"{user}@hub-lab")
    ssh_dir = Path(entry.pw_dir) / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    authorized = ssh_dir / "authorized_keys"
    authorized.write_text(Path(f"{key}.pub").read_text())
    os.chmod(authorized, 0o600)
    for path in (ssh_dir, authorized):
        os.chown(path, entry.pw_uid, entry.pw_gid)


def add_users(count: int) -> list[str]:
    """``count`` benchmark users (``hsu001`` ...), as alice and bob: accounts with homes
    (made once, kept) and, each time, a fresh key in ``KEY_DIR`` (gone with the lab). Returns
    their names."""
    names = [f"{BENCH_USER_PREFIX}{number:03d}" for number in range(1, count + 1)]
    for name in names:
        _user_with_a_key(name)
    return names


def _start_munged() -> int:
    process = subprocess.Popen(
        ["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--foreground", "--force"],
        stdout=subprocess.DEVNULL, stderr=open(LAB_DIR / "munged.log", "w"),
        start_new_session=True,
    )
    _wait_until(lambda: Path("/run/munge/munge.socket.2").exists(), 10, "munged socket")
    return process.pid


def sge_command(command: str, check: bool = True, timeout: float = 30
                ) -> subprocess.CompletedProcess:
    """Run a shell command as root on the login host (Grid Engine's admin and submit host)."""
    return subprocess.run(host_command("login", f"{SGE_ENV} sh -c {shlex.quote(command)}"),
                          check=check, timeout=timeout, capture_output=True, text=True)


def stop_sshd() -> None:
    """Stop the login host's sshd listener (existing sessions live on in their own processes)."""
    state = json.loads(STATE_FILE.read_text())
    stop_pid(state["pids"]["sshd"])


def start_sshd() -> None:
    """Start the login host's sshd again, with the same host key."""
    state = json.loads(STATE_FILE.read_text())
    state["pids"]["sshd"] = _start_sshd()
    _write_state(state)


def _fresh_key(key: Path, comment: str = "") -> Path:
    """A new ed25519 key pair at ``key`` (and ``key``.pub), replacing any old one."""
    key.unlink(missing_ok=True)
    Path(f"{key}.pub").unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", *(["-C", comment] if comment
                    else []), "-f", str(key)], check=True)
    return key


def _configure_sshd() -> None:
    """Host keys of the login and compute hosts, a user CA (for the certificate identity mode:
    both sshds accept a certificate whose principal is the user's name) and the three sshd
    configs (login :22 and :2222, compute :22)."""
    for key in (LAB_DIR / "ssh_host_ed25519_key", LAB_DIR / "ssh_host_compute_ed25519_key",
                USER_CA):
        _fresh_key(key)
    configs = {
        "22": (LOGIN_IP, 22, "ssh_host_ed25519_key"),
        str(TORQUE_PORT): (LOGIN_IP, TORQUE_PORT, "ssh_host_ed25519_key"),
        "compute": (COMPUTE_IP, 22, "ssh_host_compute_ed25519_key"),
    }
    for name, (listen_ip, port, host_key) in configs.items():
        _write_sshd_config(name, listen_ip, port, host_key)


def _write_sshd_config(name: str, listen_ip: str, port: int, host_key: str) -> None:
    config = LAB_DIR / f"sshd_config-{name}"
    config.write_text(SSHD_CONFIG_TEXT.format(listen_ip=listen_ip, run=LAB_DIR, port=port,
                                              name=name, host_key=host_key,
                                              users=" ".join(USERS) + f" {BENCH_USER_PREFIX}*"))
    subprocess.run(["/usr/sbin/sshd", "-t", "-f", str(config)], check=True)


def _sshd_name(host: str, port: int) -> str:
    if host == "compute":
        return "compute"
    return str(port) if host == "login" else f"{host}-{port}"


def _start_sshd(port: int = 22, host: str = "login", name: str = "", ip: str = "") -> int:
    """An sshd of a login host (on ``TORQUE_PORT`` its sessions see the Torque/PBS wrappers
    in /usr/local/bin, first on PATH, so ``qsub`` there is Torque's, not Grid Engine's), the
    compute host's (port 22) or the bastion's; ``name`` and ``ip``: another of a host's."""
    name = name or _sshd_name(host, port)
    config = LAB_DIR / f"sshd_config-{name}"
    binds = {str(TORQUE_WRAPPERS): "/usr/local/bin"} if port == TORQUE_PORT else None
    process = subprocess.Popen(
        host_command(host, f"/usr/sbin/sshd -D -e -f {config}", binds=binds),
        stdout=subprocess.DEVNULL, stderr=open(LAB_DIR / f"sshd-{name}.log", "a"),
        start_new_session=True,
    )
    _wait_until(lambda: _port_open(host, ip or HOST_IPS[host], port), 10,
                f"sshd on the {host} host, port {port}")
    return process.pid


def _start_slurm() -> dict[str, int]:
    run = LAB_DIR / "slurm"
    for sub in ("state", "spool", "log"):
        (run / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(run / sub, "slurm", "slurm")
    SLURM_CONF.parent.mkdir(exist_ok=True)
    # LAB_SLURM_CPUS (bench/scale_bench.py): more Slurm CPUs than the machine has, for many
    # light servers at once; slurmd then takes the configured count over what it detects.
    cpus = int(os.environ.get("LAB_SLURM_CPUS", "2"))
    SLURM_CONF.write_text(SLURM_CONF_TEXT.format(
        login_ip=LOGIN_CLUSTER_IP, compute_ip=COMPUTE_IP, run=LAB_DIR, cpus=cpus,
        slurmd_parameters="SlurmdParameters=config_overrides\n" if cpus > 2 else ""))
    ctld = _start_slurmctld(clear=True)
    slurmd = subprocess.Popen(host_command("compute", "/usr/sbin/slurmd -D"),
                              stdout=subprocess.DEVNULL, stderr=open(run / "log/slurmd.err", "w"),
                              start_new_session=True)
    return {"slurmctld": ctld, "slurmd": slurmd.pid}


def _start_slurmctld(clear: bool) -> int:
    """Slurm's controller on the login host; ``clear``: forget the saved jobs (``-c``)."""
    log = open(LAB_DIR / "slurm/log/ctld.err", "w" if clear else "a")
    ctld = subprocess.Popen(
        host_command("login", f"/usr/sbin/slurmctld -D {'-c ' if clear else ''}-i"),
        stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
    )
    _wait_until(lambda: _port_open("login", LOGIN_CLUSTER_IP, 6817), 20, "slurmctld")
    return ctld.pid


def stop_slurmctld() -> None:
    """Stop Slurm's controller: the scheduler is down (running jobs live on)."""
    state = json.loads(STATE_FILE.read_text())
    stop_pid(state["pids"]["slurmctld"])


def start_slurmctld() -> None:
    """Start Slurm's controller again, with its saved state (jobs, the node)."""
    state = json.loads(STATE_FILE.read_text())
    state["pids"]["slurmctld"] = _start_slurmctld(clear=False)
    _write_state(state)
    _wait_until(lambda: in_namespace("login", ["sinfo", "-h"], check=False).returncode == 0,
                30, "slurmctld answering")


def stop_sge_qmaster() -> None:
    """Stop Grid Engine's qmaster: the scheduler is down (running jobs live on)."""
    state = json.loads(STATE_FILE.read_text())
    stop_pid(state["pids"]["sge_qmaster"])


def start_sge_qmaster() -> None:
    """Start Grid Engine's qmaster again on its spool (jobs, queue, hosts)."""
    state = json.loads(STATE_FILE.read_text())
    qmaster = subprocess.Popen(
        host_command("login", f"{SGE_ENV} SGE_ND=1 /usr/sbin/sge_qmaster"),
        stdout=open(LAB_DIR / "sge" / "qmaster.out", "a"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    state["pids"]["sge_qmaster"] = qmaster.pid
    _write_state(state)
    _wait_until(lambda: sge_command("qstat", check=False).returncode == 0, 30,
                "sge_qmaster answering")


def _wait_for_slurm() -> None:
    def idle() -> bool:
        result = in_namespace("login", ["sinfo", "-h", "-o", "%T"], check=False)
        return set(result.stdout.split()) == {"idle"}  # one line per partition

    _wait_until(idle, 30, "Slurm node 'compute' idle")


def _start_sge() -> dict[str, int]:
    """A fresh Grid Engine cell every time: spool under LAB_DIR, qmaster on login, execd on
    compute, one queue ``all.q`` (2 slots) with parallel environment ``smp``."""
    run = LAB_DIR / "sge"
    shutil.rmtree(run, ignore_errors=True)
    for sub in ("qmaster/job_scripts", "spooldb", "execd", "config"):
        (run / sub).mkdir(parents=True)
    subprocess.run(["chown", "-R", "sgeadmin:sgeadmin", str(run)], check=True)
    common = SGE_ROOT / "default" / "common"
    (common / "accounting").unlink(missing_ok=True)  # a fresh cell restarts job numbers at 1
    (common / "bootstrap").write_text(SGE_BOOTSTRAP_TEXT.format(run=LAB_DIR))
    (common / "act_qmaster").write_text("login\n")
    subprocess.run(
        ["runuser", "-u", "sgeadmin", "--", "/usr/share/gridengine/scripts/init_cluster",
         str(SGE_ROOT), "default", str(run / "spooldb"), "sgeadmin"],
        check=True, capture_output=True, cwd="/",
    )
    # SGE_ND: stay in the foreground, so the PID is ours to stop.
    qmaster = subprocess.Popen(
        host_command("login", f"{SGE_ENV} SGE_ND=1 /usr/sbin/sge_qmaster"),
        stdout=open(run / "qmaster.out", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    _wait_until(lambda: sge_command("qconf -sh", check=False).returncode == 0, 30,
                "sge_qmaster")
    config = run / "config"
    (config / "exec_host").write_text(SGE_EXEC_HOST_TEXT)
    (config / "pe").write_text(SGE_PE_TEXT)
    (config / "queue_editor").write_text(SGE_QUEUE_EDITOR_TEXT)
    os.chmod(config / "queue_editor", 0o755)
    scheduler = sge_command("qconf -ssconf").stdout.splitlines()
    edited = []
    for line in scheduler:
        key = line.split(None, 1)[0] if line.strip() else ""
        edited.append(f"{key} {SGE_SCHEDULER_EDITS[key]}" if key in SGE_SCHEDULER_EDITS else line)
    (config / "scheduler").write_text("\n".join(edited) + "\n")
    # Spool under LAB_DIR; accounting (qacct) flushed every second instead of every 15 s.
    global_config = []
    for line in sge_command("qconf -sconf global").stdout.splitlines():
        if line.startswith("execd_spool_dir"):
            line = f"execd_spool_dir {run}/execd"
        # reporting_params spans continuation lines
        line = line.replace("flush_time=00:00:15", "flush_time=00:00:01")
        if not line.startswith("#"):
            global_config.append(line)
    (config / "global").write_text("\n".join(global_config) + "\n")
    sge_command(
        f"qconf -as login && qconf -as login2 && qconf -ah {COMPUTE_FQDN}"
        f" && qconf -Ae {config}/exec_host"
        f" && qconf -Ap {config}/pe && EDITOR={config}/queue_editor qconf -aq all.q"
        f" && qconf -Msconf {config}/scheduler && cd {config} && qconf -Mconf global"
    )
    execd = subprocess.Popen(
        host_command("compute", f"{SGE_ENV} SGE_ND=1 /usr/sbin/sge_execd"),
        stdout=open(run / "execd.out", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    return {"sge_qmaster": qmaster.pid, "sge_execd": execd.pid}


def _wait_for_sge() -> None:
    def queue_up() -> bool:
        # "all.q@compute.lab.example BIP 0/0/2 0.44 lx-amd64" with no state letters once
        # execd reports.
        result = sge_command("qstat -f -q all.q", check=False)
        for line in result.stdout.splitlines():
            fields = line.split()
            if fields and fields[0] == f"all.q@{COMPUTE_FQDN}":
                return len(fields) == 5 and fields[3] != "-NA-"
        return False

    _wait_until(queue_up, 60, f"Grid Engine queue all.q@{COMPUTE_FQDN} up")


def _write_known_hosts() -> None:
    """The login host by its address (as the hub dials it), and the compute host by the names
    the schedulers report (as the node hop dials it, through the login host): ``compute``
    (Slurm) and its full name (Grid Engine)."""
    public = (LAB_DIR / "ssh_host_ed25519_key.pub").read_text().split()
    compute = (LAB_DIR / "ssh_host_compute_ed25519_key.pub").read_text().split()
    lines = [f"{LOGIN_IP} {public[0]} {public[1]}",
             f"[{LOGIN_IP}]:{TORQUE_PORT} {public[0]} {public[1]}",
             f"compute,{COMPUTE_FQDN} {compute[0]} {compute[1]}"]
    # The login host also by its name: as the hub resolves it while login2 is up, and as a
    # bastion dials it.
    lines += [f"login {public[0]} {public[1]}", f"[login]:{TORQUE_PORT} {public[0]} {public[1]}"]
    login2 = LAB_DIR / "ssh_host_login2_ed25519_key.pub"
    if login2.exists():
        second = login2.read_text().split()
        lines += [f"{LOGIN2_IP},login2 {second[0]} {second[1]}",
                  f"[{LOGIN2_IP}]:{TORQUE_PORT},[login2]:{TORQUE_PORT} {second[0]} {second[1]}"]
    bastion = LAB_DIR / "ssh_host_bastion_ed25519_key.pub"
    if bastion.exists():
        third = bastion.read_text().split()
        lines += [f"{BASTION_IP},bastion {third[0]} {third[1]}"]
    KNOWN_HOSTS.write_text("\n".join(lines) + "\n")


def _hub_hosts(present: bool) -> None:
    """Add (or remove) the lines of the hub's /etc/hosts that name the login hosts."""
    hosts = Path("/etc/hosts")
    lines = hosts.read_text().splitlines()
    kept = [line for line in lines if HUB_HOSTS_MARK not in line]
    if not present and kept == lines:
        return
    if present:
        kept += [f"{LOGIN_IP} login {HUB_HOSTS_MARK}", f"{LOGIN2_IP} login2 {HUB_HOSTS_MARK}"]
    hosts.write_text("\n".join(kept) + "\n")


def add_bastion() -> dict:
    """Add a bastion in front of the first login host (once): its namespace, linked to the
    hub (``BASTION_IP``) and to the login host only (a second sshd of the login host, with
    its host key, listens on that link), its own host key and sshd, in the known_hosts file
    as ``bastion``. The bastion resolves the login host as ``login``. Returns the state."""
    state = json.loads(STATE_FILE.read_text())
    if state.get("bastion"):
        return state
    namespace, login = NAMESPACES["bastion"], NAMESPACES["login"]
    try:
        _new_namespace(namespace, f"127.0.0.1 localhost\n{LOGIN_BASTION_SIDE_IP} login\n")
        _link("", "hsl-hub3", HUB3_IP, namespace, "hsl-b1", BASTION_IP)
        _link(namespace, "hsl-b2", BASTION_INNER_IP, login, "hsl-l3", LOGIN_BASTION_SIDE_IP)
        _no_forwarding(namespace)
        key = _fresh_key(LAB_DIR / "ssh_host_bastion_ed25519_key")
        _write_sshd_config("bastion-22", BASTION_IP, 22, key.name)
        _write_sshd_config("login-bastion-side", LOGIN_BASTION_SIDE_IP, 22,
                           "ssh_host_ed25519_key")
        state["bastion"] = True
        state["pids"]["sshd-bastion-22"] = _start_sshd(22, host="bastion")
        state["pids"]["sshd-login-bastion-side"] = _start_sshd(
            22, host="login", name="login-bastion-side", ip=LOGIN_BASTION_SIDE_IP)
        _write_state(state)
        _write_known_hosts()
    except BaseException:
        _write_state(state)
        down()
        raise
    return state


def login_host_down(host: str = "login") -> None:
    """A login host goes down for the hub: its sshds stop (their sessions live on, cut off)
    and its hub-side link goes down, so every packet to it is dropped."""
    state = json.loads(STATE_FILE.read_text())
    link = "hsl-l1" if host == "login" else "hsl-m1"
    _ip("-n", NAMESPACES[host], "link", "set", link, "down")
    for name, pid in state["pids"].items():
        if name in _hub_side_sshds(host, state):
            stop_pid(pid)


def _hub_side_sshds(host: str, state: dict) -> dict[str, int]:
    """The sshds of login host ``host`` that the hub reaches (name in the state -> port); not
    the first login host's bastion-side one."""
    if host == "login":
        return {"sshd": 22, "sshd-torque": TORQUE_PORT}
    return {name: int(name.rsplit("-", 1)[1]) for name in state["pids"]
            if name.startswith(f"sshd-{host}-")}


def login_host_up(host: str = "login") -> None:
    """Undo ``login_host_down``: the link up, its sshds started again (same host keys)."""
    state = json.loads(STATE_FILE.read_text())
    link = "hsl-l1" if host == "login" else "hsl-m1"
    _ip("-n", NAMESPACES[host], "link", "set", link, "up")
    for name, port in _hub_side_sshds(host, state).items():
        if name in state["pids"] and not _alive(state["pids"][name]):
            state["pids"][name] = _start_sshd(port, host=host)
    _write_state(state)


def _port_open(host: str, ip: str, port: int) -> bool:
    probe = f"exec 3<>/dev/tcp/{ip}/{port}"
    return in_namespace(host, ["bash", "-c", probe], check=False).returncode == 0


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def _alive(pid: int) -> bool:
    """Running (a zombie that only waits to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _namespace_pids(namespace: str) -> list[int]:
    if not Path(f"/run/netns/{namespace}").exists():
        return []
    result = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True,
                            check=False)
    return [int(pid) for pid in result.stdout.split() if pid.isdigit()]


def stop_tunnel_service(directory: Path) -> bool:
    """Stop the tunnel service of ``directory`` and everything it holds (its forwards, its SSH
    masters); False if none was running. Hubs never stop it: demos and tests do."""
    import asyncio

    from hub_spawner.tunnels.client import TunnelClient, TunnelError
    from hub_spawner.tunnels.service import identities_directory

    client = TunnelClient(directory)
    try:
        pid = asyncio.run(client.health())["pid"]
        asyncio.run(client.request({"op": "stop-everything"}, start=False))
    except TunnelError:
        return False
    finally:  # its keys in /dev/shm and its masters, also when it was not running
        shutil.rmtree(identities_directory(directory), ignore_errors=True)
        _stop_masters_of(directory)
    stop_pid(pid)
    return True


def _stop_masters_of(directory: Path) -> None:
    """SIGTERM the ssh masters with a control socket in ``directory`` (a test that failed
    must not leave them logged in for the next one)."""
    sockets = f" -S {directory.resolve() / 'm'}/"
    result = subprocess.run(["pgrep", "-a", "-x", "ssh"], capture_output=True, text=True)
    for line in result.stdout.splitlines():
        pid, _, command = line.partition(" ")
        if sockets in f" {command}" and " -M " in command:
            print(f"lab: stopping ssh master {pid} of {directory}", flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)


def stop_pid(pid: int, timeout: float = 15) -> None:
    """SIGTERM, wait up to ``timeout`` (reaping our own children), then SIGKILL."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            finished = 0 if _alive(pid) else pid
        if finished == pid or not _alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise RuntimeError(f"lab: timed out waiting for {what} (logs in {LAB_DIR})")


def _write_state(state: dict) -> None:
    LAB_DIR.mkdir(parents=True, exist_ok=True)
    STATE_FILE.write_text(json.dumps(state))


def main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else "status"
    if command == "up":
        words = argv[2:]
        login_hosts = 1
        if "--login-hosts" in words:
            at = words.index("--login-hosts")
            login_hosts = int(words[at + 1])
            del words[at:at + 2]
        state = up(tuple(words) or SCHEDULERS, login_hosts)
        print(f"lab up: {state['pids']}")
    elif command == "down":
        down()
        print("lab down")
    elif command == "status":
        print(STATE_FILE.read_text() if STATE_FILE.exists() else "lab is down")
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
