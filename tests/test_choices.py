"""hub_spawner/choices.py: partitions, presets, accounts and limits per user; the summary."""

import pytest

from hub_spawner.choices import choices_for, format_duration, format_memory, resolve, summary
from hub_spawner.resources import Limits, OptionError, Resources

BASE = Limits(default_partition="short", max_cpus=4, max_memory_mb=8192,
              default_walltime_seconds=8 * 3600, max_walltime_seconds=86400)
PARTITIONS = [
    "short",
    {"name": "long", "description": "up to 7 days", "max_walltime": "7-00:00:00"},
    {"name": "gpu", "description": "A100 nodes", "groups": ["gpu"], "max_gpus": 2,
     "default_gpus": 1, "max_cpus": 16},
]
PRESETS = [
    {"name": "small", "display_name": "Small", "description": "1 core, 4 GB, 8 h", "cpus": 1,
     "memory": "4G", "walltime": "08:00:00"},
    {"name": "gpu", "display_name": "GPU", "description": "1 GPU, 8 cores", "partition": "gpu",
     "gpus": 1, "cpus": 8, "groups": ["gpu"]},
]


def choices(groups=(), **settings):
    settings.setdefault("partitions", PARTITIONS)
    settings.setdefault("presets", PRESETS)
    return choices_for(BASE, set(groups), **settings)


def test_a_group_only_partition_and_preset_are_hidden_from_others():
    plain, gpu = choices(), choices(["gpu"])
    assert [p.name for p in plain.partitions] == ["short", "long"]
    assert [p.key for p in plain.presets] == ["small"]
    assert [p.name for p in gpu.partitions] == ["short", "long", "gpu"]
    assert [p.key for p in gpu.presets] == ["small", "gpu"]


def test_a_hidden_partition_or_preset_is_refused_through_the_api_too():
    with pytest.raises(OptionError) as raised:
        resolve({"partition": "gpu"}, choices())
    assert raised.value.field == "partition" and "short, long" in str(raised.value)
    with pytest.raises(OptionError) as raised:
        resolve({"preset": "gpu"}, choices())
    assert raised.value.field == "preset" and "small" in str(raised.value)


def test_partition_limits_hold_when_it_is_chosen():
    gpu = choices(["gpu"])
    assert resolve({"partition": "gpu", "cpus": 16}, gpu).resources.gpus == 1  # its default
    with pytest.raises(OptionError, match="between 1 and 4") as raised:
        resolve({"partition": "short", "cpus": 16}, gpu)
    assert raised.value.field == "cpus"
    long_job = resolve({"partition": "long", "walltime": "3-00:00:00"}, gpu)
    assert long_job.resources.walltime_seconds == 3 * 86400
    with pytest.raises(OptionError) as raised:
        resolve({"partition": "short", "walltime": "3-00:00:00"}, gpu)
    assert raised.value.field == "walltime"


def test_group_limits_raise_the_base_and_the_largest_wins():
    settings = {"group_limits": {"power": {"max_cpus": 32}, "more": {"max_cpus": 64},
                                 "other": {"max_cpus": 2}}}
    assert choices(["power"], **settings).limits.max_cpus == 32
    assert choices(["power", "more"], **settings).limits.max_cpus == 64
    assert choices([], **settings).limits.max_cpus == 4
    # a partition's own setting wins over the group's
    assert choices(["power", "gpu"], **settings).limits_for("gpu").max_cpus == 16


def test_a_preset_gives_its_resources_and_its_name_as_the_summary():
    request = resolve({"preset": "small"}, choices())
    assert request.resources == Resources("short", 1, 4096, 8 * 3600, "", 0)
    assert request.summary == "Small"
    options = request.to_user_options()
    assert options["preset"] == "small" and options["profile"] == "Small"
    assert resolve(options, choices()) == request  # round trip (a respawn reuses them)


def test_a_preset_changed_by_the_api_is_summarised_by_its_resources():
    request = resolve({"preset": "small", "cpus": 2}, choices())
    assert request.preset is None
    assert request.summary == "short · 2 cores · 4 GB · 8 h"


def test_accounts_become_a_closed_list():
    listed = choices(accounts=["proj-a", {"name": "proj-b", "groups": ["b"]}])
    assert listed.limits.default_account == "proj-a"
    assert resolve({}, listed).resources.account == "proj-a"
    with pytest.raises(OptionError) as raised:
        resolve({"account": "proj-b"}, listed)
    assert raised.value.field == "account"


@pytest.mark.parametrize(("settings", "words"), [
    ({"partitions": [{"name": "x; rm"}]}, "partitions"),
    ({"partitions": [{"name": "x", "max_cpus": "many"}]}, "partitions['x']['max_cpus']"),
    ({"partitions": [{"name": "x", "colour": "red"}]}, "unknown key 'colour'"),
    ({"presets": [{"display_name": "no key"}]}, "presets"),
    ({"presets": [{"name": "a", "groups": "gpu"}]}, "presets['a']['groups']"),
    ({"group_limits": {"g": {"max_memory": "lots"}}}, "group_limits['g']['max_memory']"),
    ({"partitions": [{"name": "x", "groups": ["nobody"]}]}, "No partition here is offered"),
])
def test_a_bad_setting_is_a_clear_error_naming_it(settings, words):
    with pytest.raises(ValueError) as raised:
        choices(**settings)
    assert words in str(raised.value)


def test_summary_words():
    assert summary(Resources("debug", 2, 4096, 8 * 3600)) == "debug · 2 cores · 4 GB · 8 h"
    assert summary(Resources("", 1, 0, 0, "proj", 1)) == \
        "default partition · 1 core · 1 GPU · account proj"
    assert [format_memory(m) for m in (512, 1536, 4096, 2 * 1024 * 1024)] == \
        ["512 MB", "1.5 GB", "4 GB", "2 TB"]
    assert [format_duration(s) for s in (2700, 5400, 86400 * 2, 86400 + 12 * 3600)] == \
        ["45 min", "1 h 30 min", "2 d", "1 d 12 h"]


@pytest.mark.parametrize("name", ["partition", "cpus", "memory", "gpus", "walltime", "account",
                                  "preset"])
@pytest.mark.parametrize("value", [["x"], {"x": 1}, True, 1.5j], ids=repr)
def test_a_value_of_another_type_is_refused_naming_its_field(name, value):
    """REST clients send JSON of any shape: never a TypeError (a 500), always the field."""
    listed = choices(accounts=["proj-a"])
    with pytest.raises(OptionError) as raised:
        resolve({name: value}, listed)
    assert raised.value.field == name, raised.value
