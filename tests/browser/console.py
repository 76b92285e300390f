"""The admin console in a real browser: Debian's headless Chromium driven by
Playwright (never its own downloaded browser).

Run by tests/api/console.rs (`browser_*` test), which starts sessiongate and
its Redis, creates the sessions named below, and passes everything through
the environment:

  CONSOLE_URL       http://127.0.0.1:PORT (sessiongate)
  ADMIN_KEY         a configured admin key
  CHROMIUM          the browser binary (/usr/bin/chromium)
  ARTIFACTS         directory for the screenshots
  USER_ID           a user with two sessions: VICTIM (revoked on its own)
                    and KEPT (ended by the logout-all)
  VICTIM_SID, VICTIM_TOKEN, KEPT_SID, KEPT_TOKEN
  NOJS_USER, NOJS_TOKEN   a user signed out everywhere with JavaScript off

Prints one `OK <step>` line per step; exits non-zero at the first failure.
"""

import os
import re
import sys

from playwright.sync_api import expect, sync_playwright

E = os.environ
BASE = E["CONSOLE_URL"].rstrip("/")
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
]
TIMEOUT_MS = 20_000
expect.set_options(timeout=TIMEOUT_MS)


def ok(step):
    print(f"OK {step}", flush=True)


def shot(page, name, full=True):
    path = os.path.join(ART, name)
    page.screenshot(path=path, full_page=full)
    print(f"SCREENSHOT {path}", flush=True)


def verify_status(page, token):
    res = page.request.get(f"{BASE}/v1/verify", headers={"Authorization": f"Bearer {token}"})
    return res.status


def console_cookie(context):
    return [c for c in context.cookies() if c["name"] == "sessiongate_console"]


def sign_in(page, key):
    page.goto(f"{BASE}/admin/")
    expect(page).to_have_url(f"{BASE}/admin/login")
    page.get_by_label("Admin key").fill(key)
    with page.expect_navigation():
        page.get_by_role("button", name="Sign in").click()


def main():
    problems = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=E["CHROMIUM"], args=ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1100, "height": 800})
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        # Anything the CSP blocked, or any script error, fails the run.
        # (Failed loads are the refusals the steps ask for, not problems.)
        page.on(
            "console",
            lambda m: m.type == "error"
            and not m.text.startswith("Failed to load resource")
            and problems.append(m.text),
        )
        page.on("pageerror", lambda e: problems.append(str(e)))

        # 1. Sign-in page, then a wrong key: refused, no console cookie.
        page.goto(f"{BASE}/admin/")
        expect(page).to_have_url(f"{BASE}/admin/login")
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        shot(page, "01-sign-in.png")
        page.get_by_label("Admin key").fill("not-the-admin-key-0123456789abcdef0123")
        with page.expect_response(f"{BASE}/admin/login") as info:
            page.get_by_role("button", name="Sign in").click()
        assert info.value.status == 401, info.value.status
        expect(page.get_by_role("alert")).to_contain_text("not an admin key")
        assert not console_cookie(context), context.cookies()
        shot(page, "02-wrong-key-refused.png")
        ok("wrong admin key refused")

        # 2. The right key: a HttpOnly, SameSite=Strict cookie scoped to /admin.
        page.get_by_label("Admin key").fill(E["ADMIN_KEY"])
        with page.expect_navigation():
            page.get_by_role("button", name="Sign in").click()
        expect(page).to_have_url(f"{BASE}/admin/")
        expect(page.get_by_role("heading", name="Overview")).to_be_visible()
        [cookie] = console_cookie(context)
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict", cookie
        assert cookie["path"] == "/admin", cookie
        assert E["ADMIN_KEY"] not in str(context.cookies())
        assert "sessiongate_console" not in page.evaluate("document.cookie")
        storage = page.evaluate("JSON.stringify(localStorage) + JSON.stringify(sessionStorage)")
        assert E["ADMIN_KEY"] not in storage
        ok("signed in")

        # 3. Live counters: the vendored script refreshes them (under the CSP).
        counters = page.locator("#counters")
        expect(counters).to_have_attribute("data-updated-ms", re.compile(r"^\d+$"))
        first = counters.get_attribute("data-updated-ms")
        for _ in range(3):
            assert verify_status(page, E["KEPT_TOKEN"]) == 200
        page.wait_for_function(
            "(first) => document.getElementById('counters').dataset.updatedMs !== first", arg=first
        )
        expect(page.locator('[data-counter="verify_ok"]')).not_to_have_text("0.0")
        expect(page.locator('[data-counter="redis"]')).to_have_text("ready")
        expect(page.locator('[data-counter="updated"]')).to_contain_text("Live: updated")
        shot(page, "03-overview-live-counters.png")
        ok("counters update without a reload")

        # 4. Find the user: both sessions, with device, IP and user agent.
        page.get_by_label("Find a user").fill(E["USER_ID"])
        with page.expect_navigation():
            page.get_by_role("button", name="Show sessions").click()
        victim = page.locator(f'li[data-session="{E["VICTIM_SID"]}"]')
        kept = page.locator(f'li[data-session="{E["KEPT_SID"]}"]')
        expect(victim).to_be_visible()
        expect(kept).to_be_visible()
        expect(victim).to_contain_text("198.51.100.23")
        expect(victim).to_contain_text("Mobile Safari")
        shot(page, "04-user-sessions.png")
        ok("found the user")

        # 5. Sign out the victim's device: its token is refused by /v1/verify.
        assert verify_status(page, E["VICTIM_TOKEN"]) == 200
        with page.expect_navigation():
            victim.get_by_role("button", name="Sign out this device").click()
        expect(page.get_by_role("status")).to_contain_text("1 session revoked")
        expect(victim).to_have_count(0)
        expect(kept).to_be_visible()
        status = verify_status(page, E["VICTIM_TOKEN"])
        assert status == 401, status
        assert verify_status(page, E["KEPT_TOKEN"]) == 200
        shot(page, "05-device-signed-out.png")
        ok("revoked a device; its token is refused")

        # 6. A session's detail page.
        with page.expect_navigation():
            kept.get_by_role("link", name="Details").click()
        expect(page.get_by_role("heading", name="History")).to_be_visible()
        expect(page.get_by_text("History not available")).to_be_visible()
        shot(page, "06-session-detail.png")
        ok("session detail")

        # 7. A form with its CSRF token removed is refused (403), nothing done.
        page.goto(f"{BASE}/admin/keys")
        kid = page.locator("[data-kid]").inner_text()
        page.evaluate(
            "document.querySelector('form[action=\"/admin/keys/rotate\"] input[name=csrf]').remove()"
        )
        with page.expect_response(f"{BASE}/admin/keys/rotate") as info:
            page.get_by_role("button", name="Rotate the signing key").click()
        assert info.value.status == 403, info.value.status
        expect(page.get_by_role("alert")).to_contain_text("CSRF")
        shot(page, "07-missing-csrf-refused.png")
        page.goto(f"{BASE}/admin/keys")
        expect(page.locator("[data-kid]")).to_have_text(kid)
        ok("missing CSRF token refused")

        # 8. Key rotation through the form.
        with page.expect_navigation():
            page.get_by_role("button", name="Rotate the signing key").click()
        expect(page.get_by_role("status")).to_contain_text("rotated")
        expect(page.locator("[data-kid]")).not_to_have_text(kid)
        shot(page, "08-key-rotated.png")
        ok("rotated the signing key")

        # 9. Without JavaScript: sign in and sign a user out everywhere (before
        # the logout-all, which would end that session too).
        nojs = browser.new_context(java_script_enabled=False)
        nojs.set_default_timeout(TIMEOUT_MS)
        plain = nojs.new_page()
        sign_in(plain, E["ADMIN_KEY"])
        expect(plain.get_by_role("heading", name="Overview")).to_be_visible()
        plain.get_by_label("Find a user").fill(E["NOJS_USER"])
        with plain.expect_navigation():
            plain.get_by_role("button", name="Show sessions").click()
        with plain.expect_navigation():
            plain.get_by_role("button", name="Sign out everywhere", exact=True).click()
        expect(plain.get_by_role("status")).to_contain_text("1 session revoked")
        expect(plain.get_by_text("No live sessions for this user.")).to_be_visible()
        status = verify_status(plain, E["NOJS_TOKEN"])
        assert status == 401, status
        shot(plain, "12-no-javascript-signed-out-everywhere.png")
        ok("works without JavaScript")
        nojs.close()


        # 10. Logout-all: a wrong phrase does nothing; the phrase logs out everyone.
        with page.expect_navigation():
            page.get_by_role("navigation").get_by_role("link", name="Log out everyone").click()
        page.get_by_label("to confirm").fill("yes")
        with page.expect_response(f"{BASE}/admin/logout-all") as info:
            page.get_by_role("button", name="Log out everyone").click()
        assert info.value.status == 400, info.value.status
        expect(page.get_by_role("alert")).to_contain_text("Nothing was done")
        assert verify_status(page, E["KEPT_TOKEN"]) == 200
        shot(page, "09-logout-all-confirmation.png")
        page.get_by_label("to confirm").fill("log out everyone")
        with page.expect_navigation():
            page.get_by_role("button", name="Log out everyone").click()
        expect(page).to_have_url(f"{BASE}/admin/?done=logout_all")
        expect(page.get_by_role("status")).to_contain_text("Everyone was logged out")
        status = verify_status(page, E["KEPT_TOKEN"])
        assert status == 401, status
        shot(page, "10-everyone-logged-out.png")
        ok("logout-all through the confirmation")

        # 11. Readable on a phone: no sideways scrolling.
        page.set_viewport_size({"width": 390, "height": 844})
        page.goto(f"{BASE}/admin/users?user_id={E['USER_ID']}")
        wide = page.evaluate("document.documentElement.scrollWidth > window.innerWidth")
        assert not wide, "the page scrolls sideways on a phone"
        page.goto(f"{BASE}/admin/")
        shot(page, "11-phone-overview.png")
        ok("fits a phone screen")

        # 12. Sign out: back to the sign-in page, the cookie gone.
        with page.expect_navigation():
            page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_role("status")).to_contain_text("signed out")
        assert not console_cookie(context), context.cookies()
        page.goto(f"{BASE}/admin/")
        expect(page).to_have_url(f"{BASE}/admin/login")
        ok("signed out")

        browser.close()
    if problems:
        print("PROBLEMS " + " | ".join(problems), flush=True)
        sys.exit(1)
    ok("no console errors or CSP violations")


if __name__ == "__main__":
    main()
