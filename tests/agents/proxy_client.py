"""A client that ignores base-URL variables and goes through HTTPS_PROXY, for the tests.

Each request is described on the command line as JSON and its outcome appended to --out as one
JSON line: the status, the body, and the certificate the server presented. It uses only the
standard library, so it trusts what SSL_CERT_FILE names, as OpenSSL-based clients do.

    proxy_client.py --out FILE '{"url": "https://api.openai.com/v1/chat/completions",
                                 "body": {...}}'

Request fields: `url`, `method` (POST when a body is given, else GET), `body`, `headers`,
`proxy` ("env" for HTTPS_PROXY as given, "no-credentials" for its address without the
credentials, "wrong-password", or "none" to connect directly) and `cafile` (a CA file to trust
instead of the default store).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import os
import ssl
import sys
from urllib.parse import unquote, urlsplit


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("requests", nargs="+")
    args = parser.parse_args()
    for spec in args.requests:
        outcome = _send(json.loads(spec))
        with open(args.out, "a", encoding="utf-8") as out:
            out.write(json.dumps(outcome) + "\n")
    return 0


def _send(spec: dict) -> dict:
    url = urlsplit(spec["url"])
    body = json.dumps(spec["body"]).encode() if "body" in spec else None
    method = spec.get("method") or ("POST" if body is not None else "GET")
    headers = {"content-type": "application/json", **spec.get("headers", {})}
    port = url.port or 443
    context = ssl.create_default_context(cafile=spec.get("cafile"))

    mode = spec.get("proxy", "env")
    proxy = urlsplit(os.environ["HTTPS_PROXY"])
    try:
        if mode == "none":
            conn = http.client.HTTPSConnection(url.hostname, port, context=context, timeout=30)
        else:
            conn = http.client.HTTPSConnection(
                proxy.hostname, proxy.port, context=context, timeout=30
            )
            conn.set_tunnel(url.hostname, port, headers=_proxy_headers(proxy, mode))
        path = url.path + (f"?{url.query}" if url.query else "")
        conn.request(method, path, body=body, headers=headers)
        # Read the certificate before the response: the server may close the connection.
        certificate = conn.sock.getpeercert(binary_form=True)
        issuer = dict(item[0] for item in conn.sock.getpeercert()["issuer"])
        response = conn.getresponse()
        data = response.read()
        outcome = {
            "status": response.status,
            "body": data.decode("utf-8", errors="replace"),
            "fingerprint": hashlib.sha256(certificate).hexdigest(),
            "issuer": issuer.get("commonName"),
        }
        conn.close()
        return outcome
    except OSError as exc:
        # A refused CONNECT raises OSError("Tunnel connection failed: 407 ...").
        return {"status": None, "error": f"{type(exc).__name__}: {exc}"}


def _proxy_headers(proxy, mode: str) -> dict[str, str]:
    if mode == "no-credentials":
        return {}
    user = unquote(proxy.username or "")
    password = unquote(proxy.password or "")
    if mode == "wrong-password":
        password += "x"
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Proxy-Authorization": f"Basic {token}"}


if __name__ == "__main__":
    sys.exit(main())
