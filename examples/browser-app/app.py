"""A tiny web app behind a gateway checked by sessiongate, with its login backend.

The example of README "Browser apps: the login flow" and the app that the
browser tests (tests/api/gateway/browser.rs) put behind the shipped nginx and
Caddy configurations. Python's standard library only; not production code
(users come from an environment variable, pages are inline strings).

Routes (the gateway makes the first three public, the rest it checks):
  GET  /login?return=PATH   the sign-in form
  POST /login               checks the password, creates the session
                            (POST /v1/sessions with the issuer key), sets the
                            cookie, and goes to PATH when it is a path on this
                            site (else to /)
  POST /logout              ends the session (DELETE /v1/sessions/current) and
                            clears the cookie
  GET  /static/app.css      the stylesheet
  POST /devices/sign-out    signs one of the user's other devices out
                            (DELETE /v1/sessions/{id})
  anything else             a page showing the identity the gateway passed on
                            (X-Session-User, -Id, -Device) and the user's devices

Settings (environment):
  LISTEN           host:port to serve on (default 127.0.0.1:3000; port 0 picks one)
  SESSIONGATE_URL  sessiongate on the private network (default http://127.0.0.1:8080)
  ISSUER_KEY       an issuer key of that sessiongate (required)
  COOKIE_NAME      the cookie, = SESSIONGATE_COOKIE_NAME (default __Host-session)
  USERS            user:password pairs, comma-separated (default alice:alice-password)
  SEEN_LOG         if set, a file that gets one JSON line per request served

Prints `listening on HOST:PORT` once it accepts connections.
"""

import hmac
import html
import http.cookies
import http.server
import json
import os
import re
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

E = os.environ
SESSIONGATE = E.get("SESSIONGATE_URL", "http://127.0.0.1:8080").rstrip("/")
ISSUER_KEY = E["ISSUER_KEY"]
COOKIE = E.get("COOKIE_NAME", "__Host-session")
DEVICE_COOKIE = "__Host-device"
USERS = dict(
    pair.split(":", 1) for pair in E.get("USERS", "alice:alice-password").split(",") if pair
)
SEEN_LOG = E.get("SEEN_LOG")

# `__Host-` cookies must be Secure, Path=/ and without Domain; browsers accept
# Secure cookies from https sites and from http://localhost / 127.0.0.1.
COOKIE_ATTRIBUTES = "Path=/; Secure; HttpOnly; SameSite=Lax"


def safe_return(value):
    """The path to go to after sign-in: `value` if it is a path on this site,
    else "/". Never an open redirect: `//evil`, `/\\evil`, `https://evil`,
    `javascript:…` and their %-encoded forms (`/%2F/evil`, `%2F%2Fevil`,
    `/%5Cevil`, `/%09/evil`) are refused. The gateway does not vet what it
    puts after `return=`, so this is the only check."""
    if not value or len(value) > 2048 or not re.fullmatch(r"/[!-~]*", value) or "\\" in value:
        return "/"
    decoded = value
    for _ in range(3):  # the raw form and up to two rounds of %-decoding
        # Browsers drop tabs and newlines inside URLs ("/\t/evil" is "//evil").
        bare = re.sub(r"[\t\n\r]", "", decoded)
        if not bare.startswith("/") or bare.startswith("//") or bare.startswith("/\\"):
            return "/"
        decoded = urllib.parse.unquote(decoded)
    parts = urllib.parse.urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/"
    return value


def page(title, body, status_line=""):
    status = f'<p role="status">{html.escape(status_line)}</p>' if status_line else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{html.escape(title)}</title><link rel="stylesheet" href="/static/app.css">'
        f"</head><body><main>{status}{body}</main></body></html>"
    )


CSS = b"""body{font:16px/1.5 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d1f23}
main{max-width:40rem;margin:2rem auto;padding:1.5rem;background:#fff;border-radius:8px}
label{display:block;margin:.75rem 0 .25rem}input{font:inherit;padding:.4rem;width:100%;box-sizing:border-box}
button{font:inherit;margin-top:1rem;padding:.4rem 1rem}nav a{margin-right:1rem}
[role=alert]{color:#a40000}[role=status]{color:#0b6b2e}li{margin:.5rem 0}code{font-size:.9em}
"""


def call(method, path, token, body=None):
    """sessiongate's answer: (status, JSON or None). Raises OSError when it
    cannot be reached."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(SESSIONGATE + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            raw = res.read()
            return res.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, None


class App(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "example-app"

    # --- plumbing ---------------------------------------------------------------

    def log_message(self, *args):
        pass

    def seen(self):
        if SEEN_LOG:
            line = {
                "method": self.command,
                "path": self.path,
                "user": self.headers.get("X-Session-User"),
                "origin": self.headers.get("Origin"),
            }
            with open(SEEN_LOG, "a") as f:
                f.write(json.dumps(line) + "\n")

    def cookie(self, name):
        jar = http.cookies.SimpleCookie()
        try:
            jar.load(self.headers.get("Cookie", ""))
        except http.cookies.CookieError:
            return None
        return jar[name].value if name in jar else None

    def send(self, status, body, content_type="text/html; charset=utf-8", headers=()):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "same-origin")
        self.send_header(
            "Content-Security-Policy",
            "default-src 'none'; style-src 'self'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'",
        )
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def see_other(self, location, cookies=()):
        self.send(303, "", headers=[("Location", location)] + [("Set-Cookie", c) for c in cookies])

    def form(self):
        length = int(self.headers.get("Content-Length") or 0)
        fields = urllib.parse.parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
        return {k: v[0] for k, v in fields.items()}

    def same_origin(self):
        """The public routes' POSTs are not checked by sessiongate: the
        browser's Origin must be this site (as the gateway describes it)."""
        host = self.headers.get("X-Forwarded-Host") or self.headers.get("Host", "")
        proto = self.headers.get("X-Forwarded-Proto", "http")
        return self.headers.get("Origin") == f"{proto}://{host}"

    def unavailable(self):
        self.send(503, page("Try again", "<h1>Try again in a moment</h1>"
                            "<p>Sign-in is unavailable right now.</p>"),
                  headers=[("Retry-After", "1")])

    # --- routes -----------------------------------------------------------------

    def do_GET(self):
        self.seen()
        path, _, query = self.path.partition("?")
        if path == "/static/app.css":
            return self.send(200, CSS, "text/css; charset=utf-8")
        if path == "/login":
            # The gateway appends the request URI as it came, not %-encoded:
            # everything after `return=` is the return path.
            back = query[len("return="):] if query.startswith("return=") else "/"
            note = "You are signed out." if query == "signed_out=1" else ""
            return self.login_form(back, status_line=note)
        return self.app_page(path)

    def do_POST(self):
        self.seen()
        path = self.path.partition("?")[0]
        if path in ("/login", "/logout") and not self.same_origin():
            return self.send(403, page("Refused", "<h1>Refused</h1><p role=alert>"
                                       "That form was not sent from this site.</p>"))
        if path == "/login":
            return self.sign_in(self.form())
        if path == "/logout":
            return self.sign_out()
        if path == "/devices/sign-out":
            return self.sign_out_device(self.form())
        self.form()  # read (and here ignore) the body: the connection is kept alive
        return self.app_page(path, posted=True)

    def login_form(self, back, error="", status_line="", status=200, user=""):
        alert = f'<p role="alert">{html.escape(error)}</p>' if error else ""
        body = (
            f"<h1>Sign in</h1>{alert}"
            '<form method="post" action="/login">'
            '<label for="user">User</label>'
            f'<input id="user" name="user" value="{html.escape(user)}" autocomplete="username">'
            '<label for="password">Password</label>'
            '<input id="password" name="password" type="password" autocomplete="current-password">'
            f'<input type="hidden" name="return" value="{html.escape(back)}">'
            "<button>Sign in</button></form>"
        )
        self.send(status, page("Sign in", body, status_line))

    def sign_in(self, f):
        user, password, back = f.get("user", ""), f.get("password", ""), f.get("return", "/")
        known = USERS.get(user)
        # Compare in constant time, also for an unknown user.
        good = hmac.compare_digest((known or secrets.token_hex(16)).encode(), password.encode())
        if not (known and good):
            return self.login_form(back, error="Wrong user or password.", status=401, user=user)
        device = self.cookie(DEVICE_COOKIE) or secrets.token_urlsafe(16)
        body = {
            "user_id": user,
            "device_id": device,
            "metadata": {"user_agent": self.headers.get("User-Agent", "")[:256]},
        }
        try:
            status, created = call("POST", "/v1/sessions", ISSUER_KEY, body)
        except OSError:
            return self.unavailable()
        if status != 201:
            return self.unavailable()
        max_age = max(0, created["expires_at"] - int(time.time()))
        self.see_other(
            safe_return(back),
            [
                f"{COOKIE}={created['token']}; {COOKIE_ATTRIBUTES}; Max-Age={max_age}",
                f"{DEVICE_COOKIE}={device}; {COOKIE_ATTRIBUTES}; Max-Age=31536000",
            ],
        )

    def sign_out(self):
        token = self.cookie(COOKIE)
        if token:
            try:
                status, _ = call("DELETE", "/v1/sessions/current", token)
            except OSError:
                status = 503
            # 401: the session was already over. Anything else but 204: keep
            # the cookie and say so, rather than pretend the session ended.
            if status not in (204, 401):
                return self.unavailable()
        self.see_other("/login?signed_out=1", [f"{COOKIE}=; {COOKIE_ATTRIBUTES}; Max-Age=0"])

    def sign_out_device(self, f):
        # Reached only through the gateway's check (and its CSRF rule).
        token, sid = self.cookie(COOKIE), f.get("session_id", "")
        if not self.headers.get("X-Session-User") or not token or not re.fullmatch(r"[A-Za-z0-9_-]+", sid):
            return self.send(400, page("Bad request", "<h1>Bad request</h1>"))
        try:
            call("DELETE", f"/v1/sessions/{sid}", token)
        except OSError:
            return self.unavailable()
        self.see_other("/")

    def app_page(self, path, posted=False):
        user = self.headers.get("X-Session-User")
        if not user:
            # Only the gateway's check sets it: fail closed if it is missing.
            return self.send(500, page("No identity", "<h1>No identity from the gateway</h1>"))
        sid = self.headers.get("X-Session-Id", "")
        devices = ""
        try:
            status, listed = call("GET", "/v1/sessions", self.cookie(COOKIE) or "")
        except OSError:
            status, listed = 503, None
        if status == 200:
            items = []
            for s in listed["sessions"]:
                if s["current"]:
                    items.append(f'<li data-session="{html.escape(s["session_id"])}">this device</li>')
                else:
                    items.append(
                        f'<li data-session="{html.escape(s["session_id"])}">another device '
                        f'<code>{html.escape(s["device_id"])}</code>'
                        '<form method="post" action="/devices/sign-out">'
                        f'<input type="hidden" name="session_id" value="{html.escape(s["session_id"])}">'
                        "<button>Sign that device out</button></form></li>"
                    )
            devices = f"<h2>Your devices</h2><ul>{''.join(items)}</ul>"
        body = (
            '<nav><a href="/">Home</a><a href="/orders">Orders</a>'
            '<a href="/account/settings">Account</a></nav>'
            f"<h1>{'Order placed' if posted else 'Hello, ' + html.escape(user)}</h1>"
            f'<p>Signed in as <b id="user">{html.escape(user)}</b> on device '
            f'<code id="device">{html.escape(self.headers.get("X-Session-Device", ""))}</code>, '
            f'session <code id="session">{html.escape(sid)}</code>.</p>'
            f'<p>Page <code id="path">{html.escape(path)}</code></p>'
            f"{devices}"
            '<form method="post" action="/orders"><input type="hidden" name="item" value="42">'
            "<button>Place an order</button></form>"
            '<form method="post" action="/logout"><button>Sign out</button></form>'
        )
        self.send(200, page(path, body))


def main():
    host, _, port = E.get("LISTEN", "127.0.0.1:3000").rpartition(":")
    server = http.server.ThreadingHTTPServer((host, int(port)), App)
    server.daemon_threads = True
    print(f"listening on {server.server_address[0]}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
