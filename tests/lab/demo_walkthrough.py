"""``make demo`` as a newcomer uses it, end to end (``make fresh-check`` runs this in a fresh root).

    python -m tests.lab.demo_walkthrough [--timeout SECONDS]

Starts ``make demo`` in its own process group, waits for its banner, then in Debian's chromium
(Playwright, ``/usr/bin/chromium``) logs in as bob, presses Start on the spawn form, waits for
JupyterLab, and stops the server from the hub's home page; then presses Ctrl-C (SIGINT to the
demo's process group, as a terminal does) and checks that the demo stopped cleanly and left
nothing running: no process under this root but this script and its parents, no lab network
device, route or namespace, nothing listening on the demo's ports.

Exit status 0 when every step held; otherwise 1, with the step that failed and the tail of the
demo's output. Needs the lab's venv (playwright) and root; starts and stops only its own
processes.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HUB_URL = "http://127.0.0.1:8000"
DEMO_PORTS = (8000, 8001, 8081)
BANNER = "JupyterHub with hub_spawner"
STOPPED = "demo: stopped; nothing left running."
BOB_PASSWORD = "lab-demo-password"  # printed by the demo's banner
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


class WalkthroughFailed(Exception):
    """A step of the walkthrough did not hold; the message says which and what was seen."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds for make demo to print its banner (default 600: it may "
                             "install first)")
    args = parser.parse_args(argv)
    log_path = Path(tempfile.mkstemp(prefix="demo-walkthrough-", suffix=".log")[1])
    started = time.monotonic()
    with open(log_path, "wb") as log:
        demo = subprocess.Popen(["make", "demo"], cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        step("make demo: waiting for its banner")
        wait_until(lambda: BANNER in log_path.read_text(errors="replace"), args.timeout,
                   "make demo printed no banner", demo)
        step("in chromium: bob logs in, starts from the form, waits for JupyterLab, stops")
        use_the_hub_as_bob()
        step("Ctrl-C: waiting for the demo to stop")
        os.killpg(demo.pid, signal.SIGINT)
        try:
            status = demo.wait(timeout=240)
        except subprocess.TimeoutExpired:
            raise WalkthroughFailed("make demo did not exit within 240 s of Ctrl-C") from None
        output = log_path.read_text(errors="replace")
        # make itself dies of the SIGINT once the demo has exited, as in a terminal.
        if status not in (0, -signal.SIGINT, 128 + signal.SIGINT) or STOPPED not in output:
            raise WalkthroughFailed(f"make demo exited with status {status} after Ctrl-C"
                                    f"{'' if STOPPED in output else f' without {STOPPED!r}'}")
        step("looking for anything of the demo left running")
        left = leftovers()
        if left:
            raise WalkthroughFailed("left running after the demo stopped:\n  " + "\n  ".join(left))
    except WalkthroughFailed as failure:
        stop_demo(demo)
        print(f"--- the last lines of make demo's output ({log_path}):", flush=True)
        print("\n".join(log_path.read_text(errors="replace").splitlines()[-40:]), flush=True)
        print(f"demo walkthrough: FAILED: {failure}", flush=True)
        return 1
    print("demo walkthrough: what the hub said of bob's server:", flush=True)
    for line in log_path.read_text(errors="replace").splitlines():
        if "bob" in line and any(word in line for word in ("job", "ready", "Stopping", "stopped")):
            print(f"  {line.strip()[:160]}", flush=True)
    print(f"demo walkthrough: passed in {time.monotonic() - started:.0f} s", flush=True)
    log_path.unlink()
    return 0


_STARTED = time.monotonic()


def step(what: str) -> None:
    print(f"demo walkthrough: [{time.monotonic() - _STARTED:5.0f} s] {what}", flush=True)


def use_the_hub_as_bob() -> None:
    """Login, the spawn form's Start, JupyterLab, then Stop My Server on the home page."""
    from playwright.sync_api import Error as PlaywrightError  # the lab's venv has playwright
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                             args=CHROMIUM_ARGS)
        page = browser.new_page()
        try:
            page.goto(f"{HUB_URL}/hub/login")
            page.fill("#username_input", "bob")
            page.fill("#password_input", BOB_PASSWORD)
            page.click("#login_submit")
            page.wait_for_url("**/hub/spawn**", timeout=30_000)
            page.click("form input[type=submit], form button[type=submit]")
            page.wait_for_url("**/user/bob/lab**", timeout=240_000)
            page.wait_for_selector(".jp-LabShell", timeout=120_000)
            if page.title() != "JupyterLab":
                raise WalkthroughFailed(f"the server's page is titled {page.title()!r}")
            step(f"JupyterLab is open at {page.url}")
            page.goto(f"{HUB_URL}/hub/home")
            page.click("#stop", timeout=30_000)
            page.wait_for_selector("#start", state="visible", timeout=120_000)
        except PlaywrightError as error:
            text = page.inner_text("body") if not page.is_closed() else ""
            raise WalkthroughFailed(f"in the browser at {page.url}: {error.message.splitlines()[0]}"
                                    f"\n  the page said: {' '.join(text.split())[:600]}") from None
        finally:
            browser.close()


def leftovers() -> list[str]:
    """What still runs or exists of the demo: processes under this root (but this one and its
    parents), the lab's network devices, route and namespaces, listeners on the demo's ports."""
    found = []
    ours = _ancestors()
    root = os.stat("/")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in ours:
            continue
        try:
            process_root = os.stat(entry / "root")
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:  # gone meanwhile, or a kernel thread
            continue
        if (process_root.st_dev, process_root.st_ino) == (root.st_dev, root.st_ino) and command:
            found.append(f"process {entry.name}: {command[:200]}")
    for what, argv in (("network device", ["ip", "-o", "link", "show"]),
                       ("network namespace", ["ip", "netns", "list"]),
                       ("route", ["ip", "route", "show", "table", "all"])):
        listed = subprocess.run(argv, capture_output=True, text=True).stdout
        found += [f"{what}: {line.strip()}" for line in listed.splitlines()
                  if "hsl-" in line or "10.77." in line]
    for port in DEMO_PORTS:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                found.append(f"something listens on 127.0.0.1:{port}")
    return found


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


def wait_until(predicate, timeout: float, what: str, demo: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if demo.poll() is not None:
            raise WalkthroughFailed(f"{what}: make demo exited with status {demo.returncode}")
        time.sleep(1)
    raise WalkthroughFailed(f"{what} within {timeout:.0f} s")


def stop_demo(demo: subprocess.Popen) -> None:
    """After a failure: Ctrl-C the demo (it tears the lab down), then kill what is left of it."""
    if demo.poll() is None:
        try:
            os.killpg(demo.pid, signal.SIGINT)
            demo.wait(timeout=240)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(demo.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    sys.exit(main())
