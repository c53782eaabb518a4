"""Scale: one hub with 0, 1, 50 and 200 servers on the lab's Slurm, and a spawn storm of 50.

    make bench-scale    (or: python -m bench.scale_bench [--window 60] [--storm 50])

Needs the lab down (it brings up its own, Slurm only, with ``LAB_SLURM_CPUS=256``: the compute
host then offers 256 Slurm CPUs, ``SlurmdParameters=config_overrides``) and takes it down.
The hub is the test hub (tests/integration/hub_config.py) with its proxy and tunnel service,
the status watch listing every 10 s as alice (``status_cluster_username``: Slurm shows her
every user's jobs) and JupyterHub polling each server every 30 s (its default). The servers
are named servers of alice and bob (the lab's two cluster users), ``light-N``: the lab's
``light-`` scenario runs JupyterHub's own light test server (``jupyterhub.tests.mocksu``) as
the job's server, behind the same launcher, ready line and tunnels as a real one.

Order: N = 0; a storm of ``--storm`` spawns pressed at random moments within 10 s (seeded),
which then are the N = 50; up to N = 200 (spawned 10 at a time); down to N = 1. At each N,
after 15 s of rest:
- a ``--window`` of seconds with nothing of ours asking the hub anything: the hub's CPU
  seconds (user + system, /proc), the tunnel service's and its SSH masters', slurmctld's
  job-listing RPCs (``sdiag``: REQUEST_JOB_INFO) per status cycle, the sshd processes of alice
  and bob on the login node (one per SSH connection), the hub's RSS;
- then 20 s of ``GET /hub/api/`` every 50 ms (the hub's event loop answering), p50 and p99.
The storm: time from the first press to the last ready, and the same run's floor: for each
spawn, its press plus the scheduler's own part (submitted to the job's first line) plus the
server's own start-up (the launcher's timestamps), of which the latest.
"""

from __future__ import annotations

import argparse
import asyncio
import os
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

import requests

from bench.machine import describe
from bench.spawn_latency import _job_stamps, press_start
from tests.integration.conftest import Hub, processes_on, start_hub, stop_hub
from tests.lab import lab

HUB_PORT = 18800
STATUS_INTERVAL = 10.0
USERS = ("alice", "bob")
RAMP_ERRORS: list[str] = []  # spawns that failed on the way up to --top


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--window", type=float, default=60.0, help="seconds of rest measured")
    parser.add_argument("--storm", type=int, default=50, help="spawns in the storm")
    parser.add_argument("--top", type=int, default=200, help="most servers at once")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    if lab.STATE_FILE.exists():
        print("the lab is up: this benchmark needs its own (256 Slurm CPUs); take it down first",
              file=sys.stderr)
        return 2
    os.environ["LAB_SLURM_CPUS"] = "256"
    lab.up(("slurm",))
    state_dir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    hub, process = start_hub(state_dir, HUB_PORT, secrets.token_hex(24), {
        "HUB_STATUS_USER": "alice", "HUB_CLUSTER_STATUS_INTERVAL": str(STATUS_INTERVAL)})
    running: list[tuple[str, str]] = []
    rows: list[dict] = []
    storm: dict = {}
    try:
        for user in USERS:
            hub.api("POST", f"/users/{user}")
        rows.append(_measure(hub, process.pid, state_dir, 0, args))
        storm = _storm(hub, args, running)
        rows.append(_measure(hub, process.pid, state_dir, len(running), args))
        _spawn_up_to(hub, args.top, running)
        rows.append(_measure(hub, process.pid, state_dir, len(running), args))
        _stop_down_to(hub, 1, running)
        rows.append(_measure(hub, process.pid, state_dir, len(running), args))
    finally:
        _stop_down_to(hub, 0, running)
        stop_hub(process)
        lab.stop_tunnel_service(state_dir / "tunnels")
        lab.down()
    _report(sorted(rows, key=lambda row: row["servers"]), storm, args)
    return 0


def _names():
    """light-1 of alice, light-1 of bob, light-2 of alice, ..."""
    number = 0
    while True:
        number += 1
        for user in USERS:
            yield user, f"light-{number}"


def _spawn_one(hub: Hub, user: str, server: str, delay: float = 0.0) -> dict:
    """Press Start for USER/SERVER after ``delay`` s; follow it to ready. Wall-clock times."""
    time.sleep(delay)
    return press_start(hub, user, server, timeout=300)


def _storm(hub: Hub, args, running: list) -> dict:
    rng = random.Random(args.seed)
    names = _names()
    plan = [(*next(names), rng.uniform(0, 10)) for _ in range(args.storm)]
    with ThreadPoolExecutor(len(plan)) as pool:
        results = list(pool.map(lambda p: _spawn_one(hub, *p), plan))
    errors = [r["error"] for r in results if "error" in r]
    good = [r for r in results if "ready" in r]
    running.extend((r["user"], r["server"]) for r in good)
    first = min(r["pressed"] for r in good)
    floors = []
    for r in good:
        stamps = _job_stamps(r["job"])
        floors.append(r["pressed"] + (stamps["job started"] - r["submitted"])
                      + (stamps["the server listens"] - stamps["starting the server"]))
    storm = {"spawns": len(plan), "ready": len(good), "errors": errors,
             "last_ready": max(r["ready"] for r in good) - first,
             "floor": max(floors) - first,
             "press_to_ready_p50": statistics.median(r["ready"] - r["pressed"] for r in good),
             "press_to_ready_max": max(r["ready"] - r["pressed"] for r in good)}
    print(f"storm: {storm}", flush=True)
    return storm


def _spawn_up_to(hub: Hub, count: int, running: list) -> None:
    names = (name for name in _names() if name not in set(running))
    while len(running) < count:
        batch = [next(names) for _ in range(min(10, count - len(running)))]
        with ThreadPoolExecutor(len(batch)) as pool:
            results = list(pool.map(lambda name: _spawn_one(hub, *name), batch))
        for result in results:
            if "error" in result:  # counted and reported; the name is tried again
                RAMP_ERRORS.append(result["error"])
                print(f"failed: {result['error'][:300]}", flush=True)
                if len(RAMP_ERRORS) > 10:
                    raise RuntimeError("more than 10 spawns failed on the way up")
                continue
            running.append((result["user"], result["server"]))
        print(f"{len(running)} servers", flush=True)


def _stop_down_to(hub: Hub, count: int, running: list) -> None:
    while len(running) > count:
        batch = [running.pop() for _ in range(min(20, len(running) - count))]
        with ThreadPoolExecutor(len(batch)) as pool:
            list(pool.map(lambda name: hub.stop(*name), batch))


def _measure(hub: Hub, hub_pid: int, state_dir: Path, servers: int, args) -> dict:
    time.sleep(15)
    service_pid = _service_pid(state_dir / "tunnels")
    listings_before = _job_info_rpcs()
    hub_cpu, service_cpu = _cpu(hub_pid), _tree_cpu(service_pid)
    started = time.monotonic()
    time.sleep(args.window)
    seconds = time.monotonic() - started
    row = {
        "servers": servers,
        "hub_cpu_per_min": (_cpu(hub_pid) - hub_cpu) * 60 / seconds,
        "service_cpu_per_min": (_tree_cpu(service_pid) - service_cpu) * 60 / seconds,
        "listings_per_cycle": (_job_info_rpcs() - listings_before) / (seconds / STATUS_INTERVAL),
        "sshd": sum(len(processes_on("login", user, "sshd")) for user in USERS),
        "hub_rss_mb": _rss_mb(hub_pid),
    }
    row.update(_probe(hub))
    print(f"N={servers}: {row}", flush=True)
    return row


def _service_pid(directory: Path) -> int:
    from hub_spawner.tunnels.client import TunnelClient, TunnelError

    try:
        return int(asyncio.run(TunnelClient(directory).health())["pid"])
    except TunnelError:
        return 0  # none yet (N = 0)


def _probe(hub: Hub, seconds: float = 20.0, interval: float = 0.05) -> dict:
    session = requests.Session()
    session.headers["Authorization"] = f"token {hub.token}"
    latencies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        response = session.get(f"{hub.url}/hub/api/", timeout=10)
        latencies.append(time.perf_counter() - started)
        response.raise_for_status()
        time.sleep(interval)
    ordered = sorted(latencies)
    return {"api_p50_ms": 1000 * statistics.median(ordered),
            "api_p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def _job_info_rpcs() -> int:
    text = lab.in_namespace("login", ["sdiag"]).stdout
    return sum(int(count) for count in re.findall(
        r"^\s*REQUEST_JOB_INFO(?:_SINGLE)?\s+\(\s*\d+\)\s+count:(\d+)", text, re.M))


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its live children (the service's ssh masters)."""
    if not pid:
        return 0.0
    total = _cpu(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return total + sum(_tree_cpu(int(child)) for child in children)


def _rss_mb(pid: int) -> float:
    found = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(found.group(1)) / 1024 if found else 0.0


def _report(rows: list[dict], storm: dict, args) -> None:
    print(f"\n{describe()}")
    print(f"rest windows of {args.window:.0f} s; status watch every {STATUS_INTERVAL:.0f} s as "
          "alice; JupyterHub poll_interval 30 s\n")
    print("| servers | Slurm job listings per cycle | sshd (SSH connections) on the login node "
          "| hub CPU-s per min | tunnel service + masters CPU-s per min | hub RSS MB "
          "| API p50 ms | API p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['servers']} | {row['listings_per_cycle']:.2f} | {row['sshd']} | "
              f"{row['hub_cpu_per_min']:.2f} | {row['service_cpu_per_min']:.2f} | "
              f"{row['hub_rss_mb']:.0f} | {row['api_p50_ms']:.1f} | {row['api_p99_ms']:.1f} |")
    base = rows[0]
    for row in rows[1:]:
        extra = row["servers"] or 1
        more_cpu = row["hub_cpu_per_min"] - base["hub_cpu_per_min"]
        p99 = row["api_p99_ms"] / base["api_p99_ms"]
        print(f"N={row['servers']} vs 0: hub CPU +{more_cpu:.2f} s/min, API p99 x{p99:.2f}, RSS "
              f"+{(row['hub_rss_mb'] - base['hub_rss_mb']) * 1024 / extra:.0f} KB per server")
    print(f"spawns failed on the way up (tried again): {len(RAMP_ERRORS)}")
    for error in RAMP_ERRORS:
        print(f"  {error[:300]}")
    if storm:
        print(f"storm: {storm['ready']}/{storm['spawns']} ready, {len(storm['errors'])} errors; "
              f"last ready {storm['last_ready']:.1f} s after the first press; floor "
              f"{storm['floor']:.1f} s; ratio {storm['last_ready'] / storm['floor']:.2f}; "
              f"press to ready p50 {storm['press_to_ready_p50']:.1f} s, max "
              f"{storm['press_to_ready_max']:.1f} s")
        for error in storm["errors"]:
            print(f"  {error}")


if __name__ == "__main__":
    threading.stack_size(512 * 1024)
    sys.exit(main())
