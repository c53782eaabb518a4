"""The spawn form as one user meets it: which clusters and choices they are offered, the
clusters' live load, and what their posted form (or a REST client's ``user_options``) becomes.

Rules this part owns:
- a user is offered only the clusters their JupyterHub groups may use, and on each only the
  partitions, presets, accounts and limits their groups allow (``Cluster.choices``);
- a refused form comes back with the user's own values and the message beside its field
  (kept per user in ``Hub.form_retries``: JupyterHub re-renders a refused form with the user's
  default server's spawner);
- a misconfigured option is a message on the page and an error in the log, never a traceback;
- the load comes from the shared cache (``watch.load_for``), and waits for it at most 2 s;
- rendering and parsing change nothing on the spawner: the server is put on its cluster only
  when it spawns (``SSHBatchSpawner.use``, from JupyterHub's pre-spawn step and ``start()``).

The HTML itself is ``form.py``'s.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from .choices import resolve
from .cluster import Cluster
from .form import (
    ClusterSection,
    cluster_fields,
    form_values,
    load_note,
    options_from_form,
    render_cluster_forms,
    render_options_form,
)
from .hub import hub_of
from .resources import OptionError
from .watch import load_for

if TYPE_CHECKING:
    from .spawner import SSHBatchSpawner

_NONE_OFFERED = "No cluster is offered to you here. Ask the hub's admins for access."


class SpawnForm:
    """The form of one spawner's user."""

    def __init__(self, spawner: SSHBatchSpawner) -> None:
        self.spawner = spawner

    @property
    def _key(self) -> str:
        return getattr(self.spawner.user, "name", "")

    async def render(self) -> str:
        """The spawn form: the user's choices, each cluster's live free cores, and after a
        refusal their own values with the message next to the field."""
        spawner = self.spawner
        values, error = hub_of().form_retries.pop(self._key, ({}, None))
        try:
            if not spawner.clusters:
                load, note = await self.load(spawner.cluster)
                return render_options_form(
                    spawner.user_choices(), spawner.cluster.scheduler.QUEUE_LABEL,
                    values=values, error=error, load=load, load_note=note)
            offered = spawner.offered_clusters()
            if not offered:
                return f'<div class="alert alert-warning">{_NONE_OFFERED}</div>'
            sections = []
            for entry in offered:
                load, note = await self.load(entry)
                sections.append(ClusterSection(
                    entry.key, entry.title, entry.description, entry.scheduler.DISPLAY_NAME,
                    entry.scheduler.QUEUE_LABEL, spawner.user_choices(entry), load, note,
                ))
        except ValueError as problem:
            spawner.log.error("%s: cannot offer the spawn form: %s", spawner._log_name, problem)
            return (
                f'<div class="alert alert-danger">The spawn form is misconfigured: '
                f"{html.escape(str(problem))} Tell the hub's admins.</div>"
            )
        keys = [section.key for section in sections]
        chosen = values.get("cluster") if values.get("cluster") in keys else keys[0]
        return render_cluster_forms(sections, chosen, values=values, error=error)

    async def load(self, cluster: Cluster) -> tuple[list[Any] | None, str]:
        """The cluster's free/total cores per partition (shared cache), and a note on it."""
        if not cluster.cluster_load_interval or not hasattr(cluster.scheduler, "load_command"):
            return None, "not offered here"
        try:
            target = await cluster.ssh_target()
        except Exception as error:
            return None, f"cannot connect ({error})"
        reading = await load_for(
            hub_of().loads, cluster.scheduler, target, hub_of().pool,
            cluster.cluster_load_interval, cluster.command_timeout, wait=2.0,
            logger=self.spawner.log,
        )
        if reading.loads is None:
            return None, reading.error or "still being fetched; reload the page in a moment"
        return reading.loads, load_note(reading.fetched_at)

    def options(self, formdata: dict[str, list[str]]) -> dict[str, Any]:
        """The posted form as ``user_options`` (with ``cluster`` when the hub has several);
        ``ValueError`` with the field it is about, kept for the form's re-render."""
        spawner = self.spawner
        key = (formdata.get("cluster") or [""])[0] if spawner.clusters else ""
        fields = formdata
        try:
            cluster = spawner.cluster
            if spawner.clusters:
                cluster = self.choose(key)  # none posted: the first the user may use
                key = cluster.key
                fields = cluster_fields(formdata, key)
            choices = spawner.user_choices(cluster)
            options = options_from_form(fields, choices)
            cluster.template_variables(resolve(options, choices).resources)
        except ValueError as error:
            field = error.field if isinstance(error, OptionError) else ""
            values = {**form_values(fields), **({"cluster": key} if key else {})}
            hub_of().form_retries[self._key] = (values, OptionError(field, str(error)))
            raise
        return {**options, "cluster": key} if key else options

    def choose(self, key: Any) -> Cluster:
        """The cluster ``key`` names if this user may use it (for none: the first they may);
        ``OptionError`` otherwise. On a hub with one cluster, its own (and no key)."""
        spawner = self.spawner
        if not spawner.clusters:
            if key not in (None, ""):
                raise OptionError("cluster", "This hub has one cluster: leave out 'cluster'.")
            return Cluster(spawner)
        offered = spawner.offered_clusters()
        if key in (None, ""):
            if not offered:
                raise OptionError("cluster", _NONE_OFFERED)
            return offered[0]
        for entry in offered:
            if entry.key == key:
                return entry
        raise OptionError(
            "cluster", f"Cluster {str(key)[:40]!r} is not offered to you. Choose one of: "
            f"{', '.join(entry.key for entry in offered) or 'none'}."
        )
