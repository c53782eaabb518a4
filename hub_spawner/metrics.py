"""Prometheus metrics of the spawner, in the registry JupyterHub serves on ``/hub/metrics``.

JupyterHub's own metrics time a whole spawn; these say where the time goes (the queue above
all) and what the hub asks of each cluster. ``cluster`` is ``<scheduler>@<login host>``.
The tunnel service has its own (``python -m hub_spawner.tunnels --metrics HOST:PORT``).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

#: Seconds, from a fraction of a second (SSH steps) to an hour (a queue).
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

SPAWN_STEP_SECONDS = Histogram(
    "hub_spawner_spawn_step_seconds",
    "Seconds each step of a spawn took: connect, directories, old files, hub API path, files, "
    "submit, ready line (the queue wait and the server's start-up), tunnel",
    ["cluster", "step"], buckets=BUCKETS)
QUEUE_WAIT_SECONDS = Histogram(
    "hub_spawner_queue_wait_seconds",
    "Seconds from a job's submission until the scheduler ran it",
    ["cluster"], buckets=BUCKETS)
LISTING_SECONDS = Histogram(
    "hub_spawner_scheduler_listing_seconds",
    "Seconds one scheduler listing of the status watch took (one per connection group and "
    "cycle), over SSH",
    ["cluster"], buckets=BUCKETS)
LISTING_FAILURES = Counter(
    "hub_spawner_scheduler_listing_failures_total",
    "Scheduler listings that failed: the login node could not be reached (unreachable) or the "
    "scheduler did not answer (scheduler)",
    ["cluster", "cause"])
RECONCILER_CANCELS = Counter(
    "hub_spawner_reconciler_cancels_total",
    "Cancels the reconciler sent for jobs of this hub that no server owns",
    ["cluster"])
FORWARDS = Gauge(
    "hub_spawner_forwards",
    "Forwards the tunnel service holds, as the hub last listed them, by state (up or down)",
    ["state"])


def cluster_label(scheduler_name: str, host: str) -> str:
    return f"{scheduler_name}@{host}"
