"""A user's own job output cannot hurt the hub (issue 28). alice owns her job's output file
and may append anything to it while her spawn waits; the hub follows that file. Before the
fix, 256 MiB with no newline made the hub copy an ever larger partial line on its one event
loop: the hub API's p99 for other requests went from 13.6 ms to 681 ms and its RSS grew by
132 MiB."""

from __future__ import annotations

import shlex
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from .conftest import active_jobs, wait_for
from .test_slurm_spawn import occupy_the_compute_node

FLOOD_BYTES = 256 * 1024 * 1024


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def _latencies(hub, seconds: float) -> list[float]:
    """Milliseconds of a simple API request (another user's model), again and again."""
    found, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        assert hub.api("GET", "/users/bob", timeout=30).status_code == 200
        found.append((time.perf_counter() - started) * 1000)
    return found


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def test_a_flood_without_newline_in_a_waiting_jobs_output_leaves_the_hub_alone(hub, lab):
    blocker = occupy_the_compute_node(lab)
    try:
        with ThreadPoolExecutor(1) as pool:
            spawn = pool.submit(hub.spawn, "alice", timeout=240)
            assert wait_for(lambda: any(" PENDING " in job for job in active_jobs("alice")), 30)
            state = hub.api("GET", "/users/alice").json()["servers"][""]["state"]
            output = state["output_path"]
            before = _latencies(hub, 10)
            rss_before = _rss_kib(hub.pid)
            # alice appends, as herself on the login node, what a runaway print would.
            append = f"head -c {FLOOD_BYTES} /dev/zero | tr '\\000' x >> \"$1\""
            writer = subprocess.Popen(lab.host_command(
                "login", f"runuser -u alice -- sh -c {shlex.quote(append)} flood "
                         f"{shlex.quote(output)}"))
            during: list[float] = []
            rss_most = rss_before
            while writer.poll() is None or len(during) < 200:
                during += _latencies(hub, 0.5)
                rss_most = max(rss_most, _rss_kib(hub.pid))
            assert writer.returncode == 0
            during += _latencies(hub, 5)  # and while the hub reads what is still on its way
            rss_most = max(rss_most, _rss_kib(hub.pid))
            print(f"hub API p99 for other requests: {_p99(before):.1f} ms before, "
                  f"{_p99(during):.1f} ms during the flood ({len(before)} and {len(during)} "
                  f"requests); hub RSS {rss_before // 1024} MiB -> at most "
                  f"{rss_most // 1024} MiB", flush=True)
            assert _p99(during) < max(3 * _p99(before), 1.0) and _p99(during) < 300
            assert rss_most - rss_before < 64 * 1024
            lab.in_namespace("login", ["scancel", blocker])
            events, _ = spawn.result(timeout=240)
        last = events[-1]
        # Slurm truncates the output file when the job starts, so the ready line is read; a
        # failure would have to say why, never a bare "Spawn failed".
        assert last.get("ready") or len(last.get("message", "")) > len("Spawn failed: ") + 20
        print(f"alice's spawn ended: {last.get('message')}", flush=True)
    finally:
        lab.in_namespace("login", ["scancel", blocker], check=False)
        hub.stop("alice")
    assert wait_for(lambda: not active_jobs("alice"), 30)
