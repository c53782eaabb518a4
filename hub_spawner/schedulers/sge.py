"""Grid Engine (SGE, Son of Grid Engine, Univa/Altair): job script, commands and parsers.

Requirements:
- pure: no I/O; tested on recorded real output of Debian's gridengine 8.1.9
  (``tests/fixtures/sge/``);
- every value in a command line is quoted with ``shlex.quote``; ``#$`` directives only receive
  values validated by ``hub_spawner.resources`` or admin settings checked by the spawner;
- an answer we cannot read is ``JobState.UNKNOWN``; a job is ``DONE`` only when ``qstat`` ran
  and does not list it;
- a job in an error state (``Eqw``, ``E``) never runs by itself: it is ``JobState.ERROR``, and
  ``detail_command`` (``qstat -j``) gives the reason, so the spawn fails at once and the job is
  deleted; for a waiting job it gives the scheduler's "scheduling info";
- Grid Engine forgets a job the moment it ends, so why it ended comes from accounting
  (``end_reason_command``: ``qacct -j``), asked only when someone needs to be told.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from ..resources import Resources, format_walltime
from . import (
    CommandOutput,
    JobState,
    JobStatus,
    ListedJob,
    QueueLimits,
    QueueLoad,
    SchedulerUnavailable,
    SubmitRejected,
    listed_usernames,
    parse_duration,
    parse_memory_mb,
    parse_xml,
)

NAME = "sge"
DISPLAY_NAME = "Grid Engine"
QUEUE_LABEL = "Queue"

#: Default job script (Jinja2), as for Slurm; see ``template_variables`` for the extra names.
#: ``-r n``: never rerun (a rerun would print a second ready line for a server nobody reaches).
JOB_SCRIPT_TEMPLATE = """\
#!/bin/bash
#$ -N {{ job_name }}
#$ -o {{ output_path }}
#$ -j y
#$ -S /bin/bash
#$ -r n
#$ -cwd
{% if resources.partition %}#$ -q {{ resources.partition }}
{% endif %}{% if slots > 1 %}#$ -pe {{ parallel_environment }} {{ slots }}
{% endif %}{% if memory_request %}#$ -l {{ memory_request }}
{% endif %}{% if gpu_request %}#$ -l {{ gpu_request }}
{% endif %}{% if time_limit %}#$ -l h_rt={{ time_limit }}
{% endif %}{% if resources.account %}#$ -A {{ resources.account }}
{% endif %}{% for directive in extra_directives %}#$ {{ directive }}
{% endfor %}
{{ launch }}
"""

# qstat(1) state letters; a state string combines them ("hqw", "Eqw", "dr", "Rr").
_ERROR_LETTER = "E"
_DELETING_LETTER = "d"
_HELD_LETTER = "h"
_SUSPENDED_LETTERS = set("sST")
_RUNNING_LETTERS = set("rt")  # running, transferring (being started on its node)

_JOB_ID = re.compile(r"[0-9]+")


def template_variables(resources: Resources, settings: dict[str, Any]) -> dict[str, Any]:
    """``time_limit`` (``h_rt``), ``slots`` and ``parallel_environment`` (more than one core
    needs a parallel environment), ``memory_request`` and ``gpu_request``.

    Grid Engine's memory limits (``h_vmem``, ``mem_free``...) count per slot, so the memory is
    divided over the slots. Raises ``ValueError`` when cores are asked for and no parallel
    environment is configured.
    """
    slots = max(resources.cpus, 1)
    parallel_environment = settings.get("parallel_environment", "")
    if slots > 1 and not parallel_environment:
        raise ValueError(
            "This cluster takes one core per Grid Engine job (no parallel environment is "
            "configured): ask for 1 core."
        )
    memory_resource = settings.get("memory_resource") or "h_vmem"
    gpu_resource = settings.get("gpu_resource") or "gpu"
    memory_per_slot = -(-resources.memory_mb // slots) if resources.memory_mb else 0
    return {
        "time_limit": format_time_limit(resources.walltime_seconds),
        "slots": slots,
        "parallel_environment": parallel_environment,
        "memory_request": f"{memory_resource}={memory_per_slot}M" if memory_per_slot else "",
        "gpu_request": f"{gpu_resource}={resources.gpus}" if resources.gpus else "",
    }


def format_time_limit(seconds: int) -> str:
    """``h_rt`` as ``HH:MM:SS`` (hours unbounded); ``""`` for 0 (the queue's limit)."""
    return format_walltime(seconds) if seconds > 0 else ""


def submit_command(script_path: str, output_path: str) -> str:
    """Command line that submits the script; ``-terse`` prints only the job id."""
    return f"qsub -terse {shlex.quote(script_path)}"


def parse_submit_output(output: CommandOutput) -> str:
    """Job id from ``qsub -terse``; raises ``SubmitRejected`` with Grid Engine's message."""
    if output.exit_status != 0:
        raise SubmitRejected(_error_text(output) or f"qsub exited with {output.exit_status}")
    lines = output.stdout.strip().splitlines()
    job_id = lines[-1].strip() if lines else ""
    if not _JOB_ID.fullmatch(job_id):
        raise SubmitRejected(f"qsub printed no job id (output: {output.stdout.strip()!r})")
    return job_id


def status_command(job_id: str) -> str:
    """Command line that lists the user's jobs as XML; ``parse_status_output`` finds ours."""
    quote_job_id(job_id)
    return "qstat -xml"


def parse_status_output(output: CommandOutput, job_id: str) -> JobStatus:
    """Read ``qstat -xml``.

    Guarantees: ``DONE`` only when qstat succeeded and does not list the job (Grid Engine
    forgets a job as soon as it ends); ``UNKNOWN`` when qstat failed or printed no XML, or XML
    that ``parse_xml`` refuses (over 4 MiB, a DOCTYPE or entity declarations).
    """
    if output.exit_status != 0:
        return JobStatus(JobState.UNKNOWN, reason=_error_text(output))
    try:
        root = parse_xml(output.stdout, "qstat -xml")
    except ValueError as error:
        return JobStatus(JobState.UNKNOWN, reason=str(error))
    for job in root.iter("job_list"):
        if (job.findtext("JB_job_number") or "").strip() != job_id:
            continue
        state_name = (job.findtext("state") or "").strip()
        queue = (job.findtext("queue_name") or "").strip()
        node = queue.split("@", 1)[1] if "@" in queue else ""
        return _status_from_letters(state_name, node)
    return JobStatus(JobState.DONE, reason="Grid Engine no longer lists the job")


def list_command(cluster_usernames: list[str]) -> str:
    """One ``qstat -xml`` of every job of these users (Grid Engine lists only the caller's
    jobs unless asked for others: ``-u``)."""
    users = listed_usernames(cluster_usernames)
    return f"qstat -xml -u {shlex.quote(','.join(users))}"


def parse_list_output(output: CommandOutput) -> list[ListedJob]:
    """Read ``list_command`` output.

    Guarantees: ``SchedulerUnavailable`` when qstat failed or printed XML that ``parse_xml``
    refuses; a job it lists twice (one line per task of an array job) is listed once.
    """
    if output.exit_status != 0:
        raise SchedulerUnavailable(_error_text(output) or f"qstat exit status "
                                   f"{output.exit_status}")
    try:
        root = parse_xml(output.stdout, "qstat -xml")
    except ValueError as error:
        raise SchedulerUnavailable(str(error)) from None
    jobs: dict[str, ListedJob] = {}
    for job in root.iter("job_list"):
        job_id = (job.findtext("JB_job_number") or "").strip()
        if not job_id or job_id in jobs:
            continue
        queue = (job.findtext("queue_name") or "").strip()
        node = queue.split("@", 1)[1] if "@" in queue else ""
        status = _status_from_letters((job.findtext("state") or "").strip(), node)
        jobs[job_id] = ListedJob(job_id, (job.findtext("JB_name") or "").strip(),
                                 (job.findtext("JB_owner") or "").strip(), status)
    return list(jobs.values())


def job_key(job_id: str) -> str:
    """Grid Engine's job numbers are the same wherever they are printed."""
    return job_id


def _status_from_letters(state_name: str, node: str) -> JobStatus:
    letters = set(state_name)
    if _ERROR_LETTER in letters:
        return JobStatus(JobState.ERROR, state_name=state_name, node=node)
    if _DELETING_LETTER in letters:
        return JobStatus(JobState.ENDING, state_name=state_name, node=node)
    if _HELD_LETTER in letters:
        return JobStatus(
            JobState.PENDING,
            state_name=state_name,
            reason=_HELD_WORDS + " (by you, an administrator or a dependency); "
            "it starts once released (qrls)",
            node=node,
        )
    if letters & _SUSPENDED_LETTERS:
        return JobStatus(JobState.PENDING, state_name=state_name, reason="suspended", node=node)
    if letters & _RUNNING_LETTERS:
        return JobStatus(JobState.RUNNING, state_name=state_name, node=node)
    if "q" in letters or "w" in letters:
        return JobStatus(JobState.PENDING, state_name=state_name, node=node)
    return JobStatus(JobState.UNKNOWN, state_name=state_name, reason=f"state {state_name!r}")


def detail_command(job_id: str) -> str:
    """Command line that prints the job's details: ``error reason`` and ``scheduling info``."""
    return f"qstat -j {quote_job_id(job_id)}"


def parse_pending_reason(output: CommandOutput) -> str:
    """Why the job waits: the ``scheduling info`` of ``qstat -j`` (``""`` when the scheduler
    does not collect it, ``schedd_job_info false``)."""
    lines: list[str] = []
    collecting = False
    for line in output.stdout.splitlines():
        if line.startswith("scheduling info:"):
            collecting = True
            line = line.split(":", 1)[1]
        elif collecting and not line.startswith((" ", "\t")):
            break
        if collecting and line.strip():
            lines.append(line.strip())
    text = "; ".join(lines)
    if not text or "turned off" in text or "no messages available" in text:
        return ""
    return text


_HELD_WORDS = "the job is held"

# Grid Engine's scheduling info messages (sge_schedd's), by the words that mark them, in plain
# words; the first that matches wins.
_PENDING_WORDS = (
    ("hold state", "it is held (by you or an administrator); it starts once released (qrls)"),
    ("exceeds limit", "your limit (a resource quota) is reached; it starts when your other "
                      "jobs end"),
    ("has no permission", "you may not use that queue; stop it and choose another"),
    ("is full", "waiting for free slots"),
    ("overload", "waiting for free slots (the nodes are full or overloaded)"),
    ("only offers", "waiting for free slots in its parallel environment"),
    ("offers only", "no node has enough of what it asks for free now"),
    ("is not allowed to run in any queue", "no queue takes it as asked for; stop it and ask "
                                           "for less"),
    ("start time", "waiting for its requested start time"),
    ("predecessor", "waiting for the jobs it depends on"),
)


def explain_pending(reason: str) -> str:
    """Grid Engine's scheduling info in plain words, the start of its text kept for admins."""
    text = reason.strip()
    if not text or text.startswith(_HELD_WORDS):  # ours already (a hold, from the status)
        return text
    words = next((plain for marker, plain in _PENDING_WORDS if marker in text), "")
    short = text if len(text) <= 160 else text[:157] + "..."
    return f"{words} (Grid Engine: {short})" if words else f"Grid Engine says: {short}"


def parse_error_reason(output: CommandOutput) -> str:
    """The ``error reason`` text(s) of ``qstat -j``, without timestamp and pid prefixes."""
    reasons = []
    for line in output.stdout.splitlines():
        if not line.startswith("error reason"):
            continue
        text = line.split(":", 1)[1].strip() if ":" in line else ""
        # "11/22/2026 02:07:09 [1001:31565]: error: can't chdir to ..."
        text = re.sub(r"^\S+ \S+ \[[0-9:]+\]: ", "", text)
        text = re.sub(r"^error: ", "", text)
        if text and text not in reasons:
            reasons.append(text)
    if reasons:
        return "; ".join(reasons)
    return _error_text(output) if output.exit_status else "Grid Engine gave no reason"


# qacct's "failed" codes (sge_status(5), Grid Engine 8.1 "failed" field) worth a sentence.
_FAILED_EXPLANATIONS = {
    "37": "it reached its walltime limit (or another hard limit: h_rt, h_cpu, h_vmem); start "
    "a new server, with a longer walltime or more memory if you need it",
    "100": "it was killed (deleted, or over a limit)",
}


def end_reason_command(job_id: str) -> str:
    """Command line that prints the job's accounting records (``qacct -j``)."""
    return f"qacct -j {quote_job_id(job_id)}"


def parse_end_reason(output: CommandOutput) -> str:
    """Why the job ended, from its last accounting record; ``""`` when there is none (accounting
    off, or not written yet). Job numbers wrap around, so the last record is this job's."""
    if output.exit_status != 0:
        return ""
    failed = exit_status = ""
    for line in output.stdout.splitlines():
        if line.startswith("=" * 10):
            failed = exit_status = ""
        key, _, value = line.partition(" ")
        if key == "failed":
            failed = value.strip()
        elif key == "exit_status":
            exit_status = value.split()[0] if value.split() else ""
    code, _, text = (part.strip() for part in failed.partition(":"))
    if not code:
        return ""
    if code == "0":
        return f"the server exited with status {exit_status or '?'}"
    return _FAILED_EXPLANATIONS.get(code) or f"Grid Engine reports failure {code}: {text}"


def explain_end(status: JobStatus) -> str:
    """Why the job ended and what to do, in a few words; never empty."""
    if status.state is JobState.ERROR:
        return (
            f"Grid Engine put it in error state {status.state_name}: "
            f"{status.reason or 'no reason given'}"
        )
    return status.reason or "Grid Engine no longer lists it"


def check_command(cluster_username: str) -> str:
    """For ``python -m hub_spawner check``, in any login shell (csh too): ``qstat
    -help``'s first line (``SGE 8.1.9``), then ``qstat -u``, which needs sge_qmaster."""
    return f"qstat -help | head -n 1 && qstat -u {shlex.quote(cluster_username)} > /dev/null"


def cancel_command(job_id: str) -> str:
    """Command line that deletes the job (harmless if it has already ended)."""
    return f"qdel {quote_job_id(job_id)}"


def cancel_by_name_command(job_name: str, cluster_username: str) -> str:
    """Command line that deletes the user's jobs with this (unique) name."""
    return f"qdel -u {shlex.quote(cluster_username)} {shlex.quote(job_name)}"


def load_command() -> str:
    """The cluster queue summary: used, reserved, available and total slots per queue."""
    return "qstat -g c"


def parse_load_output(output: CommandOutput) -> list[QueueLoad]:
    """Read ``qstat -g c``: free (``AVAIL``) and total (``TOTAL``) slots per cluster queue.

    Guarantees: columns are found by the header's names (Grid Engine 6.1 has no ``RES``);
    slots of disabled, suspended or alarmed queue instances are not ``AVAIL``, so never free;
    GPUs and nodes are ``None`` (the summary has neither); ``ValueError`` when qstat failed or
    printed no header or a row we cannot read.
    """
    if output.exit_status != 0:
        raise ValueError(f"qstat -g c failed: {_error_text(output) or output.exit_status}")
    columns: list[str] = []
    loads = []
    for line in output.stdout.splitlines():
        if not line.strip() or set(line.strip()) == {"-"}:
            continue
        if line.startswith("CLUSTER QUEUE"):
            columns = ["QUEUE", *line.split()[2:]]
            continue
        values = line.split()
        if not columns or len(values) != len(columns):
            raise ValueError(f"unreadable qstat -g c line {line!r}")
        row = dict(zip(columns, values, strict=True))
        try:
            loads.append(QueueLoad(row["QUEUE"], int(row["AVAIL"]), int(row["TOTAL"])))
        except (KeyError, ValueError):
            raise ValueError(f"unreadable qstat -g c line {line!r}") from None
    if not columns:
        raise ValueError("qstat -g c printed no header")
    return loads


def quote_job_id(job_id: str) -> str:
    """The job id, checked to be a Grid Engine job number; raises ``ValueError`` otherwise."""
    if not _JOB_ID.fullmatch(job_id or ""):
        raise ValueError(f"not a Grid Engine job id: {job_id!r}")
    return job_id


def _error_text(output: CommandOutput) -> str:
    """Grid Engine's own message, without the trailing ``Exiting.``."""
    lines = []
    for line in (output.stderr or output.stdout).splitlines():
        line = line.strip()
        if line and line != "Exiting.":
            lines.append(line)
    return "; ".join(lines)


def discovery_command() -> str:
    """Each queue's ``h_rt`` and ``slots`` (``qconf -sq``), then ``qhost`` (CPUs and memory per
    host), for ``python -m hub_spawner init``."""
    return ("for q in $(qconf -sql); do echo \"%queue $q\"; "
            "qconf -sq \"$q\" | grep -E '^(h_rt|slots) '; done; echo %hosts; qhost")


def parse_discovery_output(output: CommandOutput) -> list[QueueLimits]:
    """Read ``discovery_command`` output: each queue with its ``h_rt`` and largest ``slots``
    value (``1,[node=8]`` gives 8), and the largest host's memory; ``ValueError`` when no
    queue was listed."""
    queues: dict[str, dict[str, Any]] = {}
    memory_mb: int | None = None
    current, in_hosts, header = "", False, []
    for line in output.stdout.splitlines():
        if line.startswith("%queue "):
            current = line.split(None, 1)[1].strip()
            queues[current] = {}
        elif line.strip() == "%hosts":
            in_hosts = True
        elif in_hosts:
            fields = line.split()
            if "MEMTOT" in fields:
                header = fields
            elif header and len(fields) == len(header) and not line.startswith("-"):
                memory = parse_memory_mb(fields[header.index("MEMTOT")])
                if memory is not None:
                    memory_mb = max(memory_mb or 0, memory)
        elif current and line.startswith("h_rt "):
            queues[current]["walltime"] = parse_duration(line.split(None, 1)[1])
        elif current and line.startswith("slots "):
            counts = [int(n) for n in re.findall(r"\d+", line.split(None, 1)[1])]
            queues[current]["cores"] = max(counts) if counts else None
    if not queues:
        raise ValueError(f"qconf -sql listed no queue: {_error_text(output) or output.stdout!r}")
    return [QueueLimits(name, found.get("walltime"), found.get("cores"), memory_mb)
            for name, found in queues.items()]
