"""The browser's login flow through a shipped gateway configuration (nginx or
Caddy), in Debian's headless Chromium driven by Playwright.

Run by tests/api/gateway/browser.rs, which starts sessiongate and its Redis,
the example app (examples/browser-app/app.py) and the gateway between the
browser and both, and passes everything through the environment:

  GATEWAY_URL      http://127.0.0.1:PORT (the site, as the browser sees it)
  SESSIONGATE_URL  sessiongate itself (for the operator's forced logout)
  ADMIN_KEY        an admin key of that sessiongate
  USER, PASSWORD   a user the example app knows
  COOKIE_NAME      the session cookie (__Host-session)
  CHROMIUM         the browser binary (/usr/bin/chromium)
  ARTIFACTS        directory for the screenshots
  PHASE            `flows` (everything but the outage), or `outage` (Redis is
                   down; OUTAGE_TOKEN is a token of a session created before)

Prints one `OK <step>` line per step and `SCREENSHOT <path>` per picture;
exits non-zero at the first failure. Every request for a host other than the
gateway and this script's own "other site" is answered by the script itself
(`route`), Chromium resolves no host name, and every request off the site is
recorded: nothing leaves the machine, and a redirect off the site shows.
"""

import http.server
import json
import os
import sys
import threading
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from playwright.sync_api import expect, sync_playwright

E = os.environ
GW = E["GATEWAY_URL"].rstrip("/")
GW_HOST = urlsplit(GW).netloc
COOKIE = E["COOKIE_NAME"]
ART = E["ARTIFACTS"]
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # No name is ever looked up: a redirect off the site fails here instead
    # of reaching the network (Playwright's `route` misses redirects).
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
]
TIMEOUT_MS = 20_000
expect.set_options(timeout=TIMEOUT_MS)
LEFT_THE_SITE = []


def ok(step):
    print(f"OK {step}", flush=True)


def shot(page, name):
    path = os.path.join(ART, name)
    page.screenshot(path=path, full_page=True)
    print(f"SCREENSHOT {path}", flush=True)


def new_context(browser, allowed_hosts):
    context = browser.new_context(viewport={"width": 900, "height": 700})
    context.set_default_timeout(TIMEOUT_MS)

    def guard(route):
        host = urlsplit(route.request.url).netloc
        if host in allowed_hosts:
            route.continue_()
        else:
            route.fulfill(status=200, content_type="text/html", body="<h1>left the site</h1>")

    context.route("**/*", guard)
    context.on(
        "request",
        lambda r: urlsplit(r.url).netloc not in allowed_hosts and LEFT_THE_SITE.append(r.url),
    )
    return context


def session_cookies(context):
    return [c for c in context.cookies() if c["name"] == COOKIE]


def sign_in(page, user=None, password=None):
    """Fills the login page the browser is on and submits it."""
    page.get_by_label("User").fill(user or E["USER"])
    page.get_by_label("Password").fill(password or E["PASSWORD"])
    with page.expect_navigation():
        page.get_by_role("button", name="Sign in").click()


def login_url(return_path):
    return f"{GW}/login?return={return_path}"


def sessiongate(method, path, key):
    req = urllib.request.Request(E["SESSIONGATE_URL"].rstrip("/") + path, method=method)
    req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            return res.status, json.loads(res.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


class OtherSite:
    """Another origin on this machine, with a page whose button posts a form
    to the gateway's /orders: a cross-origin (same-site: the same host,
    another port) and, reached as localhost, a cross-site attacker."""

    def __init__(self):
        target = f"{GW}/orders"

        class Page(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = (
                    "<!doctype html><title>another site</title><h1>another site</h1>"
                    f'<form method="post" action="{target}">'
                    '<input type="hidden" name="item" value="666">'
                    "<button>Claim your prize</button></form>"
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def flows(browser):
    other = OtherSite()
    allowed = {GW_HOST, f"127.0.0.1:{other.port}", f"localhost:{other.port}"}
    print(f"OTHER_ORIGINS http://127.0.0.1:{other.port} http://localhost:{other.port}", flush=True)

    # 1. A page load without a session goes to the login page, which is
    # public, with its stylesheet; the return path is the original URL.
    ctx = new_context(browser, allowed)
    page = ctx.new_page()
    page.goto(f"{GW}/orders?page=2&sort=asc")
    expect(page).to_have_url(login_url("/orders?page=2&sort=asc"))
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    rules = page.evaluate("document.styleSheets.length && document.styleSheets[0].cssRules.length")
    assert rules > 0, "the public stylesheet did not load"
    shot(page, "01-login-page.png")
    ok("a page load without a session goes to the login page")

    # An API-style request (no text/html in Accept) still gets JSON 401.
    res = page.request.get(f"{GW}/orders", headers={"Accept": "application/json"})
    assert res.status == 401, res.status
    assert res.json()["error"] == "invalid_token", res.text()
    ok("an API request gets the JSON 401")

    # 2. A wrong password: refused, no cookie.
    sign_in(page, password="not-the-password")
    expect(page.get_by_role("alert")).to_contain_text("Wrong user or password")
    assert not session_cookies(ctx), ctx.cookies()
    shot(page, "02-wrong-password.png")
    ok("wrong password refused")

    # 3. Sign in: back to the original URL, with the identity the gateway
    # passed on; the cookie is __Host-, Secure, HttpOnly, SameSite=Lax, Path=/.
    sign_in(page)
    expect(page).to_have_url(f"{GW}/orders?page=2&sort=asc")
    expect(page.locator("#user")).to_have_text(E["USER"])
    [cookie] = session_cookies(ctx)
    assert cookie["name"].startswith("__Host-"), cookie
    assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Lax", cookie
    assert cookie["path"] == "/" and cookie["domain"] == "127.0.0.1", cookie
    assert COOKIE not in page.evaluate("document.cookie")
    shot(page, "03-signed-in.png")
    ok("signed in and sent back to the original page")

    # 4. Browse: links, a fresh-password page, a same-origin form post.
    with page.expect_navigation():
        page.get_by_role("link", name="Account").click()
    expect(page.locator("#path")).to_have_text("/account/settings")
    with page.expect_navigation():
        page.get_by_role("link", name="Home").click()
    expect(page.locator("#path")).to_have_text("/")
    with page.expect_navigation():
        page.get_by_role("button", name="Place an order").click()
    expect(page.get_by_role("heading", name="Order placed")).to_be_visible()
    shot(page, "04-browsing.png")
    ok("browsed, and a same-origin form post passed")

    # 5. Sign out: the cookie is cleared; the kept copy is refused
    # ("un-deleting"), for a page load and for an API request.
    kept = dict(cookie)
    page.goto(f"{GW}/")
    with page.expect_navigation():
        page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(f"{GW}/login?signed_out=1")
    expect(page.get_by_role("status")).to_contain_text("signed out")
    assert not session_cookies(ctx), ctx.cookies()
    shot(page, "05-signed-out.png")
    ok("signed out")

    ctx.add_cookies([{k: kept[k] for k in ("name", "value", "domain", "path", "secure", "httpOnly", "sameSite")}])
    assert session_cookies(ctx), "the kept cookie is back"
    page.goto(f"{GW}/orders")
    expect(page).to_have_url(login_url("/orders"))
    res = page.request.get(f"{GW}/orders", headers={"Accept": "application/json"})
    assert res.status == 401, res.status
    shot(page, "06-kept-cookie-refused.png")
    ctx.close()
    ok("the kept cookie is refused after sign-out")

    # 6. Two devices: the phone signs the laptop out.
    laptop_ctx, phone_ctx = new_context(browser, allowed), new_context(browser, allowed)
    laptop, phone = laptop_ctx.new_page(), phone_ctx.new_page()
    for p in (laptop, phone):
        p.goto(f"{GW}/")
        expect(p).to_have_url(login_url("/"))
        sign_in(p)
        expect(p).to_have_url(f"{GW}/")
    laptop_sid = laptop.locator("#session").inner_text()
    phone.reload()
    other_device = phone.locator(f'li[data-session="{laptop_sid}"]')
    expect(other_device).to_be_visible()
    shot(phone, "07-two-devices.png")
    with phone.expect_navigation():
        other_device.get_by_role("button", name="Sign that device out").click()
    expect(phone.locator(f'li[data-session="{laptop_sid}"]')).to_have_count(0)
    with laptop.expect_navigation():
        laptop.get_by_role("link", name="Orders").click()
    expect(laptop).to_have_url(login_url("/orders"))
    shot(laptop, "08-signed-out-by-the-other-device.png")
    phone.reload()
    expect(phone.locator("#user")).to_have_text(E["USER"])
    laptop_ctx.close()
    ok("one device signed the other out")

    # 7. Another origin posts a form to /orders with the cookie: refused by
    # sessiongate's CSRF rule (403) before the app. From another site
    # (localhost), SameSite=Lax leaves the cookie off: 401.
    for host, status in ((f"127.0.0.1:{other.port}", 403), (f"localhost:{other.port}", 401)):
        phone.goto(f"http://{host}/")
        with phone.expect_response(lambda r: r.url == f"{GW}/orders" and r.request.method == "POST") as info:
            phone.get_by_role("button", name="Claim your prize").click()
        res = info.value
        assert res.status == status, (host, res.status)
        expected = "forbidden" if status == 403 else "invalid_token"
        assert res.json()["error"] == expected, res.text()
        sent = res.request.all_headers().get("cookie", "")
        assert (f"{COOKIE}=" in sent) == (status == 403), (host, sent and "a cookie")
        if status == 403:
            expect(phone.locator("body")).to_contain_text("forbidden")
            shot(phone, "09-cross-origin-post-refused.png")
    phone.goto(f"{GW}/")
    expect(phone.locator("#user")).to_have_text(E["USER"])
    ok("cross-origin form posts refused before the app")

    # 8. An operator signs the user out everywhere (admin API): the next page
    # load goes to the login page.
    status, body = sessiongate("DELETE", f"/v1/admin/users/{E['USER']}/sessions", E["ADMIN_KEY"])
    assert status == 200 and body["revoked"] >= 1, (status, body)
    with phone.expect_navigation():
        phone.get_by_role("link", name="Orders").click()
    expect(phone).to_have_url(login_url("/orders"))
    shot(phone, "10-forced-logout.png")
    phone_ctx.close()
    ok("a forced logout ends the browser's session on its next page")

    # 9. Open redirects: a return path that leads off the site, in any
    # spelling, lands on / after sign-in; a path on the site is kept exactly.
    ctx = new_context(browser, allowed)
    page = ctx.new_page()
    attempts = [
        "//evil.example/x",
        "/\\evil.example/x",
        "https://evil.example/x",
        "http:evil.example",
        "javascript:alert(1)",
        "%2F%2Fevil.example/x",
        "/%2F/evil.example/x",
        "/%2F%2Fevil.example",
        "/%5Cevil.example",
        "/%09/evil.example",
        "/%252F%252Fevil.example",
        "%0A//evil.example",
    ]
    for attempt in attempts:
        try:
            page.goto(login_url(attempt))
            sign_in(page)
            expect(page).to_have_url(f"{GW}/")
            expect(page.locator("#path")).to_have_text("/")
        except Exception as e:
            raise AssertionError(f"return={attempt!r}: left for {LEFT_THE_SITE}: {e}") from e
    # Through the gateway itself: it passes `//evil.example/x` on as it came.
    page.context.clear_cookies()
    page.goto(f"{GW}//evil.example/x")
    expect(page).to_have_url(login_url("//evil.example/x"))
    sign_in(page)
    expect(page).to_have_url(f"{GW}/")
    shot(page, "11-open-redirect-refused.png")
    page.context.clear_cookies()
    page.goto(f"{GW}/orders/7?a=1&b=%2F&c=d")
    expect(page).to_have_url(login_url("/orders/7?a=1&b=%2F&c=d"))
    sign_in(page)
    expect(page).to_have_url(f"{GW}/orders/7?a=1&b=%2F&c=d")
    assert not LEFT_THE_SITE, LEFT_THE_SITE
    ctx.close()
    ok("return paths off the site are refused")


def outage(browser):
    # Redis is down: a page load with a session cookie gets the gateway's
    # "try again" page (503); an API request gets JSON 503; signing in gets
    # the app's own "try again" page.
    ctx = new_context(browser, {GW_HOST})
    ctx.add_cookies([{"name": COOKIE, "value": E["OUTAGE_TOKEN"], "domain": "127.0.0.1",
                      "path": "/", "secure": True, "httpOnly": True, "sameSite": "Lax"}])
    page = ctx.new_page()
    res = page.goto(f"{GW}/orders")
    assert res.status == 503, res.status
    assert res.headers["content-type"].startswith("text/html"), res.headers
    expect(page.get_by_role("heading", name="Try again")).to_be_visible()
    shot(page, "12-try-again.png")
    res = page.request.get(f"{GW}/orders", headers={"Accept": "application/json"})
    assert res.status == 503, res.status
    assert res.json()["error"] == "store_unavailable", res.text()
    ctx.clear_cookies()
    page.goto(f"{GW}/login")
    page.get_by_label("User").fill(E["USER"])
    page.get_by_label("Password").fill(E["PASSWORD"])
    with page.expect_response(f"{GW}/login") as info:
        page.get_by_role("button", name="Sign in").click()
    assert info.value.status == 503, info.value.status
    expect(page.get_by_role("heading", name="Try again")).to_be_visible()
    assert not session_cookies(ctx), ctx.cookies()
    ctx.close()
    ok("with Redis down, page loads get a try-again page")


def main():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=E["CHROMIUM"], args=ARGS, headless=True)
        {"flows": flows, "outage": outage}[E["PHASE"]](browser)
        browser.close()


if __name__ == "__main__":
    sys.exit(main())
