"""Torque and PBS (Torque, OpenPBS, PBS Professional): job script, commands and parsers.

Requirements:
- pure: no I/O; tested on recorded output of the lab's Torque commands (Slurm's
  ``slurm-wlm-torque`` wrappers) and on fixtures of real Torque and PBS Pro output built from
  their published formats (``tests/fixtures/torque/README.md`` names each source);
- ``qstat -f`` text from Torque and PBS Pro, and Torque's ``qstat -x`` XML, are all read;
- every value in a command line is quoted with ``shlex.quote``; ``#PBS`` directives only receive
  values validated by ``hub_spawner.resources``;
- an answer we cannot read is ``JobState.UNKNOWN``; a job is ``DONE`` only when qstat says it
  finished or that it does not know the job id.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from ..resources import Resources, format_walltime
from . import (
    ALL_NODES,
    CommandOutput,
    JobState,
    JobStatus,
    ListedJob,
    QueueLimits,
    QueueLoad,
    SchedulerUnavailable,
    SubmitRejected,
    parse_duration,
    parse_memory_mb,
    parse_xml,
)

NAME = "torque"
DISPLAY_NAME = "Torque/PBS"
QUEUE_LABEL = "Queue"

#: Default job script (Jinja2), as for Slurm; see ``template_variables`` for the extra names.
#: ``-o``/``-j oe`` are also given to qsub on the command line (``submit_command``): some
#: qsub front ends (Slurm's Torque wrappers) ignore them in the script.
JOB_SCRIPT_TEMPLATE = """\
#!/bin/bash
#PBS -N {{ job_name }}
#PBS -o {{ output_path }}
#PBS -j oe
#PBS -r n
#PBS -l {{ nodes }}
{% if resources.partition %}#PBS -q {{ resources.partition }}
{% endif %}{% if memory %}#PBS -l mem={{ memory }}
{% endif %}{% if time_limit %}#PBS -l walltime={{ time_limit }}
{% endif %}{% if resources.account %}#PBS -A {{ resources.account }}
{% endif %}{% for directive in extra_directives %}#PBS {{ directive }}
{% endfor %}
{{ launch }}
"""

# qstat(1B) job states, Torque and PBS Pro.
_PENDING_STATES = {
    "Q": "",
    "H": "the job is held (by you, an administrator or a dependency); it starts once "
    "released (qrls)",
    "W": "waiting for its requested start time",
    "T": "being moved to its execution queue",
    "M": "moved to another server",
    "S": "suspended",
    "U": "suspended while its node is busy with interactive use",
}
_RUNNING_STATES = {"R", "B"}  # B: an array job whose subjobs have begun (PBS Pro)
_ENDING_STATES = {"E"}  # exiting after having run
_DONE_STATES = {"C", "F", "X"}  # completed (Torque), finished (PBS Pro), expired subjob

# Torque's negative exit codes (Torque 6 admin guide, "Job exit status").
_EXIT_EXPLANATIONS = {
    "-10": "it went over its memory limit; start a new server with more memory",
    "-11": "it reached its walltime limit; start a new server, with a longer walltime if you "
    "need more time",
    "-12": "it went over its CPU time limit",
}

# Exit codes of qstat for "unknown job id" (PBSE_UNKJOBID 15001 % 256) and, on PBS Pro,
# "job has finished, use -x" (PBSE_HISTJOBID 15139 % 256).
_GONE_EXIT_CODES = {153, 35}
_GONE_MESSAGES = ("Unknown Job Id", "Job has finished")

_JOB_ID = re.compile(r"[0-9]+(\[[0-9]*\])?(\.[A-Za-z0-9_-]+)*")
_ATTRIBUTE = re.compile(r"[ \t]+([A-Za-z_][A-Za-z0-9_.]*) = (.*)")


def template_variables(resources: Resources, settings: dict[str, Any]) -> dict[str, Any]:
    """``nodes`` (``nodes=1:ppn=N[:gpus=G]``), ``memory`` (``512mb``) and ``time_limit``."""
    nodes = f"nodes=1:ppn={max(resources.cpus, 1)}"
    if resources.gpus:
        nodes += f":gpus={resources.gpus}"
    return {
        "nodes": nodes,
        "memory": f"{resources.memory_mb}mb" if resources.memory_mb else "",
        "time_limit": format_time_limit(resources.walltime_seconds),
    }


def format_time_limit(seconds: int) -> str:
    """``walltime`` as ``HH:MM:SS`` (hours unbounded); ``""`` for 0 (the queue's limit)."""
    return format_walltime(seconds) if seconds > 0 else ""


def submit_command(script_path: str, output_path: str) -> str:
    """Command line that submits the script, joining stderr into ``output_path``."""
    return f"qsub -o {shlex.quote(output_path)} -j oe {shlex.quote(script_path)}"


def parse_submit_output(output: CommandOutput) -> str:
    """Job id printed by qsub (``123.server`` or ``123``); raises ``SubmitRejected`` with the
    scheduler's message."""
    lines = [line.strip() for line in output.stdout.splitlines() if line.strip()]
    if output.exit_status != 0 or not lines:
        raise SubmitRejected(_error_text(output) or f"qsub exited with {output.exit_status}")
    if not _JOB_ID.fullmatch(lines[-1]):
        raise SubmitRejected(f"qsub printed no job id (output: {output.stdout.strip()!r})")
    return lines[-1]


def status_command(job_id: str) -> str:
    """Command line that prints the job's full status (``qstat -f``)."""
    return f"qstat -f {quote_job_id(job_id)}"


def parse_status_output(output: CommandOutput, job_id: str) -> JobStatus:
    """Read ``qstat -f`` text (Torque, PBS Pro) or ``qstat -x`` XML (Torque).

    Guarantees: ``DONE`` for a finished state or a "no such job" answer (exit 153/35 or the
    message); other failures and unreadable output are ``UNKNOWN``.
    """
    if output.exit_status != 0:
        text = f"{output.stdout}\n{output.stderr}"
        if output.exit_status in _GONE_EXIT_CODES or any(m in text for m in _GONE_MESSAGES):
            return JobStatus(JobState.DONE, reason="the scheduler no longer knows the job")
        return JobStatus(JobState.UNKNOWN, reason=_error_text(output))
    stripped = output.stdout.lstrip()
    if not stripped:
        return JobStatus(JobState.UNKNOWN, reason="qstat printed nothing")
    try:
        attributes = (
            _xml_attributes(stripped, job_id)
            if stripped.startswith("<")
            else _text_attributes(stripped, job_id)
        )
    except ValueError as error:
        return JobStatus(JobState.UNKNOWN, reason=str(error))
    if attributes is None:
        return JobStatus(JobState.DONE, reason="qstat does not list the job")
    return _status_from_attributes(attributes)


def list_command(cluster_usernames: list[str]) -> str:
    """One ``qstat -f`` of every job (Torque's ``-u`` does not combine with ``-f``, and PBS
    shows every user's jobs by default); ``parse_list_output`` keeps their owners' own."""
    if not cluster_usernames:
        raise ValueError("no cluster users to list")
    return "qstat -f"


def parse_list_output(output: CommandOutput) -> list[ListedJob]:
    """Read ``list_command`` output (``qstat -f`` text of Torque, PBS Pro or the Slurm
    wrappers, or Torque's ``qstat -x`` XML).

    Guarantees: ``SchedulerUnavailable`` when qstat failed or printed something unreadable;
    no output with exit status 0 is no job at all; a job's owner is ``Job_Owner`` without
    its ``@host``. A non-zero exit whose every error line is about a job that ended while
    qstat printed (PBS Pro's ``Job has finished``, exit 35) is a listing without that job.
    """
    if output.exit_status != 0 and not _only_gone_jobs(output):
        raise SchedulerUnavailable(_error_text(output) or f"qstat exit status "
                                   f"{output.exit_status}")
    text = output.stdout.lstrip()
    if not text:
        return []
    try:
        jobs = (_xml_attributes if text.startswith("<") else _text_attributes)(text, "")
    except ValueError as error:
        raise SchedulerUnavailable(str(error)) from None
    return [
        ListedJob(job_id, attributes.get("Job_Name", ""),
                  attributes.get("Job_Owner", "").split("@", 1)[0],
                  _status_from_attributes(attributes))
        for job_id, attributes in jobs.items()
    ]


def _only_gone_jobs(output: CommandOutput) -> bool:
    lines = [line for line in output.stderr.splitlines() if line.strip()]
    return output.exit_status in _GONE_EXIT_CODES and bool(lines) and all(
        any(message in line for message in _GONE_MESSAGES) for line in lines)


def job_key(job_id: str) -> str:
    """The job's sequence number: qstat may add the server's name (``123.login``) or not."""
    return job_id.split(".", 1)[0]


def _text_attributes(text: str, job_id: str) -> Any:
    """``key = value`` attributes of the job's ``qstat -f`` block (``None`` if it has none;
    with ``job_id`` empty: every job's, by id); long values that qstat wrapped onto indented
    continuation lines are joined back."""
    jobs: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    last_key = ""
    for line in text.splitlines():
        if line.startswith("Job Id:"):
            current = jobs.setdefault(line.split(":", 1)[1].strip(), {})
            last_key = ""
            continue
        if current is None or not line.strip():
            continue
        match = _ATTRIBUTE.fullmatch(line)
        if match:
            last_key = match.group(1)
            current[last_key] = match.group(2)
        elif last_key and line.startswith("\t"):
            # qstat breaks at a fixed width, even inside a word or after a space: join exactly.
            current[last_key] += line[1:]
    if not jobs:
        raise ValueError(f"unreadable qstat -f output: {text[:200]!r}")
    jobs = {job: {k: v.strip() for k, v in attrs.items()} for job, attrs in jobs.items()}
    return _find_job(jobs, job_id) if job_id else jobs


def _xml_attributes(text: str, job_id: str) -> Any:
    """Attributes of the job in Torque's ``qstat -x`` (``<Data><Job>...``; with ``job_id``
    empty: every job's, by id); nested elements (``Resource_List``) become dotted keys."""
    root = parse_xml(text, "qstat -x")  # ValueError: bounded, no entities
    jobs = {}
    for job in root.iter("Job"):
        attributes: dict[str, str] = {}
        for element in job:
            if len(element):
                for child in element:
                    attributes[f"{element.tag}.{child.tag}"] = (child.text or "").strip()
            else:
                attributes[element.tag] = (element.text or "").strip()
        jobs[attributes.get("Job_Id", "")] = attributes
    return _find_job(jobs, job_id) if job_id else jobs


def _find_job(jobs: dict[str, dict[str, str]], job_id: str) -> dict[str, str] | None:
    """The job by its full id, or by its sequence number (qstat may add the server name)."""
    if job_id in jobs:
        return jobs[job_id]
    number = job_id.split(".", 1)[0]
    for listed_id, attributes in jobs.items():
        if listed_id.split(".", 1)[0] == number:
            return attributes
    return None


def _status_from_attributes(attributes: dict[str, str]) -> JobStatus:
    state_name = attributes.get("job_state", "").strip()
    exec_host = attributes.get("exec_host", "")
    # Torque "node01/0-3+node02/0-3", PBS Pro "node01/0*4": the first node runs the script.
    node = exec_host.split("+", 1)[0].split("/", 1)[0].strip()
    comment = attributes.get("comment", "")
    if state_name in _RUNNING_STATES:
        return JobStatus(JobState.RUNNING, state_name=state_name, node=node)
    if state_name in _PENDING_STATES:
        reason = "; ".join(part for part in (_PENDING_STATES[state_name], comment) if part)
        return JobStatus(JobState.PENDING, state_name=state_name, reason=reason, node=node)
    if state_name in _ENDING_STATES:
        return JobStatus(JobState.ENDING, state_name=state_name, node=node)
    if state_name in _DONE_STATES:
        exit_status = attributes.get("exit_status", attributes.get("Exit_status", ""))
        reason = _exit_reason(exit_status) or "it has finished (its output file has the details)"
        return JobStatus(JobState.DONE, state_name=state_name, reason=reason, node=node)
    return JobStatus(JobState.UNKNOWN, state_name=state_name, reason=f"state {state_name!r}")


# PBS Pro's and Moab's "Not Running" comments, by the words that mark them, in plain words.
_COMMENT_WORDS = (
    ("Can Never Run", "it can never run as asked for; stop it and ask for less"),
    ("Insufficient amount of resource", "waiting for free cores, memory or GPUs"),
    ("limit", "your (or your group's) limit is reached; it starts when other jobs end"),
    ("Queue not started", "the queue is stopped; an administrator has to start it"),
    ("Not enough free nodes", "waiting for free nodes"),
)


def explain_pending(reason: str) -> str:
    """The job's pending reason (its state's meaning and the server's comment) in plain words,
    the comment kept for admins."""
    text = reason.strip()
    if not text:
        return ""
    state_words = next((w for w in _PENDING_STATES.values() if w and text.startswith(w)), "")
    comment = text[len(state_words):].lstrip("; ").strip()
    if not comment:
        return state_words or text
    words = next((plain for marker, plain in _COMMENT_WORDS if marker in comment), "")
    parts = [part for part in (state_words, words) if part]
    return (f"{'; '.join(parts)} (Torque/PBS: {comment})" if parts
            else f"Torque/PBS says: {comment}")


def _exit_reason(exit_status: str) -> str:
    exit_status = exit_status.strip()
    if not exit_status:
        return ""
    if exit_status in _EXIT_EXPLANATIONS:
        return _EXIT_EXPLANATIONS[exit_status]
    if exit_status.lstrip("-").isdigit() and int(exit_status) > 256:
        return (
            f"it was killed by signal {int(exit_status) - 256} (a limit such as walltime or "
            "memory, or qdel)"
        )
    return f"it ended with exit status {exit_status}"


def explain_end(status: JobStatus) -> str:
    """Why the job ended and what to do, in a few words; never empty."""
    if status.reason:
        suffix = f" (job state {status.state_name})" if status.state_name else ""
        return status.reason + suffix
    return "the scheduler no longer lists it"


def check_command(cluster_username: str) -> str:
    """For ``python -m hub_spawner check``, in any login shell (csh too): ``qstat
    --version`` (Torque: ``Version: 6.1.3``, PBS Pro: ``pbs_version = ...``; Slurm's Torque
    wrappers have none), then ``qstat -u``, which needs the server (pbs_server, or slurmctld
    behind the wrappers)."""
    return ("sh -c \"qstat --version 2>/dev/null || echo 'qstat (no --version)'\" "
            f"&& qstat -u {shlex.quote(cluster_username)} > /dev/null")


def cancel_command(job_id: str) -> str:
    """Command line that deletes the job (harmless if it has already ended)."""
    return f"qdel {quote_job_id(job_id)}"


def cancel_by_name_command(job_name: str, cluster_username: str) -> str:
    """Command line that deletes the user's jobs with this (unique) name.

    Torque and PBS have no qdel-by-name: ``qselect`` finds the ids. Sites that run Slurm's
    Torque wrappers have no qselect; there the name goes straight to scancel.
    """
    name, user = shlex.quote(job_name), shlex.quote(cluster_username)
    return (
        "if command -v qselect >/dev/null 2>&1; then "
        f"qselect -u {user} -N {name} | xargs -r qdel; "
        f"else scancel --name={name} --user={user}; fi"
    )


def load_command() -> str:
    """Every node with its attributes (Torque, PBS Pro, and the lab's Slurm wrapper)."""
    return "pbsnodes -a"


def parse_load_output(output: CommandOutput) -> list[QueueLoad]:
    """Read ``pbsnodes -a``: free and total cores, GPUs and idle nodes over all nodes, as one
    ``ALL_NODES`` row (Torque's nodes are not tied to queues).

    Cores: PBS Pro's ``resources_available.ncpus`` less ``resources_assigned.ncpus``; Torque's
    ``np`` less the cores its ``jobs`` list names (``0/12.srv,1/12.srv`` or ``0-3/12.srv``).
    GPUs: PBS Pro's ``ngpus`` the same way, free only on a node with a free core (Torque's
    ``gpus`` has no used count: ``None``).
    Guarantees: a node that is down, offline, busy or unknown has nothing free; so has a node
    that runs jobs but lists none (the lab's Slurm wrapper prints ``mixed`` and no ``jobs``:
    free cores are then a lower bound); ``ValueError`` when pbsnodes failed or printed a node
    without a core count.
    """
    if output.exit_status != 0:
        raise ValueError(f"pbsnodes failed: {_error_text(output) or output.exit_status}")
    nodes: list[dict[str, str]] = []
    for line in output.stdout.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            nodes.append({"": line.strip()})
        elif nodes and " = " in line:
            key, _, value = line.strip().partition(" = ")
            nodes[-1][key] = value.strip()
    counts = {"cores_free": 0, "cores_total": 0, "nodes_free": 0, "nodes_total": len(nodes)}
    gpus_free = gpus_total = None
    for node in nodes:
        total, used = _node_cores(node)
        usable = not set(node.get("state", "").split(",")) & _UNUSABLE_NODE_STATES
        counts["cores_total"] += total
        counts["cores_free"] += max(total - used, 0) if usable else 0
        counts["nodes_free"] += 1 if usable and used == 0 and total else 0
        if "resources_available.ngpus" in node:
            gpus = _integer(node, "resources_available.ngpus")
            gpus_used = _integer(node, "resources_assigned.ngpus", 0)
            gpus_total = (gpus_total or 0) + gpus
            takes_job = usable and total > used  # a GPU needs a free core beside it
            gpus_free = (gpus_free or 0) + (max(gpus - gpus_used, 0) if takes_job else 0)
    if not nodes:
        return []
    return [QueueLoad(ALL_NODES, gpus_free=gpus_free, gpus_total=gpus_total, **counts)]


# Node states (Torque and PBS Pro) in which a node takes no new job.
_UNUSABLE_NODE_STATES = {
    "down", "offline", "unknown", "state-unknown", "busy", "stale", "provisioning",
    "wait-provisioning", "sleep", "maintenance", "unresolvable", "initializing",
}


# States of a node that runs jobs; the lab's Slurm wrapper prints Slurm's "mixed" as it is.
_BUSY_NODE_STATES = {"job-exclusive", "job-busy", "job-sharing", "mixed", "allocated"}


def _node_cores(node: dict[str, str]) -> tuple[int, int]:
    """A node's (total, used) cores."""
    if "resources_available.ncpus" in node:  # PBS Pro
        return (_integer(node, "resources_available.ncpus"),
                _integer(node, "resources_assigned.ncpus", 0))
    total = _integer(node, "np")
    if "jobs" not in node and set(node.get("state", "").split(",")) & _BUSY_NODE_STATES:
        return total, total  # in use, but no job list says how much (the lab's Slurm wrapper)
    used = 0
    for entry in filter(None, (item.strip() for item in node.get("jobs", "").split(","))):
        cores, _, _job = entry.partition("/")
        first, _, last = cores.partition("-")
        if first.isdigit() and (not last or last.isdigit()):
            used += int(last or first) - int(first) + 1
    return total, used


def _integer(node: dict[str, str], key: str, default: int | None = None) -> int:
    value = node.get(key)
    if value is None and default is not None:
        return default
    try:
        return int(value or "")
    except ValueError:
        raise ValueError(f"pbsnodes: node {node['']!r} has no readable {key} ({value!r})") from None


def quote_job_id(job_id: str) -> str:
    """The job id, checked to be a Torque/PBS job id (``123``, ``123.server.example.org``,
    ``123[].server``); raises ``ValueError`` otherwise."""
    if not _JOB_ID.fullmatch(job_id or ""):
        raise ValueError(f"not a Torque/PBS job id: {job_id!r}")
    return shlex.quote(job_id)


def _error_text(output: CommandOutput) -> str:
    """The scheduler's own message: for the lab's wrappers, the sbatch lines inside theirs."""
    text = output.stderr.strip() or output.stdout.strip()
    inner = re.findall(r"sbatch: error: (.+)", text)
    if inner:
        return "; ".join(line.strip().rstrip("'").strip() for line in inner)
    lines = [re.sub(r"^qsub: ", "", line.strip()) for line in text.splitlines() if line.strip()]
    return "; ".join(lines)


def discovery_command() -> str:
    """``pbsnodes -a`` (cores, GPUs and memory per node), then ``qstat -Qf`` (each queue's
    ``resources_max.walltime``), for ``python -m hub_spawner init``."""
    return "pbsnodes -a; echo %queues; qstat -Qf 2>/dev/null"


def parse_discovery_output(output: CommandOutput) -> list[QueueLimits]:
    """Read ``discovery_command`` output: every queue ``qstat -Qf`` lists (none: one row,
    ``ALL_NODES``, for a site whose ``qstat -Qf`` says nothing) with its longest walltime and
    the largest node's cores (``np`` or ``resources_available.ncpus``), memory (``physmem`` in
    the status, or ``resources_available.mem``) and GPUs; ``ValueError`` when pbsnodes listed
    no node."""
    nodes_text, _, queues_text = output.stdout.partition("%queues")
    nodes: list[dict[str, str]] = []
    for line in nodes_text.splitlines():
        if line.strip() and not line[0].isspace():
            nodes.append({})
        elif nodes and " = " in line:
            key, _, value = line.strip().partition(" = ")
            nodes[-1][key] = value.strip()
    if not nodes:
        raise ValueError(f"pbsnodes listed no node: {_error_text(output) or output.stdout!r}")
    cores = max((int(n.get("resources_available.ncpus") or n.get("np") or 0) for n in nodes),
                default=0) or None
    gpus = max((int(n.get("resources_available.ngpus") or n.get("gpus") or 0) for n in nodes),
               default=0)
    memories = [parse_memory_mb(n.get("resources_available.mem", "")) or parse_memory_mb(
        (re.search(r"(?:^|,)physmem=([^,]+)", n.get("status", "")) or [None, ""])[1])
        for n in nodes]
    memory_mb = max((m for m in memories if m), default=None)
    queues: dict[str, int | None] = {}
    current = ""
    for line in queues_text.splitlines():
        if line.startswith("Queue: "):
            current = line.split(None, 1)[1].strip()
            queues[current] = None
        elif current and line.strip().startswith("resources_max.walltime = "):
            queues[current] = parse_duration(line.split("=", 1)[1])
    return [QueueLimits(name, walltime, cores, memory_mb, gpus)
            for name, walltime in (queues or {ALL_NODES: None}).items()]
