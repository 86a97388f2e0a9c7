"""An independent workload-token issuer for the tests: PyJWT and cryptography (PyPI) make the
keys and tokens, Python's http.server serves OpenID discovery and the JWKS. The tokens have the
claim shape of a Kubernetes projected ServiceAccount token.

Prints one JSON line {"issuer", "tokens": {case: jwt}} and serves until stdin closes.
usage: jose_issuer.py AUDIENCE SUBJECT
"""
import base64
import hashlib
import hmac
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

audience, subject = sys.argv[1:3]
rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ec_key = ec.generate_private_key(ec.SECP256R1())
stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(public, kid, alg):
    d = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public) if alg == "RS256" else jwt.algorithms.ECAlgorithm.to_jwk(public))
    d.update({"kid": kid, "alg": alg, "use": "sig"})
    return d


jwks = {"keys": [jwk(rsa_key.public_key(), "k1", "RS256"), jwk(ec_key.public_key(), "e1", "ES256")]}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/.well-known/openid-configuration":
            body = {"issuer": issuer, "jwks_uri": issuer + "/openid/v1/jwks", "id_token_signing_alg_values_supported": ["RS256", "ES256"]}
        elif self.path == "/openid/v1/jwks":
            body = jwks
        else:
            self.send_response(404)
            self.end_headers()
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
issuer = f"http://127.0.0.1:{server.server_address[1]}"
now = int(time.time())


def claims(**over):
    c = {
        "iss": issuer, "aud": [audience], "sub": subject, "iat": now, "nbf": now, "exp": now + 600,
        "kubernetes.io": {"namespace": "reporting", "serviceaccount": {"name": "app", "uid": "0d5c"}},
    }
    c.update(over)
    return c


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header, payload, key=b""):
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest() if key else b""
    return signing_input + "." + b64(sig)


public_pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
tokens = {
    "good": jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "k1"}),
    "good_es256": jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "e1"}),
    "wrong_audience": jwt.encode(claims(aud=["someone-else"]), rsa_key, algorithm="RS256", headers={"kid": "k1"}),
    "wrong_subject": jwt.encode(claims(sub="system:serviceaccount:other:app"), rsa_key, algorithm="RS256", headers={"kid": "k1"}),
    "wrong_issuer": jwt.encode(claims(iss="https://elsewhere.example"), rsa_key, algorithm="RS256", headers={"kid": "k1"}),
    "expired": jwt.encode(claims(exp=now - 300, nbf=now - 900, iat=now - 900), rsa_key, algorithm="RS256", headers={"kid": "k1"}),
    "not_yet_valid": jwt.encode(claims(nbf=now + 900), rsa_key, algorithm="RS256", headers={"kid": "k1"}),
    "unknown_kid": jwt.encode(claims(), stranger, algorithm="RS256", headers={"kid": "k9"}),
    "bad_signature": jwt.encode(claims(), stranger, algorithm="RS256", headers={"kid": "k1"}),
    "alg_none": unsigned({"alg": "none", "typ": "JWT"}, claims()),
    "hs256_public_key": unsigned({"alg": "HS256", "kid": "k1"}, claims(), public_pem),
}
threading.Thread(target=server.serve_forever, daemon=True).start()
print(json.dumps({"issuer": issuer, "tokens": tokens}), flush=True)
sys.stdin.read()
