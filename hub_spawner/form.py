"""The spawn form: the user's choices -> HTML, and form data -> validated ``user_options``.

Requirements:
- rendering escapes every value; the form works without JavaScript (presets are radio buttons,
  the advanced part a ``<details>``, limits are ``min``/``max`` attributes and help text); the
  script only improves it (limits follow the selected partition and units, touching an advanced
  control selects "Custom");
- after a refusal, the form comes back with the user's own values and the message next to the
  field it is about (``OptionError.field``);
- parsing has no side effects and raises ``OptionError`` (a ``ValueError``) with a message the
  user can act on.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

from .choices import Choices, Partition, format_duration, format_memory, resolve
from .resources import Limits, OptionError, format_walltime
from .schedulers import ALL_NODES, QueueLoad

_NUMBER = re.compile(r"([0-9]{1,9})(?:\.([0-9]{1,3}))?")
_WALLTIME_UNITS = {"h": 3600, "d": 86400}
_MEMORY_UNITS = {"M": 1, "G": 1024}
#: The fields the form posts, besides the option names (units of the number fields).
FORM_FIELDS = ("preset", "partition", "cpus", "gpus", "memory", "memory_unit", "walltime",
               "walltime_unit", "account")


def render_options_form(
    choices: Choices,
    queue_label: str = "Partition",
    *,
    values: Mapping[str, str] | None = None,
    error: OptionError | None = None,
    load: Sequence[QueueLoad] | None = None,
    load_note: str = "",
) -> str:
    """The form's inner HTML (JupyterHub adds the ``<form>`` and the Start button).

    ``values`` are the user's last submitted fields (shown again after a refusal), ``error``
    the refusal (shown next to its field); ``load`` the cluster's live free/total cores per
    partition, or ``None`` with ``load_note`` saying why there is none.
    """
    return _section(choices, queue_label, values, error, load, load_note) + "\n" + _SCRIPT


def render_cluster_forms(
    clusters: Sequence[ClusterSection],
    chosen: str,
    *,
    values: Mapping[str, str] | None = None,
    error: OptionError | None = None,
) -> str:
    """The form for several clusters: a choice of cluster, then each cluster's own part (its
    fields named ``<cluster>--<field>``). Without JavaScript every part is shown and the chosen
    cluster's is used; the script shows only the chosen one. ``values`` and ``error`` belong to
    the ``chosen`` cluster's part."""
    radios = []
    for cluster in clusters:
        ident = f"hub-spawner-cluster-{escape(cluster.key)}"
        detail = escape(" · ".join(x for x in (cluster.description, cluster.scheduler) if x))
        radios.append(
            '<div class="form-check">'
            f'<input class="form-check-input" type="radio" name="cluster" id="{ident}" '
            f'value="{escape(cluster.key)}"{" checked" if cluster.key == chosen else ""}>'
            f'<label class="form-check-label" for="{ident}"><strong>{escape(cluster.title)}'
            f'</strong> <span class="text-body-secondary">{detail}</span></label></div>'
        )
    parts = [
        '<fieldset class="mb-3" id="hub-spawner-clusters">\n'
        '<legend class="form-label fs-6 fw-semibold">Cluster</legend>\n'
        + "\n".join(radios) + "\n</fieldset>"
    ]
    for cluster in clusters:
        mine = cluster.key == chosen
        section = _section(
            cluster.choices, cluster.queue_label, values if mine else {},
            error if mine else None, cluster.load, cluster.load_note,
            prefix=f"{cluster.key}{CLUSTER_SEPARATOR}", cluster=cluster.key,
        )
        parts.append(
            f'<section class="hub-spawner-cluster border rounded p-3 mb-3" '
            f'aria-label="{escape(cluster.title)}">\n'
            f'<h2 class="h6">{escape(cluster.title)}</h2>\n<fieldset>\n{section}\n'
            "</fieldset></section>"
        )
    return "\n".join(parts) + "\n" + _SCRIPT


@dataclass(frozen=True)
class ClusterSection:
    """One cluster's part of a several-cluster form."""

    key: str
    title: str
    description: str
    scheduler: str  # its DISPLAY_NAME
    queue_label: str
    choices: Choices
    load: Sequence[QueueLoad] | None
    load_note: str


#: Between a cluster's key and a field's name in a several-cluster form (``hpc1--cpus``).
CLUSTER_SEPARATOR = "--"


def cluster_fields(formdata: Mapping[str, list[str]], key: str) -> dict[str, list[str]]:
    """The chosen cluster's own fields of a several-cluster form, without their prefix."""
    prefix = f"{key}{CLUSTER_SEPARATOR}"
    return {
        name[len(prefix):]: posted for name, posted in formdata.items()
        if name.startswith(prefix)
    }


def _section(
    choices: Choices,
    queue_label: str,
    values: Mapping[str, str] | None,
    error: OptionError | None,
    load: Sequence[QueueLoad] | None,
    load_note: str,
    prefix: str = "",
    cluster: str = "",
) -> str:
    values = dict(values or {})
    field = error.field if error is not None else ""
    chosen_preset = values.get("preset", "" if not choices.presets else None)
    if chosen_preset is None:  # first view: the first preset
        chosen_preset = choices.presets[0].key
    partition = values.get("partition") or choices.limits.default_partition
    limits = choices.limits_for(partition)
    parts = [
        f'<div class="hub-spawner-form" id="hub-spawner-form" '
        f'data-prefix="{escape(prefix)}" data-cluster="{escape(cluster)}">'
    ]
    if error is not None and field not in FORM_FIELDS:
        parts.append(f'<div class="alert alert-danger" role="alert">{escape(str(error))}</div>')
    parts.append(_load_table(choices, queue_label, load, load_note))
    if choices.presets:
        parts.append(_preset_fieldset(choices, chosen_preset, error if field == "preset" else None))
    title = "Advanced: choose each resource" if choices.presets else "Resources"
    advanced_open = not choices.presets or chosen_preset == "" or (
        field in FORM_FIELDS and field != "preset")
    parts.append(
        f'<details class="mb-3 border rounded p-2" id="hub-spawner-advanced"'
        f'{" open" if advanced_open else ""}>\n'
        f'<summary class="fw-semibold">{title}</summary>'
    )
    parts.append('<div class="pt-2">')
    parts.append(_partition_field(choices, queue_label, partition, load, _for(error, "partition")))
    parts.append(_cpus_field(limits, values, _for(error, "cpus")))
    if any(lim.max_gpus for lim in _all_limits(choices)):
        parts.append(_gpus_field(limits, values, _for(error, "gpus")))
    parts.append(_memory_field(limits, values, _for(error, "memory")))
    parts.append(_walltime_field(limits, values, _for(error, "walltime")))
    parts.append(_account_field(choices, values, _for(error, "account")))
    parts.append("</div></details>")
    parts.append("</div>")
    html = "\n".join(parts)
    if prefix:  # our own attributes: the values in them are escaped, so none holds a '"'
        html = re.sub(r'\b(id|for|aria-describedby)="hub-spawner-', rf'\1="hub-spawner-{prefix}',
                      html)
        html = re.sub(r'\bname="', f'name="{prefix}', html)
    return html


def options_from_form(formdata: Mapping[str, list[str]], choices: Choices) -> dict[str, object]:
    """Validated, normalised ``user_options`` (with ``preset`` and ``profile``) from the form.

    A chosen preset stands alone (the advanced fields, always posted, are ignored); "Custom"
    (an empty preset) takes them. Empty fields mean "the default"; number fields are joined
    with their unit (``1.5`` + ``G`` -> ``1.5G``; ``8`` + ``h`` -> ``08:00:00``). Fields whose
    name starts with ``_`` are the page's own (``_xsrf``). Spaces and tabs around a value are
    dropped. Raises ``OptionError`` on a bad value.
    """
    return resolve(raw_options(formdata), choices).to_user_options()


def raw_options(formdata: Mapping[str, list[str]]) -> dict[str, str]:
    """The options the form's fields stand for, not yet validated."""
    fields = form_values(formdata)
    if fields.get("preset"):
        return {"preset": fields["preset"]}
    options = {
        name: fields[name] for name in ("partition", "cpus", "gpus", "account") if name in fields
    }
    for name in fields:
        if name not in FORM_FIELDS:
            options[name] = fields[name]  # refused by validation, with its name
    for field, units, names in (("memory", _MEMORY_UNITS, "MB or GB"),
                                 ("walltime", _WALLTIME_UNITS, "hours or days")):
        unit = fields.get(f"{field}_unit", "")
        if unit and unit not in units:  # else a bare number would be read in another unit
            raise OptionError(field, f"Unknown {field} unit {unit[:20]!r}: choose {names}.")
    memory, unit = fields.get("memory"), fields.get("memory_unit", "")
    if memory:
        options["memory"] = memory + unit if unit in _MEMORY_UNITS and _NUMBER.fullmatch(
            memory) else memory
    walltime, unit = fields.get("walltime"), fields.get("walltime_unit", "")
    if walltime:
        options["walltime"] = _walltime_text(walltime, unit)
    return options


def form_values(formdata: Mapping[str, list[str]]) -> dict[str, str]:
    """Each posted field's first value, trimmed of spaces and tabs; empty ones left out (but an
    empty ``preset`` is kept: it means "Custom")."""
    values = {}
    for name, posted in formdata.items():
        if name.startswith("_") or not posted:
            continue
        value = str(posted[0]).strip(" \t")
        if value or name == "preset":
            values[name] = value
    return values


def _walltime_text(value: str, unit: str) -> str:
    match = _NUMBER.fullmatch(value)
    if unit not in _WALLTIME_UNITS or not match:
        return value  # HH:MM:SS as typed, or refused by validation
    thousandths = int(match.group(1)) * 1000 + int((match.group(2) or "").ljust(3, "0"))
    minutes = round(thousandths * _WALLTIME_UNITS[unit] / 60 / 1000)
    if not minutes:
        raise OptionError("walltime", "Walltime must be at least one minute.")
    return format_walltime(minutes * 60)


# --- parts of the form ---------------------------------------------------------------------------


def _for(error: OptionError | None, field: str) -> str:
    return str(error) if error is not None and error.field == field else ""


def _all_limits(choices: Choices) -> list[Limits]:
    return [choices.limits] + [p.limits for p in choices.partitions]


def _load_table(
    choices: Choices, label: str, load: Sequence[QueueLoad] | None, note: str
) -> str:
    if load is None:
        return (
            '<p class="form-text mb-3" id="hub-spawner-load">'
            f"Live cluster data is unavailable{': ' + escape(note) if note else ''}. "
            "You can still start a server.</p>"
        )
    shown = _visible_load(choices, load)
    gpus = any(row.gpus_total for row in shown)
    nodes = any(row.nodes_total is not None for row in shown)
    head = f"<th scope=\"col\">{escape(label)}</th><th scope=\"col\">Free cores</th>"
    head += '<th scope="col">Free GPUs</th>' if gpus else ""
    head += '<th scope="col">Idle nodes</th>' if nodes else ""
    rows = []
    for row in shown:
        cells = f"<td>{escape(row.name)}</td><td>{row.cores_free} of {row.cores_total}</td>"
        if gpus:
            cells += f"<td>{_of(row.gpus_free, row.gpus_total)}</td>"
        if nodes:
            cells += f"<td>{_of(row.nodes_free, row.nodes_total)}</td>"
        rows.append(f"<tr>{cells}</tr>")
    body = "\n".join(rows) or f'<tr><td colspan="4">No {escape(label.lower())} listed.</td></tr>'
    caption = "Free on the cluster now" + (f" ({escape(note)})" if note else "")
    return (
        '<div class="mb-3" id="hub-spawner-load">\n'
        '<table class="table table-sm table-striped caption-top mb-0">\n'
        f"<caption>{caption}</caption>\n<thead><tr>{head}</tr></thead>\n"
        f"<tbody>\n{body}\n</tbody></table></div>"
    )


def _visible_load(choices: Choices, load: Sequence[QueueLoad]) -> list[QueueLoad]:
    if not choices.partitions:
        return list(load)
    names = {p.name for p in choices.partitions} | {ALL_NODES}
    return [row for row in load if row.name in names]


def _of(free: int | None, total: int | None) -> str:
    return "–" if total is None else f"{free if free is not None else '?'} of {total}"


def _preset_fieldset(choices: Choices, chosen: str, error: OptionError | None) -> str:
    items = []
    for preset in choices.presets:
        items.append(_radio(preset.key, preset.title, preset.description, chosen == preset.key))
    items.append(
        _radio("", "Custom", "the resources chosen under Advanced below", chosen == "")
    )
    feedback = (
        f'<div class="invalid-feedback d-block">{escape(str(error))}</div>' if error else ""
    )
    return (
        '<fieldset class="mb-3" id="hub-spawner-presets">\n'
        '<legend class="form-label fs-6 fw-semibold">What do you need?</legend>\n'
        + "\n".join(items) + feedback + "\n</fieldset>"
    )


def _radio(key: str, title: str, description: str, checked: bool) -> str:
    ident = f"hub-spawner-preset-{escape(key) or 'custom'}"
    detail = (
        f' <span class="text-body-secondary">{escape(description)}</span>' if description else ""
    )
    return (
        '<div class="form-check">'
        f'<input class="form-check-input" type="radio" name="preset" id="{ident}" data-preset '
        f'value="{escape(key)}"{" checked" if checked else ""}>'
        f'<label class="form-check-label" for="{ident}"><strong>{escape(title)}</strong>'
        f"{detail}</label></div>"
    )


def _partition_field(
    choices: Choices, label: str, chosen: str, load: Sequence[QueueLoad] | None, error: str
) -> str:
    if not choices.partitions:
        return _field(
            "partition", label,
            _input("partition", "text", chosen, error,
                   'placeholder="the cluster\'s default" maxlength="64"'),
            "Empty: the cluster's default.", error,
        )
    free = {row.name: row for row in load or ()}
    options = []
    for partition in choices.partitions:
        text = partition.name
        if partition.description:
            text += f": {partition.description}"
        if partition.name in free:
            row = free[partition.name]
            text += f" ({row.cores_free} of {row.cores_total} cores free)"
        options.append(
            f'<option value="{escape(partition.name)}"'
            f"{' selected' if partition.name == chosen else ''}"
            f" data-limits=\"{escape(json.dumps(_limits_data(partition)))}\">"
            f"{escape(text)}</option>"
        )
    control = (
        f'<select class="form-select{" is-invalid" if error else ""}" '
        f'id="hub-spawner-partition" name="partition">\n' + "\n".join(options) + "\n</select>"
    )
    return _field("partition", label, control, "", error)


def _limits_data(partition: Partition) -> dict[str, int]:
    limits = partition.limits
    return {
        "max_cpus": limits.max_cpus,
        "max_gpus": limits.max_gpus,
        "max_memory_mb": limits.max_memory_mb,
        "max_walltime_seconds": limits.max_walltime_seconds,
    }


def _cpus_field(limits: Limits, values: Mapping[str, str], error: str) -> str:
    value = values.get("cpus", str(limits.default_cpus))
    return _field(
        "cpus", "Cores",
        _input("cpus", "number", value, error,
               f'min="1" max="{limits.max_cpus}" step="1" required'),
        f'<span data-help="cpus">1 to {limits.max_cpus}</span>', error,
    )


def _gpus_field(limits: Limits, values: Mapping[str, str], error: str) -> str:
    value = values.get("gpus", str(limits.default_gpus))
    return _field(
        "gpus", "GPUs",
        _input("gpus", "number", value, error, f'min="0" max="{limits.max_gpus}" step="1"'),
        f'<span data-help="gpus">0 to {limits.max_gpus}</span>', error,
    )


def _memory_field(limits: Limits, values: Mapping[str, str], error: str) -> str:
    if "memory" in values or "memory_unit" in values:
        value, unit = values.get("memory", ""), values.get("memory_unit", "G")
    elif limits.default_memory_mb and limits.default_memory_mb % 1024 == 0:
        value, unit = str(limits.default_memory_mb // 1024), "G"
    elif limits.default_memory_mb:
        value, unit = str(limits.default_memory_mb), "M"
    else:
        value, unit = "", "G" if limits.max_memory_mb >= 1024 else "M"
    maximum = limits.max_memory_mb / _MEMORY_UNITS.get(unit, 1024)
    control = _with_unit("memory", value, error,
                         f'min="0" max="{maximum:g}" step="any" placeholder="scheduler default"',
                         {"M": "MB", "G": "GB"}, unit)
    return _field(
        "memory", "Memory", control,
        f'<span data-help="memory">at most {format_memory(limits.max_memory_mb)}</span>; '
        "empty: the scheduler's default", error,
    )


def _walltime_field(limits: Limits, values: Mapping[str, str], error: str) -> str:
    seconds = limits.default_walltime_seconds
    if "walltime" in values or "walltime_unit" in values:
        value, unit = values.get("walltime", ""), values.get("walltime_unit", "h")
    elif seconds and seconds % 86400 == 0:
        value, unit = str(seconds // 86400), "d"
    else:
        value, unit = (f"{seconds / 3600:g}" if seconds else ""), "h"
    maximum = limits.max_walltime_seconds / _WALLTIME_UNITS.get(unit, 3600)
    control = _with_unit("walltime", value, error,
                         f'min="0.017" max="{maximum:.3f}" step="any" required',
                         {"h": "hours", "d": "days"}, unit)
    return _field(
        "walltime", "Walltime", control,
        f'<span data-help="walltime">at most {format_duration(limits.max_walltime_seconds)}'
        "</span>; the server stops when it ends", error,
    )


def _with_unit(
    field: str, value: str, error: str, attributes: str, units: Mapping[str, str], unit: str
) -> str:
    """A number input with its unit select beside it (``<field>_unit``)."""
    return (
        '<div class="input-group">'
        + _input(field, "number", value, error, attributes)
        + _unit_select(f"{field}_unit", f"{field.capitalize()} unit", units, unit)
        + "</div>"
    )


def _account_field(choices: Choices, values: Mapping[str, str], error: str) -> str:
    chosen = values.get("account", choices.limits.default_account)
    if not choices.accounts:
        return _field(
            "account", "Account",
            _input("account", "text", chosen, error,
                   'placeholder="your default account" maxlength="64"'),
            "Empty: your default account.", error,
        )
    options = "\n".join(
        f'<option value="{escape(a.name)}"{" selected" if a.name == chosen else ""}>'
        f"{escape(a.name + (': ' + a.description if a.description else ''))}</option>"
        for a in choices.accounts
    )
    control = (
        f'<select class="form-select{" is-invalid" if error else ""}" id="hub-spawner-account" '
        f'name="account">\n{options}\n</select>'
    )
    return _field("account", "Account", control, "", error)


def _unit_select(name: str, label: str, units: Mapping[str, str], chosen: str) -> str:
    options = "".join(
        f'<option value="{key}"{" selected" if key == chosen else ""}>{text}</option>'
        for key, text in units.items()
    )
    return (
        f'<select class="form-select flex-grow-0 w-auto" id="hub-spawner-{name}" name="{name}" '
        f'aria-label="{escape(label)}">{options}</select>'
    )


def _input(name: str, kind: str, value: str, error: str, extra: str = "") -> str:
    return (
        f'<input class="form-control{" is-invalid" if error else ""}" id="hub-spawner-{name}" '
        f'name="{name}" type="{kind}" value="{escape(value)}" '
        f'aria-describedby="hub-spawner-{name}-help" {extra}>'
    )


def _field(name: str, label: str, control: str, help_html: str, error: str) -> str:
    feedback = (
        f'<div class="invalid-feedback d-block" id="hub-spawner-{name}-error">{escape(error)}</div>'
        if error else ""
    )
    help_part = (
        f'<div class="form-text" id="hub-spawner-{name}-help">{help_html}</div>' if help_html
        else ""
    )
    return (
        f'<div class="mb-3">\n<label class="form-label" for="hub-spawner-{name}">'
        f"{escape(label)}</label>\n{control}\n{feedback}{help_part}\n</div>"
    )


def load_note(fetched_at: float) -> str:
    """``as of 14:03:07 UTC`` (``fetched_at``: a ``time.time()``), for the live data's caption."""
    return "as of " + time.strftime("%H:%M:%S UTC", time.gmtime(fetched_at))


# The script only improves a form that works without it.
_SCRIPT = """<script>
(function () {
  function short(n) { return String(Math.round(n * 1000) / 1000); }
  function memoryText(mb) {
    return mb >= 1024 ? short(mb / 1024) + " GB" : mb + " MB";
  }
  function hoursText(s) {
    var d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600);
    return (d ? d + " d" : "") + (h || !d ? (d ? " " : "") + h + " h" : "");
  }
  var outer = null;
  var forms = document.querySelectorAll(".hub-spawner-form");
  function chosenForm() {  // the chosen cluster's part (or the only one)
    var cluster = document.querySelector('input[name="cluster"]:checked');
    for (var i = 0; i < forms.length; i++) {
      if (!cluster || forms[i].getAttribute("data-cluster") === cluster.value) { return forms[i]; }
    }
    return null;
  }
  function validateAdvanced() {
    // A preset ignores the advanced fields: their browser checks must not block it.
    var form = chosenForm();
    var chosen = form && form.querySelector('input[type="radio"][data-preset]:checked');
    if (outer) { outer.noValidate = !!(chosen && chosen.value !== ""); }
  }
  function showCluster() {
    var form = chosenForm();
    forms.forEach(function (each) {
      var section = each.closest(".hub-spawner-cluster");
      if (section) {
        section.hidden = each !== form;
        section.querySelector("fieldset").disabled = each !== form;
      }
    });
    validateAdvanced();
  }
  forms.forEach(function (form) {
    var prefix = form.getAttribute("data-prefix") || "";
    outer = outer || form.closest("form");
    function $(id) { return document.getElementById("hub-spawner-" + prefix + id); }
    function limits() {
      var select = $("partition");
      if (!select || select.tagName !== "SELECT") { return null; }
      var option = select.options[select.selectedIndex];
      return option ? JSON.parse(option.getAttribute("data-limits")) : null;
    }
    function help(name, text) {
      var span = form.querySelector('[data-help="' + name + '"]');
      if (span) { span.textContent = text; }
    }
    function follow() {
      var l = limits();
      if (!l) { return; }
      if ($("cpus")) { $("cpus").max = l.max_cpus; help("cpus", "1 to " + l.max_cpus); }
      if ($("gpus")) { $("gpus").max = l.max_gpus; help("gpus", "0 to " + l.max_gpus); }
      var unit = $("memory_unit").value === "M" ? 1 : 1024;
      $("memory").max = short(l.max_memory_mb / unit);
      help("memory", "at most " + memoryText(l.max_memory_mb));
      var per = $("walltime_unit").value === "d" ? 86400 : 3600;
      $("walltime").max = (l.max_walltime_seconds / per).toFixed(3);
      help("walltime", "at most " + hoursText(l.max_walltime_seconds));
    }
    function custom() {
      var radio = $("preset-custom");
      if (radio) { radio.checked = true; }
    }
    var advanced = $("advanced");
    advanced.addEventListener("change", function (event) {
      if (event.target === $("partition") || /_unit$/.test(event.target.name)) { follow(); }
      custom();
    });
    advanced.addEventListener("input", custom);
    form.querySelectorAll("input[data-preset]").forEach(function (radio) {
      radio.addEventListener("change", function () {
        if (radio.value === "") { advanced.open = true; }
      });
    });
    form.addEventListener("change", validateAdvanced);
    form.addEventListener("input", validateAdvanced);
    follow();
  });
  document.querySelectorAll('input[name="cluster"]').forEach(function (radio) {
    radio.addEventListener("change", showCluster);
  });
  showCluster();
})();
</script>"""
