"""hub_spawner/reconciler.py: the rules, against a fake watch and a fake SSH pool (no sshd is
reachable from unit tests); tests/integration/test_reconciler.py drives the same reconciler in
a real hub against the lab's sshd and real schedulers."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest

from hub_spawner.reconciler import CannotActAsOwner, Reconciler
from hub_spawner.schedulers import CommandOutput, JobState, JobStatus, ListedJob, slurm
from hub_spawner.ssh import SSHTarget
from hub_spawner.watch import Listing

OURS = "jupyterhub-a1b2c3d4-alice--0a1b2c3d"
CANCEL_7 = (f"scancel --name={OURS} --user=alice 7; hub_spawner_cancel=$?; "  # Slurm checks
            f'rm -f -- "$HOME"/.hub-spawner/{OURS}/server.env; exit $hub_spawner_cancel')


def target(user: str) -> SSHTarget:
    return SSHTarget(host="login", port=22, username=user, key_path=f"/k/{user}",
                     known_hosts_path="/kh", connect_timeout=5)


class FakePool:
    """Records (user, command); answers each with ``exit_status``."""

    def __init__(self, exit_status: int = 0) -> None:
        self.exit_status = exit_status
        self.commands: list[tuple[str, str]] = []

    async def get(self, where: SSHTarget):
        pool = self

        class Connection:
            async def run(self, command: str, timeout: float = 60) -> CommandOutput:
                pool.commands.append((where.username, command))
                return CommandOutput(pool.exit_status, "", "" if pool.exit_status == 0 else
                                     "scancel: error: Unable to contact slurm controller")

        return Connection()


def job(job_id: str, name: str, owner: str = "alice", state=JobState.RUNNING) -> ListedJob:
    return ListedJob(job_id, name, owner, JobStatus(state, node="compute"))


class FakeWatch:
    """What the reconciler reads of a ``Watch``: each ``cycle()`` is one listing per user."""

    interval = 10.0
    name = "Slurm at login:22"

    def __init__(self) -> None:
        self.listed: dict[str, Listing] = {}
        self.cycle_started = 0.0

    def cycle(self, jobs: dict[str, list[ListedJob]]) -> FakeWatch:
        self.cycle_started = time.monotonic()
        for user, listed in jobs.items():
            self.listed[user] = Listing(time.monotonic(), listed)
        return self


def reconciler(pool: FakePool, wanted=frozenset(), **changes) -> Reconciler:
    async def owner_target(user: str) -> SSHTarget:
        return target(user)

    fields = dict(scheduler=slurm, pool=pool, hub_id="a1b2c3d4", wanted=lambda: set(wanted),
                  owner_target=owner_target, grace=0.0)
    fields.update(changes)
    return Reconciler(**fields)


async def test_an_unowned_job_of_this_hub_is_cancelled_as_its_owner_and_counted_once_gone():
    pool, watch = FakePool(), FakeWatch()
    reconcile = reconciler(pool)
    await reconcile(watch.cycle({"alice": [job("7", OURS)]}))
    assert pool.commands == [("alice", CANCEL_7)]
    assert (reconcile.cancels_sent, reconcile.cancels_confirmed) == (1, 0)
    await reconcile(watch.cycle({"alice": []}))  # the listing no longer shows it
    assert (reconcile.cancels_sent, reconcile.cancels_confirmed) == (1, 1)
    assert reconcile.unwanted == {}


async def test_a_cancel_that_exits_zero_but_leaves_the_job_listed_is_sent_again_backing_off():
    pool, watch = FakePool(), FakeWatch()
    reconcile = reconciler(pool)
    await reconcile(watch.cycle({"alice": [job("7", OURS)]}))
    found = reconcile.unwanted["7"]
    assert found.next_try - time.monotonic() == pytest.approx(10, abs=1)
    found.next_try = 0  # as if the back-off had passed
    await reconcile(watch.cycle({"alice": [job("7", OURS)]}))
    assert [command for _, command in pool.commands] == [CANCEL_7] * 2
    assert reconcile.unwanted["7"].next_try - time.monotonic() == pytest.approx(20, abs=1)
    await reconcile(watch.cycle({"alice": [job("7", OURS)]}))  # within the back-off: no try
    assert len(pool.commands) == 2 and reconcile.cancels_confirmed == 0


async def test_a_refused_cancel_is_logged_with_what_the_scheduler_said(caplog):
    pool, watch = FakePool(exit_status=1), FakeWatch()
    with caplog.at_level(logging.WARNING, "hub_spawner.reconciler"):
        await reconciler(pool)(watch.cycle({"alice": [job("7", OURS)]}))
    assert "Unable to contact slurm controller" in caplog.text
    assert "until a listing no longer shows the job" in caplog.text


@pytest.mark.parametrize("name", [
    "jupyterhub-ffffffff-alice--0a1b2c3d",  # another hub on the same cluster
    "my analysis",  # the user's own batch job
    "jupyterhub-alice--0a1b2c3d",  # a job name from before hub ids
])
async def test_other_hubs_and_users_own_jobs_are_never_touched(name):
    pool, watch = FakePool(), FakeWatch()
    reconcile = reconciler(pool)
    for _ in range(5):
        await reconcile(watch.cycle({"alice": [job("7", name)]}))
    assert pool.commands == [] and reconcile.unwanted == {}


async def test_a_wanted_job_and_an_ended_one_are_left_alone():
    pool, watch = FakePool(), FakeWatch()
    reconcile = reconciler(pool, wanted={OURS})
    other = "jupyterhub-a1b2c3d4-bob--11111111"
    await reconcile(watch.cycle({"alice": [job("7", OURS)],
                                 "bob": [job("8", other, "bob", JobState.DONE)]}))
    assert pool.commands == []


async def test_nothing_is_cancelled_before_the_grace_or_when_the_database_cannot_be_read():
    pool, watch = FakePool(), FakeWatch()
    await reconciler(pool, grace=60)(watch.cycle({"alice": [job("7", OURS)]}))
    unreadable = reconciler(pool)
    unreadable.wanted = lambda: None
    await unreadable(watch.cycle({"alice": [job("7", OURS)]}))
    assert pool.commands == []


async def test_only_this_cycles_listings_count():
    """alice's listing failed this cycle (her entry is older than the cycle): not "gone"."""
    pool, watch = FakePool(), FakeWatch()
    reconcile = reconciler(pool)
    await reconcile(watch.cycle({"alice": [job("7", OURS)]}))
    watch.cycle({})  # a cycle in which alice's listing did not answer
    await reconcile(watch)
    assert reconcile.cancels_confirmed == 0 and "7" in reconcile.unwanted


async def test_log_mode_cancels_nothing_and_says_what_it_would_cancel_once(caplog):
    pool, watch = FakePool(), FakeWatch()
    reconcile = reconciler(pool, mode="log")
    with caplog.at_level(logging.WARNING, "hub_spawner.reconciler"):
        for _ in range(3):
            await reconcile(watch.cycle({"alice": [job("7", OURS)]}))
    assert pool.commands == []
    assert caplog.text.count("would cancel job 7") == 1


async def test_an_owner_it_cannot_act_as_is_logged_once_and_acted_for_when_it_can(caplog):
    pool, watch = FakePool(), FakeWatch()
    can = SimpleNamespace(now=False)

    async def owner_target(user: str) -> SSHTarget:
        if not can.now:
            raise CannotActAsOwner("alice's key is not in memory (auth_state)")
        return target(user)

    reconcile = reconciler(pool, owner_target=owner_target)
    with caplog.at_level(logging.WARNING, "hub_spawner.reconciler"):
        for _ in range(3):
            await reconcile(watch.cycle({"alice": [job("7", OURS)]}))
        assert caplog.text.count("cannot cancel job 7") == 1
        assert "cancel it on the cluster by hand" in caplog.text
        assert pool.commands == []
        can.now = True
        await reconcile(watch.cycle({"alice": [job("7", OURS)]}))
    assert pool.commands == [("alice", CANCEL_7)]


# --- the tunnel service's table ---------------------------------------------------------------


class FakeTunnels:
    """A tunnel service's table (the real one: tests/integration/test_reconciler.py)."""

    def __init__(self, names: list[str]) -> None:
        self.table = {name: {} for name in names}
        self.closed: list[str] = []

    async def request(self, request: dict, start: bool = True) -> dict:
        assert request == {"op": "list"} and start is False  # never started for this
        return {"ok": True, "forwards": dict(self.table)}

    async def close(self, name: str) -> None:
        self.closed.append(name)
        self.table.pop(name)

    def forget_listing(self) -> None:
        pass


def spawner_with(tunnels, forward: str, job_id: str = "") -> SimpleNamespace:
    """What the hub's forward reconciler reads of a spawner."""
    return SimpleNamespace(server_path=SimpleNamespace(tunnels=tunnels, name=forward),
                           job_id=job_id, job_name="")


async def test_a_forward_no_server_owns_is_closed_at_its_second_listing_and_no_other():
    from hub_spawner.hub import Hub

    tunnels = FakeTunnels(["alice/", "alice//hub-api", "bob/lost", "bob/lost/hub-api",
                           "carol/hub-spawner-check"])
    running = spawner_with(tunnels, "alice/", job_id="7")
    stopped = spawner_with(tunnels, "bob/lost")
    hub = Hub(None)
    hub.spawners = [running, stopped]
    hub.db = object()
    hub._our_rows = lambda: []
    await hub.reconcile_forwards(interval=0)
    assert tunnels.closed == []  # seen once without an owner
    await hub.reconcile_forwards(interval=0)
    assert sorted(tunnels.closed) == ["bob/lost", "bob/lost/hub-api"]
    assert sorted(tunnels.table) == ["alice/", "alice//hub-api", "carol/hub-spawner-check"]


async def test_no_forward_is_closed_when_the_database_cannot_be_read():
    from hub_spawner.hub import Hub

    tunnels = FakeTunnels(["bob/lost"])
    hub = Hub(None)
    hub.spawners = [spawner_with(tunnels, "bob/lost")]

    def unreadable():
        raise RuntimeError("database is locked")

    hub.db = object()
    hub._our_rows = unreadable
    for _ in range(3):
        await hub.reconcile_forwards(interval=0)
    assert tunnels.closed == []


async def test_a_job_the_hub_let_go_of_is_cancelled_without_the_grace_and_then_forgotten():
    pool, watch = FakePool(), FakeWatch()
    released = {OURS: time.monotonic()}
    reconcile = reconciler(pool, grace=600, released=released)
    await reconcile(watch.cycle({"alice": [job("7", OURS),
                                           job("8", "jupyterhub-a1b2c3d4-bob--11111111")]}))
    assert pool.commands == [("alice", CANCEL_7)]  # 8 waits for its grace
    await reconcile(watch.cycle({"alice": [job("8", "jupyterhub-a1b2c3d4-bob--11111111")]}))
    assert released == {} and reconcile.cancels_confirmed == 1


async def test_the_checks_test_job_and_a_job_listed_twice_are_never_touched(caplog):
    """``hub_spawner check`` cancels its own job; a job id listed twice (a forged line in a
    text listing naming another owner) is ambiguous: neither line is acted on."""
    pool, watch = FakePool(), FakeWatch()
    reconcile = reconciler(pool)
    forged = "jupyterhub-a1b2c3d4-bob-x-0a1b2c3d"
    with caplog.at_level(logging.WARNING, "hub_spawner.reconciler"):
        for _ in range(3):
            await reconcile(watch.cycle({
                "alice": [job("7", "jupyterhub-a1b2c3d4-alice-hub-spawner-check-0a1b2c3d"),
                          job("9", forged)],
                "bob": [job("9", "jupyterhub-a1b2c3d4-bob--11111111", "bob")],
            }))
    assert pool.commands == []
    assert caplog.text.count("job 9 is listed more than once") == 1


async def test_a_cancel_that_keeps_failing_for_days_backs_off_without_overflowing():
    pool, watch = FakePool(exit_status=1), FakeWatch()
    reconcile = reconciler(pool, max_backoff=300)
    await reconcile(watch.cycle({"alice": [job("7", OURS)]}))
    reconcile.unwanted["7"].tries = 5000
    reconcile.unwanted["7"].next_try = 0
    await reconcile(watch.cycle({"alice": [job("7", OURS)]}))
    assert reconcile.unwanted["7"].next_try - time.monotonic() == pytest.approx(300, abs=1)


async def test_on_slurm_the_cancel_names_the_listed_job_and_owner_so_slurm_checks_them():
    pool, watch = FakePool(), FakeWatch()
    await reconciler(pool)(watch.cycle({"alice": [job("7", OURS)]}))
    assert pool.commands == [("alice", CANCEL_7)]


def test_the_secrets_file_of_a_cancelled_job_is_named_safely():
    from hub_spawner.reconciler import secrets_file

    assert secrets_file("/scratch/hs", OURS) == f"/scratch/hs/{OURS}/server.env"
    for name in ("jupyterhub-a1-$(id)-0a1b2c3d", "jupyterhub-a1-../../x-0a1b2c3d", "x"):
        with pytest.raises(ValueError):
            secrets_file(".hub-spawner", name)
    with pytest.raises(ValueError):
        secrets_file(".hub spawner", OURS)


@pytest.mark.parametrize("name", ["x; touch /tmp/pwned", "$(id)", "a'b", "-u root"])
def test_the_slurm_cancel_quotes_a_hostile_listed_name_and_refuses_a_hostile_owner(name):
    import shlex

    command = slurm.cancel_listed_command("7", name, "alice")
    assert shlex.split(command) == ["scancel", f"--name={name}", "--user=alice", "7"]
    for owner in ("alice;id", "$(id)", ""):
        with pytest.raises(ValueError):
            slurm.cancel_listed_command("7", name, owner)
    with pytest.raises(ValueError):
        slurm.cancel_listed_command("7; id", name, "alice")
