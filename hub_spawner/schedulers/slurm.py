"""Slurm: the job script, the command lines and the parsers for their output.

Requirements:
- pure: no I/O; every function here is a small transformation tested on recorded real output
  (``tests/fixtures/slurm/``);
- every value that ends up in a command line is validated by the caller and quoted here
  with ``shlex.quote``; ``#SBATCH`` directives only ever receive values that passed
  ``hub_spawner.resources`` validation (sbatch parses them itself, no shell involved);
- an answer we cannot read is ``JobState.UNKNOWN``, never ``JobState.DONE``: a job is only
  declared gone when Slurm says so.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from ..resources import Resources
from . import (
    CommandOutput,
    JobState,
    JobStatus,
    ListedJob,
    QueueLimits,
    QueueLoad,
    QueuePlace,
    SchedulerUnavailable,
    SubmitRejected,
    listed_usernames,
    merge_queue_limits,
    parse_duration,
)

NAME = "slurm"
DISPLAY_NAME = "Slurm"
QUEUE_LABEL = "Partition"

#: Default job script. Jinja2; ``launch`` is the scheduler-independent part that starts the
#: server and prints the ready line (``hub_spawner.jobscript``). Directive values are validated
#: before rendering (see ``hub_spawner.resources``); ``template_variables`` adds the rest.
JOB_SCRIPT_TEMPLATE = """\
#!/bin/bash
#SBATCH --job-name={{ job_name }}
#SBATCH --output={{ output_path }}
#SBATCH --no-requeue
{% if resources.partition %}#SBATCH --partition={{ resources.partition }}
{% endif %}{% if resources.cpus %}#SBATCH --cpus-per-task={{ resources.cpus }}
{% endif %}{% if resources.memory_mb %}#SBATCH --mem={{ resources.memory_mb }}M
{% endif %}{% if gres %}#SBATCH --gres={{ gres }}
{% endif %}{% if time_limit %}#SBATCH --time={{ time_limit }}
{% endif %}{% if resources.account %}#SBATCH --account={{ resources.account }}
{% endif %}{% if qos %}#SBATCH --qos={{ qos }}
{% endif %}{% for directive in extra_directives %}#SBATCH {{ directive }}
{% endfor %}
{{ launch }}
"""

# States from squeue(1) "JOB STATE CODES".
_PENDING_STATES = {
    "PENDING",
    "CONFIGURING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
    "SPECIAL_EXIT",
    "RESV_DEL_HOLD",
}
_RUNNING_STATES = {"RUNNING"}
_ENDING_STATES = {"COMPLETING"}
_DONE_STATES = {
    "COMPLETED",
    "CANCELLED",
    "FAILED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "OUT_OF_MEMORY",
    "REVOKED",
}

# Why a job ended, for people, by Slurm's final state.
_END_EXPLANATIONS = {
    "TIMEOUT": "it reached its walltime limit; start a new server, with a longer walltime if "
    "you need more time",
    "OUT_OF_MEMORY": "it ran out of memory; start a new server with more memory",
    "NODE_FAIL": "its node failed; start a new server",
    "BOOT_FAIL": "its node failed to boot; start a new server",
    "PREEMPTED": "a job with higher priority preempted it; start a new server",
    "DEADLINE": "it reached its deadline; start a new server",
    "CANCELLED": "it was cancelled (by you, an administrator or the scheduler)",
    "FAILED": "it failed (its output file has the details)",
    "COMPLETED": "the server exited",
    "COMPLETING": "the server exited",
}

_JOB_ID = re.compile(r"[0-9]+(_[0-9]+)?")
_FIELD_SEPARATOR = "|"
#: What squeue's ``%S`` prints for a job without an expected start.
_NO_START = ("N/A", "Unknown", "")


def template_variables(resources: Resources, settings: dict[str, Any]) -> dict[str, Any]:
    """Scheduler-specific template variables: ``time_limit``, ``gres`` (``gpu:N`` with the
    admin's ``gpu_gres`` name), ``qos`` (the admin's ``qos``)."""
    gres_name = settings.get("gpu_gres") or "gpu"
    return {
        "time_limit": format_time_limit(resources.walltime_seconds),
        "gres": f"{gres_name}:{resources.gpus}" if resources.gpus else "",
        "qos": settings.get("qos", ""),
    }


def format_time_limit(seconds: int) -> str:
    """Slurm's ``D-HH:MM:SS`` (``--time``); ``""`` for 0 (the partition's default)."""
    if seconds <= 0:
        return ""
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    return f"{days}-{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


def submit_command(script_path: str, output_path: str) -> str:
    """Command line that submits the job script at ``script_path`` (the script itself names
    ``output_path``)."""
    return f"sbatch --parsable {shlex.quote(script_path)}"


def parse_submit_output(output: CommandOutput) -> str:
    """Job id from ``sbatch --parsable``; raises ``SubmitRejected`` with Slurm's message.

    ``--parsable`` prints ``ID`` or ``ID;CLUSTER``.
    """
    if output.exit_status != 0:
        raise SubmitRejected(_error_text(output) or f"sbatch exited with {output.exit_status}")
    first_line = output.stdout.strip().splitlines()[0] if output.stdout.strip() else ""
    job_id = first_line.split(";", 1)[0].strip()
    if not _JOB_ID.fullmatch(job_id):
        raise SubmitRejected(f"sbatch printed no job id (output: {output.stdout.strip()!r})")
    return job_id


def status_command(job_id: str) -> str:
    """Command line that prints one ``STATE|NODE|REASON|START`` line for the job (START: the
    backfill scheduler's expected start of a pending job, as ``squeue --start`` shows it).

    ``--states=all`` keeps finished jobs visible until Slurm's MinJobAge purges them.
    """
    fmt = _FIELD_SEPARATOR.join(["%T", "%N", "%r", "%S"])
    return (
        f"squeue --noheader --states=all --jobs={quote_job_id(job_id)} --format={shlex.quote(fmt)}"
    )


def parse_status_output(output: CommandOutput, job_id: str) -> JobStatus:
    """Read ``status_command`` output.

    Guarantees: ``DONE`` only when squeue names a finished state, prints nothing, or says the job
    id is invalid (purged after MinJobAge); any other failure is ``UNKNOWN``.
    """
    if output.exit_status != 0:
        if "Invalid job id" in output.stderr:
            return JobStatus(JobState.DONE, reason="Slurm no longer knows the job")
        return JobStatus(JobState.UNKNOWN, reason=_error_text(output))
    lines = [line for line in output.stdout.splitlines() if line.strip()]
    if not lines:
        return JobStatus(JobState.DONE, reason="Slurm no longer lists the job")
    fields = [field.strip() for field in lines[0].strip().split(_FIELD_SEPARATOR)]
    if len(fields) == 3:  # an older hub_spawner's format, still in a running job's commands
        fields.append("")
    if len(fields) != 4:
        return JobStatus(JobState.UNKNOWN, reason=f"unreadable squeue line {lines[0]!r}")
    state_name, node, reason, start = fields
    reason = "" if reason == "None" else reason
    node = "" if node in ("", "(null)") else node
    state_name = state_name.split()[0] if state_name else ""
    if state_name in _RUNNING_STATES:
        state = JobState.RUNNING
    elif state_name in _PENDING_STATES:
        state = JobState.PENDING
    elif state_name in _ENDING_STATES:
        state = JobState.ENDING
    elif state_name in _DONE_STATES:
        state = JobState.DONE
    else:
        state = JobState.UNKNOWN
    start = start if state is JobState.PENDING and start not in _NO_START else ""
    return JobStatus(state, state_name=state_name, reason=reason, node=node,
                     estimated_start=start)


def list_command(cluster_usernames: list[str]) -> str:
    """One command that lists every job of these users, ended ones too until Slurm purges
    them (MinJobAge): one ``ID|STATE|NODE|REASON|USER|NAME`` line each."""
    users = listed_usernames(cluster_usernames)
    fmt = _FIELD_SEPARATOR.join(["%i", "%T", "%N", "%r", "%u", "%j"])
    return (f"squeue --noheader --states=all --users={shlex.quote(','.join(users))} "
            f"--format={shlex.quote(fmt)}")


def parse_list_output(output: CommandOutput) -> list[ListedJob]:
    """Read ``list_command`` output.

    Guarantees: ``SchedulerUnavailable`` (with Slurm's words) when squeue failed, and when a
    line that starts with a job id cannot be read, so no job is ever missed and taken for
    ended; lines that are not job lines at all (a login shell's banner) are skipped.
    """
    if output.exit_status != 0:
        raise SchedulerUnavailable(_error_text(output) or f"squeue exit status "
                                   f"{output.exit_status}")
    jobs = []
    for line in output.stdout.splitlines():
        fields = line.strip().split(_FIELD_SEPARATOR, 5)
        if not _JOB_ID.fullmatch(fields[0]):
            continue
        if len(fields) != 6:
            raise SchedulerUnavailable(f"unreadable squeue line {line.strip()!r}")
        job_id, state_name, node, reason, owner, name = fields
        status = parse_status_output(
            CommandOutput(0, _FIELD_SEPARATOR.join([state_name, node, reason]) + "\n", ""),
            job_id,
        )
        jobs.append(ListedJob(job_id, name, owner.strip(), status))
    return jobs


def job_key(job_id: str) -> str:
    """Slurm's ids are the same wherever they are printed."""
    return job_id


def explain_end(status: JobStatus) -> str:
    """Why the job ended and what to do, in a few words; never empty."""
    explanation = _END_EXPLANATIONS.get(status.state_name)
    if explanation:
        return f"{explanation} (Slurm state {status.state_name})"
    return status.reason or "Slurm no longer lists it"


# Slurm's pending reasons (squeue(1) "JOB REASON CODES"), in plain words; prefixes cover the
# families (AssocGrp*, QOSMax*...).
_PENDING_WORDS = {
    "Resources": "waiting for free cores, memory or GPUs",
    "Priority": "other jobs are ahead of it in the queue",
    "ReqNodeNotAvail": "the nodes it needs are down, drained or reserved",
    "PartitionDown": "the partition is down; an administrator has to bring it back",
    "PartitionInactive": "the partition is inactive; an administrator has to bring it back",
    "PartitionNodeLimit": "it asks for more nodes than the partition allows; it will not start: "
    "stop it and ask for fewer",
    "PartitionTimeLimit": "its walltime is longer than the partition allows; it will not start: "
    "stop it and choose a shorter walltime",
    "JobHeldUser": "it is held (by you); release it with scontrol release",
    "JobHeldAdmin": "it is held by an administrator",
    "BeginTime": "waiting for its requested start time",
    "Dependency": "waiting for the jobs it depends on",
    "DependencyNeverSatisfied": "the jobs it depends on failed; it will never start",
    "Reservation": "waiting for its reservation",
    "Licenses": "waiting for free licenses",
    "NodeDown": "a node it needs is down",
    "BadConstraints": "no node has the features it asks for; it will not start",
    "InvalidAccount": "the account is not valid for you; stop it and choose another",
    "InvalidQOS": "the QOS is not valid for you; stop it and choose another",
    "Cleaning": "being requeued after a previous run",
    "launch failed requeued held": "its start failed and an administrator has to release it",
}
_PENDING_PREFIXES = (
    ("AssocGrp", "your group's (account's) limit is reached; it starts when your group's "
                 "other jobs end"),
    ("AssocMax", "your account's per-job limit is exceeded; it will not start: ask for less"),
    ("QOSGrp", "the QOS's limit for everyone is reached; it starts when other jobs end"),
    ("QOSMax", "your limit is reached; it starts when your other jobs end"),
    ("QOSMin", "it asks for less than the QOS's minimum"),
)


def explain_pending(reason: str) -> str:
    """Slurm's pending reason in plain words, its code kept for admins (``""`` for none)."""
    code = reason.strip().strip("()")
    if not code or code == "None":
        return ""
    key = code.split(",")[0].strip()  # "ReqNodeNotAvail, UnavailableNodes:node01"
    words = _PENDING_WORDS.get(key)
    if words is None:
        words = next((text for prefix, text in _PENDING_PREFIXES if key.startswith(prefix)), "")
    return f"{words} (Slurm: {code})" if words else f"Slurm says: {code}"


def pending_queue_command() -> str:
    """Every pending job the user may see: ``ID|PARTITION|PRIORITY|EXPECTED START``."""
    fmt = _FIELD_SEPARATOR.join(["%i", "%P", "%Q", "%S"])
    return f"squeue --noheader --states=PENDING --format={shlex.quote(fmt)}"


def parse_pending_queue(output: CommandOutput, job_id: str) -> QueuePlace | None:
    """The job's place among the pending jobs of its (first) partition, by priority then age
    (job id), and Slurm's expected start (set by the backfill scheduler; ``""`` when it has
    none). ``None`` when squeue failed or does not list the job (``PrivateData=jobs`` hides
    the others: then the place counts only the user's jobs)."""
    if output.exit_status != 0:
        return None
    jobs = []
    for line in output.stdout.splitlines():
        fields = [field.strip() for field in line.split(_FIELD_SEPARATOR)]
        if len(fields) != 4 or not fields[2].isdigit():
            continue
        listed, partitions, priority, start = fields
        jobs.append((listed, partitions.split(",")[0], int(priority), start))
    mine = next((job for job in jobs if job[0] == job_id), None)
    if mine is None:
        return None
    queue = sorted((job for job in jobs if job[1] == mine[1]),
                   key=lambda job: (-job[2], _job_number(job[0])))
    position = 1 + [job[0] for job in queue].index(job_id)
    start = "" if mine[3] in _NO_START else mine[3]
    return QueuePlace(position, len(queue), start)


def _job_number(job_id: str) -> int:
    digits = re.match(r"[0-9]+", job_id)
    return int(digits.group(0)) if digits else 0


def check_command(cluster_username: str) -> str:
    """For ``python -m hub_spawner check``, in any login shell (csh too): ``sinfo
    --version`` (answers without a controller), then ``squeue``, which needs slurmctld."""
    return (f"sinfo --version && squeue --noheader --user={shlex.quote(cluster_username)} "
            "--format=%i > /dev/null")


def cancel_command(job_id: str) -> str:
    """Command line that cancels the job (harmless if it has already ended)."""
    return f"scancel {quote_job_id(job_id)}"


def cancel_listed_command(job_id: str, job_name: str, cluster_username: str) -> str:
    """Cancel a job a listing showed, only if Slurm agrees on its name and owner (the
    reconciler's cancel: a listing is text, so Slurm checks again what it read)."""
    return (f"scancel --name={shlex.quote(job_name)} --user="
            f"{shlex.quote(listed_usernames([cluster_username])[0])} {quote_job_id(job_id)}")


def cancel_by_name_command(job_name: str, cluster_username: str) -> str:
    """Command line that cancels the user's jobs with this (unique) name.

    Used when a submission was sent but its job id never came back.
    """
    return f"scancel --name={shlex.quote(job_name)} --user={shlex.quote(cluster_username)}"


def load_command() -> str:
    """One sinfo line per node and partition: partition, node, CPUs as
    ``allocated/idle/other/total``, configured and used GRES, and the node's state."""
    fields = ["PartitionName", "NodeHost", "CPUsState", "Gres", "GresUsed", "StateLong"]
    fmt = ",".join(f"{field}:{_FIELD_SEPARATOR}" for field in fields[:-1]) + f",{fields[-1]}:"
    return f"sinfo --noheader --Node --Format={shlex.quote(fmt)}"


def parse_load_output(output: CommandOutput) -> list[QueueLoad]:
    """Read ``load_command`` output: free and total cores, GPUs and whole idle nodes per
    partition, in sinfo's order.

    Guarantees: free cores are Slurm's idle CPUs (a down or drained node's are "other", never
    free); a node's GPUs are free only while it takes jobs and has an idle core; GPU columns
    are ``None`` when no node of the partition has a ``gpu`` GRES; ``ValueError`` when sinfo
    failed or printed a line we cannot read.
    """
    if output.exit_status != 0:
        raise ValueError(f"sinfo failed: {_error_text(output) or output.exit_status}")
    rows: dict[str, dict[str, Any]] = {}
    for line in output.stdout.splitlines():
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split(_FIELD_SEPARATOR)]
        if len(fields) != 6:
            raise ValueError(f"unreadable sinfo line {line!r}")
        partition, _node, cpus, gres, gres_used, state = fields
        try:
            allocated, idle, _other, total = (int(n) for n in cpus.split("/"))
        except ValueError:
            raise ValueError(f"unreadable sinfo CPU counts {cpus!r}") from None
        row = rows.setdefault(partition, {"cores_free": 0, "cores_total": 0, "gpus_free": None,
                                          "gpus_total": None, "nodes_free": 0,
                                          "nodes_total": 0})
        row["cores_free"] += idle
        row["cores_total"] += total
        row["nodes_total"] += 1
        usable = state.rstrip("*~#!%$@^-+").split("+")[0] in _USABLE_NODE_STATES
        if usable and allocated == 0 and idle == total:
            row["nodes_free"] += 1
        gpus = _gpu_count(gres)
        if gpus is not None:
            used = _gpu_count(gres_used) or 0
            row["gpus_total"] = (row["gpus_total"] or 0) + gpus
            takes_job = usable and idle > 0  # a GPU needs a free core beside it
            row["gpus_free"] = (row["gpus_free"] or 0) + (max(gpus - used, 0) if takes_job else 0)
    return [QueueLoad(name, **counts) for name, counts in rows.items()]


# sinfo's long state names of nodes that take jobs (after its flag suffixes are stripped).
_USABLE_NODE_STATES = {"idle", "mixed", "allocated", "completing", "planned"}


def _gpu_count(gres: str) -> int | None:
    """The number of GPUs in a GRES string (``gpu:2``, ``gpu:a100:4(S:0-1)``,
    ``gpu:a100:1(IDX:0),gpu:v100:0(IDX:N/A)``); ``None`` when it names no GPU."""
    found = None
    for item in re.split(r",(?![^(]*\))", gres):
        name, _, rest = item.strip().partition(":")
        if name != "gpu":
            continue
        count = re.match(r"(?:[^:(]+:)?([0-9]+)", rest)
        found = (found or 0) + (int(count.group(1)) if count else 0)
    return found


def quote_job_id(job_id: str) -> str:
    """The job id, checked to be a Slurm job id; raises ``ValueError`` otherwise."""
    if not _JOB_ID.fullmatch(job_id or ""):
        raise ValueError(f"not a Slurm job id: {job_id!r}")
    return job_id


def _error_text(output: CommandOutput) -> str:
    """The scheduler's own message, without the ``sbatch: error:`` prefixes."""
    lines = []
    for line in (output.stderr or output.stdout).splitlines():
        line = re.sub(r"^\w+: error: ", "", line.strip())
        if line:
            lines.append(line)
    return "; ".join(lines)


def discovery_command() -> str:
    """One sinfo line per partition and node type: partition, time limit, CPUs per node,
    memory per node (MB), GRES (``python -m hub_spawner init``)."""
    return "sinfo --noheader --format='%R|%l|%c|%m|%G'"


def parse_discovery_output(output: CommandOutput) -> list[QueueLimits]:
    """Read ``discovery_command`` output: each partition with its largest limits (a ``+`` after
    a number, "at least", is read as the number); ``ValueError`` when sinfo failed."""
    if output.exit_status != 0:
        raise ValueError(f"sinfo failed: {_error_text(output) or output.exit_status}")
    found: dict[str, QueueLimits] = {}
    for line in output.stdout.splitlines():
        fields = line.strip().split(_FIELD_SEPARATOR)
        if len(fields) != 5 or not fields[0]:
            continue
        name, limit, cpus, memory, gres = (field.strip().rstrip("+") for field in fields)
        gpus = sum(int(count) for count in re.findall(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))
        merge_queue_limits(found, QueueLimits(
            name, parse_duration(limit, minutes_first=True),
            int(cpus) if cpus.isdigit() else None,
            int(memory) if memory.isdigit() else None, gpus))
    return list(found.values())
