#!/usr/bin/env python3
"""A sessiongate webhook receiver: checks the Standard Webhooks signature and
the timestamp, deduplicates by webhook-id, handles each event once.
Usage: WEBHOOK_SECRET=whsec_... python3 webhook_receiver.py 9000"""
import base64, hashlib, hmac, json, os, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer

SECRET = os.environ["WEBHOOK_SECRET"]
KEY = base64.b64decode(SECRET[6:]) if SECRET.startswith("whsec_") else SECRET.encode()
TOLERANCE = 300  # seconds: an older (replayed) or future timestamp is refused
seen = set()  # ids handled; in production a store with expiry

class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        msg_id, ts = self.headers.get("webhook-id", ""), self.headers.get("webhook-timestamp", "")
        if not ts.isdigit() or abs(time.time() - int(ts)) > TOLERANCE:
            return self.answer(400, b"stale or missing timestamp")
        mac = hmac.new(KEY, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
        expected = "v1," + base64.b64encode(mac).decode()
        signatures = self.headers.get("webhook-signature", "").split()
        if not any(hmac.compare_digest(expected, s) for s in signatures):
            return self.answer(400, b"bad signature")
        if msg_id not in seen:  # delivery is at least once: dedupe by id
            seen.add(msg_id)
            print(json.dumps(json.loads(body)), flush=True)  # handle the event here
        self.answer(200, b"ok")

    def answer(self, status, text):
        self.send_response(status)
        self.send_header("content-length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(sys.argv[1])), Receiver).serve_forever()
