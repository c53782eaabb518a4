"""Stop pressed while a spawn runs (issue 27). JupyterHub cancels the spawn, waits one second,
then stops the server; a ``start()`` still running after that second made the stop fail
("RuntimeError: alice pending spawn", a 500) and left the server listed as running with its job
cancelled, every visit looping between /user/alice and /hub/user/alice.

Each round: Start, then Stop at a random moment 0-3 s later (seeded; the seed is printed), on the
REST API (the POST answers at once: ``slow_spawn_timeout`` is 0 in the test hubs) and through the
spawn form and its pending page's Stop button. After each round: no 5xx, the server no longer
listed within 60 s, no job left, and the user's URL says the server is not running (no
redirect loop).
"""

from __future__ import annotations

import os
import random
import re
import time

import pytest
import requests

from .conftest import active_jobs, login, wait_for
from .test_browser import PASSWORDS, logged_in, submit

ROUNDS = 20
SEED = int(os.environ.get("HUB_STOP_SEED", "20261206"))


def _settled(hub, user: str, scheduler: str, since: int) -> None:
    """The round is over: nothing listed, no job, and the user's URL is not a loop. On a
    failure, the server's model and what the hub logged since the round began say why."""
    def servers() -> dict:
        return hub.api("GET", f"/users/{user}").json()["servers"]

    assert wait_for(lambda: "" not in servers(), 60), (servers(), hub.log()[since:][-6000:])
    assert wait_for(lambda: not active_jobs(user, scheduler), 30), (
        active_jobs(user, scheduler), hub.log()[since:][-6000:])


def _not_a_loop(hub, session: requests.Session, user: str) -> None:
    """The user's URL ends on JupyterHub's "server not running" page (424), with a Launch
    button; a server the hub wrongly lists as running loops between /user/NAME and
    /hub/user/NAME instead ("Redirect loop detected")."""
    response = session.get(f"{hub.url}/user/{user}/", timeout=30)  # follows redirects (30 max)
    assert "Redirect loop" not in response.text, response.url
    assert response.status_code == 424, (response.status_code, response.url)


def _new_lines(hub, since: int) -> str:
    return hub.log()[since:]


@pytest.mark.parametrize("scheduler", ["slurm", "sge", "torque"])
def test_stop_at_random_moments_after_a_rest_start_leaves_nothing(hub_for, scheduler):
    hub = hub_for(scheduler)
    rng = random.Random(f"{SEED}-rest-{scheduler}")
    print(f"stop during spawn ({scheduler}, REST): HUB_STOP_SEED={SEED}", flush=True)
    session = login(hub, "alice", PASSWORDS["alice"])
    since = len(hub.log())
    for round_number in range(ROUNDS):
        delay = rng.uniform(0, 3)
        round_began = len(hub.log())
        started = time.monotonic()
        response = hub.api("POST", "/users/alice/server", json={"cpus": 1})
        assert response.status_code in (201, 202), response.text
        time.sleep(max(0.0, delay - (time.monotonic() - started)))
        stop = hub.api("DELETE", "/users/alice/server")
        assert stop.status_code in (202, 204), (round_number, delay, stop.status_code, stop.text)
        _settled(hub, "alice", scheduler, round_began)
        _not_a_loop(hub, session, "alice")
    log = _new_lines(hub, since)
    assert "RuntimeError" not in log and "Traceback" not in log, log[-3000:]
    # The rounds really hit spawns in flight, by the hub's own account (else this proves
    # nothing): JupyterHub logs each stop that interrupts a pending spawn.
    interrupted = log.count("Interrupting spawner alice")
    print(f"{interrupted} of {ROUNDS} stops interrupted a spawn in flight", flush=True)
    assert interrupted >= ROUNDS // 2, interrupted


def test_stop_at_random_moments_on_the_spawn_pending_page_leaves_nothing(hub):
    """Through the browser: the spawn form's Start, then the pending page's Stop button."""
    rng = random.Random(f"{SEED}-form")
    print(f"stop during spawn (form): HUB_STOP_SEED={SEED}", flush=True)
    session = login(hub, "bob", PASSWORDS["bob"])
    since = len(hub.log())
    with logged_in(hub, "bob") as page:
        for _ in range(ROUNDS):
            delay = rng.uniform(0, 3)
            round_began = len(hub.log())
            _goto(page, f"{hub.url}/hub/spawn")
            started = time.monotonic()
            submit(page)
            time.sleep(max(0.0, delay - (time.monotonic() - started)))
            if not _press_stop(page) or _ready_anyway(hub, "bob"):
                # The server was ready first (or the click lost the race with the page moving
                # on to it, so its request never left): the user stops it as usual.
                hub.api("DELETE", "/users/bob/server")
            _settled(hub, "bob", "slurm", round_began)
            _not_a_loop(hub, session, "bob")
    log = _new_lines(hub, since)
    assert "RuntimeError" not in log and "Traceback" not in log, log[-3000:]
    server_errors = [line for line in log.splitlines() if re.search(r"log:\d+\] 5\d\d ", line)]
    assert not server_errors, server_errors  # HTTP 5xx lines only (not "job 500")
    # Rounds whose Stop landed while the spawn ran (else this proves nothing).
    interrupted = log.count("Interrupting spawner bob")
    print(f"{interrupted} of {ROUNDS} stops interrupted a spawn in flight", flush=True)
    assert interrupted >= ROUNDS // 4, interrupted


def _goto(page, url: str) -> None:
    """``page.goto``, again when the last round's pending page was still redirecting (JupyterHub
    lists the server as ready for the second before it stops it) and took over the navigation."""
    for attempt in range(5):
        try:
            page.goto(url)
            return
        except Exception as error:
            if "interrupted by another navigation" not in str(error) or attempt == 4:
                raise
            time.sleep(1)


def _ready_anyway(hub, user: str) -> bool:
    """After a Stop click: True when, 5 s on, the server is still listed as ready with nothing
    pending (the click landed as the pending page moved on to the server, and the browser
    dropped the page's stop request); False once it is gone or stopping."""
    def model() -> dict | None:
        return hub.api("GET", f"/users/{user}").json()["servers"].get("")

    if wait_for(lambda: (m := model()) is None or m.get("pending") == "stop", 5):
        return False
    found = model()
    return bool(found and found.get("ready") and not found.get("pending"))


def _press_stop(page) -> bool:
    """Press the pending page's Stop button as a user does, if the page still shows it (the
    check and the click in one step in the page: it may move on to JupyterLab any moment)."""
    try:
        return page.evaluate("""() => {
            const button = document.getElementById('stop-server-btn');
            if (!button || button.disabled) { return false; }
            button.click();
            return true;
        }""")
    except Exception:  # the page navigated away meanwhile: the server was ready
        return False
