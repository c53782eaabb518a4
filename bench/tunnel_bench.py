"""Tunnel benchmark: hub_spawner's tunnel service vs OpenSSH ``ssh -L``, same lab, same run.

    make bench        (or: python -m bench.tunnel_bench [--reps 5] [--bulk-mb 200])

Both tunnels go hub -> login sshd -> compute:PORT in the lab (tests/lab/lab.py); the load comes
from this process. Ours is a forward the tunnel service (hub_spawner.tunnels) holds, asked for as
the spawner asks; its bytes move in the service's OpenSSH master, whose CPU is what is counted
(the service process's own CPU is reported beside it). Paths are measured interleaved,
``--reps`` times; medians are reported with ratios ours/OpenSSH. Brings the lab up (and down)
if it is not up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tornado import websocket

from bench.machine import describe
from hub_spawner.tunnels.client import TunnelClient
from hub_spawner.tunnels.forwards import Login
from tests.lab import lab

TARGET_PORT = 18888
SSH_L_PORT = 18889


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bulk_mb_per_s(port: int, megabytes: int) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/bulk?mb={megabytes}") as response:
        while response.read(1 << 20):
            pass
    return megabytes / (time.perf_counter() - started)


async def websocket_round_trips(port: int, count: int) -> list[float]:
    connection = await websocket.websocket_connect(f"ws://127.0.0.1:{port}/ws")
    payload = "m" * 1024
    times = []
    for _ in range(count):
        started = time.perf_counter()
        await connection.write_message(payload)
        await connection.read_message()
        times.append(time.perf_counter() - started)
    connection.close()
    return times


async def concurrent_round_trips(port: int, sockets: int, each: int) -> list[float]:
    """``sockets`` websockets at once, ``each`` 1 KB round trips on every one; all latencies."""
    results = await asyncio.gather(*(websocket_round_trips(port, each) for _ in range(sockets)))
    return [latency for latencies in results for latency in latencies]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def measure(port: int, pid: int, bulk_mb: int, round_trips: int) -> dict[str, float]:
    cpu_before = cpu_seconds(pid)
    rate = bulk_mb_per_s(port, bulk_mb)
    cpu_per_gb = (cpu_seconds(pid) - cpu_before) / (bulk_mb / 1024)
    times = asyncio.run(websocket_round_trips(port, round_trips))
    crowd = asyncio.run(concurrent_round_trips(port, 100, 50))
    return {"bulk_mb_s": rate, "cpu_s_per_gb": cpu_per_gb,
            "ws_p50_us": percentile(times, 0.5) * 1e6, "ws_p99_us": percentile(times, 0.99) * 1e6,
            "ws100_p99_us": percentile(crowd, 0.99) * 1e6}


def wait_for_port(port: int, timeout: float = 15) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--bulk-mb", type=int, default=200)
    parser.add_argument("--round-trips", type=int, default=2000)
    args = parser.parse_args()

    owns_lab = not lab.STATE_FILE.exists()
    if owns_lab:
        lab.up()
    python = str(lab.LAB_PREFIX / "venv/bin/python")
    key, known_hosts = str(lab.KEY_DIR / "alice"), str(lab.KNOWN_HOSTS)
    processes = []
    service_dir = Path(tempfile.mkdtemp(prefix="bench-tun-"))
    try:
        target = subprocess.Popen(lab.host_command(
            "compute", f"{python} {os.path.dirname(__file__)}/target_server.py {TARGET_PORT}"))
        processes.append(target)
        time.sleep(1.5)
        # OpenSSH reference: same cipher, no compression, and a session (the stall fix).
        openssh = subprocess.Popen([
            "ssh", "-i", key, "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "Ciphers=aes128-gcm@openssh.com",
            "-o", "Compression=no", "-o", "ExitOnForwardFailure=yes",
            "-L", f"127.0.0.1:{SSH_L_PORT}:compute:{TARGET_PORT}",
            f"alice@{lab.LOGIN_IP}", "sleep 3600"], stdin=subprocess.DEVNULL)
        processes.append(openssh)
        client = TunnelClient(service_dir, python)
        login = Login(lab.LOGIN_IP, 22, "alice", key, known_hosts)
        our_port = asyncio.run(
            client.ensure_local("bench", login, "127.0.0.1", "compute", TARGET_PORT))
        master_pid = asyncio.run(client.forwards())["bench"]["master_pid"]
        service_pid = asyncio.run(client.health())["pid"]
        service_cpu_before = cpu_seconds(service_pid)
        wait_for_port(SSH_L_PORT)
        paths = {"OpenSSH ssh -L": (SSH_L_PORT, openssh.pid), "hub_spawner": (our_port, master_pid)}
        for port, pid in paths.values():  # warm-up
            measure(port, pid, 20, 200)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
        for _ in range(args.reps):
            for name, (port, pid) in paths.items():
                results[name].append(measure(port, pid, args.bulk_mb, args.round_trips))
        report(results, args)
        print(f"\ntunnel service process (control only) CPU during the run: "
              f"{cpu_seconds(service_pid) - service_cpu_before:.2f} s")
    finally:
        lab.stop_tunnel_service(service_dir)
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=10)
        if owns_lab:
            lab.down()
    return 0


def report(results, args) -> None:
    medians = {name: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
               for name, runs in results.items()}
    reference, ours = medians["OpenSSH ssh -L"], medians["hub_spawner"]
    print(f"\n{describe()}")
    print(f"run: {args.reps} interleaved reps, bulk {args.bulk_mb} MB, "
          f"{args.round_trips} websocket round trips of 1 KB; medians\n")
    print("| path | bulk MB/s | tunnel CPU-s per GB | WS RTT p50 us | WS RTT p99 us "
          "| 100 WS p99 us |")
    print("|---|---|---|---|---|---|")
    for name, row in medians.items():
        print(f"| {name} | {row['bulk_mb_s']:.0f} | {row['cpu_s_per_gb']:.2f} | "
              f"{row['ws_p50_us']:.0f} | {row['ws_p99_us']:.0f} | {row['ws100_p99_us']:.0f} |")
    print(f"| ratio hub_spawner / OpenSSH | {ours['bulk_mb_s'] / reference['bulk_mb_s']:.2f} | "
          f"{ours['cpu_s_per_gb'] / reference['cpu_s_per_gb']:.2f} | "
          f"{ours['ws_p50_us'] / reference['ws_p50_us']:.2f} | "
          f"{ours['ws_p99_us'] / reference['ws_p99_us']:.2f} | "
          f"{ours['ws100_p99_us'] / reference['ws100_p99_us']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
