"""Asks sessiongate's gRPC ext_authz listener with a client sessiongate did
not write: Python's grpcio and the Envoy stubs the gRPC project publishes
(xds-protos on PyPI). Run by tests/api/grpc.rs:

    python tests/grpc/check.py HOST:PORT
    env: LIVE_TOKEN, LIVE_SESSION (a live session), GONE_TOKEN (logged out)

Exits non-zero on the first answer that is not what /v1/verify would say.
"""

import json
import os
import sys

import grpc
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc

OK, PERMISSION_DENIED, UNAUTHENTICATED = 0, 7, 16


def check(stub, method="GET", headers=None, host="app.example", path="/"):
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method=method, host=host, scheme="https", path=path, protocol="HTTP/1.1",
        headers=headers or {},
    )
    request = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )
    # Envoy's default ext_authz timeout is 200 ms; a loaded test machine
    # gets more, the behaviour checked is the same.
    return stub.Check(request, timeout=10)


def headers_of(options):
    return {o.header.key.lower(): o.header.value for o in options}


def expect(what, cond, detail):
    if not cond:
        print(f"check.py: FAILED {what}: {detail}")
        sys.exit(1)
    print(f"check.py: ok {what}")


def main():
    target = sys.argv[1]
    live, session, gone = (os.environ[k] for k in ("LIVE_TOKEN", "LIVE_SESSION", "GONE_TOKEN"))
    with grpc.insecure_channel(target) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)

        res = check(stub, headers={"authorization": f"Bearer {live}", "x-session-role": "admin"})
        set_ = headers_of(res.ok_response.headers)
        expect(
            "a live session is OK with its identity",
            res.status.code == OK
            and res.HasField("ok_response")
            and set_.get("x-session-user") == "alice"
            and set_.get("x-session-id") == session
            and set_.get("x-session-device") == "laptop"
            and "x-session-role" in res.ok_response.headers_to_remove,
            res,
        )

        res = check(stub, headers={"authorization": f"Bearer {gone}"})
        denied = res.denied_response
        body = json.loads(denied.body) if denied.body else {}
        got = headers_of(denied.headers)
        expect(
            "a logged-out session is 401 invalid_token",
            res.status.code == UNAUTHENTICATED
            and denied.status.code == 401
            and got.get("www-authenticate") == 'Bearer error="invalid_token"'
            and body.get("error") == "invalid_token",
            res,
        )

        res = check(
            stub,
            method="POST",
            headers={"cookie": f"theme=dark; session={live}", "origin": "https://evil.example"},
        )
        body = json.loads(res.denied_response.body or "{}")
        expect(
            "a cross-site cookie POST is 403 forbidden",
            res.status.code == PERMISSION_DENIED
            and res.denied_response.status.code == 403
            and body.get("error") == "forbidden",
            res,
        )
    print("check.py: 3 checks passed")


if __name__ == "__main__":
    main()
