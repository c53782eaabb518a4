"""hub_spawner/resources.py and hub_spawner/form.py: validation of what users ask for."""

import pytest

from hub_spawner.choices import Choices, choices_for
from hub_spawner.form import options_from_form, render_options_form
from hub_spawner.resources import (
    Limits,
    Resources,
    format_walltime,
    parse_memory_mb,
    parse_walltime_seconds,
    resources_from_options,
)

LIMITS = Limits(default_partition="debug", partitions=("debug", "gpu"), max_cpus=8,
                max_memory_mb=64 * 1024, default_walltime_seconds=3600,
                max_walltime_seconds=2 * 86400)


def test_defaults_fill_missing_options():
    assert resources_from_options({}, LIMITS) == Resources("debug", 1, 0, 3600, "")


def test_full_request_is_normalised():
    resources = resources_from_options(
        {"partition": "gpu", "cpus": "4", "memory": "8G", "walltime": "1-02:00:00",
         "account": "proj.x-1"}, LIMITS)
    assert resources == Resources("gpu", 4, 8192, 93600, "proj.x-1")
    assert resources_from_options(resources.to_user_options(), LIMITS) == resources


@pytest.mark.parametrize(
    "options, message",
    [
        ({"partition": "debug; touch /tmp/pwned"}, "not a valid name"),
        ({"partition": "$(id)"}, "not a valid name"),
        ({"partition": "other"}, "not offered here"),
        ({"account": "a b"}, "not a valid name"),
        ({"account": "x\n#SBATCH --uid=0"}, "not a valid name"),
        ({"cpus": "0"}, "between 1 and 8"),
        ({"cpus": "9"}, "between 1 and 8"),
        ({"cpus": "two"}, "whole number"),
        ({"memory": "lots"}, "not understood"),
        ({"memory": "65G"}, "more than the 64 GB"),
        ({"walltime": "3-00:00:00"}, "longer than"),
        ({"walltime": "1:2:3:4"}, "not understood"),
        ({"walltime": "0"}, "longer than zero"),
        ({"image": "x"}, "Unknown option 'image'"),
    ],
)
def test_bad_values_are_rejected_with_a_message(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        resources_from_options(options, LIMITS)


@pytest.mark.parametrize("text, mb", [("4", 4096), ("4G", 4096), ("512M", 512), ("1.5g", 1536),
                                      ("2GB", 2048)])
def test_memory_units(text, mb):
    assert parse_memory_mb(text, 1 << 30) == mb


@pytest.mark.parametrize("text, seconds", [("90", 5400), ("01:30", 5400), ("01:30:15", 5415),
                                           ("2-00:00:00", 172800)])
def test_walltime_formats(text, seconds):
    assert parse_walltime_seconds(text, 1 << 30) == seconds


def test_walltime_format_has_unbounded_hours():
    assert format_walltime(36 * 3600 + 61) == "36:01:01"


def test_form_parses_first_values_and_ignores_empty_fields():
    options = options_from_form({"partition": ["gpu"], "cpus": ["2"], "memory": [""],
                                 "walltime": ["02:00:00"], "account": [""]}, Choices(LIMITS))
    assert options == {"partition": "gpu", "cpus": 2, "memory": "", "gpus": 0,
                       "walltime": "02:00:00", "account": "", "preset": "",
                       "profile": "gpu · 2 cores · 2 h"}


def test_form_ignores_the_pages_own_xsrf_field():
    assert options_from_form({"_xsrf": ["token"], "cpus": ["2"]}, Choices(LIMITS))["cpus"] == 2


def test_form_rejects_bad_value():
    with pytest.raises(ValueError, match="Cores"):
        options_from_form({"cpus": ["-1"]}, Choices(LIMITS))


def test_form_escapes_values_and_offers_partitions():
    html = render_options_form(choices_for(Limits(default_account='"><b>'), set(),
                                           partitions=["debug", {"name": "gpu",
                                                       "description": '"><script>'}]))
    assert html.count("<script>") == 1  # the form's own
    assert '"><script>' not in html and "<b>" not in html
    assert '<select class="form-select"' in html and 'value="debug"' in html


# --- hostile input: every field, every path (REST user_options and the form) --------------------

FIELD_WORDS = {"partition": "partition", "cpus": "cores", "memory": "memory", "gpus": "gpus",
               "walltime": "walltime", "account": "account"}
HOSTILE_TEXT = ["; touch CANARY", "$(id)", "`id`", "x\n#SBATCH --uid=0", "--uid=0", "A" * 10240,
                "ünï", "1e400", "9" * 400, "-1", "nan", "inf", "debug\n", "4\n", "\n", " debug"]
HOSTILE_JSON = [-1, 10**400, float("nan"), float("inf"), float("-inf"), 1.5, [], ["debug"], {},
                {"cpus": 1}, True, False]
GPU_LIMITS = Limits(partitions=(), max_cpus=8, max_memory_mb=64 * 1024, max_gpus=2,
                    max_walltime_seconds=2 * 86400)
GPU_CHOICES = Choices(GPU_LIMITS)


def assert_refused_naming(field, options, limits=GPU_LIMITS):
    with pytest.raises(ValueError) as raised:
        resources_from_options(options, limits)
    message = str(raised.value)
    assert FIELD_WORDS[field] in message.lower(), message
    assert len(message) < 400, "a message quotes at most a short piece of the value"
    return message


@pytest.mark.parametrize("field", sorted(FIELD_WORDS))
@pytest.mark.parametrize("value", HOSTILE_TEXT + HOSTILE_JSON,
                         ids=lambda value: repr(value)[:20])
def test_every_hostile_value_of_every_field_is_refused_naming_the_field(field, value):
    """Refused with a message naming the field, or (a harmless name such as 'nan' for a
    partition) accepted as exactly that name, which is safe in a directive."""
    if field in ("partition", "account") and isinstance(value, str) and is_plain_name(value):
        assert getattr(resources_from_options({field: value}, GPU_LIMITS), field) == value
        return
    assert_refused_naming(field, {field: value})


def is_plain_name(value):
    return bool(value) and value[0].isascii() and value[0].isalnum() and len(value) <= 64 and all(
        ch.isascii() and (ch.isalnum() or ch in "_.-") for ch in value)


@pytest.mark.parametrize("field", sorted(FIELD_WORDS))
def test_false_is_not_a_value_of_any_field(field):
    assert_refused_naming(field, {field: False})


@pytest.mark.parametrize("field", sorted(FIELD_WORDS))
@pytest.mark.parametrize("value", HOSTILE_TEXT, ids=lambda value: repr(value)[:20])
def test_the_form_refuses_the_same_values(field, value):
    if value == " debug" and field in ("partition", "account"):
        # the form drops spaces around a typed value: " debug" is the name "debug"
        assert options_from_form({field: [value]}, GPU_CHOICES)[field] == "debug"
        return
    if value.strip(" \t") == "":
        return  # an empty field means the default
    if field in ("partition", "account") and is_plain_name(value):
        assert options_from_form({field: [value]}, GPU_CHOICES)[field] == value
        return
    with pytest.raises(ValueError) as raised:
        options_from_form({field: [value]}, GPU_CHOICES)
    assert FIELD_WORDS[field] in str(raised.value).lower()


@pytest.mark.parametrize("field", sorted(FIELD_WORDS))
def test_null_and_empty_mean_the_default(field):
    defaults = resources_from_options({}, LIMITS)
    assert resources_from_options({field: None}, LIMITS) == defaults
    assert resources_from_options({field: ""}, LIMITS) == defaults


@pytest.mark.parametrize("key", ["; touch CANARY", "x" * 10240, "ünï", "cpus\n", "__class__"])
def test_unknown_keys_are_refused_with_a_short_message(key):
    with pytest.raises(ValueError, match="Unknown option") as raised:
        resources_from_options({key: "1"}, LIMITS)
    assert len(str(raised.value)) < 200


@pytest.mark.parametrize("options", [[], ["cpus"], "cpus=2", 2, True])
def test_options_that_are_not_an_object_are_refused(options):
    with pytest.raises(ValueError, match="must be a JSON object"):
        resources_from_options(options, LIMITS)


def test_huge_memory_is_a_clear_refusal_not_an_overflow():
    # float("9" * 400) is inf and int(inf) raised OverflowError past the ValueError handler
    message = assert_refused_naming("memory", {"memory": "9" * 400})
    assert "not understood" in message
    assert "more than the 64 GB" in assert_refused_naming("memory", {"memory": "999999999T"})


def test_json_numbers_are_taken_where_they_make_sense():
    resources = resources_from_options({"cpus": 2, "gpus": 1, "memory": 4, "walltime": 90},
                                       GPU_LIMITS)
    assert (resources.cpus, resources.gpus, resources.memory_mb, resources.walltime_seconds) == (
        2, 1, 4096, 5400)


def test_fractional_memory_is_exact():
    assert parse_memory_mb("1.5G", 1 << 30) == 1536
    assert parse_memory_mb("0.001T", 1 << 30) == 1048
    with pytest.raises(ValueError, match="too small"):
        parse_memory_mb("0.1M", 1 << 30)


def test_fullwidth_and_other_unicode_digits_are_not_numbers():
    for value in ("２", "٣", "1_000"):
        assert_refused_naming("cpus", {"cpus": value})
