"""hub_spawner/schedulers/slurm.py on recorded real Slurm output (tests/fixtures/slurm)."""

import shlex
from pathlib import Path

import pytest

from hub_spawner.jobscript import render_job_script
from hub_spawner.resources import Resources
from hub_spawner.schedulers import CommandOutput, JobState, SubmitRejected, slurm

FIXTURES = Path(__file__).parent / "fixtures" / "slurm"


def recorded(name: str) -> CommandOutput:
    return CommandOutput(
        int((FIXTURES / f"{name}.rc").read_text()),
        (FIXTURES / f"{name}.stdout").read_text(),
        (FIXTURES / f"{name}.stderr").read_text(),
    )


def test_submit_command_quotes_the_script_path():
    command = slurm.submit_command("/home/a b/x.sh", "/home/a b/x.out")
    assert shlex.split(command) == ["sbatch", "--parsable", "/home/a b/x.sh"]


def test_submit_output_gives_the_job_id():
    assert slurm.parse_submit_output(recorded("sbatch_ok")) == "3"


def test_submit_output_with_cluster_suffix_gives_the_job_id():
    assert slurm.parse_submit_output(CommandOutput(0, "812;cllab\n", "")) == "812"


def test_rejected_submission_carries_slurms_own_message():
    with pytest.raises(SubmitRejected) as raised:
        slurm.parse_submit_output(recorded("sbatch_invalid_partition"))
    assert "Invalid partition name specified" in str(raised.value)
    assert "sbatch: error:" not in str(raised.value)


def test_submit_output_without_job_id_is_rejected():
    with pytest.raises(SubmitRejected, match="no job id"):
        slurm.parse_submit_output(CommandOutput(0, "Submitted batch job\n", ""))


@pytest.mark.parametrize(
    "name, state, node, reason",
    [
        ("squeue_running", JobState.RUNNING, "compute", ""),
        ("squeue_pending", JobState.PENDING, "", "Resources"),
        ("squeue_pending_unsatisfiable", JobState.PENDING, "", "PartitionConfig"),
        ("squeue_cancelled", JobState.DONE, "compute", ""),
        ("squeue_completed", JobState.DONE, "compute", ""),
        ("squeue_invalid_job", JobState.DONE, "", "Slurm no longer knows the job"),
    ],
)
def test_status_output_maps_to_state(name, state, node, reason):
    status = slurm.parse_status_output(recorded(name), "3")
    assert (status.state, status.node, status.reason) == (state, node, reason)


def test_a_waiting_jobs_status_carries_slurms_expected_start_a_running_ones_does_not():
    """Recorded with the four-field format; the three-field one of older versions still
    reads (a job submitted before an upgrade)."""
    pending = slurm.parse_status_output(recorded("squeue_pending_estimated"), "3")
    assert (pending.state, pending.reason) == (JobState.PENDING, "Resources")
    assert pending.estimated_start == "2026-12-07T11:01:52"
    running = slurm.parse_status_output(recorded("squeue_running_with_start"), "3")
    assert (running.state, running.node, running.estimated_start) == (
        JobState.RUNNING, "compute", "")
    unknown = slurm.parse_status_output(CommandOutput(0, "PENDING||Priority|N/A\n", ""), "3")
    assert (unknown.state, unknown.estimated_start) == (JobState.PENDING, "")


def test_completing_is_ending_not_done():
    status = slurm.parse_status_output(CommandOutput(0, "COMPLETING|compute|None\n", ""), "3")
    assert status.state is JobState.ENDING


@pytest.mark.parametrize(
    "name, words",
    [("squeue_cancelled", "it was cancelled"), ("squeue_completed", "the server exited"),
     ("squeue_invalid_job", "Slurm no longer knows the job")],
)
def test_end_explanations_say_why(name, words):
    assert words in slurm.explain_end(slurm.parse_status_output(recorded(name), "3"))


def test_walltime_end_tells_what_to_do():
    status = slurm.parse_status_output(CommandOutput(0, "TIMEOUT|compute|TimeLimit\n", ""), "3")
    assert status.state is JobState.DONE
    assert "walltime" in slurm.explain_end(status) and "longer" in slurm.explain_end(status)


def test_status_empty_output_means_done():
    assert slurm.parse_status_output(CommandOutput(0, "\n", ""), "3").state is JobState.DONE


@pytest.mark.parametrize(
    "output",
    [
        CommandOutput(1, "", "slurm_load_jobs error: Unable to contact slurm controller"),
        CommandOutput(255, "", "ssh: connection reset"),
        CommandOutput(0, "garbage without separators\n", ""),
        CommandOutput(0, "WEIRD_NEW_STATE|compute|None\n", ""),
    ],
)
def test_status_errors_are_unknown_never_done(output):
    assert slurm.parse_status_output(output, "3").state is JobState.UNKNOWN


def test_status_and_cancel_commands_quote_and_validate_the_job_id():
    assert shlex.split(slurm.status_command("42"))[-1] == "--format=%T|%N|%r|%S"
    assert slurm.cancel_command("42") == "scancel 42"
    for hostile in ["42; rm -rf ~", "$(id)", "", "42\n43"]:
        with pytest.raises(ValueError):
            slurm.cancel_command(hostile)
        with pytest.raises(ValueError):
            slurm.status_command(hostile)


def test_cancel_by_name_quotes_hostile_values():
    command = slurm.cancel_by_name_command("job'; touch /tmp/x; '", "alice")
    assert shlex.split(command) == ["scancel", "--name=job'; touch /tmp/x; '", "--user=alice"]


@pytest.mark.parametrize(
    "seconds, text", [(0, ""), (59, "0-00:00:59"), (3600, "0-01:00:00"), (90061, "1-01:01:01")]
)
def test_time_limit_format(seconds, text):
    assert slurm.format_time_limit(seconds) == text


def test_job_script_has_directives_for_every_resource():
    resources = Resources(partition="debug", cpus=2, memory_mb=512, walltime_seconds=3600,
                          account="proj1", gpus=2)
    script = render_job_script(
        slurm.JOB_SCRIPT_TEMPLATE, job_name="jupyterhub-alice-x", output_path="/home/a/o.out",
        resources=resources, extra_directives=["--constraint=skylake"], launch="echo launch",
        **slurm.template_variables(resources, {"qos": "short", "gpu_gres": "gpu"}),
    )
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in [
        "#SBATCH --job-name=jupyterhub-alice-x", "#SBATCH --output=/home/a/o.out",
        "#SBATCH --partition=debug", "#SBATCH --cpus-per-task=2", "#SBATCH --mem=512M",
        "#SBATCH --time=0-01:00:00", "#SBATCH --account=proj1", "#SBATCH --constraint=skylake",
        "#SBATCH --no-requeue", "#SBATCH --gres=gpu:2", "#SBATCH --qos=short",
    ]:
        assert directive in lines
    assert lines[-1] == "echo launch"


def test_job_script_leaves_out_unset_resources():
    resources = Resources(cpus=0)
    script = render_job_script(
        slurm.JOB_SCRIPT_TEMPLATE, job_name="j", output_path="/o", resources=resources,
        extra_directives=[], launch="true", **slurm.template_variables(resources, {}),
    )
    for absent in ["--partition", "--mem", "--time", "--account", "--cpus-per-task", "--gres",
                   "--qos"]:
        assert absent not in script


@pytest.mark.parametrize("job_id", ["1234\n", "1234\nrm -rf ~", "\n1234", "12 34", "1234_"])
def test_job_id_with_a_line_break_or_junk_is_refused(job_id):
    with pytest.raises(ValueError, match="not a Slurm job id"):
        slurm.quote_job_id(job_id)
    with pytest.raises(ValueError):
        slurm.cancel_command(job_id)


def test_submit_output_whose_id_has_junk_after_it_is_rejected():
    with pytest.raises(SubmitRejected, match="no job id"):
        slurm.parse_submit_output(CommandOutput(0, "1234 x\n", ""))


# --- the spawn form's live load (sinfo) ---------------------------------------------------


def test_load_command_asks_sinfo_for_one_line_per_node_and_partition():
    words = shlex.split(slurm.load_command())
    assert words[:3] == ["sinfo", "--noheader", "--Node"]
    assert words[3] == ("--Format=PartitionName:|,NodeHost:|,CPUsState:|,Gres:|,GresUsed:|,"
                        "StateLong:")


def test_load_of_the_idle_lab_is_every_core_free_in_both_partitions():
    loads = slurm.parse_load_output(recorded("load_idle"))
    assert [(row.name, row.cores_free, row.cores_total, row.nodes_free, row.nodes_total)
            for row in loads] == [("debug", 2, 2, 1, 1), ("long", 2, 2, 1, 1)]
    assert all(row.gpus_total is None and row.gpus_free is None for row in loads)


def test_load_with_one_core_used_counts_the_mixed_node_as_not_idle():
    loads = slurm.parse_load_output(recorded("load_one_core_used"))
    assert [(row.name, row.cores_free, row.cores_total, row.nodes_free) for row in loads] == [
        ("debug", 1, 2, 0), ("long", 1, 2, 0)]


def test_load_when_the_controller_is_down_raises_with_slurms_words():
    with pytest.raises(ValueError, match="Unable to contact slurm controller"):
        slurm.parse_load_output(recorded("load_controller_down"))


def test_load_sums_gpus_per_partition_and_counts_none_free_on_a_down_or_full_node():
    # sinfo lines as Slurm 22.05 prints them for GPU nodes (GRES with types and sockets).
    output = CommandOutput(0, "\n".join([
        "gpu|g01|4/28/0/32|gpu:a100:4(S:0-1)|gpu:a100:1(IDX:0)|mixed",
        "gpu|g02|0/0/32/32|gpu:a100:4(S:0-1)|gpu:a100:0(IDX:N/A)|down*",
        "gpu|g03|32/0/0/32|gpu:a100:2(S:0),gpu:v100:2(S:1)|gpu:a100:0(IDX:N/A),gpu:v100:0(IDX:N/A)|allocated",
        "cpu|c01|0/64/0/64|(null)|(null)|idle",
        "cpu|c02|0/0/64/64|(null)|(null)|drained",
    ]) + "\n", "")
    gpu, cpu = slurm.parse_load_output(output)
    assert (gpu.name, gpu.cores_free, gpu.cores_total) == ("gpu", 28, 96)
    assert (gpu.gpus_free, gpu.gpus_total) == (3, 12)
    assert (gpu.nodes_free, gpu.nodes_total) == (0, 3)
    assert (cpu.cores_free, cpu.cores_total, cpu.nodes_free, cpu.nodes_total) == (64, 128, 1, 2)
    assert cpu.gpus_total is None


@pytest.mark.parametrize("line", ["debug|compute|0/2/0|(null)|(null)|idle", "debug|compute",
                                  "debug|compute|a/b/c/d|(null)|(null)|idle"])
def test_an_unreadable_load_line_is_a_value_error(line):
    with pytest.raises(ValueError, match="unreadable sinfo"):
        slurm.parse_load_output(CommandOutput(0, line + "\n", ""))


# --- a pending job in words, its place and start estimate ---------------------------------


@pytest.mark.parametrize("reason, words", [
    ("Resources", "waiting for free cores, memory or GPUs (Slurm: Resources)"),
    ("Priority", "other jobs are ahead of it in the queue (Slurm: Priority)"),
    ("AssocGrpCpuLimit", "your group's (account's) limit is reached"),
    ("QOSMaxCpuPerUserLimit", "your limit is reached; it starts when your other jobs end"),
    ("ReqNodeNotAvail, UnavailableNodes:compute", "the nodes it needs are down, drained or"),
    ("PartitionTimeLimit", "choose a shorter walltime"),
    ("SomethingNew", "Slurm says: SomethingNew"),
])
def test_pending_reasons_are_explained_in_plain_words_with_the_code_kept(reason, words):
    assert words in slurm.explain_pending(reason)


@pytest.mark.parametrize("reason", ["", "None", "(None)"])
def test_no_pending_reason_explains_to_nothing(reason):
    assert slurm.explain_pending(reason) == ""


def test_pending_queue_gives_the_place_by_priority_and_slurms_start_estimate():
    # Recorded: a 2-core job running on the 2-core node, two more waiting (bf_interval=5).
    output = recorded("squeue_pending_queue")
    first = slurm.parse_pending_queue(output, "7")
    second = slurm.parse_pending_queue(output, "8")
    assert (first.position, first.waiting) == (1, 2)
    assert (second.position, second.waiting) == (2, 2)
    assert first.estimated_start == "2026-12-05T13:05:31"
    assert second.estimated_start == "2026-12-05T13:15:00"
    assert slurm.parse_pending_queue(output, "99") is None


def test_pending_queue_counts_only_the_jobs_partition_and_sorts_by_priority():
    output = CommandOutput(0, "30|debug|100|N/A\n31|long|900|N/A\n32|debug,long|500|N/A\n"
                              "33|debug|500|2026-12-05T14:00:00\n", "")
    place = slurm.parse_pending_queue(output, "33")
    assert (place.position, place.waiting, place.estimated_start) == (
        2, 3, "2026-12-05T14:00:00")  # 32 (same priority, older) first, then 33, then 30
    assert slurm.parse_pending_queue(output, "30").estimated_start == ""
    assert slurm.parse_pending_queue(CommandOutput(1, "", "error"), "33") is None
