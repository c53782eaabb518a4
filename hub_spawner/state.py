"""What a server's spawner keeps in the hub's database (its ``state``), and how it is read
back after a restart.

Rules this part owns:
- the state holds everything needed to find, poll, reach and cancel the job after a hub
  restart even if the config changed meanwhile: the scheduler, the login node, the cluster
  user, the cluster's key, the job's id and unique name, its node, ports and files;
- it is committed as soon as a job may exist (``save_now``, before the submission), not only
  when ``start()`` returns, so a hub that dies while a job waits finds it (``starting``) and
  cancels it;
- after a stop the cluster user stays on record: the reconciler lists, and cancels as, the
  cluster users on record, also after a restart with no server running;
- a job id in a state of a version this code does not know is never forgotten: it is kept,
  polled and cancelled as usual, with an error in the log; version 1 (no login node,
  scheduler or cluster user) is read with the config's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .cluster import cluster_named
from .job import iso_time, parse_iso_time

if TYPE_CHECKING:
    from .spawner import SSHBatchSpawner

STATE_VERSION = 2


def of(spawner: SSHBatchSpawner) -> dict[str, Any]:
    """Everything needed to find, poll, reach and cancel the job after a hub restart,
    even if the config changed meanwhile (state version 2)."""
    state: dict[str, Any] = {}
    if spawner.job_id or spawner.job_name:
        state.update(
            hub_spawner_version=STATE_VERSION,
            scheduler=spawner.cluster.scheduler.NAME,
            login_host=spawner.job_login_host or spawner.cluster.login_host,
            login_port=spawner.job_login_port or spawner.cluster.login_port,
            submit_host=spawner.job_submit_host,
            cluster_username=spawner.job_cluster_username,
            job_id=spawner.job_id,
            job_name=spawner.job_name,
            job_host=spawner.job_host,
            remote_port=spawner.remote_port,
            remote_socket=spawner.remote_socket,
            tunnel_port=spawner.tunnel_port,
            api_tunnel_port=spawner.api_tunnel_port,
            output_path=spawner.output_path,
            secrets_path=spawner.secrets_path,
            certs_dir=spawner.certs_dir,
            starting=spawner._starting or spawner._start_interrupted,
            # For admins (the API's server state, the admin page's details):
            cluster=(spawner.cluster.cluster_display_name or spawner.job_login_host
                     or spawner.cluster.login_host),
            cluster_key=spawner.cluster.key,
            submitted_at=iso_time(spawner.job_submitted_at),
            started_at=iso_time(spawner.job_started_at),
            walltime_seconds=spawner.walltime_seconds,
            ends_at=iso_time(spawner._walltime_end),
        )
    elif spawner.cluster_username_on_record:
        # Kept after a stop: the reconciler lists (and cancels as) the cluster users on
        # record, also after a restart with no server running.
        state.update(
            hub_spawner_version=STATE_VERSION,
            scheduler=spawner.cluster.scheduler.NAME,
            login_host=spawner.job_login_host or spawner.cluster.login_host,
            login_port=spawner.job_login_port or spawner.cluster.login_port,
            cluster_username=spawner.cluster_username_on_record,
            cluster_key=spawner.cluster.key,
        )
    return state


def load(spawner: SSHBatchSpawner, state: dict[str, Any]) -> None:
    """Read state of version 2, or migrate version 1 (the skeleton's: no login node,
    scheduler or cluster user; the config's are assumed). A job id in state of any other
    version is never forgotten: it is kept (and polled, and cancelled at stop), with an
    error in the log."""
    version = state.get("hub_spawner_version")
    if version not in (1, STATE_VERSION):
        if state.get("job_id") or state.get("job_name"):
            spawner.log.error(
                "%s: spawner state of unknown version %r holds job %s; keeping the job id "
                "(it is polled and cancelled as usual) and ignoring the rest: %s",
                spawner._log_name, version, state.get("job_id") or state.get("job_name"),
                sorted(state),
            )
            spawner.job_id = _state_text(state, "job_id")
            spawner.job_name = _state_text(state, "job_name")
        return
    spawner.job_id = _state_text(state, "job_id")
    spawner.job_name = _state_text(state, "job_name")
    if state.get("starting"):
        spawner._start_interrupted = True
        spawner._submission_sent = bool(spawner.job_name)  # no id yet: cancelled by its name
    spawner.job_host = _state_text(state, "job_host")
    spawner.job_submit_host = _state_text(state, "submit_host")
    spawner.remote_port = int(state.get("remote_port") or 0)
    spawner.remote_socket = _state_text(state, "remote_socket")
    spawner.tunnel_port = int(state.get("tunnel_port") or 0)
    spawner.api_tunnel_port = int(state.get("api_tunnel_port") or 0)
    spawner.output_path = _state_text(state, "output_path")
    spawner.secrets_path = _state_text(state, "secrets_path")
    spawner.certs_dir = _state_text(state, "certs_dir")
    spawner.job_submitted_at = parse_iso_time(state.get("submitted_at"))
    spawner.job_started_at = parse_iso_time(state.get("started_at"))
    walltime = state.get("walltime_seconds")
    spawner.walltime_seconds = walltime if isinstance(walltime, int) and walltime > 0 else 0
    if version == STATE_VERSION:
        spawner.job_cluster_username = _state_text(state, "cluster_username")
        spawner.cluster_username_on_record = spawner.job_cluster_username
        if not (spawner.job_id or spawner.job_name):
            spawner.job_cluster_username = ""
        cluster_key = _state_text(state, "cluster_key")
        if cluster_key:
            try:
                spawner.use(cluster_named(spawner, cluster_key))  # its scheduler: poll, stop
            except ValueError as error:
                spawner.log.error(
                    "%s: job %s ran on cluster %r, which the config no longer has (%s); "
                    "following it with the spawner's own settings", spawner._log_name,
                    spawner.job_id, cluster_key, error,
                )
        if state.get("scheduler") not in ("", None, spawner.cluster.scheduler.NAME):
            spawner.log.error(
                "%s: job %s was submitted to %s, but this spawner is for %s; it is polled "
                "and cancelled with %s's commands, which may not know it",
                spawner._log_name, spawner.job_id, state["scheduler"],
                spawner.cluster.scheduler.NAME, spawner.cluster.scheduler.NAME,
            )
        login = (_state_text(state, "login_host"), int(state.get("login_port") or 0))
        if login[0] and login != (spawner.cluster.login_host, spawner.cluster.login_port):
            spawner.log.warning(
                "%s: job %s was submitted through %s:%d; following it there (the config now "
                "says %s:%d)", spawner._log_name, spawner.job_id, *login,
                spawner.cluster.login_host, spawner.cluster.login_port,
            )
        if login[0] and login[1]:
            spawner.job_login_host, spawner.job_login_port = login


def save_now(spawner: SSHBatchSpawner) -> None:
    """Commit this state to the hub's database at once. JupyterHub saves it only after
    start() returns: a hub that dies while a job waits or starts would forget the job, and
    leave it running. With this, the restarted hub loads the job (``starting``: the spawn
    never finished), and cancels it."""
    if spawner.orm_spawner is None or spawner.db is None:
        return
    try:
        spawner.orm_spawner.state = spawner.get_state()
        spawner.db.commit()
    except Exception as error:
        spawner.db.rollback()
        spawner.log.warning(
            "%s: could not save the state of job %s early (%s); a hub that dies before "
            "the spawn ends would not know it", spawner._log_name,
            spawner.job_id or spawner.job_name, error,
        )


def _state_text(state: dict[str, Any], key: str) -> str:
    value = state.get(key)
    return value if isinstance(value, str) else ""
