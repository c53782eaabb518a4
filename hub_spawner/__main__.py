"""``python -m hub_spawner check -f jupyterhub_config.py --user alice [--submit]``, and
``python -m hub_spawner init --login HOST --user ME --key KEY`` (a starting config)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from .check import Checklist, run_check
from .init import add_arguments as add_init_arguments
from .init import run_init


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hub_spawner")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "check", help="check the set-up for one user, step by step, with advice for failures",
        description="Load the hub's config and check, for one user, each step a spawn takes: "
        "config, key, login node, host key, login, scheduler; with --submit also a test job, "
        "its tunnel and its server. Run it as the hub's user, from the hub's working directory "
        "(relative paths in the config resolve there). Exit status 0 only if all pass.",
    )
    check.add_argument("-f", "--config", default="jupyterhub_config.py",
                       help="the hub's config file (default: %(default)s)")
    check.add_argument("--user", required=True, help="the hub user to check, e.g. alice")
    check.add_argument("--submit", action="store_true",
                       help="also submit a short test job with the configured template, wait "
                       "for its server and ask it for /api/status through its tunnel; the job "
                       "and its forwards are removed afterwards, also on Ctrl-C")
    check.add_argument("--hub-ip", default=os.environ.get("HUB_SPAWNER_POD_IP", "127.0.0.1"),
                       help="address for the check's stand-in hub API, which the tunnel "
                       "service's reverse forward connects to (default: $HUB_SPAWNER_POD_IP "
                       "if set, as in the Helm chart's hub pod, else 127.0.0.1)")
    check.add_argument("--hub-port", type=int, default=0,
                       help="port for the stand-in hub API (default: any free port; the Helm "
                       "chart's NetworkPolicy opens hub.checkPort, 8082, for it)")
    check.add_argument("--cluster", default="", metavar="NAME",
                       help="with several clusters (c.SSHBatchSpawner.clusters), check only "
                       "this one (default: each in turn)")
    check.add_argument("-v", "--verbose", action="store_true", help="also print the spawner's log")
    init = commands.add_parser(
        "init", help="write a starting jupyterhub_config.py and chart values from the cluster",
        description="Connect to the login node as one cluster user (after you confirm its "
        "host key), find the scheduler, its partitions or queues and their limits, GPUs and "
        "accounts, and write a commented jupyterhub_config.py, a chart values.yaml and their "
        "known_hosts; then run `check --submit` on them.",
    )
    add_init_arguments(init)
    args = parser.parse_args(argv)
    if args.command == "init":
        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("asyncssh").setLevel(logging.ERROR)
        return asyncio.run(run_init(args))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="[%(levelname)1.1s %(asctime)s %(name)s] %(message)s")
    if not args.verbose:
        logging.getLogger("asyncssh").setLevel(logging.ERROR)
        logging.getLogger("hub_spawner").setLevel(logging.CRITICAL)  # the checklist says it
    return asyncio.run(_check(args))


async def _check(args: argparse.Namespace) -> int:
    """The check, cancelled once by SIGINT (Ctrl-C), SIGTERM or SIGHUP (a closed terminal, a
    dropped ``kubectl exec``): its cleanup runs to its end whatever comes after."""
    task = asyncio.current_task()
    signals: list[int] = []

    def interrupt(signum: int) -> None:
        if not signals:
            print(f"\n{signal.Signals(signum).name}: stopping; the test job and its forwards "
                  "are being removed", file=sys.stderr, flush=True)
            task.cancel()
        else:
            print("still cleaning up, please wait", file=sys.stderr, flush=True)
        signals.append(signum)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, interrupt, signum)
    checks = Checklist(sys.stdout)
    try:
        passed = await run_check(args.config, args.user, args.submit, args.hub_ip,
                                 args.hub_port, checks, args.cluster)
    except asyncio.CancelledError:
        if checks.ended("FAIL", "cleanup"):
            print("interrupted; the cleanup did not finish: see the cleanup line above",
                  file=sys.stderr)
        elif checks.ended("ok", "cleanup"):
            print("interrupted; the test job and its forwards are gone", file=sys.stderr)
        else:
            print("interrupted; no test job had been submitted", file=sys.stderr)
        return 130
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
