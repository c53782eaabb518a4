"""Distinct users: one hub, N lab users (hsu001 ...) with one light server each, on the lab's Slurm.

    make bench-users    (or: python -m bench.users_bench [--steps 100,200,500] [--storm 100])

Needs the lab down (it brings up its own, Slurm only, with ``LAB_SLURM_CPUS`` one per server
and some to spare) and takes it down. The hub is the test hub (tests/integration/hub_config.py)
with its proxy and tunnel service; the status watch lists every 10 s as alice (the status
identity: Slurm shows her every user's jobs); JupyterHub polls each server every 30 s. Each
user's server is ``light-1`` (the lab's light scenario: JupyterHub's own test server behind the
same launcher, ready line and tunnels as a real one). Each user logs in with their own key, so
the tunnel service keeps one OpenSSH master per user and the login node one sshd per master.

Order: N = 0; a storm of ``--storm`` distinct users pressing Start at random moments within
10 s (seeded); then up to each of ``--steps`` (spawned 20 at a time). At each N, after 15 s of
rest, a ``--window`` with nothing of ours asking the hub anything, then 20 s of
``GET /hub/api/`` every 50 ms:
- the tunnel service and its ssh masters: CPU seconds, and memory as PSS and private bytes
  (``/proc/PID/smaps_rollup``), per user;
- ssh processes on the hub's side, sshd processes of the benchmark users on the login node;
- slurmctld's job-listing RPCs (``sdiag``) per status cycle;
- the hub's RSS and open files, the hub API's p50 and p99.
The storm: time from the first press to the last ready, against the same storm's floor (for
each spawn: its press plus the scheduler's own part plus the server's own start-up, from the
launcher's timestamps; the latest of those).
A spawn that fails on the way up is reported with its message; more than 10 end the ramp there
(the first thing that broke, with the N reached).
"""

from __future__ import annotations

import argparse
import os
import pwd
import random
import re
import secrets
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.machine import describe
from bench.scale_bench import _cpu, _job_info_rpcs, _probe, _rss_mb, _service_pid, _tree_cpu
from bench.spawn_latency import _job_stamps, press_start
from tests.integration.conftest import Hub, start_hub, stop_hub
from tests.lab import lab

HUB_PORT = 18800
STATUS_INTERVAL = 10.0
SERVER = "light-1"
ERRORS: list[str] = []
MIN_AVAILABLE_MB = 2048


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", default="100,200,500",
                        help="numbers of users with a server to measure at (after the storm)")
    parser.add_argument("--storm", type=int, default=100, help="distinct users in the storm")
    parser.add_argument("--window", type=float, default=30.0, help="seconds of rest measured")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    steps = sorted(int(step) for step in args.steps.split(","))
    if lab.STATE_FILE.exists():
        print("the lab is up: this benchmark needs its own; take it down first", file=sys.stderr)
        return 2
    top = max(steps + [args.storm])
    os.environ["LAB_SLURM_CPUS"] = str(top + 16)
    lab.up(("slurm",))
    started = time.monotonic()
    users = lab.add_users(top)
    print(f"{top} users made in {time.monotonic() - started:.0f} s", flush=True)
    state_dir = Path(tempfile.mkdtemp(prefix="bench-users-"))
    hub, process = start_hub(state_dir, HUB_PORT, secrets.token_hex(24), {
        "HUB_STATUS_USER": "alice", "HUB_CLUSTER_STATUS_INTERVAL": str(STATUS_INTERVAL)})
    running: list[str] = []
    rows: list[dict] = []
    storm: dict = {}
    broke = ""
    try:
        for user in ["alice", *users]:
            hub.api("POST", f"/users/{user}")
        rows.append(_measure(hub, process.pid, state_dir, running, args))
        storm = _storm(hub, users[:args.storm], args, running)
        rows.append(_measure(hub, process.pid, state_dir, running, args))
        for step in steps:
            if step <= len(running):
                continue
            broke = _spawn_up_to(hub, users, step, running)
            rows.append(_measure(hub, process.pid, state_dir, running, args))
            if broke:
                break
    finally:
        _stop_all(hub, running)
        stop_hub(process)
        lab.stop_tunnel_service(state_dir / "tunnels")
        lab.down()
    _report(rows, storm, broke, args)
    return 0


def _storm(hub: Hub, users: list[str], args, running: list[str]) -> dict:
    rng = random.Random(args.seed)
    plan = [(user, rng.uniform(0, 10)) for user in users]

    def one(user: str, delay: float) -> dict:
        time.sleep(delay)
        return press_start(hub, user, SERVER, timeout=600)

    with ThreadPoolExecutor(len(plan)) as pool:
        results = list(pool.map(lambda p: one(*p), plan))
    errors = [r["error"] for r in results if "error" in r]
    good = [r for r in results if "ready" in r]
    running.extend(r["user"] for r in good)
    first = min(r["pressed"] for r in results)
    floors = []
    for r in good:
        stamps = _job_stamps(r["job"])
        floors.append(r["pressed"] + (stamps["job started"] - r["submitted"])
                      + (stamps["the server listens"] - stamps["starting the server"]))
    ready = sorted(r["ready"] - r["pressed"] for r in good)
    storm = {"spawns": len(plan), "ready": len(good), "errors": errors,
             "last_ready": max(r["ready"] for r in good) - first,
             "floor": max(floors) - first,
             "click_to_ready_p50": statistics.median(ready),
             "click_to_ready_p99": ready[min(len(ready) - 1, int(0.99 * len(ready)))]}
    print(f"storm: {storm}", flush=True)
    return storm


def _spawn_up_to(hub: Hub, users: list[str], count: int, running: list[str]) -> str:
    """Spawn the next users' servers, 20 at a time, up to ``count``; what broke, if the ramp
    had to end ("" if not)."""
    waiting = [user for user in users if user not in set(running)]
    while len(running) < count and waiting:
        available = _available_mb()
        if available < MIN_AVAILABLE_MB:  # all hosts share this machine's memory
            return (f"this machine's memory at N={len(running)}: {available:.0f} MB available "
                    f"(the servers on the compute host use most; stopped below "
                    f"{MIN_AVAILABLE_MB} MB)")
        batch = [waiting.pop(0) for _ in range(min(20, count - len(running), len(waiting)))]
        with ThreadPoolExecutor(len(batch)) as pool:
            results = list(pool.map(lambda user: press_start(hub, user, SERVER, timeout=600),
                                    batch))
        for result in results:
            if "error" in result:
                ERRORS.append(f"at N={len(running)}: {result['error']}")
                print(f"failed: {result['error'][:300]}", flush=True)
            else:
                running.append(result["user"])
        if len(ERRORS) > 10:
            return f"more than 10 spawns failed by N={len(running)}: {ERRORS[-1][:300]}"
        print(f"{len(running)} users with a server", flush=True)
    return ""


def _available_mb() -> float:
    found = re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    return int(found.group(1)) / 1024 if found else 0.0


def _stop_all(hub: Hub, running: list[str]) -> None:
    while running:
        batch = [running.pop() for _ in range(min(20, len(running)))]
        with ThreadPoolExecutor(len(batch)) as pool:
            list(pool.map(lambda user: hub.stop(user, SERVER), batch))


def _measure(hub: Hub, hub_pid: int, state_dir: Path, running: list[str], args) -> dict:
    time.sleep(15)
    service_pid = _service_pid(state_dir / "tunnels")
    listings_before = _job_info_rpcs()
    hub_cpu, service_cpu = _cpu(hub_pid), _tree_cpu(service_pid)
    started = time.monotonic()
    time.sleep(args.window)
    seconds = time.monotonic() - started
    memory = _tree_memory(service_pid)
    row = {
        "users": len(running),
        "hub_cpu_per_min": (_cpu(hub_pid) - hub_cpu) * 60 / seconds,
        "service_cpu_per_min": (_tree_cpu(service_pid) - service_cpu) * 60 / seconds,
        "service_pss_mb": memory["Pss"] / 1024,
        "service_private_mb": memory["Private"] / 1024,
        "ssh": len(_children(service_pid)),
        "login_sshd": _bench_sshd_on_login(),
        "listings_per_cycle": (_job_info_rpcs() - listings_before) / (seconds / STATUS_INTERVAL),
        "hub_rss_mb": _rss_mb(hub_pid),
        "hub_fds": len(os.listdir(f"/proc/{hub_pid}/fd")),
        "available_mb": _available_mb(),
    }
    row.update(_probe(hub))
    print(f"N={row['users']}: {row}", flush=True)
    return row


def _children(pid: int) -> list[int]:
    if not pid:
        return []
    try:
        return [int(child) for child in
                Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _tree_memory(pid: int) -> dict[str, int]:
    """PSS and private memory (kB) of ``pid`` and its children (the ssh masters)."""
    total = {"Pss": 0, "Private": 0}
    for each in ([pid] if pid else []) + _children(pid):
        try:
            text = Path(f"/proc/{each}/smaps_rollup").read_text()
        except OSError:
            continue
        for name, value in re.findall(r"^(\w+):\s+(\d+) kB", text, re.M):
            if name == "Pss":
                total["Pss"] += int(value)
            elif name in ("Private_Clean", "Private_Dirty"):
                total["Private"] += int(value)
    return total


def _bench_sshd_on_login() -> int:
    """sshd processes of the benchmark users in the login host's namespace (one /proc scan)."""
    uids = {entry.pw_uid for entry in pwd.getpwall()
            if entry.pw_name.startswith(lab.BENCH_USER_PREFIX)}
    namespace = os.stat(f"/run/netns/{lab.NAMESPACES['login']}").st_ino
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if (os.stat(f"/proc/{pid}").st_uid in uids
                    and os.stat(f"/proc/{pid}/ns/net").st_ino == namespace
                    and Path(f"/proc/{pid}/comm").read_text().strip() == "sshd"):
                count += 1
        except OSError:
            continue
    return count


def _report(rows: list[dict], storm: dict, broke: str, args) -> None:
    print(f"\n{describe()}")
    print(f"rest windows of {args.window:.0f} s; status watch every {STATUS_INTERVAL:.0f} s as "
          "alice; JupyterHub poll_interval 30 s; one light server per user\n")
    print("| users with a server | Slurm listings per cycle | ssh (hub side) | login sshd "
          "| tunnel service + masters PSS MB | private MB | CPU-s per min | hub CPU-s per min "
          "| hub RSS MB | hub fds | API p50 ms | API p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['users']} | {row['listings_per_cycle']:.2f} | {row['ssh']} | "
              f"{row['login_sshd']} | {row['service_pss_mb']:.1f} | "
              f"{row['service_private_mb']:.1f} | {row['service_cpu_per_min']:.2f} | "
              f"{row['hub_cpu_per_min']:.2f} | {row['hub_rss_mb']:.0f} | {row['hub_fds']} | "
              f"{row['api_p50_ms']:.1f} | {row['api_p99_ms']:.1f} |")
    base = rows[0]
    for row in rows[1:]:
        users = row["users"] or 1
        print(f"N={row['users']} vs 0: API p99 x{row['api_p99_ms'] / base['api_p99_ms']:.2f}; "
              f"per user: tunnel service + masters "
              f"{(row['service_pss_mb'] - base['service_pss_mb']) * 1024 / users:.0f} KB PSS, "
              f"{(row['service_private_mb'] - base['service_private_mb']) * 1024 / users:.0f} KB "
              f"private, {row['service_cpu_per_min'] / users * 1000:.1f} ms CPU per min; "
              f"{row['ssh'] / users:.2f} ssh here, {row['login_sshd'] / users:.2f} sshd on the "
              "login node")
    if storm:
        print(f"storm of {storm['spawns']} distinct users: {storm['ready']} ready, "
              f"{len(storm['errors'])} errors; last ready {storm['last_ready']:.1f} s after the "
              f"first press, floor {storm['floor']:.1f} s, ratio "
              f"{storm['last_ready'] / storm['floor']:.2f}; click to ready p50 "
              f"{storm['click_to_ready_p50']:.1f} s, p99 {storm['click_to_ready_p99']:.1f} s")
        for error in storm["errors"]:
            print(f"  {error[:300]}")
    print(f"spawns that failed on the way up: {len(ERRORS)}")
    for error in ERRORS:
        print(f"  {error[:300]}")
    print(f"the ramp ended early: {broke}" if broke else "the ramp reached every step")


if __name__ == "__main__":
    threading.stack_size(512 * 1024)
    sys.exit(main())
