"""The built-in web client (GET /): served from the package with a strict CSP, and used
through Chromium the way a person would: register, start a chat by username, talk across
two nodes, watch the ticks, lose the network and come back, reload.

The browser tests need the `playwright` package (the dev extra) and a Chromium binary
(Debian's `chromium`); `playwright install` is never needed. Without either they skip.
A screenshot of the chat view is saved under test-artifacts/.
"""

from __future__ import annotations

import re
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.client import FAST_ENV, PASSWORD, Api, connect
from tests.harness import REPO_ROOT, ChatdNodes, ValkeyProcess

try:
    from playwright.async_api import (
        Browser,
        Dialog,
        Locator,
        Page,
        Response,
        async_playwright,
        expect,
    )
except ImportError:  # the HTTP test still runs; the browser tests skip
    async_playwright = None

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
ARTIFACTS = REPO_ROOT / "test-artifacts"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
       "form-action 'self'")
UI_TIMEOUT_MS = 20_000


def _chromium() -> str | None:
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    return shutil.which("chromium")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if async_playwright is None:
        pytest.skip("playwright is not installed (it is in the dev extra: pip install -e '.[dev]')")
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium found (/usr/bin/chromium or `chromium` on PATH); "
                    "on Debian: apt-get install chromium")
    expect.set_options(timeout=UI_TIMEOUT_MS)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS,
                                           headless=True)
        try:
            yield browser
        finally:
            await browser.close()


class Watch:
    """What a page did that it should not have: script errors, CSP reports, dialogs."""

    def __init__(self, page: Page) -> None:
        self.problems: list[str] = []
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("console", lambda m: self.problems.append(f"console: {m.text}")
                if m.type == "error" and "Content Security Policy" in m.text else None)
        page.on("dialog", self._dialog)

    async def _dialog(self, dialog: Dialog) -> None:
        self.problems.append(f"dialog: {dialog.message}")
        await dialog.dismiss()


async def register(page: Page, url: str, username: str) -> Response | None:
    response = await page.goto(url)
    await page.get_by_test_id("auth-username").fill(username)
    await page.get_by_test_id("auth-password").fill(PASSWORD)
    await page.get_by_test_id("register-button").click()
    await expect(page.get_by_test_id("me")).to_have_text(username)
    await expect(page.get_by_test_id("connection-state")).to_have_attribute("data-state",
                                                                            "online")
    return response


async def send(page: Page, text: str) -> None:
    box = page.get_by_test_id("composer-input")
    await box.fill(text)
    await box.press("Enter")


def message(page: Page, text: str) -> Locator:
    return page.get_by_test_id("message").filter(
        has=page.get_by_test_id("message-body").get_by_text(text, exact=True))


def tick(page: Page, text: str) -> Locator:
    return message(page, text).get_by_test_id("message-status")


def name(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(3)}"


async def test_page_and_assets_are_served_with_csp_and_types(
        valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    (node,) = await chatd_nodes.start(1, redis_url=valkey, env=FAST_ENV)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{node.url}/") as r:
            assert r.status == 200
            assert r.content_type == "text/html"
            assert r.headers["Content-Security-Policy"] == CSP
            assert r.headers["Cache-Control"] == "no-cache"
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            page = await r.text()
            etag = r.headers["ETag"]
        assert '<script type="module" src="/static/app.js"></script>' in page
        assert "<style" not in page and " style=" not in page and "onclick" not in page

        async with http.get(f"{node.url}/", headers={"If-None-Match": etag}) as r:
            assert r.status == 304

        async with http.get(f"{node.url}/static/app.js") as r:
            assert r.status == 200
            assert r.content_type == "text/javascript"
            app_js = await r.text()
        async with http.get(f"{node.url}/static/app.css") as r:
            assert r.status == 200
            assert r.content_type == "text/css"
        # Every module app.js imports ships in the package too.
        for module in re.findall(r"from '\./([\w-]+\.js)'", app_js):
            async with http.get(f"{node.url}/static/{module}") as r:
                assert (r.status, r.content_type) == (200, "text/javascript"), module

        for missing in ("/static/nope.js", "/static/index.html", "/static/..%2Fapp.py"):
            async with http.get(f"{node.url}{missing}") as r:
                assert r.status == 404, missing
                assert (await r.json())["error"]["code"] == "not_found"


async def test_two_users_chat_across_nodes_in_the_browser(
        browser: Browser, valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    node_a, node_b = await chatd_nodes.start(2, redis_url=valkey, env=FAST_ENV)
    alice_ctx = await browser.new_context()
    bob_ctx = await browser.new_context()
    alice, bob = await alice_ctx.new_page(), await bob_ctx.new_page()
    watches = [Watch(alice), Watch(bob)]
    alice_name, bob_name = name("alice"), name("bob")

    response = await register(alice, node_a.url, alice_name)
    assert response is not None and response.headers["content-security-policy"] == CSP
    await register(bob, node_b.url, bob_name)

    # Alice starts a direct chat by username (any case); it shows up live in Bob's list.
    await alice.get_by_test_id("new-direct-button").click()
    await alice.get_by_test_id("direct-username").fill(bob_name.upper())
    await alice.get_by_test_id("direct-submit").click()
    await expect(alice.get_by_test_id("chat-title")).to_have_text(bob_name)
    bob_room = bob.get_by_test_id("room-item")
    await expect(bob_room).to_have_count(1)

    # Sent: stored, but Bob's browser is offline.
    await bob_ctx.set_offline(True)
    await expect(bob.get_by_test_id("connection-state")).to_have_attribute("data-state",
                                                                          "offline")
    await send(alice, "hi bob")
    await expect(message(alice, "hi bob")).to_be_visible()
    await expect(tick(alice, "hi bob")).to_have_attribute("data-status", "sent")
    # Delivered: Bob's client comes back, resumes, gets it (its room is not open).
    await bob_ctx.set_offline(False)
    await expect(bob_room.get_by_test_id("room-unread")).to_have_text("1")
    await expect(bob_room.get_by_test_id("room-last-message")).to_have_text("hi bob")
    await expect(tick(alice, "hi bob")).to_have_attribute("data-status", "delivered")
    # Read: Bob opens the room, and the message is on his screen.
    await bob_room.click()
    await expect(bob.get_by_test_id("message-body")).to_have_text(["hi bob"])
    # Bob's view names Alice (members carry usernames) and shows her online: she was
    # online before Bob reconnected, so that came in his welcome, not a presence frame.
    await expect(bob.get_by_test_id("chat-title")).to_have_text(alice_name)
    await expect(bob.get_by_test_id("chat-presence")).to_have_attribute("data-presence",
                                                                        "online")
    await expect(tick(alice, "hi bob")).to_have_attribute("data-status", "read")
    await expect(bob_room.get_by_test_id("room-unread")).to_have_count(0)

    # Bob answers (Shift+Enter is a new line) and types: Alice sees both live.
    box = bob.get_by_test_id("composer-input")
    await box.fill("hello alice")
    await box.press("Shift+Enter")
    await box.press_sequentially("second line")
    await expect(alice.get_by_test_id("typing-indicator")).to_contain_text("typing")
    await box.press("Enter")
    reply = "hello alice\nsecond line"
    await expect(alice.get_by_test_id("message-body")).to_have_text(["hi bob", reply])
    await expect(tick(bob, reply)).to_have_attribute("data-status", "read")
    await expect(alice.get_by_test_id("typing-indicator")).to_have_text("")

    # Alice loses the network; Bob sends five; Alice comes back: all five, in order, once.
    # What Alice wrote meanwhile waits in her outbox and goes out after the reconnect.
    await alice_ctx.set_offline(True)
    await expect(alice.get_by_test_id("connection-state")).to_have_attribute("data-state",
                                                                            "offline")
    burst = [f"while you were away {i}" for i in range(5)]
    for text in burst:
        await send(bob, text)
    for text in burst:
        await expect(tick(bob, text)).to_have_attribute("data-status", "sent")
    await send(alice, "written offline")
    await expect(tick(alice, "written offline")).to_have_attribute("data-status", "pending")
    await alice_ctx.set_offline(False)
    await expect(alice.get_by_test_id("connection-state")).to_have_attribute("data-state",
                                                                            "online")
    everything = ["hi bob", reply, *burst, "written offline"]
    for page in (alice, bob):
        await expect(page.get_by_test_id("message-body")).to_have_text(everything)
        await expect(page.get_by_test_id("message").last).to_have_attribute("data-seq", "8")
        seqs = await page.get_by_test_id("message").evaluate_all(
            "nodes => nodes.map(n => Number(n.dataset.seq))")
        assert seqs == list(range(1, 9))
    for text in burst:
        await expect(tick(bob, text)).to_have_attribute("data-status", "read")
    await expect(tick(alice, "written offline")).to_have_attribute("data-status", "read")

    # Markup in a message is text, on both sides.
    xss = "<img src=x onerror=alert(1)>"
    await send(alice, xss)
    for page in (alice, bob):
        await expect(message(page, xss)).to_be_visible()
        assert await page.get_by_test_id("message-list").locator("img").count() == 0

    ARTIFACTS.mkdir(exist_ok=True)
    await bob.screenshot(path=ARTIFACTS / "web-client-chat.png")
    await alice.screenshot(path=ARTIFACTS / "web-client-chat-alice.png")

    # A reload keeps Alice logged in, with her rooms and the history.
    await alice.reload()
    await expect(alice.get_by_test_id("me")).to_have_text(alice_name)
    await expect(alice.get_by_test_id("connection-state")).to_have_attribute("data-state",
                                                                            "online")
    await alice.get_by_test_id("room-item").click()
    await expect(alice.get_by_test_id("message-body")).to_have_text([*everything, xss])

    # Logging out forgets the token: a reload shows the login form.
    await alice.get_by_test_id("logout-button").click()
    await expect(alice.get_by_test_id("auth-form")).to_be_visible()
    await alice.reload()
    await expect(alice.get_by_test_id("auth-form")).to_be_visible()

    assert [p for w in watches for p in w.problems] == []
    await alice_ctx.close()
    await bob_ctx.close()


async def test_groups_members_paging_on_a_phone(
        browser: Browser, valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    env = FAST_ENV | {"CHATD_LIMITS__SEND_RATE_PER_S": "1000", "CHATD_LIMITS__SEND_BURST": "1000"}
    (node,) = await chatd_nodes.start(1, redis_url=valkey, env=env)
    context = await browser.new_context(viewport={"width": 390, "height": 780},
                                        is_mobile=True, has_touch=True)
    page = await context.new_page()
    watch = Watch(page)
    async with aiohttp.ClientSession() as http:
        api = Api(http, node.url)
        carol, dave, erin = [await api.register(name(who)) for who in ("carol", "dave", "erin")]
        direct = await api.direct(dave, carol)
        for i in range(1, 121):
            status_code, _ = await api.call("POST", f"/api/v1/rooms/{direct}/messages", user=dave,
                                            json_body={"client_msg_id": f"m{i}", "body": f"n{i}"})
            assert status_code == 201

        await page.goto(node.url)
        await page.get_by_test_id("auth-username").fill(carol.username)
        await page.get_by_test_id("auth-password").fill(PASSWORD)
        await page.get_by_test_id("login-button").click()
        await expect(page.get_by_test_id("connection-state")).to_have_attribute("data-state",
                                                                               "online")
        direct_item = page.locator(f"[data-testid=room-item][data-room-id='{direct}']")
        await expect(direct_item.get_by_test_id("room-unread")).to_have_text("120")

        # A group with members given by username; on a phone the chat replaces the list.
        await page.get_by_test_id("new-group-button").click()
        await page.get_by_test_id("group-name").fill("Team <b>")
        await page.get_by_test_id("group-members").fill(f"{dave.username}, {erin.username}")
        await page.get_by_test_id("group-submit").click()
        await expect(page.get_by_test_id("chat-title")).to_have_text("Team <b>")
        await expect(page.get_by_test_id("room-list")).to_be_hidden()

        # Members: remove erin, add her back by username.
        await page.get_by_test_id("members-button").click()
        members = page.get_by_test_id("member-item")
        await expect(members).to_have_count(3)
        await members.filter(has_text=erin.username).get_by_test_id("member-remove").click()
        await expect(members).to_have_count(2)
        await page.get_by_test_id("add-member-username").fill(erin.username)
        await page.get_by_test_id("add-member-submit").click()
        await expect(members).to_have_count(3)
        await page.get_by_test_id("members-dialog").get_by_role("button", name="Close").click()

        # The tick names who has read a group message.
        await send(page, "team hello")
        status = tick(page, "team hello")
        await expect(status).to_have_attribute("data-status", "sent")
        _, listed = await api.call("GET", "/api/v1/rooms", user=dave)
        (group,) = [r["room_id"] for r in listed["rooms"] if r["kind"] == "group"]
        dave_ws = await connect(http, node.ws_url, dave)
        await dave_ws.send({"type": "read", "room_id": group, "seq": 1})
        await expect(status).to_have_attribute("title", re.compile(
            f"Read by {dave.username}.*Not yet delivered to {erin.username}"))
        await status.click()
        await expect(message(page, "team hello").get_by_test_id("receipt-detail")).to_contain_text(
            f"Read by {dave.username}")
        await dave_ws.close()

        # Back to the list; the long direct room pages in older messages when scrolled up.
        await page.get_by_test_id("back-button").click()
        await expect(page.get_by_test_id("chat-view")).to_be_hidden()
        await expect(direct_item.get_by_test_id("room-last-message")).to_have_text("n120")
        await direct_item.click()
        bodies = page.get_by_test_id("message-body")
        await expect(bodies).to_have_count(50)
        await expect(bodies.last).to_have_text("n120")
        for count in (100, 120):
            await page.get_by_test_id("message-scroller").evaluate("el => { el.scrollTop = 0; }")
            await expect(bodies).to_have_count(count)
        await expect(bodies.first).to_have_text("n1")
        await expect(page.get_by_test_id("load-older")).to_be_hidden()
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=ARTIFACTS / "web-client-phone.png")

        # The server restarts: the client backs off, reconnects and resumes by itself.
        state = page.get_by_test_id("connection-state")
        await node.stop()
        await expect(state).to_have_attribute("data-state", "reconnecting")
        await expect(page.get_by_test_id("connection-note")).to_contain_text("Reconnecting")
        await node.start()
        status_code, _ = await api.call("POST", f"/api/v1/rooms/{direct}/messages", user=dave,
                                        json_body={"client_msg_id": "back", "body": "back again"})
        assert status_code == 201
        await expect(state).to_have_attribute("data-state", "online")
        await expect(page.get_by_test_id("connection-note")).to_be_hidden()
        await expect(bodies.last).to_have_text("back again")
        await expect(bodies).to_have_count(121)

    assert watch.problems == []
    await context.close()
