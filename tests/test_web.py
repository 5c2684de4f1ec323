"""The page at / in a real headless browser (Debian's chromium driven by Playwright), and the HTML report.

Skips only when no browser is installed (`.ci/run` installs chromium); Playwright comes with the dev extra.
Screenshots go to the test's tmp folder, or to $PALR_SCREENSHOTS when set.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    if exe is None:
        pytest.skip("no chromium installed (apt-get install -y chromium)")
    from playwright.sync_api import (
        sync_playwright,  # in the dev extra: with a browser, its absence is an error
    )

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    out = Path(os.environ.get("PALR_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_page_shows_profile_and_recommended_titles(browser, tiny_ml100k_run: dict[str, Path], shots: Path) -> None:
    from serving import BackgroundServer

    from palr.rank.pipeline import PALR
    from palr.serve.app import create_app

    palr = PALR.load(tiny_ml100k_run["palr"], tiny_ml100k_run["data_dir"])
    want = palr.recommend(user="1", k=10)
    with BackgroundServer(create_app(palr)) as url:
        page = browser.new_page()  # the default viewport, 1280x720
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url.removesuffix("/v1") + "/?user=1")
        page.wait_for_selector("#recs tbody tr", timeout=30_000)
        assert page.inner_text("#profile") == want.profile and want.profile
        rows = page.locator("#recs tbody tr")
        assert rows.count() == 10
        text = page.inner_text("#recs")
        assert all(it["title"] in text for it in want.items)
        assert page.input_value("#user") == "1"
        page.screenshot(path=str(shots / "page_user1.png"))
        # build a history from the search results and recommend for it
        page.fill("#search", "star wars")
        page.wait_for_selector("#search-results li button", timeout=10_000)
        assert "Star Wars (1977)" in page.inner_text("#search-results")
        page.click("#search-results li button")
        page.click("#recommend-history")
        # a selector, not wait_for_function: the page's CSP forbids eval, which wait_for_function's polling uses
        page.wait_for_selector("#profile-title:text-is('Your history')", timeout=30_000)
        page.wait_for_selector("#recs tbody tr")
        assert "Star Wars (1977)" in page.inner_text("#seen-box") or page.locator("#seen li").count() == 1
        titles = page.locator("#recs tbody td.title > div:first-child").all_inner_texts()
        assert titles and "Star Wars (1977)" not in titles  # never recommends what the history holds
        page.screenshot(path=str(shots / "page_history.png"), full_page=True)
        assert not errors, errors
        page.close()


def test_page_asks_for_the_token(browser, tiny_ml100k_run: dict[str, Path]) -> None:
    from serving import BackgroundServer

    from palr.rank.pipeline import PALR
    from palr.serve.app import ServiceConfig, create_app

    palr = PALR.load(tiny_ml100k_run["palr"], tiny_ml100k_run["data_dir"])
    with BackgroundServer(create_app(palr, config=ServiceConfig(token="s3cret"))) as url:
        page = browser.new_page()
        page.goto(url.removesuffix("/v1") + "/?user=1")
        page.wait_for_selector("#message:not([hidden])", timeout=30_000)
        assert "401" in page.inner_text("#message") and page.is_visible("#token")
        page.fill("#token", "s3cret")
        page.dispatch_event("#token", "change")
        page.click("#user-form button")
        page.wait_for_selector("#recs tbody tr", timeout=30_000)
        assert page.is_hidden("#message") and page.locator("#user-ids option").count() > 0
        page.close()


def test_report_renders_in_the_browser(browser, tiny_ml100k_run: dict[str, Path], shots: Path, tmp_path: Path) -> None:
    from palr.evaluate.report import write_report

    out = write_report([tiny_ml100k_run["palr"]], tmp_path / "report.html", data_dir=tiny_ml100k_run["data_dir"])
    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(out.resolve().as_uri())
    assert page.locator("figure svg, figure img").count() >= 3
    assert page.locator("table.metrics tbody tr").count() >= 2
    assert all(u.startswith(("file:", "data:")) for u in requests), requests  # self-contained: no network
    page.screenshot(path=str(shots / "report.png"), full_page=True)
    page.close()
