"""Verifies X-Session-Assertion values the way an upstream would, with an
independent JWT library (PyJWT) and sessiongate's published keys. Run by
tests/api/assertion.rs:

    python tests/assertion/verify_assertion.py JWKS_URL AUDIENCE ISSUER < assertions

One assertion per line on stdin; for each, one line of JSON with its claims
and kid on stdout. Also checks that a tampered copy and another audience are
refused. Exits non-zero on the first failure.
"""

import json
import sys

import jwt


def main():
    jwks_url, audience, issuer = sys.argv[1:4]
    keys = jwt.PyJWKClient(jwks_url, cache_keys=False)
    for line in sys.stdin:
        assertion = line.strip()
        if not assertion:
            continue
        key = keys.get_signing_key_from_jwt(assertion)
        claims = jwt.decode(
            assertion,
            key,
            algorithms=["EdDSA"],
            audience=audience,
            issuer=issuer,
            options={"require": ["exp", "iat", "sub", "aud", "iss"]},
        )
        header = jwt.get_unverified_header(assertion)
        try:
            jwt.decode(assertion, key, algorithms=["EdDSA"], audience="https://other.example")
            sys.exit("another audience was accepted")
        except jwt.InvalidAudienceError:
            pass
        head, body, sig = assertion.split(".")
        tampered = ".".join([head, body, ("A" if sig[0] != "A" else "B") + sig[1:]])
        try:
            jwt.decode(tampered, key, algorithms=["EdDSA"], audience=audience)
            sys.exit("a tampered assertion was accepted")
        except jwt.InvalidSignatureError:
            pass
        print(json.dumps({"kid": header["kid"], "alg": header["alg"], "claims": claims}))


if __name__ == "__main__":
    main()
