"""The control-room page and /docs in a real browser: Debian's chromium, driven by Playwright.

Playwright's own browser download is not reachable here; ``./scripts/test`` installs Debian's
``chromium`` with apt, and Playwright launches that one. Every request the pages make is
watched: anything that leaves the service (a CDN, a font) is blocked and fails the test, so
the pages are shown to work with no network at all.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import TOKEN, Server
from playwright.sync_api import Browser, ConsoleMessage, Page, Route, expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
# As root there is no sandbox; nothing may reach out on its own (updates, sync, first-run pages).
ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CSP = "default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert shutil.which(CHROMIUM), "Debian's chromium is missing: ./scripts/test installs it with apt"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


class Watched:
    """A page whose requests to anywhere but the service are blocked and listed, with its console errors."""

    def __init__(self, browser: Browser, server: Server) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 720})
        self.page: Page = self.context.new_page()
        self.outside: list[str] = []
        self.errors: list[str] = []
        self.page_headers: dict[str, dict[str, str]] = {}
        host = urlsplit(server.url).netloc
        self.context.route("**/*", lambda route: self._route(route, host))
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("response", lambda r: self.page_headers.__setitem__(urlsplit(r.url).path, r.headers))

    def _route(self, route: Route, host: str) -> None:
        if urlsplit(route.request.url).netloc == host:
            route.continue_()
        else:
            self.outside.append(route.request.url)
            route.abort("internetdisconnected")

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def watched(browser: Browser, server: Server) -> Iterator[Watched]:
    page = Watched(browser, server)
    yield page
    page.close()


def post(server: Server, domain: str, event: dict[str, Any]) -> None:
    assert server.post(domain, json.dumps(event)).status_code == 200


def test_log_in_open_a_domain_and_see_a_new_event_arrive(server: Server, watched: Watched, tmp_path: Path) -> None:
    post(server, "shop.orders", {"order": 1, "state": "placed"})
    post(server, "sensors.hall-a", {"temp": 21.5})
    page = watched.page
    page.goto(server.url + "/")
    assert page.url == server.url + "/ui/"
    # The token goes into a password field; Enter signs in.
    field = page.locator("input[type=password]")
    field.fill(TOKEN)
    field.press("Enter")
    link = page.get_by_role("link", name="shop.orders", exact=True)
    expect(link).to_be_visible()
    expect(page.get_by_role("link", name="sensors.hall-a", exact=True)).to_be_visible()
    row = page.locator("tr", has=link)
    expect(row.locator("svg.spark rect")).to_have_count(1)  # one minute with events in the last hour
    expect(row).to_contain_text("B")
    link.click()
    expect(page.locator("#status")).to_have_text("live")
    expect(page.locator("#event-rows tr")).to_have_count(1)

    marker = f"marker-{uuid.uuid4()}"
    sent = time.monotonic()
    post(server, "shop.orders", {"order": 2, "note": marker})
    expect(page.get_by_text(marker)).to_be_visible(timeout=5000)
    assert time.monotonic() - sent < 3.0
    page.screenshot(path=tmp_path / "live-tail.png", full_page=True)
    assert (tmp_path / "live-tail.png").stat().st_size > 10_000

    # The whole event as indented JSON, on click.
    page.get_by_text(marker).click()
    expect(page.locator("#detail")).to_contain_text(f'"note": "{marker}"')
    expect(page.locator("#detail")).to_contain_text('\n  "order": 2,')

    # Paused, nothing new arrives; resumed, it comes without a gap.
    page.get_by_role("button", name="Pause").click()
    expect(page.locator("#status")).to_have_text("paused")
    post(server, "shop.orders", {"order": 3})
    time.sleep(1.0)
    expect(page.locator("#event-rows tr")).to_have_count(2)
    page.get_by_role("button", name="Resume").click()
    expect(page.locator("#event-rows tr").first).to_contain_text('"order":3')
    expect(page.locator("#status")).to_have_text("live")

    # The filter asks the server (q=), for the tail and the stream.
    page.locator("#q").fill("placed")
    page.locator("#q").press("Enter")
    expect(page.locator("#event-rows tr")).to_have_count(1)
    post(server, "shop.orders", {"order": 4, "state": "placed"})
    post(server, "shop.orders", {"order": 5, "state": "paid"})
    expect(page.locator("#event-rows tr")).to_have_count(2)
    expect(page.locator("#event-rows tr").first).to_contain_text('"order":4')

    # The token never travelled in a URL; it is in this tab's sessionStorage only.
    assert TOKEN not in page.url
    assert page.evaluate("sessionStorage.getItem('leitstand.token')") == TOKEN
    assert page.evaluate("localStorage.length") == 0
    assert watched.page_headers["/ui/"]["content-security-policy"] == CSP
    assert watched.page_headers["/ui/app.js"]["content-security-policy"] == CSP
    # Chromium asks for deflate, so the live tail above came deflated, and the browser read it as it came.
    assert watched.page_headers["/events/shop.orders/stream"]["content-encoding"] == "deflate"
    assert not watched.outside, watched.outside
    assert not watched.errors, watched.errors


def test_a_wrong_token_is_refused_and_asked_for_again(server: Server, watched: Watched) -> None:
    page = watched.page
    page.goto(server.url + "/ui/")
    page.locator("input[type=password]").fill("wrong-token")
    page.locator("input[type=password]").press("Enter")
    expect(page.locator("#login-error")).to_have_text("The token was refused.")
    expect(page.locator("input[type=password]")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('leitstand.token')") is None
    # The browser's own console reports the 401 of the refused request; nothing else went wrong.
    assert all("401" in error for error in watched.errors), watched.errors


def test_docs_render_with_the_network_off(server: Server, watched: Watched, tmp_path: Path) -> None:
    page = watched.page
    page.goto(server.url + "/docs")
    expect(page.locator(".opblock-summary-path", has_text="/events/{domain}/stream")).to_be_visible()
    expect(page.locator(".opblock-summary-path", has_text="/ingest/{domain}")).to_be_visible()
    page.screenshot(path=tmp_path / "docs.png")
    assert watched.page_headers["/docs"]["content-security-policy"] == CSP
    assert watched.page_headers["/docs/swagger-ui/swagger-ui-bundle.js"]["content-security-policy"] == CSP
    assert not watched.outside, watched.outside
    assert not watched.errors, watched.errors
