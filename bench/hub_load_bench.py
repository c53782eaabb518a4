"""Hub load benchmark: what 4 servers' downloads through their tunnels cost the hub process.

    make bench-hub    (or: python -m bench.hub_load_bench [--seconds 20] [--probes 400])

A real JupyterHub (the test hub: tests/integration/hub_config.py on the lab, Slurm) with its
configurable-http-proxy, four servers (alice, alice/dl2, bob, bob/dl2: the lab has two cluster
users), each downloading a file from its own server through the proxy and its tunnel with
``curl`` in a loop. Measured, idle and during the downloads, in the same run:
- the hub process's CPU seconds (user + system, from /proc) over the window;
- the hub API's latency: ``GET /hub/api/users/alice`` with a token, one request every 25 ms,
  p50 and p99.
Two placements: unpinned (the kernel schedules everything on both cores), and pinned with
``taskset``: the hub and the latency probe (this process) on core 0, everything the load
consists of (curl, the proxy, the tunnel service's ssh masters, the lab's sshd sessions and the
servers) on core 1, so the hub's own share shows apart from the CPU contention.
Brings the lab up (and down) if it is not up.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from bench.machine import describe
from tests.integration.conftest import Hub, execute, open_kernel, start_hub, stop_hub
from tests.lab import lab

HUB_PORT = 18600
HUB_API = f"http://127.0.0.1:{HUB_PORT + 81}/hub/api"  # the lab config: hub_port = port + 81
SERVERS = (("alice", ""), ("alice", "dl2"), ("bob", ""), ("bob", "dl2"))
FILE_MB = 100


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each window")
    parser.add_argument("--interval", type=float, default=0.025, help="seconds between probes")
    args = parser.parse_args()

    owns_lab = not lab.STATE_FILE.exists()
    if owns_lab:
        lab.up(("slurm",))
    state_dir = Path(tempfile.mkdtemp(prefix="bench-hub-"))
    # The lab node has 2 Slurm CPUs; let four one-core jobs share them for this run.
    _scontrol("update", "PartitionName=debug", "OverSubscribe=FORCE:4")
    hub, process = start_hub(state_dir, HUB_PORT, secrets.token_hex(24))
    try:
        for user in {user for user, _ in SERVERS}:
            hub.api("POST", f"/users/{user}")
        for user, server in SERVERS:
            events, seconds = hub.spawn(user, server)
            if not events or not events[-1].get("ready"):
                raise RuntimeError(f"{user}/{server} did not start: {events[-1:]}")
            print(f"spawned {user}/{server or '(default)'} in {seconds:.1f} s", flush=True)
        for user in ("alice", "bob"):  # one file per home directory, read by both servers
            kernel_id, connection = open_kernel(hub, user)
            execute(connection, f"open('bench.bin','wb').write(b'x' * {FILE_MB << 20})")
            connection.close()
            hub.api_server("DELETE", user, f"/api/kernels/{kernel_id}")

        results = {}
        for placement in ("unpinned", "pinned"):
            pin = placement == "pinned"
            _place(process.pid, state_dir, pin)
            idle = _window(hub, process.pid, args, load=None, pin=pin)
            loaded = _window(hub, process.pid, args, load=SERVERS, pin=pin)
            results[placement] = (idle, loaded)
        _place(process.pid, state_dir, pin=None)
        _report(results, args)
    finally:
        for user, server in SERVERS:
            try:
                hub.stop(user, server)
            except Exception as error:  # the hub's cleanup_servers cancels what is left
                print(f"stopping {user}/{server}: {error}", file=sys.stderr)
        stop_hub(process)
        lab.stop_tunnel_service(state_dir / "tunnels")
        _scontrol("update", "PartitionName=debug", "OverSubscribe=NO")
        if owns_lab:
            lab.down()
    return 0


def _window(hub: Hub, hub_pid: int, args, load, pin: bool) -> dict:
    """One measurement window, with the downloads running or not: first the hub's CPU with no
    request of ours, then API latencies straight to the hub and through the proxy."""
    downloads = [_download_loop(hub, user, server, pin) for user, server in load or ()]
    try:
        time.sleep(2 if downloads else 0.5)  # let the downloads get going
        cpu_before, started = _cpu_seconds(hub_pid), time.monotonic()
        time.sleep(args.seconds)
        cpu, cpu_seconds = _cpu_seconds(hub_pid) - cpu_before, time.monotonic() - started
        direct = _probe(hub, HUB_API, args)
        proxied = _probe(hub, f"{hub.url}/hub/api", args)
    finally:
        for download in downloads:
            download.terminate()
        moved = sum(_bytes_moved(download) for download in downloads)
    seconds = time.monotonic() - started
    return {"cpu_s": cpu, "cpu_window": cpu_seconds, "mb_s": moved / 1e6 / seconds,
            "direct": direct, "proxied": proxied}


def _probe(hub: Hub, api: str, args) -> dict:
    """``GET {api}/users/alice`` every ``interval`` for ``seconds``: p50 and p99 in ms."""
    session = requests.Session()
    headers = {"Authorization": f"token {hub.token}"}
    latencies: list[float] = []
    started = time.monotonic()
    while time.monotonic() - started < args.seconds:
        began = time.perf_counter()
        session.get(f"{api}/users/alice", headers=headers, timeout=30).raise_for_status()
        latencies.append(time.perf_counter() - began)
        time.sleep(args.interval)
    return {"p50_ms": _pct(latencies, 0.5), "p99_ms": _pct(latencies, 0.99),
            "probes": len(latencies)}


def _download_loop(hub: Hub, user: str, server: str, pin: bool) -> subprocess.Popen:
    """curl fetching the user's file through the proxy and the tunnel, again and again; the
    byte count of each fetch is printed on its own line."""
    prefix = f"/user/{user}/{server + '/' if server else ''}"
    url = f"{hub.url}{prefix}files/bench.bin"
    script = (f'while :; do curl -sf -o /dev/null -w "%{{size_download}}\\n" '
              f'-H "Authorization: token $TOKEN" {url} || exit 1; done')
    command = ["sh", "-c", script]
    if pin:
        command = ["taskset", "-c", "1", *command]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, TOKEN=hub.token))


def _bytes_moved(download: subprocess.Popen) -> int:
    output, _ = download.communicate(timeout=10)
    return sum(int(line) for line in output.split() if line.isdigit())


def _place(hub_pid: int, state_dir: Path, pin: bool | None) -> None:
    """Pin the hub and this process to core 0 and the load's processes to core 1 (pin=True),
    or let every one of them run on both cores (pin=False or None)."""
    cores_hub, cores_load = ("0", "1") if pin else ("0,1", "0,1")
    _taskset(cores_hub, [hub_pid, os.getpid()])
    load = _children(hub_pid)  # the proxy
    load += _pids_of("-f", f"ssh .*-S {state_dir}/tunnels")  # the tunnel service's masters
    for user in ("alice", "bob"):
        load += _pids_of("-u", user)  # their sshd sessions on the login host and their servers
    _taskset(cores_load, load)


def _taskset(cores: str, pids: list[int]) -> None:
    for pid in pids:
        subprocess.run(["taskset", "-a", "-p", "-c", cores, str(pid)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _children(pid: int) -> list[int]:
    output = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(word) for word in output.split()]


def _pids_of(*pgrep_args: str) -> list[int]:
    output = subprocess.run(["pgrep", *pgrep_args], capture_output=True, text=True).stdout
    return [int(word) for word in output.split()]


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000


def _scontrol(*args: str) -> None:
    lab.in_namespace("login", ["scontrol", *args])


def _report(results: dict, args) -> None:
    print(f"\n{describe()}")
    print(f"windows of {args.seconds:.0f} s each (hub CPU with no probe; then probes straight to "
          f"the hub; then through the proxy); a probe every {args.interval * 1000:.0f} ms\n")
    print("| placement | window | downloads MB/s | hub CPU % | hub API p50 ms | hub API p99 ms "
          "| via proxy p50 ms | via proxy p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for placement, (idle, loaded) in results.items():
        for name, row in (("idle", idle), ("4 downloads", loaded)):
            print(f"| {placement} | {name} | {row['mb_s']:.0f} | "
                  f"{100 * row['cpu_s'] / row['cpu_window']:.1f} | "
                  f"{row['direct']['p50_ms']:.1f} | {row['direct']['p99_ms']:.1f} | "
                  f"{row['proxied']['p50_ms']:.1f} | {row['proxied']['p99_ms']:.1f} |")
        ratio = {path: {key: loaded[path][key] / idle[path][key] for key in ("p50_ms", "p99_ms")}
                 for path in ("direct", "proxied")}
        print(f"| {placement} | **ratio loaded / idle** | | | "
              f"**{ratio['direct']['p50_ms']:.2f}** | **{ratio['direct']['p99_ms']:.2f}** | "
              f"**{ratio['proxied']['p50_ms']:.2f}** | **{ratio['proxied']['p99_ms']:.2f}** |")
    for placement, (_, loaded) in results.items():
        gigabytes = loaded["mb_s"] * loaded["cpu_window"] / 1000
        print(f"{placement}: the hub used {loaded['cpu_s']:.2f} CPU-s in "
              f"{loaded['cpu_window']:.0f} s while about {gigabytes:.1f} GB went through "
              "the tunnels")


if __name__ == "__main__":
    sys.exit(main())
