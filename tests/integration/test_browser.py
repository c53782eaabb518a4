"""A researcher's path in a real browser (Debian's chromium, driven by Playwright): log in,
press Start on the default spawn form, get JupyterLab served from the compute host."""

from __future__ import annotations

from playwright.sync_api import sync_playwright

from .conftest import active_jobs, wait_for

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def browser_session(playwright):
    return playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)


def log_in(page, hub, user: str, password: str) -> None:
    page.goto(f"{hub.url}/hub/login")
    page.fill("#username_input", user)
    page.fill("#password_input", password)
    page.click("#login_submit")


def test_a_bad_form_value_is_shown_on_the_form_and_starts_nothing(hub):
    with sync_playwright() as playwright:
        browser = browser_session(playwright)
        try:
            page = browser.new_page()
            log_in(page, hub, "bob", "lab-demo-password")
            page.wait_for_url("**/hub/spawn**")
            page.fill("[name=memory]", "lots")
            page.click("form input[type=submit], form button[type=submit]")
            page.wait_for_load_state()
            text = page.content()
            assert "Memory &#39;lots&#39; is not understood" in text or \
                "Memory 'lots' is not understood" in text
            assert page.locator("[name=memory]").count() == 1  # the form is shown again
        finally:
            browser.close()
    assert active_jobs("bob") == []


def test_bob_clicks_start_on_the_default_form_and_gets_jupyterlab(hub, tmp_path):
    with sync_playwright() as playwright:
        browser = browser_session(playwright)
        try:
            page = browser.new_page()
            log_in(page, hub, "bob", "lab-demo-password")
            page.wait_for_url("**/hub/spawn**")
            assert page.locator("[name=partition]").input_value() == "debug"
            page.click("form input[type=submit], form button[type=submit]")
            page.wait_for_url("**/user/bob/lab**", timeout=150_000)
            page.wait_for_selector(".jp-LabShell", timeout=60_000)
            assert page.title() == "JupyterLab"
            page.screenshot(path=str(tmp_path / "jupyterlab.png"))
        finally:
            browser.close()
    job = active_jobs("bob")
    assert len(job) == 1 and "RUNNING" in job[0], job
    hub.stop("bob")
    assert wait_for(lambda: not active_jobs("bob"), 20), active_jobs("bob")
