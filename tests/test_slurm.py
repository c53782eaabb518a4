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
    assert shlex.split(slurm.status_command("42"))[-1] == "--format=%T|%N|%r"
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
