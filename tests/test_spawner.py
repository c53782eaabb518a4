"""hub_spawner/spawner.py pieces that need no cluster: job scripts for hostile names, state."""

import asyncio
import logging
import re
import subprocess
import time
from types import SimpleNamespace

import pytest
from traitlets import TraitError

from hub_spawner import state as saved_state
from hub_spawner.cluster import cluster_named
from hub_spawner.errors import BadOptions, BadReadyLine, ClusterUnreachable, JobRejected
from hub_spawner.jobfiles import JOB_NAME, RemoteEntry
from hub_spawner.resources import Resources
from hub_spawner.schedulers import CommandOutput, JobState, JobStatus, sge, slurm
from hub_spawner.spawn_form import SpawnForm
from hub_spawner.spawner import (
    SGESSHSpawner,
    SlurmSSHSpawner,
    TorqueSSHSpawner,
    _slug,
    derived_hub_id,
    job_name,
)
from hub_spawner.state import STATE_VERSION

SPAWNERS = {"slurm": SlurmSSHSpawner, "sge": SGESSHSpawner, "torque": TorqueSSHSpawner}
JOB_NAME_DIRECTIVES = {"slurm": "#SBATCH --job-name=", "sge": "#$ -N ", "torque": "#PBS -N "}


def make_spawner(user_name: str = "alice", server_name: str = "", scheduler: str = "slurm",
                 **config) -> SlurmSSHSpawner:
    return SPAWNERS[scheduler](user=SimpleNamespace(name=user_name), hub=SimpleNamespace(),
                               orm_spawner=SimpleNamespace(name=server_name, server=None),
                               **config)


@pytest.mark.parametrize("name", ["a'b\"c;$(id)`x`", "../../etc", "x" * 100, "ünïcode name", ""])
def test_slug_is_always_safe(name):
    slug = _slug(name)
    assert len(slug) <= 24
    assert all(ch.isascii() and (ch.isalnum() or ch in "_.-") for ch in slug)


@pytest.mark.parametrize(("user", "server"), [
    ("alice", ""), ("a" * 100, "s" * 100), ("eve';touch /tmp/pwned;'", "srv$(id)"),
    ("ünïcode name", "-"), ("x", "."),
])
def test_a_job_name_carries_the_hub_id_and_is_always_one_of_ours(user, server):
    name = job_name("prod", user, server, "0a1b2c3d")
    assert name.startswith("jupyterhub-prod-") and name.endswith("-0a1b2c3d")
    assert JOB_NAME.fullmatch(name), name
    longest = job_name("abcd1234", "u" * 100, "s" * 100, "0a1b2c3d")
    assert JOB_NAME.fullmatch(longest), longest
    assert job_name("prod", "alice", "", "0a1b2c3d") == "jupyterhub-prod-alice-default-0a1b2c3d"


def test_the_derived_hub_id_is_stable_per_secret_and_differs_between_hubs():
    first, second = bytes(range(32)), bytes(range(1, 33))
    assert derived_hub_id(first) == derived_hub_id(first)
    assert derived_hub_id(first) != derived_hub_id(second)
    assert re.fullmatch(r"[0-9a-f]{8}", derived_hub_id(first))
    assert derived_hub_id(first.hex()) != derived_hub_id(first)  # a str is taken as its text
    assert derived_hub_id(None) == derived_hub_id(b"") == "00000000"


def test_the_spawner_names_jobs_with_its_hubs_id_or_the_configured_one():
    spawner = make_spawner()
    spawner.user.settings = {"cookie_secret": bytes(range(32))}
    assert spawner._hub_id == derived_hub_id(bytes(range(32)))
    spawner.hub_id = "staging"
    assert spawner._hub_id == "staging"


@pytest.mark.parametrize("value", ["PROD", "prod-1", "toolongid", "a b", "$(id)", "é"])
def test_a_hub_id_that_cannot_be_part_of_a_job_name_is_refused(value):
    with pytest.raises(TraitError, match="hub_id must be 1 to 8 lower-case letters or digits"):
        make_spawner(hub_id=value)


@pytest.mark.parametrize("scheduler", SPAWNERS)
def test_job_script_for_hostile_names_is_valid_bash_with_everything_quoted(scheduler, tmp_path):
    spawner = make_spawner("eve';touch /tmp/pwned;'", "srv$(id)", scheduler,
                           job_prologue="module load jupyter",
                           cmd=["/opt/jupyter bin/jupyterhub-singleuser"])
    spawner.job_name = f"jupyterhub-{_slug(spawner.user.name)}-{_slug(spawner.name)}-0a1b2c3d"
    spawner.output_path = f"/home/eve/.hub-spawner/{spawner.job_name}.out"
    spawner.secrets_path = f"/home/eve/.hub-spawner/{spawner.job_name}.env"
    script = spawner._job_script(Resources("debug", 2, 1024, 3600, ""))
    directive = JOB_NAME_DIRECTIVES[scheduler]
    assert f"{directive}jupyterhub-eve--touch--tmp-pwned---srv--id--0a1b2c3d" in script
    assert "'/opt/jupyter bin/jupyterhub-singleuser'" in script
    assert "module load jupyter" in script
    (tmp_path / "job.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sh")]).returncode == 0


def test_state_round_trips_with_a_version():
    spawner = make_spawner()
    spawner.job_id, spawner.job_host, spawner.remote_port = "42", "compute", 43211
    spawner.tunnel_port, spawner.api_tunnel_port = 40001, 40002
    state = spawner.get_state()
    assert state["hub_spawner_version"] == STATE_VERSION
    restored = make_spawner()
    restored.load_state(state)
    assert (restored.job_id, restored.job_host, restored.remote_port, restored.tunnel_port,
            restored.api_tunnel_port) == ("42", "compute", 43211, 40001, 40002)
    restored.clear_state()
    assert restored.get_state().get("job_id") is None


def test_state_v2_keeps_where_and_as_whom_the_job_was_submitted(caplog):
    spawner = make_spawner(login_host="login-a", login_port=22)
    spawner.job_id, spawner.job_cluster_username = "42", "alice_c"
    spawner.remote_socket = "/tmp/hub-spawner.x/server.sock"
    state = spawner.get_state()
    assert state["hub_spawner_version"] == 2 == STATE_VERSION
    assert (state["scheduler"], state["login_host"], state["login_port"],
            state["cluster_username"]) == ("slurm", "login-a", 22, "alice_c")
    # The admin moved the hub to another login node meanwhile: the job is followed where it is,
    # as whom it runs; the next job goes where the config says.
    restored = make_spawner(login_host="login-b", login_port=2200, cluster_username="{username}")
    restored.load_state(state)
    assert restored._job_where() == ("login-a", 22, "alice_c")
    assert restored.remote_socket == "/tmp/hub-spawner.x/server.sock"
    assert "following it there" in caplog.text
    target = asyncio.run(restored._ssh_target())
    assert (target.host, target.port, target.username) == ("login-a", 22, "alice_c")
    plan = restored._cleanup_plan()
    assert plan.where == ("login-a", 22, "alice_c")  # the cancel goes there, after a reset too
    restored.clear_state()
    target = asyncio.run(restored._ssh_target())
    assert (target.host, target.port, target.username) == ("login-b", 2200, "alice")


#: What version 1 (the skeleton, up to this change) wrote, field for field.
STATE_V1 = {
    "hub_spawner_version": 1, "job_id": "17", "job_name": "jupyterhub-alice-default-0a1b2c3d",
    "job_host": "compute", "remote_port": 43211, "tunnel_port": 40001, "api_tunnel_port": 40002,
    "output_path": "/home/alice/.hub-spawner/jupyterhub-alice-default-0a1b2c3d/job.out",
    "secrets_path": "/home/alice/.hub-spawner/jupyterhub-alice-default-0a1b2c3d/server.env",
    "certs_dir": "",
}


def test_state_v1_is_migrated_with_the_configs_login_node():
    spawner = make_spawner(login_host="login", login_port=22)
    spawner.load_state(dict(STATE_V1))
    assert (spawner.job_id, spawner.job_host, spawner.remote_port, spawner.tunnel_port,
            spawner.api_tunnel_port) == ("17", "compute", 43211, 40001, 40002)
    assert spawner.output_path == STATE_V1["output_path"] and spawner.remote_socket == ""
    state = spawner.get_state()  # written back as version 2
    assert state["hub_spawner_version"] == 2 and state["login_host"] == "login"
    assert state["job_id"] == "17"


@pytest.mark.parametrize("version", [STATE_VERSION + 1, "3-beta", None])
def test_a_job_id_in_state_of_an_unknown_version_is_never_forgotten(version, caplog):
    spawner = make_spawner()
    spawner.load_state({"hub_spawner_version": version, "job_id": "42", "job_host": "x",
                        "tunnel_port": "not a number"})
    assert spawner.job_id == "42"  # polled and cancelled as usual
    assert spawner.job_host == "" and spawner.tunnel_port == 0  # the rest is not trusted
    assert "state of unknown version" in caplog.text and "42" in caplog.text
    assert spawner.get_state()["job_id"] == "42"


@pytest.mark.parametrize("job_id", ["", "42"])
def test_a_spawn_the_hub_never_finished_ends_at_the_first_poll_and_is_cancelled(job_id, caplog):
    """The hub died while the job was waiting or starting (its state was saved early, with
    ``starting``): the restarted hub's first poll says "ended" (no SSH needed), and the stop
    that JupyterHub then makes cancels the job, by its name if the id never came back."""
    spawner = make_spawner()
    spawner.load_state({**STATE_V1, "hub_spawner_version": STATE_VERSION, "job_id": job_id,
                        "starting": True})
    assert asyncio.run(spawner.poll()) == 1
    assert "the hub stopped while job" in caplog.text
    plan = spawner._cleanup_plan()
    assert (plan.job_id, plan.by_name) == (job_id, not job_id)
    assert plan.job_name == STATE_V1["job_name"]


def test_a_finished_spawns_state_is_not_starting():
    spawner = make_spawner()
    spawner.load_state({**STATE_V1, "hub_spawner_version": STATE_VERSION, "starting": False})
    assert not spawner._start_interrupted and spawner.get_state()["starting"] is False


class FakeDB:
    def __init__(self, fail: bool = False) -> None:
        self.fail, self.commits, self.rollbacks = fail, 0, 0

    def commit(self) -> None:
        if self.fail:
            raise RuntimeError("database is locked")
        self.commits += 1

    def rollback(self) -> None:
        self.rollbacks += 1


def test_the_state_is_committed_early_while_the_spawn_runs(caplog):
    spawner = make_spawner()
    spawner.db = FakeDB()
    spawner.job_name, spawner._starting = "jupyterhub-alice-default-0a1b2c3d", True
    saved_state.save_now(spawner)
    assert spawner.db.commits == 1
    assert spawner.orm_spawner.state["job_name"] == spawner.job_name
    assert spawner.orm_spawner.state["starting"] is True
    spawner.db = FakeDB(fail=True)
    saved_state.save_now(spawner)  # never raises: the spawn goes on
    assert spawner.db.rollbacks == 1 and "could not save the state" in caplog.text


def test_state_without_a_job_is_not_an_error(caplog):
    spawner = make_spawner()
    spawner.load_state({})
    spawner.load_state({"hub_spawner_version": 99})
    assert spawner.job_id == "" and "unknown version" not in caplog.text


def test_bad_limit_in_config_is_a_clear_error():
    with pytest.raises(ValueError, match="Memory 'lots' is not understood"):
        make_spawner(max_memory="lots").cluster.limits()


def test_cluster_username_template_must_give_a_unix_name():
    spawner = make_spawner("alice@example.org", login_host="login")
    with pytest.raises(ClusterUnreachable, match="not a valid Unix user name"):
        asyncio.run(spawner._ssh_target())


@pytest.mark.parametrize(("scheduler", "label"),
                         [("slurm", "Partition"), ("sge", "Queue"), ("torque", "Queue")])
def test_form_speaks_the_schedulers_language_and_offers_gpus_only_when_allowed(scheduler, label):
    spawner = make_spawner(scheduler=scheduler, cluster_load_interval=0)
    form = asyncio.run(spawner.options_form(spawner))
    assert f">{label}</label>" in form
    assert 'name="gpus"' not in form
    spawner = make_spawner(scheduler=scheduler, max_gpus=2, cluster_load_interval=0)
    assert 'name="gpus"' in asyncio.run(spawner.options_form(spawner))


def test_gpus_are_refused_where_none_are_offered():
    spawner = make_spawner()
    with pytest.raises(ValueError, match="GPUs are not offered here"):
        spawner.options_from_form({"gpus": ["1"]})


def test_grid_engine_form_refuses_cores_without_a_parallel_environment():
    spawner = make_spawner(scheduler="sge", parallel_environment="")
    with pytest.raises(ValueError, match="one core per Grid Engine job"):
        spawner.options_from_form({"cpus": ["2"]})
    assert spawner.options_from_form({"cpus": ["1"]})["cpus"] == 1


def test_hostile_admin_setting_never_reaches_a_directive():
    spawner = make_spawner(scheduler="sge", parallel_environment="smp\n#$ -u root")
    with pytest.raises(ValueError, match="Bad spawner setting"):
        spawner.options_from_form({"cpus": ["2"]})


@pytest.mark.parametrize(("username", "config", "words"), [
    ("root", {}, "ssh_certificate_denied_principals"),
    ("admin", {"ssh_certificate_denied_principals": ["root", "admin"]},
     "ssh_certificate_denied_principals"),
    ("daemon", {"ssh_certificate_min_uid": 1000}, "has uid 1, and ssh_certificate_min_uid"),
    ("no-such-user-here", {"ssh_certificate_min_uid": 1000}, "not in the hub's user database"),
])
def test_certificate_mode_refuses_a_principal_by_the_sites_rule_before_signing(
        tmp_path, username, config, words):
    """Issue 28: a certificate for ``root`` (or any account below the site's uid floor) is
    never signed, with a message saying why."""
    spawner = make_spawner("eve", login_host="login", ssh_ca_key_path=str(tmp_path / "ca"),
                           cluster_username=lambda _: username, **config)
    with pytest.raises(ClusterUnreachable, match=words):
        asyncio.run(spawner._ssh_target())
    # The status identity falls back to per-user listings instead (``nobody``: Debian's
    # base-passwd account, uid 65534, stands for an ordinary user here).
    spawner = make_spawner("nobody", login_host="login", ssh_ca_key_path=str(tmp_path / "ca"),
                           status_cluster_username=username, **config)
    owner = asyncio.run(spawner._ssh_target())
    assert owner.username == "nobody" and spawner.cluster.status_target(owner) is None


def test_certificate_mode_signs_for_an_ordinary_user(tmp_path):
    spawner = make_spawner("eve", login_host="login", ssh_ca_key_path=str(tmp_path / "ca"),
                           ssh_certificate_min_uid=0)
    assert asyncio.run(spawner._ssh_target()).username == "eve"


@pytest.mark.parametrize("username", ["alice\n", "alice\nbob", "\nalice", "alice "])
def test_cluster_username_with_a_line_break_or_space_is_refused(username):
    spawner = make_spawner("alice", login_host="login", cluster_username=lambda _: username)
    with pytest.raises(ClusterUnreachable, match="not a valid Unix user name"):
        asyncio.run(spawner._ssh_target())


REST_HOSTILE = ["; touch CANARY", "$(id)", "`id`", "x\n#SBATCH --uid=0", "--uid=0", "A" * 10240,
                "ünï", "9" * 400, -1, 10**400, float("nan"), float("inf"), [], {}, True]
REST_FIELD_WORDS = {"partition": "partition", "cpus": "cores", "memory": "memory",
                    "gpus": "gpus", "walltime": "walltime", "account": "account"}


@pytest.mark.parametrize("field", sorted(REST_FIELD_WORDS))
@pytest.mark.parametrize("value", REST_HOSTILE, ids=lambda value: repr(value)[:20])
def test_rest_user_options_are_refused_by_start_before_any_io(field, value):
    """The REST API hands the request body to start() as user_options: a bad value is a 400
    BadOptions naming the field, raised before the spawner connects anywhere (no login_host
    is configured here: getting further would be a ClusterUnreachable instead)."""
    spawner = make_spawner(max_gpus=2)
    spawner.user_options = {field: value}
    with pytest.raises(BadOptions) as raised:
        asyncio.run(spawner.start())
    assert raised.value.status_code == 400
    assert REST_FIELD_WORDS[field] in str(raised.value).lower()
    assert len(str(raised.value)) < 400


@pytest.mark.parametrize("user_options", [{"image": "x"}, {"x" * 10240: 1}, {"; id": 1}])
def test_rest_unknown_keys_are_refused_by_start(user_options):
    spawner = make_spawner()
    spawner.user_options = user_options  # (the trait itself refuses anything but a dict)
    with pytest.raises(BadOptions, match="Unknown option"):
        asyncio.run(spawner.start())


def ready_output(host, port=43211):
    return f'starting\nHUB_SPAWNER_READY {{"host": "{host}", "port": {port}}}\n'


def connection_reading(text):
    """``_connection`` of a spawner whose job output file holds ``text`` (or raises it)."""

    class Connection:
        async def read_file(self, path):
            if isinstance(text, Exception):
                raise text
            return text

    async def connect(where=None):
        return Connection()

    return connect


def ready_wait(spawner):
    """The spawner's ``ReadyWait`` for its job, as ``_wait_for_ready_line`` makes it."""
    from hub_spawner.job import ReadyWait

    return ReadyWait(spawner._calls, spawner.job_id, spawner.output_path, False, 1, 1,
                     lambda progress, message: None, lambda: None)


def test_the_tunnel_target_is_the_schedulers_node_not_the_jobs_words():
    spawner = make_spawner()
    spawner.job_id = "42"

    spawner._connection = connection_reading(ready_output("COMPUTE"))
    ready = asyncio.run(ready_wait(spawner).read_ready_line("compute"))
    assert (ready.host, ready.port) == ("compute", 43211)


@pytest.mark.parametrize("reported", ["elsewhere.127.0.0.1.nip.io", "cn0170.evil.example",
                                      "login"])
def test_a_ready_line_naming_another_host_fails_the_spawn(reported):
    spawner = make_spawner()
    spawner.job_id = "42"

    spawner._connection = connection_reading(ready_output(reported))
    with pytest.raises(BadReadyLine, match="Not connecting to job 42: the job says"):
        asyncio.run(ready_wait(spawner).read_ready_line("cn017"))


def test_a_ready_line_the_follower_got_is_used_after_it_ended():
    """The job printed its ready line, then a line too long for the follower, which ended:
    the ready line it has is good (the file's tail, read otherwise, may no longer hold it)."""
    spawner = make_spawner()
    spawner.job_id = "42"
    spawner._connection = connection_reading(AssertionError("no need to read the file"))
    follower = SimpleNamespace(text=ready_output("compute"), ended=True)
    ready = asyncio.run(ready_wait(spawner).read_ready_line("compute", follower))
    assert (ready.host, ready.port) == ("compute", 43211)
    # An ended follower without one: the file is read.
    spawner._connection = connection_reading(ready_output("compute", 43212))
    follower = SimpleNamespace(text="starting\n", ended=True)
    assert asyncio.run(ready_wait(spawner).read_ready_line("compute", follower)).port == 43212


def test_no_ready_line_is_read_while_the_scheduler_names_no_node():
    spawner = make_spawner()
    spawner.job_id = "42"

    spawner._connection = connection_reading(AssertionError("the output must not be read "
                                                            "before the node is known"))
    assert asyncio.run(ready_wait(spawner).read_ready_line("")) is None


@pytest.mark.parametrize("directive", ["--constraint=a\nrm -rf ~", "--x\r", "--x\0y"])
def test_an_extra_directive_with_a_line_break_is_refused(directive):
    with pytest.raises(TraitError, match=r"job_extra_directives\[1\].*line break"):
        make_spawner(job_extra_directives=["--exclusive", directive])


@pytest.mark.parametrize("scheduler", SPAWNERS)
def test_a_hostile_job_python_never_runs_in_the_job_script(scheduler, tmp_path):
    spawner = make_spawner(scheduler=scheduler, job_python='/opt/py"; touch CANARY; "',
                           cmd=["true"])
    spawner.job_name = "jupyterhub-alice-default-0a1b2c3d"
    spawner.output_path = str(tmp_path / "job.out")
    spawner.secrets_path = str(tmp_path / "server.env")
    (tmp_path / "server.env").write_text("")
    script = spawner._job_script(Resources("", 1, 0, 3600, ""))
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                            timeout=20, cwd=tmp_path)
    assert not (tmp_path / "CANARY").exists()
    assert result.returncode == 1 and "could not choose a free port" in result.stderr


class RecordingConnection:
    """A LoginConnection stand-in: records what the spawner does on the cluster."""

    def __init__(self, listing):
        self.target = SimpleNamespace(username="alice", host="login", port=22)
        self.listing = listing
        self.calls = []

    async def home(self):
        return "/home/alice"

    async def make_private_dir(self, path):
        self.calls.append(("mkdir -p", path))

    async def make_new_private_dir(self, path):
        self.calls.append(("mkdir", path))
        return RemoteEntry(path.rsplit("/", 1)[1], 1_800_000_000.0, 1001, True, False)

    async def list_dir(self, path):
        self.calls.append(("list", path))
        return self.listing

    async def write_private_file(self, path, content):
        self.calls.append(("create", path))

    async def run(self, command, timeout=60):
        self.calls.append(("run", command))
        if command.startswith("sbatch"):
            return CommandOutput(1, "", "sbatch: error: Invalid partition name specified\n")
        return CommandOutput(0, "", "")


def test_each_job_gets_a_fresh_directory_and_old_ones_are_removed_at_submit():
    old = [RemoteEntry(f"jupyterhub-alice-default-{n:08x}", 1_800_000_000.0 - n * 30 * 86400,
                       1001, True, False) for n in range(1, 4)]
    connection = RecordingConnection(old + [
        RemoteEntry("jupyterhub-bob-default-00000009", 0.0, 1002, True, False)])
    spawner = make_spawner(job_files_keep=1, hub_connect_url="http://hub:8081")
    spawner.hub = SimpleNamespace(api_url="http://127.0.0.1:8081/hub/api")

    async def the_connection():
        return connection

    spawner._connection = the_connection
    spawner._job_env = lambda api_url: {"JUPYTERHUB_API_TOKEN": "t"}
    spawner._job_script = lambda resources: "#!/bin/bash\n"
    with pytest.raises(JobRejected):
        asyncio.run(spawner._start_job(Resources()))
    state_dir = "/home/alice/.hub-spawner"
    job_dir = f"{state_dir}/{spawner.job_name}"
    assert spawner.output_path == f"{job_dir}/job.out"
    assert spawner.secrets_path == f"{job_dir}/server.env"
    calls = connection.calls
    assert calls[:3] == [("mkdir -p", state_dir), ("mkdir", job_dir), ("list", state_dir)]
    removal = [command for kind, command in calls if kind == "run" and "rm" in command]
    assert removal == [f"rm -rf -- {state_dir}/{old[1].name} {state_dir}/{old[2].name}"]
    assert ("create", f"{job_dir}/server.env") in calls
    assert ("create", f"{job_dir}/job.sh") in calls
    assert ("run", f"sbatch --parsable {job_dir}/job.sh") in calls


def test_the_tunnel_listing_is_asked_once_for_all_polls_of_a_cycle():
    """Every running server's poll checks its forwards: all of a cycle share one ``list``."""
    from hub_spawner.tunnels.client import TunnelClient

    client = TunnelClient("/nonexistent-tunnels")
    calls = []

    async def forwards():
        calls.append(1)
        await asyncio.sleep(0.05)
        return {"alice/": {"up": True, "port": 40001}}

    client.forwards = forwards

    async def polls():
        first = await asyncio.gather(*(client.recent_forwards(0.5) for _ in range(20)))
        again = await client.recent_forwards(0.5)  # within max_age: no new request
        await asyncio.sleep(0.6)
        later = await client.recent_forwards(0.5)
        return first, again, later

    first, again, later = asyncio.run(polls())
    assert len(calls) == 2 and all(f == again == later for f in first)


def _with_tunnels(spawner, tunnels):
    """``spawner`` with ``tunnels`` as its tunnel service, until the returned undo is called."""
    path = type(spawner.server_path)
    original = path.tunnels
    path.tunnels = property(lambda self: tunnels)
    return lambda: setattr(path, "tunnels", original)


@pytest.mark.parametrize("listing, up", [
    ({"alice/": {"up": True, "port": 40001}, "alice//hub-api": {"up": True, "port": 40002}}, True),
    ({"alice/": {"up": True, "port": 40001}}, False),  # the hub API path is missing
    ({"alice/": {"up": False, "port": 40001}, "alice//hub-api": {"up": True, "port": 40002}},
     False),
    ({"alice/": {"up": True, "port": 49999}, "alice//hub-api": {"up": True, "port": 40002}},
     False),  # another port: ask the service
])
def test_a_poll_asks_for_the_forwards_only_when_the_listing_lacks_them(listing, up):
    spawner = make_spawner()
    spawner.tunnel_port, spawner.api_tunnel_port = 40001, 40002

    class Listing:
        async def recent_forwards(self, max_age):
            return listing

    undo = _with_tunnels(spawner, Listing())
    try:
        assert asyncio.run(spawner.server_path.listed_up()) is up
    finally:
        undo()


class _RecordingTunnels:
    """A fake tunnel service that records what it is asked, in order; ``recent_forwards``
    waits for ``release`` (a re-open under way) when one is given. A fake, not the lab's
    service: the race needs a re-open held at one exact await while stop() runs, which real
    timing cannot pin down; the lab's chaos and stop-during-spawn tests check the outcome (the
    service's table holds exactly the running servers' forwards)."""

    def __init__(self, release: asyncio.Event | None = None) -> None:
        self.calls: list[str] = []
        self.release = release

    async def recent_forwards(self, max_age):
        self.calls.append("listing")
        if self.release is not None:
            await self.release.wait()
        return {}

    def forget_listing(self):
        self.calls.append("forget")

    async def close(self, name):
        self.calls.append(f"close {name}")

    def __getattr__(self, name):  # any other request would (re)open a forward
        raise AssertionError(f"the tunnel service was asked to {name}")




def test_a_released_server_never_has_its_forwards_reopened():
    spawner = make_spawner()
    spawner.job_id, spawner.tunnel_port = "", 40001  # stop() took the job
    undo = _with_tunnels(spawner, _RecordingTunnels())
    try:
        assert asyncio.run(spawner.server_path.reopen()) is False
    finally:
        undo()


def test_a_close_waits_for_a_reopen_under_way_and_a_later_reopen_finds_the_job_released():
    """The race of issue 27: a poll re-opening forwards while stop() closes them. The close
    comes after the re-open's requests, never before them."""
    spawner = make_spawner()
    spawner.job_id, spawner.tunnel_port, spawner.api_tunnel_port = "12", 40001, 40002

    async def race():
        tunnels = _RecordingTunnels(asyncio.Event())
        undo = _with_tunnels(spawner, tunnels)
        try:
            reopen = asyncio.ensure_future(spawner.server_path.reopen())
            await asyncio.sleep(0.05)  # the re-open holds the lock, waiting for its listing
            spawner.job_id = ""  # stop() takes the job ...
            close = asyncio.ensure_future(spawner.server_path.close())  # ... and closes
            await asyncio.sleep(0.05)
            assert tunnels.calls == ["listing"]  # the close waits for the re-open
            tunnels.release.set()
            await asyncio.gather(reopen, close, return_exceptions=True)
            assert tunnels.calls[-2:] == ["close alice/", "close alice//hub-api"]
            assert await spawner.server_path.reopen() is False  # and nothing comes back
            assert tunnels.calls[-2:] == ["close alice/", "close alice//hub-api"]
        finally:
            undo()

    asyncio.run(race())


def test_a_poll_whose_server_is_stopped_meanwhile_reopens_nothing():
    spawner = make_spawner()
    spawner.job_id, spawner.job_host, spawner.tunnel_port = "12", "compute", 40001
    listed = asyncio.Event()
    reopened = []

    async def listed_status():
        await listed.wait()
        return JobStatus(JobState.RUNNING)

    async def reopen(quiet=False):
        reopened.append(quiet)
        return True

    spawner._listed_status = listed_status
    spawner.server_path.reopen = reopen

    async def poll_during_stop():
        poll = asyncio.ensure_future(spawner.poll())
        await asyncio.sleep(0.05)
        spawner.job_id = ""  # stop() took the job while the listing was awaited
        listed.set()
        return await poll

    assert asyncio.run(poll_during_stop()) == 0
    assert reopened == []


# --- what the spawn page says while the job waits, and near the walltime -------------------


def test_the_walltime_warning_is_logged_once_when_the_end_is_near(caplog):
    spawner = make_spawner()
    spawner.job_id, spawner.walltime_seconds = "12", 3600
    spawner.walltime_warning = 600
    spawner.job_started_at = time.time() - 3600 + 1200  # 20 min left: no warning yet
    with caplog.at_level(logging.WARNING):
        spawner._warn_near_walltime()
        assert "reaches its walltime" not in caplog.text
        spawner.job_started_at = time.time() - 3600 + 300  # 5 min left
        spawner._warn_near_walltime()
        spawner._warn_near_walltime()
    warnings = [r.getMessage() for r in caplog.records if "reaches its walltime" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "job 12 reaches its walltime at " in warnings[0] and "(in 4 min)" in warnings[0]
    assert "Slurm will stop the server then" in warnings[0]


# --- several clusters behind one hub ------------------------------------------------------

CLUSTERS = [
    {"name": "hpc", "display_name": "HPC", "description": "CPU nodes", "scheduler": "slurm",
     "config": {"login_host": "login.hpc.example", "partitions": ["cpu", "long"],
                "max_cpus": 32}},
    {"name": "farm", "display_name": "GPU farm", "scheduler": "sge", "groups": ["gpu"],
     "settings": {"parallel_environment": "mpi-smp"},
     "config": {"login_host": "farm.example", "login_port": 2200, "max_gpus": 2}},
]


def cluster_spawner(groups=(), user="alice"):
    spawner = make_spawner(clusters=CLUSTERS, login_host="own.example", cluster_load_interval=0)
    spawner.user = SimpleNamespace(name=user, groups=[SimpleNamespace(name=g) for g in groups])
    return spawner


def test_a_user_sees_only_the_clusters_their_groups_may_use():
    assert [c.key for c in cluster_spawner().offered_clusters()] == ["hpc"]
    assert [c.key for c in cluster_spawner(["gpu"]).offered_clusters()] == ["hpc", "farm"]


def test_a_clusters_option_value_is_normalised_by_the_options_own_validator():
    spawner = make_spawner(clusters=[{"name": "x", "scheduler": "slurm",
                                      "config": {"server_transport": "SOCKET"}}])
    assert cluster_named(spawner, "x").server_transport == "socket"


def test_a_cluster_reads_its_own_scheduler_settings_and_options_over_the_spawners():
    spawner = cluster_spawner(["gpu"])
    farm, hpc = (cluster_named(spawner, key) for key in ("farm", "hpc"))
    assert farm.scheduler is sge and hpc.scheduler is slurm
    assert (farm.login_host, farm.login_port, farm.max_gpus) == ("farm.example", 2200, 2)
    assert (hpc.login_host, hpc.login_port, hpc.max_cpus) == ("login.hpc.example", 22, 32)
    assert farm.template_variables(Resources(cpus=2))["parallel_environment"] == "mpi-smp"
    # Reading them changes nothing on the spawner: it stays on its own cluster.
    assert spawner.cluster.key == "" and spawner.cluster.scheduler is slurm
    assert (spawner.cluster.login_host, spawner.cluster.max_cpus) == ("own.example", 64)
    spawner.use(farm)
    assert "-pe mpi-smp 2" in spawner._job_script(Resources(cpus=2))
    assert spawner.cluster.login_host == "farm.example" and spawner.login_host == "own.example"
    spawner.use(cluster_named(spawner, ""))
    assert spawner.cluster.scheduler is slurm and spawner.cluster.login_host == "own.example"
    with pytest.raises(ValueError, match="no cluster 'nosuch'"):
        cluster_named(spawner, "nosuch")
    with pytest.raises(AttributeError, match="no option 'no_such_option'"):
        farm.no_such_option  # noqa: B018


def test_a_clusters_jupyterhub_options_go_on_the_spawner_and_come_back_with_another():
    """JupyterHub reads start_timeout (and cmd, http_timeout, ...) from the spawner's traits."""
    entries = [{**CLUSTERS[0], "config": {**CLUSTERS[0]["config"], "start_timeout": 900}},
               CLUSTERS[1]]
    spawner = make_spawner(clusters=entries, login_host="own.example", start_timeout=120)
    spawner.user = SimpleNamespace(name="alice", groups=[SimpleNamespace(name="gpu")])
    hpc, farm = (cluster_named(spawner, key) for key in ("hpc", "farm"))
    assert hpc.hub_options == {"start_timeout": 900} and farm.hub_options == {}
    spawner.use(hpc)
    assert spawner.start_timeout == 900 and farm.start_timeout == 120
    spawner.use(farm)
    assert spawner.start_timeout == 120
    # JupyterHub runs the pre-spawn hook before move_certs and before it reads start_timeout.
    spawner.user_options = {"cluster": "hpc", "cpus": 1}
    spawner.run_pre_spawn_hook()
    assert spawner.cluster.key == "hpc" and spawner.start_timeout == 900
    spawner.user_options = {"cluster": "nosuch"}
    spawner.run_pre_spawn_hook()  # start() says what is wrong
    assert spawner.cluster.key == "hpc"


def test_an_option_a_hook_changed_after_the_cluster_stays_as_the_hook_left_it():
    entries = [{**CLUSTERS[0], "config": {**CLUSTERS[0]["config"], "start_timeout": 900,
                                          "cmd": ["hpc-singleuser"]}}, CLUSTERS[1]]
    seen = []
    spawner = make_spawner(clusters=entries, login_host="own.example", start_timeout=120,
                           pre_spawn_hook=lambda s: seen.append(s.start_timeout))
    spawner.user = SimpleNamespace(name="alice", groups=[SimpleNamespace(name="gpu")])
    spawner.user_options = {"cluster": "hpc"}
    spawner.run_pre_spawn_hook()
    assert seen == [900]  # the admin's hook sees the cluster's values
    spawner.start_timeout = 1800  # e.g. the hook, or group_overrides, for this user
    spawner.use(cluster_named(spawner, "hpc"))  # start() puts it there again: no change
    assert spawner.start_timeout == 1800
    spawner.use(cluster_named(spawner, "farm"))
    # cmd was the cluster's: back to the configured one; start_timeout is not the cluster's
    # value any more, so it is left alone.
    assert spawner.cmd == ["jupyterhub-singleuser"] and spawner.start_timeout == 1800


def test_the_form_data_of_the_chosen_cluster_becomes_its_options():
    spawner = cluster_spawner(["gpu"])
    formdata = {"cluster": ["farm"], "farm--preset": [""], "farm--cpus": ["2"],
                "hpc--cpus": ["30"], "hpc--partition": ["cpu"]}
    options = spawner.options_from_form(formdata)
    assert options["cluster"] == "farm" and options["cpus"] == 2
    assert spawner.cluster.key == "" and spawner.cluster.login_host == "own.example"  # untouched


def test_a_cluster_the_user_may_not_use_is_refused_on_the_form_and_by_start():
    spawner = cluster_spawner()
    with pytest.raises(ValueError, match="Cluster 'farm' is not offered to you"):
        spawner.options_from_form({"cluster": ["farm"], "farm--cpus": ["1"]})
    spawner.user_options = {"cluster": "farm", "cpus": 1}
    with pytest.raises(BadOptions, match="Cluster 'farm' is not offered to you"):
        asyncio.run(spawner.start())


def test_a_hub_with_one_cluster_refuses_a_cluster_option():
    spawner = make_spawner()
    spawner.user_options = {"cluster": "hpc"}
    with pytest.raises(BadOptions, match="one cluster"):
        asyncio.run(spawner.start())


def test_the_jobs_cluster_is_in_its_state_and_a_restarted_hub_follows_it_there():
    spawner = cluster_spawner(["gpu"])
    spawner.use(cluster_named(spawner, "farm"))
    spawner.job_id, spawner.job_cluster_username = "12", "alice"
    spawner.job_login_host, spawner.job_login_port = "farm.example", 2200
    state = spawner.get_state()
    assert (state["cluster_key"], state["scheduler"], state["login_host"]) == (
        "farm", "sge", "farm.example")
    fresh = cluster_spawner()  # even a user no longer in the group: the job is followed
    fresh.load_state(state)
    assert fresh.cluster.scheduler is sge and fresh.job_id == "12"
    assert fresh.cluster.login_host == "farm.example"


@pytest.mark.parametrize("entry, message", [
    ({"name": "a b", "scheduler": "slurm"}, "'name' must be"),
    ({"name": "x", "scheduler": "lsf"}, "'scheduler' must be slurm, sge or torque"),
    ({"name": "x", "scheduler": "slurm", "settings": {"parallel_environment": "smp"}},
     "slurm has no setting 'parallel_environment'"),
    ({"name": "x", "scheduler": "slurm", "config": {"no_such_option": 1}},
     "not an option of this spawner"),
    ({"name": "x", "scheduler": "slurm", "config": {"max_cpus": "many"}}, "config 'max_cpus'"),
    ({"name": "x", "scheduler": "slurm", "colour": "red"}, "unknown field 'colour'"),
    # The option's own validators run too, as for the spawner's own value:
    ({"name": "x", "scheduler": "slurm",
      "config": {"job_extra_directives": ["--x\n#SBATCH --evil"]}}, "line break"),
    ({"name": "x", "scheduler": "slurm", "config": {"reconcile": "bogus"}}, "reconcile"),
    ({"name": "x", "scheduler": "slurm", "config": {"hub_id": "a b"}}, "hub's option"),
    ({"name": "x", "scheduler": "slurm", "config": {"tunnel_service_dir": "/x"}},
     "the same for every cluster"),
])
def test_a_bad_cluster_entry_is_a_clear_config_error(entry, message):
    spawner = make_spawner(clusters=[entry])
    with pytest.raises(ValueError, match=message):
        spawner.offered_clusters()


def test_the_form_offers_each_visible_cluster_with_its_own_choices():
    html = asyncio.run(cluster_spawner(["gpu"], user="carol").render_form())
    assert 'name="cluster"' in html and 'value="hpc" checked' in html
    assert 'name="hpc--partition"' in html and 'name="farm--gpus"' in html
    assert "GPU farm" in html and "Grid Engine" in html
    assert "farm--" not in asyncio.run(cluster_spawner(user="dave").render_form())


def test_the_form_shows_every_cluster_without_moving_a_running_server_off_its_own(monkeypatch):
    """While the form waits for each cluster's load, the spawner's own server (here on the
    farm) is polled and stopped on the hub's one loop: what it reads must not change."""
    spawner = cluster_spawner(["gpu"])
    spawner.use(cluster_named(spawner, "farm"))
    seen = []

    async def load(self, cluster):
        await asyncio.sleep(0)  # another coroutine (a poll of this server) runs here
        seen.append((cluster.key, spawner.cluster.key, spawner.cluster.login_host))
        return None, "not offered here"

    monkeypatch.setattr(SpawnForm, "load", load)
    html = asyncio.run(spawner.render_form())
    assert 'name="hpc--partition"' in html and 'name="farm--gpus"' in html
    assert seen == [("hpc", "farm", "farm.example"), ("farm", "farm", "farm.example")]
    spawner.options_from_form({"cluster": ["hpc"], "hpc--cpus": ["3"]})
    assert spawner.cluster.key == "farm"


def test_a_refused_cluster_form_comes_back_with_that_cluster_open_and_the_message():
    spawner = cluster_spawner(["gpu"], user="erin")

    async def refused_then_shown():  # on the hub's one loop, as JupyterHub's handlers run
        with pytest.raises(ValueError):
            spawner.options_from_form({"cluster": ["farm"], "farm--cpus": ["999"]})
        return await spawner.render_form()

    html = asyncio.run(refused_then_shown())
    assert 'value="farm" checked' in html
    assert 'name="farm--cpus"' in html and 'value="999"' in html
    assert "invalid-feedback" in html


def test_a_form_posted_without_a_cluster_goes_to_the_first_the_user_may_use():
    options = cluster_spawner(["gpu"], user="fay").options_from_form(
        {"hpc--cpus": ["3"], "farm--cpus": ["2"]})
    assert options["cluster"] == "hpc" and options["cpus"] == 3


def test_a_start_cancelled_while_its_hub_api_path_is_made_closes_that_path_after_it_is_made():
    """Stop pressed while the tunnel service makes the hub API path: start() ends at once,
    and the background cleanup closes the forwards only after the cancelled spawn's own
    request is answered (a fake service: the order of two requests within 0.3 s cannot be
    pinned down against the real one)."""
    spawner = make_spawner()
    events = []

    class Tunnels:
        async def close(self, name):
            events.append(f"close {name}")

    async def open_hub_api():
        await asyncio.sleep(0.3)
        events.append("api path made")
        return "http://127.0.0.1:1/hub/api"

    async def prepare_job_dir(connection, steps):
        await asyncio.sleep(60)

    async def connection(where=None):
        return SimpleNamespace(target=SimpleNamespace(host="login", port=22, username="alice"))

    spawner.server_path.open_hub_api = open_hub_api
    spawner._prepare_job_dir = prepare_job_dir
    spawner._connection = connection

    async def cancel_the_start():
        start = asyncio.ensure_future(spawner.start())
        await asyncio.sleep(0.1)
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        events.append("start ended")
        await spawner._background_release

    undo = _with_tunnels(spawner, Tunnels())
    try:
        asyncio.run(cancel_the_start())
    finally:
        undo()
    assert events == ["start ended", "api path made", "close alice/", "close alice//hub-api"]


@pytest.mark.parametrize(("listing", "asked"), [
    ({"alice//hub-api": {"up": True, "port": 40002}}, False),
    ({"alice//hub-api": {"up": False, "port": 40002}}, True),  # the service lost its master
    ({}, True),
])
def test_a_starting_server_gets_its_hub_api_path_back_only_when_the_service_lacks_it(
        listing, asked):
    """While a spawn waits for the ready line (the login node was down longer than a
    certificate lives, say), the hub API forward is asked for again, with a fresh identity,
    only when the service's listing lacks it (a fake service; the chaos lab test's
    'certificate-expired-login-down' fault is the real case)."""
    spawner = make_spawner()
    spawner.job_id, spawner.api_tunnel_port = "12", 40002
    calls = []

    class Tunnels:
        async def recent_forwards(self, max_age):
            return listing

        def forget_listing(self):
            calls.append("forget")

    async def open_hub_api():
        calls.append("open")
        return "http://127.0.0.1:40002/hub/api"

    spawner.server_path.open_hub_api = open_hub_api
    undo = _with_tunnels(spawner, Tunnels())
    try:
        asyncio.run(spawner.server_path.keep_hub_api())
    finally:
        undo()
    assert calls == (["forget", "open"] if asked else [])


def test_a_servers_certificate_names_the_tunnel_services_address():
    """internal_ssl: the proxy and the hub reach the server at tunnel_connect_host (the chart's
    tunnels Service) and check its certificate's name; loopback is named by JupyterHub itself."""
    assert make_spawner().ssl_alt_names == []
    assert make_spawner(tunnel_connect_host="hub-tunnels").ssl_alt_names == ["DNS:hub-tunnels"]
    assert make_spawner(tunnel_bind_ip="10.0.0.5").ssl_alt_names == ["IP:10.0.0.5"]
    assert make_spawner(tunnel_connect_host="fd00::5").ssl_alt_names == ["IP:fd00::5"]
    # an explicit setting wins, as in JupyterHub
    assert make_spawner(tunnel_connect_host="t", ssl_alt_names=["DNS:x"]).ssl_alt_names == [
        "DNS:x"]


@pytest.mark.parametrize(("text", "behind_bastion", "down"), [
    ("cannot connect to alice@login1:22: ssh: connect to host login1 port 22: No route to "
     "host", False, True),
    ("cannot connect to alice@login1:22: ssh: connect to host login1 port 22: Connection "
     "timed out", False, True),
    ("cannot connect to alice@login1:22: alice@login1: Permission denied (publickey).", False,
     False),
    # a node hop's own master (the node does not answer): not the login node's fault
    ("cannot connect to alice@cn1:22 via alice@login1:22: no answer in time", False, False),
    # behind a bastion: the bastion down is not this login node down ...
    ("cannot connect to alice@login1:22 via alice@bastion:22: ssh: connect to host bastion "
     "port 22: Connection timed out", True, False),
    # ... the bastion's forward to the node failing is
    ("cannot connect to alice@login1:22 via alice@bastion:22: channel 0: open failed: connect "
     "failed: No route to host\nstdio forwarding failed", True, True),
])
def test_only_the_login_nodes_own_connect_failure_marks_it_down(text, behind_bastion, down):
    """What the tunnel service says decides whether a login node is passed over (and every
    user's idle connection to it closed): only its own connect failure does."""
    from hub_spawner import server_path
    from hub_spawner.hub import hub_of
    from hub_spawner.tunnels.client import TunnelError
    from hub_spawner.tunnels.forwards import Login

    async def judge() -> tuple[bool, bool]:
        bastion = Login("bastion", 22, "alice", "/k", "/kh") if behind_bastion else None
        login = Login("login1", 22, "alice", "/k", "/kh", jump=bastion)
        said = server_path._node_down(login, TunnelError(text))
        return said, hub_of().pool.is_down("login1", 22)

    assert asyncio.run(judge()) == (down, down)
