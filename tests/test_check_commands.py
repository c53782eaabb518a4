"""The schedulers' check commands and the shared reading of their output (pure)."""

from __future__ import annotations

import pytest

from hub_spawner.schedulers import (
    CommandOutput,
    SchedulerUnavailable,
    parse_check_output,
    sge,
    slurm,
    torque,
)


@pytest.mark.parametrize("module", [slurm, sge, torque])
def test_each_check_command_asks_for_the_version_then_the_controller(module):
    command = module.check_command()
    first, _, second = command.partition("&&")
    assert first.strip() and second.strip()
    assert '"$(id -un)"' in second  # the user's own jobs: a query the controller must answer


def test_the_version_is_the_first_line():
    output = CommandOutput(0, "\nslurm-wlm 22.05.8\nmore\n", "")
    assert parse_check_output(output) == "slurm-wlm 22.05.8"


def test_a_command_not_on_path_says_so():
    output = CommandOutput(127, "", "bash: line 1: sinfo: command not found\n")
    with pytest.raises(SchedulerUnavailable, match="not on the PATH .*sinfo: command not found"):
        parse_check_output(output)


def test_a_controller_that_is_down_gives_the_schedulers_words():
    output = CommandOutput(
        1, "slurm-wlm 22.05.8\n",
        "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n")
    with pytest.raises(SchedulerUnavailable, match="Unable to contact slurm controller"):
        parse_check_output(output)
