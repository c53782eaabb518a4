"""A researcher's path in a real browser (Debian's chromium, driven by Playwright): log in,
press Start on the default spawn form, get JupyterLab served from the compute host."""

from __future__ import annotations

import pwd
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

from .conftest import active_jobs, wait_for
from .test_slurm_spawn import occupy_the_compute_node

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


PASSWORDS = {"bob": "lab-demo-password", "alice": "lab-demo-admin-password-for-alice-only"}


@contextmanager
def logged_in(hub, user: str):
    """A chromium page, logged in to ``hub`` as ``user``, showing the spawn form."""
    from playwright.sync_api import sync_playwright  # the lab's venv has it; not at collection

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                             args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{hub.url}/hub/login")
            page.fill("#username_input", user)
            page.fill("#password_input", PASSWORDS[user])
            page.click("#login_submit")
            page.wait_for_url("**/hub/spawn**")
            yield page
        finally:
            browser.close()


@pytest.fixture(scope="module")
def demo_hub(hub_for):
    """The Slurm hub with the demo's spawn form (presets, partition "long" for alice's group)."""
    return hub_for("demo")


@pytest.fixture(params=["bob"])
def on_the_spawn_form(request, demo_hub):
    """A browser page on the demo hub, logged in as the user named by the parameter."""
    with logged_in(demo_hub, request.param) as page:
        yield page


SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-screenshots"  # git-ignored


def screenshot(page, name: str) -> None:
    """Saved on every run (``test-screenshots/``); ``docs/screenshots/`` holds a committed set."""
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def submit(page, check_in_browser: bool = True) -> None:
    """Press Start; ``check_in_browser=False`` skips the browser's own checks (``min``/``max``)
    so that the server's are seen, as a script or an old browser would post."""
    if not check_in_browser:  # after the last field's change event (the form's script)
        page.evaluate("document.activeElement.blur(); "
                      "document.querySelector('#spawn_form').noValidate = true")
    page.click("form input[type=submit], form button[type=submit]")
    page.wait_for_load_state()


def choose_custom(page) -> None:
    page.check("#hub-spawner-preset-custom")
    page.evaluate("document.getElementById('hub-spawner-advanced').open = true")


def test_a_bad_advanced_value_is_refused_in_the_browser_and_by_the_server_next_to_its_field(
    on_the_spawn_form,
):
    """bob: 99 cores is stopped by the browser (the input's max); posted anyway, the server
    refuses it and the form comes back with the message under the field, bob's other values
    kept; no job is submitted."""
    page = on_the_spawn_form
    choose_custom(page)
    page.fill("[name=cpus]", "99")
    page.fill("[name=memory]", "300")
    page.select_option("[name=memory_unit]", "M")
    assert page.evaluate("document.getElementById('hub-spawner-cpus').validity.valid") is False
    submit(page)
    assert "/hub/spawn" in page.url and page.locator("#hub-spawner-cpus-error").count() == 0
    submit(page, check_in_browser=False)
    error = page.locator("#hub-spawner-cpus-error")
    assert error.inner_text() == "Cores must be between 1 and 2, not 99."
    assert "is-invalid" in page.get_attribute("#hub-spawner-cpus", "class")
    assert page.input_value("[name=memory]") == "300"  # the other choices are kept
    assert page.input_value("[name=memory_unit]") == "M"
    assert page.is_checked("#hub-spawner-preset-custom")
    assert page.locator("#hub-spawner-memory-error").count() == 0
    assert active_jobs("bob") == []


def test_limits_follow_the_partition_and_a_group_sees_its_own_partition(demo_hub):
    """alice (group long-jobs) sees the "long" partition; choosing it lowers the cores' max
    to its 1 and raises the walltime's to its 2 days, in the page. bob does not see it."""
    with logged_in(demo_hub, "alice") as page:
        choose_custom(page)
        assert page.get_attribute("[name=cpus]", "max") == "2"
        page.select_option("[name=partition]", "long")
        assert page.get_attribute("[name=cpus]", "max") == "1"
        assert page.inner_text("#hub-spawner-walltime-help").startswith("at most 2 d")
        assert page.get_attribute("[name=walltime]", "max") == "48.000"
    with logged_in(demo_hub, "bob") as page:
        names = page.eval_on_selector_all("[name=partition] option", "els => els.map(e => e.value)")
        assert names == ["debug"]


@pytest.mark.parametrize("on_the_spawn_form", ["alice"], indirect=True)
def test_alice_picks_a_preset_watches_her_job_start_and_the_admin_stops_it(
    demo_hub, on_the_spawn_form
):
    """The researcher's and the admin's path: live free cores on the form, a refused advanced
    value next to its field, the "Small" preset, progress events to JupyterLab, a cell that
    runs on the compute host; the admin page shows the profile and stops the server, and the
    job is gone."""
    home = Path(pwd.getpwnam("alice").pw_dir)  # a fresh JupyterLab: no restored notebooks
    shutil.rmtree(home / ".jupyter" / "lab" / "workspaces", ignore_errors=True)
    for notebook in home.glob("Untitled*.ipynb"):
        notebook.unlink()
    page = on_the_spawn_form

    load = page.inner_text("#hub-spawner-load")
    assert "Free on the cluster now" in load and "debug" in load, load
    assert page.is_checked("#hub-spawner-preset-small")
    screenshot(page, "1-spawn-form")
    choose_custom(page)
    page.fill("[name=walltime]", "30")  # hours; at most 8 here
    submit(page, check_in_browser=False)
    assert "longer than the 08:00:00 allowed" in page.inner_text("#hub-spawner-walltime-error")
    assert active_jobs("alice") == []

    page.check("#hub-spawner-preset-small")
    submit(page)
    page.get_by_text("running on compute").first.wait_for(timeout=60_000)
    log = page.text_content("#progress-log") or ""
    screenshot(page, "2-progress")
    assert "Submitted job" in log, log
    page.wait_for_url("**/user/alice/lab**", timeout=150_000)
    page.wait_for_selector(".jp-LabShell", timeout=60_000)
    assert page.title() == "JupyterLab"

    # A new notebook from the launcher; one cell that says where, as whom, and until when.
    page.locator(".jp-LauncherCard[data-category='Notebook']").first.click()
    editor = page.locator(".jp-Notebook .jp-Cell .cm-content").first
    editor.wait_for(timeout=60_000)
    # Type only once the kernel is connected: earlier keystrokes run nothing.
    page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=60_000)
    editor.click()
    page.keyboard.type("import os, socket; print(socket.gethostname(), os.getuid(), "
                       "os.environ['HUB_SPAWNER_PROFILE'], "
                       "int(os.environ['HUB_SPAWNER_WALLTIME_END']) - int(time.time()) > 3000)")
    page.keyboard.press("Home")
    page.keyboard.type("import time; ")
    page.keyboard.press("Shift+Enter")
    output = page.locator(".jp-OutputArea-output").first
    output.wait_for(timeout=60_000)
    screenshot(page, "3-jupyterlab")
    assert output.inner_text().split() == [
        "compute", str(pwd.getpwnam("alice").pw_uid), "Small", "True"]

    job = active_jobs("alice")
    assert len(job) == 1 and "RUNNING" in job[0], job
    job_id = job[0].split()[0]
    hub = demo_hub
    state = hub.api("GET", "/users/alice").json()["servers"][""]["state"]
    assert state["job_id"] == job_id and state["job_host"] == "compute"
    assert state["cluster"] == "lab (slurm)" and state["started_at"].endswith("Z"), state

    page.goto(f"{hub.url}/hub/admin")
    row = page.locator("[data-testid=user-row-alice]")
    row.wait_for(timeout=30_000)
    assert row.locator("[data-testid=user-row-profile-used]").inner_text() == "Small"
    row.locator("[data-testid=user-row-name] span").first.click()  # the details
    page.get_by_text(job_id).first.wait_for(timeout=10_000)
    screenshot(page, "4-admin")
    row.locator(".stop-button").click()
    assert wait_for(lambda: not active_jobs("alice"), 30), active_jobs("alice")
    assert wait_for(lambda: "" not in hub.api("GET", "/users/alice").json()["servers"], 30)


def test_a_waiting_job_says_why_on_the_spawn_page_and_its_cancel_cancels_the_job(demo_hub, lab):
    """bob's job fills the node; alice's spawn waits, the page says why in plain words and
    where it stands in the queue; the page's Stop button cancels her pending job."""
    blocker = occupy_the_compute_node(lab)
    try:
        with logged_in(demo_hub, "alice") as page:
            submit(page)  # "Small": one core, none free
            page.get_by_text("is waiting in the queue").first.wait_for(timeout=60_000)
            assert wait_for(lambda: any(" PENDING " in job for job in active_jobs("alice")), 30)
            page.evaluate("document.querySelector('#progress-details').open = true")
            log = page.inner_text("#progress-log")
            assert "waiting in its partition" in log, log
            page.click("#stop-server-btn")
            assert wait_for(lambda: not active_jobs("alice"), 30), active_jobs("alice")
            assert wait_for(
                lambda: "" not in demo_hub.api("GET", "/users/alice").json()["servers"], 30)
    finally:
        lab.in_namespace("login", ["scancel", blocker], check=False)
    assert "cancelling job" in demo_hub.log()


def test_two_named_servers_run_on_two_jobs_and_stopping_one_leaves_the_other(demo_hub):
    """bob starts his default server and a named one ("second") from the hub's pages; each is
    its own job with its own tunnel; stopping "second" on the home page cancels its job only,
    and the default server still answers."""
    hub = demo_hub
    with logged_in(hub, "bob") as page:
        submit(page)  # the "Small" preset
        page.wait_for_url("**/user/bob/lab**", timeout=150_000)
        page.goto(f"{hub.url}/hub/home")
        page.fill(".new-server-name", "second")
        page.click(".new-server-btn")  # creates it; the page reloads with its row
        page.click("#start-second")
        page.wait_for_url("**/hub/spawn/bob/second**", timeout=30_000)
        submit(page)  # "Small" again: the lab's node has 2 cores
        page.wait_for_url("**/user/bob/second/lab**", timeout=150_000)
        servers = hub.api("GET", "/users/bob").json()["servers"]
        states = {name: servers[name]["state"] for name in ("", "second")}
        assert states[""]["job_id"] != states["second"]["job_id"], states
        assert states[""]["tunnel_port"] != states["second"]["tunnel_port"], states
        assert len(active_jobs("bob")) == 2

        page.goto(f"{hub.url}/hub/home")
        page.click("#stop-second")
        assert wait_for(lambda: [states["second"]["job_id"]] not in [
            line.split()[:1] for line in active_jobs("bob")], 30), active_jobs("bob")
        assert wait_for(
            lambda: not hub.api("GET", "/users/bob").json()["servers"].get("second"), 30)
        remaining = active_jobs("bob")
        assert [line.split()[0] for line in remaining] == [states[""]["job_id"]], remaining
        assert hub.api_server("GET", "bob", "/api/status").status_code == 200
    hub.stop("bob")
    assert wait_for(lambda: not active_jobs("bob"), 30), active_jobs("bob")


def test_grid_engine_form_says_queue_and_a_rejection_shows_on_the_spawn_page(hub_for):
    """bob on the sge-ssh hub: the form speaks Grid Engine; asking for a GPU the lab does not
    have is refused by Grid Engine itself, and its words reach the page."""
    hub = hub_for("sge")
    with logged_in(hub, "bob") as page:
        assert page.locator("label[for=hub-spawner-partition]").inner_text() == "Queue"
        page.fill("[name=gpus]", "1")
        page.click("form input[type=submit], form button[type=submit]")
        page.get_by_text('unknown resource "gpu"').first.wait_for(timeout=60_000)
        body = page.inner_text("body")
        assert "Grid Engine rejected the job: Unable to run job: unknown resource" in body
    assert active_jobs("bob", "sge") == []
