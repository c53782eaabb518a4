"""Load on the scheduler (issue 28): a spawn waiting in a Slurm queue used to list the whole
cluster's pending jobs (``squeue --states=PENDING``) on each of its waits, every few seconds,
to show its place in the queue. Now one listing per cluster per minute serves every waiting
spawn. Counted on the login node itself: alice's ``squeue`` is a shim that notes each call
(her ``~/.bashrc`` puts it first in PATH for the commands the hub runs)."""

from __future__ import annotations

import pwd
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .conftest import active_jobs, wait_for
from .test_slurm_spawn import occupy_the_compute_node

SPAWNS = 10
WATCHED_SECONDS = 75


def test_ten_waiting_spawns_make_at_most_one_queue_listing_a_minute(hub, lab):
    home = Path(pwd.getpwnam("alice").pw_dir)
    user = pwd.getpwnam("alice")
    shim, calls, bashrc = home / ".squeue-shim", home / ".squeue-calls", home / ".bashrc"
    before = bashrc.read_bytes()
    shim.mkdir(exist_ok=True)
    (shim / "squeue").write_text(
        '#!/bin/sh\necho "$(date +%s) $*" >> "$HOME/.squeue-calls"\nexec /usr/bin/squeue "$@"\n')
    (shim / "squeue").chmod(0o755)
    calls.write_text("")
    for path in (shim, shim / "squeue", calls):
        shutil.chown(path, user.pw_uid, user.pw_gid)
    bashrc.write_bytes(b'export PATH="$HOME/.squeue-shim:$PATH"\n' + before)
    blocker = occupy_the_compute_node(lab)
    names = [f"queued{n}" for n in range(SPAWNS)]
    try:
        with ThreadPoolExecutor(SPAWNS) as pool:
            spawns = [pool.submit(hub.spawn, "alice", name, timeout=300) for name in names]
            assert wait_for(lambda: sum(" PENDING " in job for job in active_jobs("alice"))
                            == SPAWNS, 60), active_jobs("alice")
            started = time.time()
            time.sleep(WATCHED_SECONDS)
            listings = [line for line in calls.read_text().splitlines()
                        if "--states=PENDING" in line and int(line.split()[0]) >= started]
            every = [line for line in calls.read_text().splitlines()
                     if int(line.split()[0]) >= started]
            print(f"{SPAWNS} spawns waiting for {WATCHED_SECONDS} s: {len(listings)} listings "
                  f"of the pending queue, {len(every)} squeue calls of alice in all",
                  flush=True)
            assert 1 <= len(listings) <= 2, listings  # one a minute: 75 s may hold two
            # They still say their place in the queue.
            assert "waiting in its partition" in hub.log()
            lab.in_namespace("login", ["scancel", blocker])
            for name in names:
                hub.stop("alice", name)
            for spawn in spawns:
                spawn.result(timeout=120)
    finally:
        bashrc.write_bytes(before)
        lab.in_namespace("login", ["scancel", blocker], check=False)
        for name in names:
            hub.stop("alice", name)
        shutil.rmtree(shim, ignore_errors=True)
        calls.unlink(missing_ok=True)
    assert wait_for(lambda: not active_jobs("alice"), 60), active_jobs("alice")
