"""Spawn latency: click to ready, and how much of it is ours.

    make bench-spawn    (or: python -m bench.spawn_latency [--spawns 10])

A real JupyterHub (the test hub: tests/integration/hub_config.py on the lab, Slurm) starts
alice's server ``--spawns`` times for each of two ways of waiting, interleaved in one run:
- ``follow``: the spawner as shipped, which follows the job's output (``tail -F`` over its SSH
  connection) and wakes on the job's first line and on its ready line;
- ``poll-only``: the same spawner with the follower off (the lab's ``poll-only`` scenario), so
  it learns of both at its next status check (0.5 s, growing by half while the job waits);
- ``form``: as ``follow``, but alice first opens the spawn form (logged in, as in a browser)
  and looks at it for 3 s before Start: showing the form opens her SSH connection and has the
  tunnel service log in (``warm_up_on_form``). The other two modes start cold: nothing of
  alice's is connected when they press Start (each stop closed her tunnel master; her hub
  connection stays open between spawns, as it does within ``ssh_idle_timeout``).

Per spawn, from the wall clock of this machine (the lab's hosts share it):
- click: just before ``POST /hub/api/users/alice/servers/NAME``; ready: the progress stream's
  ready event; submitted: its "Submitted job" event;
- the scheduler's own part: from submitted to the job's first line (``hub_spawner: job
  started ... at T``, printed by the job script on the node);
- the server's own start-up: from the launcher's "starting the server at T" to its "the
  server listens at T";
- our overhead: click to ready minus both. It is the SSH and file work up to ``sbatch``, the
  launcher's own steps on the node, and everything from the server listening to the hub
  calling it ready (seeing the ready line, the tunnel, JupyterHub's own check).
Brings the lab up (and down) if it is not up.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.machine import describe
from tests.integration.conftest import Hub, login, start_hub, stop_hub
from tests.lab import lab

HUB_PORT = 18700
MODES = {"follow": "latency", "poll-only": "poll-only", "form": "latency-form"}  # -> server
FORM_SECONDS = 3.0  # how long the "form" mode's user looks at the spawn form before Start
_STAMP = re.compile(r"^hub_spawner: (job started on \S+|starting the server|the server listens)"
                    r" at (\d+\.\d+)$", re.MULTILINE)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spawns", type=int, default=10, help="spawns per mode")
    args = parser.parse_args()

    owns_lab = not lab.STATE_FILE.exists()
    if owns_lab:
        lab.up(("slurm",))
    state_dir = Path(tempfile.mkdtemp(prefix="bench-spawn-"))
    hub, process = start_hub(state_dir, HUB_PORT, secrets.token_hex(24))
    rows: dict[str, list[dict]] = {mode: [] for mode in MODES}
    try:
        hub.api("POST", "/users/alice")
        browser = login(hub, "alice", "lab-demo-admin-password-for-alice-only")  # an admin
        for number in range(args.spawns):
            for mode, server in MODES.items():
                if mode == "form":  # the page with the form, as a browser shows it
                    page = browser.get(f"{hub.url}/hub/spawn/alice/{server}", timeout=30)
                    if 'name="cpus"' not in page.text:
                        raise RuntimeError(f"no spawn form: {page.status_code} {page.text[:300]}")
                    time.sleep(FORM_SECONDS)
                row = _spawn(hub, server)
                rows[mode].append(row)
                print(f"{mode} #{number + 1}: " + ", ".join(
                    f"{key} {value:.3f}" for key, value in row.items() if key != "job"),
                    flush=True)
    finally:
        for server in MODES.values():
            try:
                hub.stop("alice", server)
            except Exception as error:  # the hub's cleanup_servers cancels what is left
                print(f"stopping alice/{server}: {error}", file=sys.stderr)
        stop_hub(process)
        lab.stop_tunnel_service(state_dir / "tunnels")
        if owns_lab:
            lab.down()
    _report(rows)
    return 0


def press_start(hub: Hub, user: str, server: str, timeout: float = 120) -> dict:
    """Start USER/SERVER over the REST API and follow its progress stream to the end: the
    wall-clock times of the press (``pressed``) and of the events seen (``submitted``,
    ``ready_line``, ``tunnel_open``, ``ready``), the ``job`` id, or ``error``."""
    path = f"/users/{user}/servers/{server}"
    result: dict = {"pressed": time.time(), "user": user, "server": server}
    response = hub.api("POST", path, json={"cpus": 1}, timeout=timeout)
    if response.status_code not in (201, 202):
        result["error"] = f"{user}/{server}: POST {response.status_code} {response.text[:200]}"
        return result
    stream = hub.api("GET", f"{path}/progress", stream=True, timeout=timeout)
    for line in stream.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data:"):
            continue
        event, seen = json.loads(line[5:]), time.time()
        message = event.get("message", "")
        found = re.search(r"Submitted job (\d+)", message)
        if found:
            result["submitted"], result["job"] = seen, found.group(1)
        if message.startswith("Server listening on"):
            result["ready_line"] = seen
        if message.startswith("Tunnel open"):
            result["tunnel_open"] = seen
        if event.get("failed"):
            result["error"] = f"{user}/{server}: {message}"
            break
        if event.get("ready"):
            result["ready"] = seen
            break
    stream.close()
    if "ready" not in result and "error" not in result:
        result["error"] = f"{user}/{server}: the progress stream ended without ready"
    return result


def _spawn(hub: Hub, server: str) -> dict:
    """One spawn and stop of alice/SERVER; its times in seconds (see the module's text)."""
    result = press_start(hub, "alice", server)
    if "error" in result:
        raise RuntimeError(result["error"])
    click, submitted, job, ready = (result[key] for key in ("pressed", "submitted", "job",
                                                             "ready"))
    seen_ready_line, tunnel_open = result["ready_line"], result["tunnel_open"]
    stamps = _job_stamps(job)
    hub.stop("alice", server)
    scheduler = stamps["job started"] - submitted
    server_start = stamps["the server listens"] - stamps["starting the server"]
    return {
        "job": float(job),
        "click_to_ready": ready - click,
        "scheduler": scheduler,
        "server": server_start,
        "overhead": ready - click - scheduler - server_start,
        "to_submit": submitted - click,
        "launcher": stamps["starting the server"] - stamps["job started"],
        "listen_to_ready": ready - stamps["the server listens"],
        "listen_to_seen": seen_ready_line - stamps["the server listens"],
        "tunnel": tunnel_open - seen_ready_line,
        "hub_check": ready - tunnel_open,
    }


def _job_stamps(job: str) -> dict[str, float]:
    """The launcher's timestamps in job JOB's output (found through ``scontrol``)."""
    shown = lab.in_namespace("login", ["scontrol", "show", "job", job]).stdout
    output = re.search(r"StdOut=(\S+)", shown)
    if not output:
        raise RuntimeError(f"scontrol shows no StdOut for job {job}")
    text = Path(output.group(1)).read_text()
    stamps = {}
    for name, value in _STAMP.findall(text):
        stamps["job started" if name.startswith("job started") else name] = float(value)
    if len(stamps) != 3:
        raise RuntimeError(f"job {job}'s output lacks the launcher's timestamps:\n{text}")
    return stamps


def _pct(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _report(rows: dict[str, list[dict]]) -> None:
    print(f"\n{describe()}")
    columns = ("click_to_ready", "scheduler", "server", "overhead", "to_submit", "launcher",
               "listen_to_ready", "listen_to_seen", "tunnel", "hub_check")
    print("| mode | spawns | " + " | ".join(f"{column} p50 / p90 s" for column in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for mode, spawned in rows.items():
        if not spawned:
            continue
        cells = [f"{statistics.median(r[c] for r in spawned):.3f} / "
                 f"{_pct([r[c] for r in spawned], 0.9):.3f}" for c in columns]
        print(f"| {mode} | {len(spawned)} | " + " | ".join(cells) + " |")
    if all(rows.values()):
        ours = {mode: statistics.median(r["overhead"] for r in spawned)
                for mode, spawned in rows.items()}
        print(f"overhead median, follow / poll-only: {ours['follow'] / ours['poll-only']:.2f}; "
              f"form / poll-only: {ours['form'] / ours['poll-only']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
