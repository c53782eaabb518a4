"""A researcher's path in a real browser (Debian's chromium, driven by Playwright): log in,
press Start on the default spawn form, get JupyterLab served from the compute host."""

from __future__ import annotations

import pwd
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from .conftest import active_jobs, wait_for

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


PASSWORDS = {"bob": "lab-demo-password", "alice": "lab-demo-admin-password-for-alice-only"}


@contextmanager
def logged_in(hub, user: str):
    """A chromium page, logged in to ``hub`` as ``user``, showing the spawn form."""
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


@pytest.fixture(params=["bob"])
def on_the_spawn_form(request, hub):
    """A browser page on the Slurm hub, logged in as the user named by the parameter."""
    with logged_in(hub, request.param) as page:
        yield page


def test_a_bad_form_value_is_shown_on_the_form_and_starts_nothing(on_the_spawn_form):
    page = on_the_spawn_form
    page.fill("[name=memory]", "lots")
    page.click("form input[type=submit], form button[type=submit]")
    page.wait_for_load_state()
    assert "Memory 'lots' is not understood" in page.inner_text("body")
    assert page.locator("[name=memory]").count() == 1  # the form is shown again
    assert active_jobs("bob") == []


@pytest.mark.parametrize("on_the_spawn_form", ["alice"], indirect=True)
def test_alice_clicks_start_and_her_notebook_runs_as_her_on_the_compute_host(
    hub, on_the_spawn_form, tmp_path
):
    home = Path(pwd.getpwnam("alice").pw_dir)  # a fresh JupyterLab: no restored notebooks
    shutil.rmtree(home / ".jupyter" / "lab" / "workspaces", ignore_errors=True)
    for notebook in home.glob("Untitled*.ipynb"):
        notebook.unlink()
    page = on_the_spawn_form
    assert page.locator("[name=partition]").input_value() == "debug"
    page.click("form input[type=submit], form button[type=submit]")
    page.wait_for_url("**/user/alice/lab**", timeout=150_000)
    page.wait_for_selector(".jp-LabShell", timeout=60_000)
    assert page.title() == "JupyterLab"

    # A new notebook from the launcher; one cell that says where and as whom it runs.
    page.locator(".jp-LauncherCard[data-category='Notebook']").first.click()
    editor = page.locator(".jp-Notebook .jp-Cell .cm-content").first
    editor.wait_for(timeout=60_000)
    # Type only once the kernel is connected: earlier keystrokes run nothing.
    page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=60_000)
    editor.click()
    page.keyboard.type("import os, socket; print(socket.gethostname(), os.getuid())")
    page.keyboard.press("Shift+Enter")
    output = page.locator(".jp-OutputArea-output").first
    output.wait_for(timeout=60_000)
    page.screenshot(path=str(tmp_path / "notebook.png"))
    assert output.inner_text().split() == ["compute", str(pwd.getpwnam("alice").pw_uid)]

    job = active_jobs("alice")
    assert len(job) == 1 and "RUNNING" in job[0], job
    hub.stop("alice")
    assert wait_for(lambda: not active_jobs("alice"), 20), active_jobs("alice")


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
