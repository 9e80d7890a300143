"""The web page at `/`, driven in headless Chromium: type a text, press the button, read the bars.

Uses Debian's chromium (/usr/bin/chromium, `apt-get install chromium`) through Playwright; no browser is
downloaded. Without Chromium the test skips, unless TEXTCLASS_REQUIRE_BROWSER=1 (set in CI), where it fails.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'textclass[serve]'")

from test_app import predictor, running_server, serve_run  # noqa: E402,F401  (fixtures)
from textclass.inference.predictor import BasePredictor  # noqa: E402
from textclass.serve import ServeSettings  # noqa: E402
from textclass.serve.app import create_app  # noqa: E402

CHROMIUM = os.environ.get("TEXTCLASS_CHROMIUM", "/usr/bin/chromium")
REQUIRED = os.environ.get("TEXTCLASS_REQUIRE_BROWSER") == "1"
# Flags that let Chromium run headless as root in a container, offline, with nothing phoning home.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]


@pytest.fixture()
def chromium() -> str:
    """Chromium's path, checked before anything is trained; skip (or fail in CI) without it."""
    reasons = []
    if not (os.path.isfile(CHROMIUM) or shutil.which(CHROMIUM)):
        reasons.append(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reasons.append("playwright is not installed (pip install playwright; the dev extra has it)")
    if reasons:
        message = "; ".join(reasons)
        if REQUIRED:
            pytest.fail(f"TEXTCLASS_REQUIRE_BROWSER=1 but {message}")
        pytest.skip(message)
    return CHROMIUM


@pytest.mark.parametrize("api_key", [None, "page-key"])
def test_web_page_shows_label_probabilities(
    chromium: str, predictor: BasePredictor, tmp_path: Path, api_key: str | None  # noqa: F811
) -> None:
    from playwright.sync_api import sync_playwright

    text = "the striker scored a goal for the team"
    want = predictor.predict([text])[0]
    app = create_app(predictor, ServeSettings(api_key=api_key))
    with running_server(app) as url, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = context.new_page()
            outside: list[str] = []
            page.on("request", lambda r: None if r.url.startswith(url) else outside.append(r.url))
            console_errors: list[str] = []
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.goto(url + "/")
            assert page.title() == "textclass"
            if api_key:
                page.wait_for_selector("#model-info:has-text('Labels unavailable')")
                page.click("#classify")  # empty text: the page says so, no request
                page.fill("#text", text)
                page.click("#classify")
                page.wait_for_selector("#error:has-text('401')")
                assert page.is_visible("#api-key")  # the key box opened itself
                page.fill("#api-key", api_key)
                page.dispatch_event("#api-key", "change")
            page.wait_for_selector("#model-info:has-text('3 labels (single-label): food, sport, tech')")
            page.fill("#text", text)
            page.click("#classify")
            page.wait_for_selector("#result:not([hidden])")
            assert page.text_content("#decision") == want["label"]
            bars = page.eval_on_selector_all(
                "#bars li",
                "els => els.map(e => [e.dataset.label, Number(e.dataset.score), e.querySelector('.fill').getBoundingClientRect().width,"
                " e.querySelector('.track').getBoundingClientRect().width, e.classList.contains('chosen')])",
            )
            assert [b[0] for b in bars] == list(want["scores"])  # ranked, best first
            for name, score, fill, track, chosen in bars:
                assert score == pytest.approx(want["scores"][name], abs=1e-6)
                assert fill == pytest.approx(score * track, abs=1.5)  # the bar's length is the probability
                assert chosen == (name == want["label"])
            assert page.is_hidden("#error")
            assert outside == [], f"the page fetched from outside the server (no CDN allowed): {outside}"
            assert not [e for e in console_errors if "401" not in e], console_errors
        finally:
            context.close()
