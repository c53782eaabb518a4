"""Hostile spawn options through the real hub: every field, through the REST API and through
the spawn form of a logged-in user. Each value is refused with a message naming the field (or,
for a harmless name, sent as exactly that name); no job appears and no canary file is created
on the login or the compute host, where an injected command would run."""

from __future__ import annotations

import os
import re

import pytest

from .conftest import active_jobs, login

FIELDS = {"partition": "partition", "cpus": "cores", "memory": "memory", "gpus": "gpus",
          "walltime": "walltime", "account": "account"}
CANARY = f"/tmp/hub-spawner-canary-{os.getpid()}"
TEXT = [f"; touch {CANARY}", f"$(touch {CANARY})", f"`touch {CANARY}`",
        "x\n#SBATCH --uid=0", "--uid=0", "A" * 10240, "ünï", "1e400", "9" * 400]
JSON = [10**400, -1, 1.5, ["debug"], {"cpus": 1}, True]


def plain_name(value) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value)


def no_canary(lab) -> bool:
    return all(lab.in_namespace(host, ["test", "-e", CANARY], check=False).returncode == 1
               for host in ("login", "compute"))


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_hostile_rest_options_are_refused_naming_the_field(hub, lab, field):
    for number, value in enumerate(TEXT + JSON):
        if field in ("partition", "account") and plain_name(value):
            continue  # a valid name ("1e400"), sent as just that (tests/test_resources.py)
        events, _ = hub.spawn("alice", f"hostile-{field}-{number}", options={field: value})
        assert events[-1].get("failed"), (value, events)
        message = events[-1]["message"]
        assert FIELDS[field] in message.lower(), (value, message)
        assert len(message) < 600, message  # a short piece of the value at most
    assert active_jobs("alice") == []
    assert no_canary(lab)


def test_unknown_option_keys_are_refused(hub, lab):
    events, _ = hub.spawn("alice", "hostile-key", options={f"; touch {CANARY}": "1"})
    assert events[-1].get("failed") and "Unknown option" in events[-1]["message"], events
    assert active_jobs("alice") == [] and no_canary(lab)



@pytest.mark.parametrize("field", sorted(FIELDS))
def test_the_spawn_form_refuses_the_same_values_and_keeps_the_page(hub, lab, field):
    """bob submits the spawn form (as his browser would); the form comes back with the
    message, and nothing reaches the cluster."""
    session = login(hub, "bob", "lab-demo-password")
    for number, value in enumerate(TEXT):
        if field in ("partition", "account") and plain_name(value):
            continue
        url = f"{hub.url}/hub/spawn/bob/form-{field}-{number}"
        page = session.get(url, timeout=30)
        assert page.status_code == 200, page.text[-300:]
        response = session.post(url, timeout=60, allow_redirects=False,
                                data={field: value, "_xsrf": session.cookies.get("_xsrf")})
        assert response.status_code in (200, 400), (value, response.status_code)
        error = re.search(r'class="spawn-error-msg[^>]*>(.*?)</p>', response.text, re.S)
        assert error and FIELDS[field] in error.group(1).lower(), (value, response.text[-800:])
        assert "<form" in response.text  # the form again, to correct the value
    assert active_jobs("bob") == []
    assert no_canary(lab)
