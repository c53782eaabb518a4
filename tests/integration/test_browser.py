"""A researcher's path in a real browser (Debian's chromium, driven by Playwright): log in,
press Start on the default spawn form, get JupyterLab served from the compute host."""

from __future__ import annotations

import pytest
from playwright.sync_api import sync_playwright

from .conftest import active_jobs, wait_for

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture
def bob_on_the_spawn_form(hub):
    """A browser page, logged in as bob, showing the spawn form."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                             args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{hub.url}/hub/login")
            page.fill("#username_input", "bob")
            page.fill("#password_input", "lab-demo-password")
            page.click("#login_submit")
            page.wait_for_url("**/hub/spawn**")
            yield page
        finally:
            browser.close()


def test_a_bad_form_value_is_shown_on_the_form_and_starts_nothing(bob_on_the_spawn_form):
    page = bob_on_the_spawn_form
    page.fill("[name=memory]", "lots")
    page.click("form input[type=submit], form button[type=submit]")
    page.wait_for_load_state()
    assert "Memory 'lots' is not understood" in page.inner_text("body")
    assert page.locator("[name=memory]").count() == 1  # the form is shown again
    assert active_jobs("bob") == []


def test_bob_clicks_start_on_the_default_form_and_gets_jupyterlab(
    hub, bob_on_the_spawn_form, tmp_path
):
    page = bob_on_the_spawn_form
    assert page.locator("[name=partition]").input_value() == "debug"
    page.click("form input[type=submit], form button[type=submit]")
    page.wait_for_url("**/user/bob/lab**", timeout=150_000)
    page.wait_for_selector(".jp-LabShell", timeout=60_000)
    assert page.title() == "JupyterLab"
    page.screenshot(path=str(tmp_path / "jupyterlab.png"))
    job = active_jobs("bob")
    assert len(job) == 1 and "RUNNING" in job[0], job
    hub.stop("bob")
    assert wait_for(lambda: not active_jobs("bob"), 20), active_jobs("bob")
