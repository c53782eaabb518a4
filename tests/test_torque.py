"""hub_spawner/schedulers/torque.py on the lab's recorded Torque-wrapper output and on real
Torque 6 / PBS Pro output written after their documented formats (tests/fixtures/torque/README.md
says which is which)."""

import shlex
import subprocess

import pytest

from hub_spawner.jobscript import render_job_script
from hub_spawner.resources import Resources
from hub_spawner.schedulers import CommandOutput, JobState, SubmitRejected, torque
from tests.fixture_output import recorded


@pytest.mark.parametrize(
    ("name", "job_id"),
    [("qsub_ok", "194"), ("torque6_qsub_ok", "1234.torque-server.example.org")],
)
def test_submit_output_gives_the_job_id(name, job_id):
    assert torque.parse_submit_output(recorded("torque", name)) == job_id


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("qsub_unknown_queue", "invalid partition specified: nosuch"),
        ("torque6_qsub_rejected", "submit error (Unknown queue MSG=requested queue not found)"),
    ],
)
def test_rejected_submission_carries_the_schedulers_message(name, message):
    with pytest.raises(SubmitRejected) as raised:
        torque.parse_submit_output(recorded("torque", name))
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("name", "job_id", "state", "state_name", "node"),
    [
        ("qstat_f_running", "194", JobState.RUNNING, "R", "compute"),
        ("qstat_f_pending", "195", JobState.PENDING, "Q", ""),
        ("qstat_f_cancelled", "194", JobState.DONE, "C", "compute"),
        ("qstat_f_unknown", "99999", JobState.DONE, "", ""),
        ("torque6_qstat_f_running", "1234.torque-server.example.org", JobState.RUNNING, "R",
         "node017"),
        ("torque6_qstat_f_held", "1235.torque-server.example.org", JobState.PENDING, "H", ""),
        ("torque6_qstat_f_walltime_exceeded", "1236.torque-server.example.org", JobState.DONE,
         "C", "node003"),
        ("torque6_qstat_f_unknown", "1299.torque-server.example.org", JobState.DONE, "", ""),
        ("torque6_qstat_x_running", "1234.torque-server.example.org", JobState.RUNNING, "R",
         "node017"),
        ("torque6_qstat_x_queued", "1237.torque-server.example.org", JobState.PENDING, "Q", ""),
        ("pbspro_qstat_f_running", "5678.pbs-server", JobState.RUNNING, "R", "cn042"),
        ("pbspro_qstat_f_queued", "5679.pbs-server", JobState.PENDING, "Q", ""),
        ("pbspro_qstat_xf_finished", "5680.pbs-server", JobState.DONE, "F", "cn007"),
        ("pbspro_qstat_f_finished", "5680.pbs-server", JobState.DONE, "", ""),
        ("pbspro_qstat_f_unknown", "5699.pbs-server", JobState.DONE, "", ""),
    ],
)
def test_status_output_maps_to_state(name, job_id, state, state_name, node):
    status = torque.parse_status_output(recorded("torque", name), job_id)
    assert (status.state, status.state_name, status.node) == (state, state_name, node)


def test_job_found_by_number_when_qstat_adds_the_server_name():
    status = torque.parse_status_output(recorded("torque", "torque6_qstat_f_running"), "1234")
    assert status.state is JobState.RUNNING


def test_held_job_says_so():
    status = torque.parse_status_output(
        recorded("torque", "torque6_qstat_f_held"), "1235.torque-server.example.org")
    assert "held" in status.reason and "qrls" in status.reason


def test_pending_reason_includes_the_wrapped_pbs_comment():
    status = torque.parse_status_output(recorded("torque", "pbspro_qstat_f_queued"),
                                        "5679.pbs-server")
    assert "Not Running: Insufficient amount of resource: ncpus (R: 128 A: 36 T: 36)" in (
        status.reason)


def test_walltime_end_tells_what_to_do():
    status = torque.parse_status_output(
        recorded("torque", "torque6_qstat_f_walltime_exceeded"), "1236.torque-server.example.org")
    text = torque.explain_end(status)
    assert "walltime" in text and "longer" in text


def test_signal_exit_is_explained():
    status = torque.parse_status_output(recorded("torque", "pbspro_qstat_xf_finished"),
                                        "5680.pbs-server")
    assert "signal 15" in torque.explain_end(status)


@pytest.mark.parametrize(
    "output",
    [
        CommandOutput(1, "", "qstat: cannot connect to server torque-server (errno=111)\n"),
        CommandOutput(0, "", ""),
        CommandOutput(0, "garbage\n", ""),
        CommandOutput(0, "<Data><Job>", ""),
        CommandOutput(0, "Job Id: 5\n    job_state = Z\n", ""),
    ],
)
def test_failures_and_surprises_are_unknown_never_done(output):
    assert torque.parse_status_output(output, "5").state is JobState.UNKNOWN


def test_commands_quote_and_validate():
    assert torque.status_command("12.server") == "qstat -f 12.server"
    assert torque.cancel_command("12") == "qdel 12"
    assert shlex.split(torque.cancel_command("12[].server")) == ["qdel", "12[].server"]
    for bad in ["12; rm -rf ~", "$(id)", "", "12 13", "12.server;x"]:
        with pytest.raises(ValueError):
            torque.status_command(bad)
    assert shlex.split(torque.submit_command("/h/a b.sh", "/h/o u")) == [
        "qsub", "-o", "/h/o u", "-j", "oe", "/h/a b.sh"]
    hostile = "x'; touch /tmp/pwned; '"
    command = torque.cancel_by_name_command(hostile, "alice")
    assert shlex.quote(hostile) in command
    subprocess.run(["bash", "-n", "-c", command], check=True)


def render(resources: Resources) -> str:
    return render_job_script(
        torque.JOB_SCRIPT_TEMPLATE, job_name="jupyterhub-alice-x", output_path="/home/a/o.out",
        resources=resources, extra_directives=["-l feature=skylake"], launch="echo launch",
        **torque.template_variables(resources, {}),
    )


def test_job_script_maps_every_resource():
    script = render(Resources(partition="batch", cpus=4, memory_mb=8192, walltime_seconds=90000,
                              account="proj1", gpus=1))
    lines = script.splitlines()
    for directive in [
        "#PBS -N jupyterhub-alice-x", "#PBS -o /home/a/o.out", "#PBS -j oe", "#PBS -r n",
        "#PBS -l nodes=1:ppn=4:gpus=1", "#PBS -q batch", "#PBS -l mem=8192mb",
        "#PBS -l walltime=25:00:00", "#PBS -A proj1", "#PBS -l feature=skylake",
    ]:
        assert directive in lines
    assert lines[-1] == "echo launch"
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_job_script_leaves_out_unset_resources():
    script = render(Resources(cpus=1))
    assert "#PBS -l nodes=1:ppn=1" in script.splitlines()
    for absent in ["-q ", "mem=", "walltime=", "-A ", "gpus="]:
        assert absent not in script


@pytest.mark.parametrize("job_id", ["1234\n", "1234.server\n", "1234\nqdel all", "12 34",
                                    "1234.ser ver"])
def test_job_id_with_a_line_break_or_junk_is_refused(job_id):
    with pytest.raises(ValueError, match="not a Torque/PBS job id"):
        torque.quote_job_id(job_id)


def test_entity_expansion_and_oversized_xml_are_unknown_without_hanging():
    laughs = ('<?xml version="1.0"?><!DOCTYPE Data [<!ENTITY a "aaaaaaaaaa">'
              '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
              "<Data><Job><Job_Id>1.s</Job_Id><job_state>&b;</job_state></Job></Data>")
    oversized = "<Data>" + " " * (4 * 1024 * 1024) + "</Data>"
    for stdout in (laughs, oversized):
        status = torque.parse_status_output(CommandOutput(0, stdout, ""), "1.s")
        assert status.state is JobState.UNKNOWN
        assert "unreadable qstat -x output" in status.reason


# --- the spawn form's live load (pbsnodes -a) ---------------------------------------------


def test_load_command_lists_every_node():
    assert torque.load_command() == "pbsnodes -a"


def test_load_of_the_labs_wrapper_is_one_all_nodes_row():
    (idle,) = torque.parse_load_output(recorded("torque", "load_idle"))
    assert (idle.name, idle.cores_free, idle.cores_total, idle.nodes_free) == (
        "all nodes", 2, 2, 1)
    # The wrapper prints Slurm's "mixed" and no job list: the node counts as full.
    (busy,) = torque.parse_load_output(recorded("torque", "load_one_core_used"))
    assert (busy.cores_free, busy.cores_total, busy.nodes_free) == (0, 2, 0)


def test_load_of_torque6_counts_the_cores_its_job_lists_name():
    # n001: 16 cores, 0-3 and 4 in use; n002 down,offline; n003 job-exclusive; n004 free.
    (row,) = torque.parse_load_output(recorded("torque", "torque6_pbsnodes"))
    assert (row.cores_free, row.cores_total) == (11 + 8, 48)
    assert (row.nodes_free, row.nodes_total) == (1, 4)
    assert row.gpus_total is None  # Torque's "gpus" has no used count


def test_load_of_pbs_pro_uses_assigned_resources_and_counts_gpus():
    # cn01: 8 of 32 cores and 1 of 4 GPUs assigned; cn02 job-busy; cn03 offline.
    (row,) = torque.parse_load_output(recorded("torque", "pbspro_pbsnodes"))
    assert (row.cores_free, row.cores_total) == (24, 96)
    assert (row.gpus_free, row.gpus_total) == (3, 12)
    assert (row.nodes_free, row.nodes_total) == (0, 3)


def test_load_when_the_server_is_down_raises_with_its_words():
    with pytest.raises(ValueError, match="cannot connect to server"):
        torque.parse_load_output(recorded("torque", "torque6_pbsnodes_no_server"))


def test_a_node_without_a_core_count_is_a_value_error():
    with pytest.raises(ValueError, match="no readable np"):
        torque.parse_load_output(CommandOutput(0, "n1\n     state = free\n", ""))


def test_no_nodes_is_no_rows():
    assert torque.parse_load_output(CommandOutput(0, "", "")) == []


# --- a pending job in words ----------------------------------------------------------------


@pytest.mark.parametrize("reason, words", [
    ("", ""),
    ("Not Running: Insufficient amount of resource: ncpus (R: 4 A: 2 T: 2)",
     "waiting for free cores, memory or GPUs (Torque/PBS: Not Running: Insufficient"),
    ("Not Running: User has reached queue workq running job limit.",
     "your (or your group's) limit is reached"),
    ("Can Never Run: Insufficient amount of queue resource: ncpus",
     "it can never run as asked for"),
    ("Something else entirely", "Torque/PBS says: Something else entirely"),
])
def test_pbs_comments_in_plain_words(reason, words):
    assert torque.explain_pending(reason).startswith(words)


def test_a_held_jobs_reason_stays_plain():
    status = torque.parse_status_output(recorded("torque", "torque6_qstat_f_held"),
                                        "1235.torque-server.example.org")
    explained = torque.explain_pending(status.reason)
    assert explained.startswith("the job is held")
