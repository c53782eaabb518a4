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
    command = module.check_command("alice")
    first, _, second = command.partition("&&")
    assert first.strip() and second.strip()
    assert "-u alice" in second or "--user=alice" in second  # a query the controller answers
    assert "$(" not in command and "{" not in command  # csh has neither


@pytest.mark.parametrize("module", [slurm, sge, torque])
def test_the_user_name_is_quoted(module):
    assert "'alice; id'" in module.check_command("alice; id")


def test_the_version_is_the_last_line_after_any_banner():
    output = CommandOutput(0, "Welcome to the cluster!\n\nslurm-wlm 22.05.8\n", "")
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
