"""The spawn form: resource choices -> HTML, and form data -> validated ``user_options``.

Requirements: rendering escapes every value; parsing has no side effects and raises
``ValueError`` with a message the user can act on (JupyterHub shows it above the form).
"""

from __future__ import annotations

from html import escape

from .resources import Limits, format_walltime, resources_from_options


def render_options_form(limits: Limits, queue_label: str = "Partition") -> str:
    """The form's inner HTML (JupyterHub adds the ``<form>`` and the Start button).

    ``queue_label`` is what the scheduler calls a queue ("Partition" in Slurm, "Queue" in Grid
    Engine and Torque/PBS). The GPU field is shown only when GPUs are offered.
    """
    fields = [_partition_field(limits, queue_label)]
    fields.append(
        _input(
            "cpus",
            "Cores",
            "number",
            str(limits.default_cpus),
            f'min="1" max="{limits.max_cpus}" step="1"',
        )
    )
    memory = f"{limits.default_memory_mb // 1024}G" if limits.default_memory_mb else ""
    fields.append(
        _input(
            "memory", "Memory", "text", memory, 'placeholder="scheduler default, e.g. 4G or 512M"'
        )
    )
    if limits.max_gpus:
        fields.append(
            _input(
                "gpus",
                "GPUs",
                "number",
                str(limits.default_gpus),
                f'min="0" max="{limits.max_gpus}" step="1"',
            )
        )
    fields.append(
        _input(
            "walltime",
            "Walltime",
            "text",
            format_walltime(limits.default_walltime_seconds),
            'placeholder="HH:MM:SS"',
        )
    )
    fields.append(
        _input(
            "account",
            "Account",
            "text",
            limits.default_account,
            'placeholder="your default account"',
        )
    )
    return "\n".join(fields)


def options_from_form(formdata: dict[str, list[str]], limits: Limits) -> dict[str, object]:
    """Validated, normalised ``user_options`` from the submitted form.

    Empty fields mean "the default"; fields whose name starts with ``_`` are the page's own
    (``_xsrf``, when a client posts it in the body) and are not options. Spaces and tabs around
    a value are dropped; anything else (a line break cannot come from a text field) goes to
    validation as it is. Raises ``ValueError`` on a bad value.
    """
    options = {
        name: values[0].strip(" \t")
        for name, values in formdata.items()
        if not name.startswith("_") and values and values[0].strip(" \t")
    }
    return resources_from_options(options, limits).to_user_options()


def _partition_field(limits: Limits, label: str) -> str:
    if not limits.partitions:
        return _input(
            "partition",
            label,
            "text",
            limits.default_partition,
            'placeholder="the cluster\'s default"',
        )
    choices = "\n".join(
        f'<option value="{escape(name)}"{" selected" if name == limits.default_partition else ""}>'
        f"{escape(name)}</option>"
        for name in limits.partitions
    )
    return (
        '<div class="mb-3">\n'
        f'  <label class="form-label" for="hub-spawner-partition">{escape(label)}</label>\n'
        '  <select class="form-select" id="hub-spawner-partition" name="partition">\n'
        f"{choices}\n  </select>\n</div>"
    )


def _input(name: str, label: str, kind: str, value: str, extra: str = "") -> str:
    return (
        '<div class="mb-3">\n'
        f'  <label class="form-label" for="hub-spawner-{name}">{escape(label)}</label>\n'
        f'  <input class="form-control" id="hub-spawner-{name}" name="{name}" type="{kind}" '
        f'value="{escape(value)}" {extra}>\n'
        "</div>"
    )
