"""A real browser (Debian chromium via Playwright) clicks through every tab on the demo family,
logs in with the local mock login, pushes, and saves a screenshot of each tab into assets/."""

import os
import shutil
from pathlib import Path

import pytest

from residuals_core.demo import DEMO_FAMILY

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parent.parent / "assets" / "screenshots"

pytestmark = [
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason="chromium is not installed (scripts/test.sh installs it)"
    ),
    pytest.mark.skipif(not (DEMO_FAMILY / "world.json").is_file(), reason="demo family not built"),
]

LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def page(served_app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(120_000)
        page.goto(served_app.replace("127.0.0.1", "localhost"))
        page.get_by_text("Residuals Studio").first.wait_for()
        yield page
        browser.close()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_click_through_every_tab_login_and_push(page, hub_server):
    # log in (off a Space, gradio mocks the login with this machine's token: alice on the test Hub)
    page.get_by_role("button", name="Sign in with Hugging Face").click()
    page.get_by_role("button", name="Logout (alice)").wait_for()

    # Compute: the demo family is filled in; no typing needed
    page.get_by_role("button", name="Compute residuals").click()
    page.get_by_text("Residuals ready").wait_for()
    page.locator(".js-plotly-plot").first.wait_for()  # the module × layer heatmap
    page.locator("canvas, svg.marks").first.wait_for()  # the per-layer bar chart
    shot(page, "compute")

    # Apply the session's residuals to the CPT'd base, then push the merged model
    page.get_by_role("tab", name="Apply").click()
    page.get_by_role("button", name="Apply residuals").click()
    page.get_by_text("Merged model ready").wait_for()
    page.get_by_role("button", name="Push merged model").click()
    page.get_by_text("Pushed to").wait_for()
    assert any(repo.startswith("alice/") for repo in hub_server.repos)
    shot(page, "apply")

    # Inspect the session's residuals
    page.get_by_role("tab", name="Inspect").click()
    page.get_by_role("button", name="Inspect", exact=True).click()
    page.locator("#inspect-status", has_text="total ‖R‖").wait_for()
    page.get_by_text("model.embed_tokens.weight").first.wait_for()  # the largest-tensors table
    shot(page, "inspect")

    # Try: side-by-side generations
    page.get_by_role("tab", name="Try").click()
    page.get_by_role("button", name="Generate side by side").click()
    merged = page.get_by_label("Merged (CPT'd base + residuals)")
    page.wait_for_function(
        "el => el.value && el.value.length > 0", arg=merged.element_handle(), timeout=120_000
    )
    assert page.get_by_label("CPT'd base", exact=True).nth(1).input_value()
    verdict = page.locator("#try-verdict")
    verdict.get_by_text("Expected:").wait_for()  # a demo-family question: the truth, and ✓/✗ per model
    assert verdict.inner_text().count("format ") == 3 and (
        "✓" in verdict.inner_text() or "✗" in verdict.inner_text()
    )
    page.get_by_role("button", name="Score 30 questions").click()
    table = page.locator("#score-table")
    table.get_by_text("Merged").wait_for()
    page.wait_for_function(  # the live table reached 30 questions on all three rows (the label holds one "30")
        "el => (el.innerText.match(/\\b30\\b/g) || []).length >= 4",
        arg=table.element_handle(),
        timeout=300_000,
    )
    shot(page, "try")
    assert all((SHOTS / f"{n}.png").stat().st_size > 10_000 for n in ("compute", "apply", "inspect", "try"))
    assert os.environ.get("HF_TOKEN") is None  # the test process itself never holds the token

    # a pasted token is used, never kept: nothing of it in the browser's storage (run history is off)
    page.get_by_role("tab", name="Compute").click()
    page.get_by_label("Access token", exact=False).fill("hf_typed_secret_123")
    page.get_by_role("button", name="Check compatibility").click()
    page.get_by_text("Compatible").first.wait_for()
    stored = page.evaluate("() => JSON.stringify({...localStorage}) + JSON.stringify({...sessionStorage})")
    assert "hf_typed_secret_123" not in stored


def test_mobile_layout(page, served_app):
    """390 px wide, as a phone shows it: a screenshot of the first tab for the README."""
    phone = page.context.browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2)
    mobile = phone.new_page()
    mobile.set_default_timeout(120_000)
    mobile.goto(served_app.replace("127.0.0.1", "localhost"))
    mobile.get_by_role("button", name="Compute residuals").wait_for()
    assert mobile.evaluate("() => document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    shot(mobile, "mobile")
    phone.close()


def test_space_mode_in_the_browser(page, space):
    """As a visitor of the hosted Space sees it: no token field, and a server path typed into a model
    field is refused in words on the page."""
    url, _, _ = space
    visitor = page.context.browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    visitor.set_default_timeout(120_000)
    visitor.goto(url.replace("127.0.0.1", "localhost"))
    visitor.get_by_role("button", name="Check compatibility").wait_for()
    assert visitor.get_by_label("Access token", exact=False).count() == 0
    for field, value in (("Base model", "/etc"), ("Instruct model", "<b>../../etc/passwd</b>")):
        box = visitor.get_by_label(field, exact=False).first
        box.fill(value)
        visitor.get_by_role("button", name="Check compatibility").click()
        visitor.get_by_text("folders on the server cannot be read").first.wait_for()
        if "<b>" in value:  # typed HTML is shown as the text it is, not rendered
            visitor.get_by_text("<b>../../etc/passwd</b>", exact=False).first.wait_for()
        box.fill("demo:base-v1" if field == "Base model" else "demo:instruct-v1")
        for close in visitor.locator(".toast-close").all():
            close.click()
    visitor.context.close()
