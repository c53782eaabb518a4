"""hub_spawner/schedulers/sge.py on recorded real Grid Engine output (tests/fixtures/sge)."""

import shlex
import subprocess

import pytest

from hub_spawner.jobscript import render_job_script
from hub_spawner.resources import Resources
from hub_spawner.schedulers import CommandOutput, JobState, SubmitRejected, sge
from tests.fixture_output import recorded


def test_submit_output_gives_the_job_id():
    assert sge.parse_submit_output(recorded("sge", "qsub_ok")) == "1"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("qsub_unknown_queue", 'job requests unknown queue "nosuch"'),
        ("qsub_unknown_resource", 'unknown resource "gpu"'),
    ],
)
def test_rejected_submission_carries_grid_engines_message(name, message):
    with pytest.raises(SubmitRejected) as raised:
        sge.parse_submit_output(recorded("sge", name))
    assert message in str(raised.value)
    assert "Exiting" not in str(raised.value)


def test_submit_output_without_job_id_is_rejected():
    with pytest.raises(SubmitRejected, match="no job id"):
        sge.parse_submit_output(CommandOutput(0, "Your job 3 has been submitted\n", ""))


@pytest.mark.parametrize(
    ("job_id", "state", "state_name", "node"),
    [
        ("1", JobState.RUNNING, "r", "compute"),
        ("4", JobState.PENDING, "qw", ""),
        ("5", JobState.PENDING, "hqw", ""),
        ("6", JobState.ERROR, "Eqw", ""),
        ("7", JobState.DONE, "", ""),  # not listed: finished and forgotten
    ],
)
def test_status_finds_the_job_in_the_listing(job_id, state, state_name, node):
    status = sge.parse_status_output(recorded("sge", "qstat_xml_mixed"), job_id)
    assert (status.state, status.state_name, status.node) == (state, state_name, node)


def test_held_job_says_so():
    status = sge.parse_status_output(recorded("sge", "qstat_xml_mixed"), "5")
    assert "held" in status.reason and "qrls" in status.reason


def test_deleting_job_is_ending_not_done():
    status = sge.parse_status_output(recorded("sge", "qstat_xml_deleting"), "1")
    assert status.state is JobState.ENDING and status.state_name == "dr"


def test_empty_listing_means_done():
    assert sge.parse_status_output(recorded("sge", "qstat_xml_none"), "1").state is JobState.DONE


@pytest.mark.parametrize(
    "output",
    [
        CommandOutput(1, "", "error: commlib error: got select error (Connection refused)\n"),
        CommandOutput(0, "<?xml version='1.0'?><job_info", ""),
        CommandOutput(0, "", ""),
        CommandOutput(0, "<job_info><job_list><JB_job_number>1</JB_job_number>"
                         "<state>zz</state></job_list></job_info>", ""),
    ],
)
def test_failures_and_surprises_are_unknown_never_done(output):
    assert sge.parse_status_output(output, "1").state is JobState.UNKNOWN


def test_error_reason_comes_from_qstat_j():
    reason = sge.parse_error_reason(recorded("sge", "qstat_j_error"))
    assert reason == "can't chdir to /nonexistent-dir: No such file or directory"


def test_error_state_explanation_names_state_and_reason():
    status = sge.parse_status_output(recorded("sge", "qstat_xml_mixed"), "6")
    status = type(status)(status.state, status.state_name, "can't chdir to /x", status.node)
    text = sge.explain_end(status)
    assert "Eqw" in text and "can't chdir to /x" in text


def test_commands_quote_and_validate():
    assert sge.status_command("12") == "qstat -xml"
    assert sge.cancel_command("12") == "qdel 12"
    assert sge.detail_command("12") == "qstat -j 12"
    for bad in ["12; rm -rf ~", "$(id)", "", "12.server"]:
        with pytest.raises(ValueError):
            sge.cancel_command(bad)
    command = sge.cancel_by_name_command("job'; touch /tmp/x", "alice")
    assert shlex.split(command) == ["qdel", "-u", "alice", "job'; touch /tmp/x"]
    assert shlex.split(sge.submit_command("/h/a b.sh", "/h/o")) == ["qsub", "-terse", "/h/a b.sh"]


def render(resources: Resources, settings: dict | None = None) -> str:
    settings = {"parallel_environment": "smp", "memory_resource": "h_vmem",
                "gpu_resource": "gpu"} if settings is None else settings
    return render_job_script(
        sge.JOB_SCRIPT_TEMPLATE, job_name="jupyterhub-alice-x", output_path="/home/a/o.out",
        resources=resources, extra_directives=["-l arch=lx-amd64"], launch="echo launch",
        **sge.template_variables(resources, settings),
    )


def test_job_script_maps_every_resource():
    script = render(Resources(partition="all.q", cpus=4, memory_mb=8192, walltime_seconds=90000,
                              account="proj1", gpus=2))
    lines = script.splitlines()
    for directive in [
        "#$ -N jupyterhub-alice-x", "#$ -o /home/a/o.out", "#$ -j y", "#$ -S /bin/bash",
        "#$ -r n", "#$ -q all.q", "#$ -pe smp 4", "#$ -l h_vmem=2048M", "#$ -l gpu=2",
        "#$ -l h_rt=25:00:00", "#$ -A proj1", "#$ -l arch=lx-amd64",
    ]:
        assert directive in lines
    assert lines[-1] == "echo launch"
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_job_script_leaves_out_unset_resources():
    script = render(Resources(cpus=1))
    for absent in ["-q ", "-pe ", "h_vmem", "gpu=", "h_rt", "-A "]:
        assert absent not in script


def test_memory_is_per_slot_and_rounded_up():
    variables = sge.template_variables(Resources(cpus=3, memory_mb=1000), {
        "parallel_environment": "smp", "memory_resource": "mem_free"})
    assert variables["memory_request"] == "mem_free=334M"


def test_several_cores_without_parallel_environment_is_refused():
    with pytest.raises(ValueError, match="one core"):
        sge.template_variables(Resources(cpus=2), {"parallel_environment": ""})


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("qacct_walltime", "reached its walltime limit"),
        ("qacct_deleted", "it was killed"),
        ("qacct_error_deleted", "failure 28: changing into working directory"),
        ("qacct_exit3", "the server exited with status 3"),
        ("qacct_unknown", ""),
    ],
)
def test_end_reason_comes_from_accounting(name, words):
    reason = sge.parse_end_reason(recorded("sge", name))
    assert (words in reason) if words else reason == ""


def test_end_reason_uses_the_last_record_when_job_numbers_wrapped():
    first = recorded("sge", "qacct_walltime").stdout
    second = recorded("sge", "qacct_exit3").stdout
    reason = sge.parse_end_reason(CommandOutput(0, first + second, ""))
    assert reason == "the server exited with status 3"


def test_pending_reason_is_the_scheduling_info():
    reason = sge.parse_pending_reason(recorded("sge", "qstat_j_pending"))
    assert reason == 'cannot run in PE "smp" because it only offers 0 slots'


@pytest.mark.parametrize(
    "line",
    ["scheduling info:            (Collecting of scheduler job information is turned off)",
     "scheduling info:            There are no messages available"],
)
def test_no_pending_reason_when_the_scheduler_keeps_none(line):
    assert sge.parse_pending_reason(CommandOutput(0, f"job_number: 4\n{line}\n", "")) == ""


@pytest.mark.parametrize("job_id", ["1234\n", "1234\nqdel -u '*'", "\n1234", "12 34", "1234.x"])
def test_job_id_with_a_line_break_or_junk_is_refused(job_id):
    with pytest.raises(ValueError):
        sge.quote_job_id(job_id)
    with pytest.raises(ValueError):
        sge.detail_command(job_id)


def test_entity_expansion_and_oversized_listings_are_unknown_without_hanging():
    from tests.test_schedulers import BILLION_LAUGHS, EXTERNAL_ENTITY

    for stdout in (BILLION_LAUGHS, EXTERNAL_ENTITY,
                   "<job_info>" + " " * (4 * 1024 * 1024) + "</job_info>"):
        status = sge.parse_status_output(CommandOutput(0, stdout, ""), "1")
        assert status.state is JobState.UNKNOWN
        assert "unreadable qstat -xml output" in status.reason


# --- the spawn form's live load (qstat -g c) ----------------------------------------------


def test_load_command_is_the_cluster_queue_summary():
    assert sge.load_command() == "qstat -g c"


def test_load_of_the_lab_gives_available_and_total_slots():
    (idle,) = sge.parse_load_output(recorded("sge", "load_idle"))
    (busy,) = sge.parse_load_output(recorded("sge", "load_one_core_used"))
    assert (idle.name, idle.cores_free, idle.cores_total) == ("all.q", 2, 2)
    assert (busy.name, busy.cores_free, busy.cores_total) == ("all.q", 1, 2)
    assert idle.gpus_total is None and idle.nodes_total is None


def test_load_reads_columns_by_name_and_leaves_disabled_slots_out():
    # Grid Engine 6.1's summary has no RES column; gpu.q has 8 of its 16 slots disabled.
    output = CommandOutput(0, (
        "CLUSTER QUEUE                   CQLOAD   USED  AVAIL  TOTAL aoACDS  cdsuE  \n"
        "-------------------------------------------------------------------------------\n"
        "all.q                             0.52     40     24     64      0      0 \n"
        "gpu.q                             -NA-      0      8     16      0      8 \n"), "")
    assert [(row.name, row.cores_free, row.cores_total)
            for row in sge.parse_load_output(output)] == [("all.q", 24, 64), ("gpu.q", 8, 16)]


def test_load_when_the_qmaster_is_down_raises_with_grid_engines_words():
    with pytest.raises(ValueError, match="unable to send message to qmaster"):
        sge.parse_load_output(recorded("sge", "load_controller_down"))


@pytest.mark.parametrize("text", ["all.q 0.1 0 0 2 2 0 0\n",  # no header
                                  "CLUSTER QUEUE CQLOAD USED RES AVAIL TOTAL aoACDS cdsuE\n"
                                  "all.q 0.1 0 0 two 2 0 0\n",
                                  "CLUSTER QUEUE CQLOAD USED RES AVAIL TOTAL aoACDS cdsuE\n"
                                  "all.q 0.1 0\n", ""])
def test_an_unreadable_summary_is_a_value_error(text):
    with pytest.raises(ValueError, match="qstat -g c"):
        sge.parse_load_output(CommandOutput(0, text, ""))


# --- a pending job in words ----------------------------------------------------------------


def test_the_recorded_pending_reason_reads_as_waiting_for_free_slots():
    reason = sge.parse_pending_reason(recorded("sge", "qstat_j_pending"))
    assert reason
    assert sge.explain_pending(reason).startswith("waiting for free slots")
    assert "(Grid Engine: " in sge.explain_pending(reason)


@pytest.mark.parametrize("reason, words", [
    ('cannot run because it exceeds limit "alice/////" in rule "per_user/1"',
     "your limit (a resource quota) is reached"),
    ("job dropped because of job dependencies", "Grid Engine says: job dropped"),
    ("", ""),
])
def test_grid_engine_reasons_in_plain_words(reason, words):
    assert sge.explain_pending(reason).startswith(words)


def test_a_long_grid_engine_reason_is_shortened():
    assert len(sge.explain_pending("x" * 1000)) < 200
