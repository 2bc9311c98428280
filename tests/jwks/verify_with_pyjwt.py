#!/usr/bin/env python3
"""Verify authd tokens with a JWT library no one on this project wrote: PyJWT, fetching
the keys from authd's JWKS URL with PyJWKClient, as a sidecar or another service would.

usage: verify_with_pyjwt.py JWKS_URL ISSUER AUDIENCE TOKEN [TOKEN...]

Prints one JSON line per token: {"alg": ..., "kid": ..., "sub": ...}; exits non-zero if
any token does not verify.
"""
import json
import sys

import jwt


def main() -> int:
    jwks_url, issuer, audience, *tokens = sys.argv[1:]
    client = jwt.PyJWKClient(jwks_url, cache_keys=False)
    for token in tokens:
        header = jwt.get_unverified_header(token)
        key = client.get_signing_key_from_jwt(token)
        claims = jwt.decode(
            token,
            key.key,
            algorithms=[header["alg"]],
            audience=audience,
            issuer=issuer,
            options={"require": ["exp", "iss", "aud", "sub"]},
        )
        print(json.dumps({"alg": header["alg"], "kid": header["kid"], "sub": claims["sub"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
