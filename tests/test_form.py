"""hub_spawner/form.py: the spawn form's HTML and its fields -> user_options."""

import re

import pytest

from hub_spawner.choices import choices_for
from hub_spawner.form import options_from_form, raw_options, render_options_form
from hub_spawner.resources import Limits, OptionError
from hub_spawner.schedulers import QueueLoad

from .test_choices import BASE, PARTITIONS, PRESETS

CHOICES = choices_for(BASE, {"gpu"}, partitions=PARTITIONS, presets=PRESETS)


def field_html(html, name):
    """The ``mb-3`` block of one field."""
    match = re.search(rf'<div class="mb-3">\n<label class="form-label" for="hub-spawner-{name}">'
                      rf".*?\n</div>", html, re.S)
    assert match, name
    return match.group(0)


def test_the_form_offers_presets_then_custom_with_the_first_checked():
    html = render_options_form(CHOICES)
    assert html.index('value="small" checked') < html.index('value="gpu"') < html.index(
        'id="hub-spawner-preset-custom"')
    assert "1 core, 4 GB, 8 h" in html
    assert '<details class="mb-3 border rounded p-2" id="hub-spawner-advanced">' in html  # closed


def test_each_resource_is_a_proper_control_with_its_limits():
    html = render_options_form(CHOICES)
    assert "<option value=\"long\"" in html and "long: up to 7 days" in html
    cpus = field_html(html, "cpus")
    assert 'type="number"' in cpus and 'min="1" max="4"' in cpus and "1 to 4" in cpus
    memory = field_html(html, "memory")
    assert 'name="memory_unit"' in memory and 'max="8"' in memory and "at most 8 GB" in memory
    walltime = field_html(html, "walltime")
    assert 'value="8"' in walltime and '<option value="h" selected>' in walltime
    assert "at most 1 d" in walltime
    assert 'name="gpus"' in html  # the gpu partition offers them


def test_the_limits_of_every_partition_are_in_the_page_for_the_script():
    html = render_options_form(CHOICES)
    assert '"max_cpus": 16' in html.replace("&quot;", '"')


def test_a_refused_form_comes_back_with_the_message_next_to_its_field_and_values_kept():
    values = {"preset": "", "partition": "long", "cpus": "99", "memory": "3",
              "memory_unit": "G", "walltime": "2", "walltime_unit": "d"}
    with pytest.raises(OptionError) as raised:
        options_from_form({k: [v] for k, v in values.items()}, CHOICES)
    html = render_options_form(CHOICES, values=values, error=raised.value)
    cpus = field_html(html, "cpus")
    assert "is-invalid" in cpus and "Cores must be between 1 and 4, not 99" in cpus
    assert "is-invalid" not in field_html(html, "memory")
    assert 'value="3"' in field_html(html, "memory")
    assert '<option value="long" selected' in html
    assert '<option value="d" selected>' in field_html(html, "walltime")
    assert "<details class=\"mb-3 border rounded p-2\" id=\"hub-spawner-advanced\" open>" in html
    assert 'id="hub-spawner-preset-custom" data-preset value="" checked' in html


def test_numbers_are_joined_with_their_units():
    assert raw_options({"preset": [""], "memory": ["1.5"], "memory_unit": ["G"],
                        "walltime": ["1.5"], "walltime_unit": ["h"]}) == {
        "memory": "1.5G", "walltime": "01:30:00"}
    assert raw_options({"preset": [""], "walltime": ["2"], "walltime_unit": ["d"]}) == {
        "walltime": "48:00:00"}
    assert raw_options({"walltime": ["08:00:00"]}) == {"walltime": "08:00:00"}  # API-like post


@pytest.mark.parametrize(("field", "unit"), [("walltime", "minutes"), ("walltime", "s"),
                                             ("memory", "T"), ("memory", "$(id)")])
def test_a_unit_the_form_does_not_offer_is_refused_naming_its_field(field, unit):
    """Posted as a user could: ``walltime=1`` with an unknown unit once became one minute."""
    with pytest.raises(OptionError, match=f"Unknown {field} unit") as raised:
        options_from_form({"preset": [""], field: ["1"], f"{field}_unit": [unit]}, CHOICES)
    assert raised.value.field == field


def test_a_chosen_preset_ignores_the_advanced_fields():
    options = options_from_form({"preset": ["small"], "cpus": ["99"]}, CHOICES)
    assert options["cpus"] == 1 and options["profile"] == "Small"


@pytest.mark.parametrize("hostile", ["1e9", "-1", "$(id)", "1.5.5", "9" * 40, "0"])
def test_a_hostile_walltime_number_is_refused_naming_the_walltime(hostile):
    with pytest.raises(OptionError) as raised:
        options_from_form({"preset": [""], "walltime": [hostile], "walltime_unit": ["h"]},
                          CHOICES)
    assert raised.value.field == "walltime"


def test_live_load_is_shown_for_the_users_partitions_only():
    load = [QueueLoad("short", 3, 8), QueueLoad("hidden", 1, 1), QueueLoad("gpu", 4, 16, 1, 2)]
    html = render_options_form(choices_for(BASE, set(), partitions=PARTITIONS), load=load,
                               load_note="as of 12:00:00 UTC")
    assert "<td>short</td><td>3 of 8</td>" in html
    assert "<td>hidden</td>" not in html and "<td>gpu</td>" not in html
    assert "short (3 of 8 cores free)" in html


def test_unavailable_load_says_so_and_the_form_still_works():
    html = render_options_form(CHOICES, load=None, load_note="ssh: connection refused")
    assert "Live cluster data is unavailable: ssh: connection refused" in html
    assert 'name="cpus"' in html


def test_free_text_partition_and_account_without_lists():
    html = render_options_form(choices_for(Limits(), set()))
    assert 'name="partition" type="text"' in html and 'name="account" type="text"' in html
    assert 'name="preset"' not in html
