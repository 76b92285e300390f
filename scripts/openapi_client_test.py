"""scripts/openapi_client_test.py: a session's life through a Python client
generated from sessiongate's /openapi.json (see scripts/openapi-check).

Create a session with the issuer key (201), verify its token (200, identity
headers), log it out (204), verify again (401 invalid_token). Uses only the
generated client's typed functions, so a document that names an operation,
a parameter or a body wrongly fails here. Environment: SG_BASE (the
service), SG_ISSUER_KEY; PYTHONPATH holds the generated sessiongate_client.
"""

import os
import sys

from sessiongate_client import AuthenticatedClient
from sessiongate_client.api.sessions import create, logout
from sessiongate_client.api.verify import verify_get
from sessiongate_client.models import CreatedBody, CreateSessionBody, ErrorBody


def check(condition, message):
    if not condition:
        print(f"openapi client test: FAILED: {message}", file=sys.stderr)
        sys.exit(1)


def main():
    base = os.environ["SG_BASE"]
    issuer = AuthenticatedClient(base_url=base, token=os.environ["SG_ISSUER_KEY"])

    res = create.sync_detailed(
        client=issuer, body=CreateSessionBody(user_id="openapi-client", device_id="laptop")
    )
    check(res.status_code == 201, f"create: {res.status_code} {res.content!r}")
    created = res.parsed
    check(isinstance(created, CreatedBody), f"create: parsed as {type(created).__name__}")
    check(created.user_id == "openapi-client", f"create: user_id {created.user_id!r}")
    check(created.device_id == "laptop", f"create: device_id {created.device_id!r}")

    holder = AuthenticatedClient(base_url=base, token=created.token)
    res = verify_get.sync_detailed(client=holder)
    check(res.status_code == 200, f"verify: {res.status_code} {res.content!r}")
    check(res.headers.get("x-session-user") == "openapi-client", f"verify: {res.headers}")
    check(res.headers.get("x-session-id") == created.session_id, f"verify: {res.headers}")
    # The optional query parameter is sent as one: a generous max_age passes.
    res = verify_get.sync_detailed(client=holder, max_age=3600)
    check(res.status_code == 200, f"verify?max_age=3600: {res.status_code} {res.content!r}")

    res = logout.sync_detailed(client=holder)
    check(res.status_code == 204, f"logout: {res.status_code} {res.content!r}")

    res = verify_get.sync_detailed(client=holder)
    check(res.status_code == 401, f"verify after logout: {res.status_code} {res.content!r}")
    check(isinstance(res.parsed, ErrorBody), f"verify after logout: parsed {res.parsed!r}")
    check(res.parsed.error == "invalid_token", f"verify after logout: {res.parsed.error!r}")
    print("openapi client test: create 201, verify 200, logout 204, verify 401: ok")


if __name__ == "__main__":
    main()
