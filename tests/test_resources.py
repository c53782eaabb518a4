"""hub_spawner/resources.py and hub_spawner/form.py: validation of what users ask for."""

import pytest

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
                                 "walltime": ["02:00:00"], "account": [""]}, LIMITS)
    assert options == {"partition": "gpu", "cpus": 2, "memory": "", "gpus": 0,
                       "walltime": "02:00:00", "account": ""}


def test_form_ignores_the_pages_own_xsrf_field():
    assert options_from_form({"_xsrf": ["token"], "cpus": ["2"]}, LIMITS)["cpus"] == 2


def test_form_rejects_bad_value():
    with pytest.raises(ValueError, match="Cores"):
        options_from_form({"cpus": ["-1"]}, LIMITS)


def test_form_escapes_values_and_offers_partitions():
    html = render_options_form(Limits(partitions=("debug", '"><script>'),
                                      default_account='"><b>'))
    assert "<script>" not in html and "<b>" not in html
    assert '<select class="form-select"' in html and 'value="debug"' in html
