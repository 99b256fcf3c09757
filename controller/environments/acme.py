"""An ACME client (RFC 8555) for `tls: auto`: an account, an order for the environment's names,
their HTTP-01 challenges (answered by the routers: `publish` puts each answer there), the
finalisation with a key made here, and the certificate chain (decision 036).

Only the protocol lives here; the job (certificates.py) decides when to order, where the answers
go and where the certificate and key are kept. Keys are ECDSA P-256; requests are JWS signed with
ES256. HTTP is urllib in a worker thread, with the CA bundle the controller is told to trust for
the ACME server (or the system's).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Awaitable, Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from common import errors

HTTP_TIMEOUT_S = 30.0
POLL_S = 1.0
ORDER_DEADLINE_S = 180.0
BAD_NONCE = "urn:ietf:params:acme:error:badNonce"
USER_AGENT = "deployer-acme/1"
REPLY_MAX = 1 << 20          # a directory, an order or a chain is far smaller


class AcmeError(errors.Failed):
    """The ACME server refused or failed the order; the message is its own (a problem document's
    type and detail), never a key."""


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_key() -> str:
    """A new private key, PEM (PKCS#8, unencrypted: it is sealed where it is kept)."""
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()


def _load(key_pem: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise AcmeError("the ACME account key is not an ECDSA key")
    return key


def jwk(key: ec.EllipticCurvePrivateKey) -> dict:
    numbers = key.public_key().public_numbers()
    return {"crv": "P-256", "kty": "EC", "x": b64(numbers.x.to_bytes(32, "big")),
            "y": b64(numbers.y.to_bytes(32, "big"))}


def thumbprint(key: ec.EllipticCurvePrivateKey) -> str:
    """RFC 7638: the SHA-256 of the JWK's required members, in lexical order, without spaces."""
    return b64(hashlib.sha256(json.dumps(jwk(key), sort_keys=True, separators=(",", ":")).encode()).digest())


def signed(key: ec.EllipticCurvePrivateKey, url: str, nonce: str, payload: dict | None, kid: str = "") -> bytes:
    """A flattened JWS: `payload` None is a POST-as-GET (an empty payload)."""
    protected = {"alg": "ES256", "nonce": nonce, "url": url, **({"kid": kid} if kid else {"jwk": jwk(key)})}
    head = b64(json.dumps(protected).encode())
    body = "" if payload is None else b64(json.dumps(payload).encode())
    r, s = decode_dss_signature(key.sign(f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256())))
    return json.dumps({"protected": head, "payload": body,
                       "signature": b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))}).encode()


def csr(key_pem: str, names: tuple[str, ...]) -> bytes:
    """A certificate request for `names` (the first as common name), DER."""
    key = _load(key_pem)
    request = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
               .sign(key, hashes.SHA256()))
    return request.public_bytes(serialization.Encoding.DER)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        try:
            body = json.loads(self.body or b"{}")
        except ValueError:
            raise AcmeError(f"the ACME server answered {self.status} with no JSON") from None
        if not isinstance(body, dict):
            raise AcmeError(f"the ACME server answered {self.status} with JSON that is not an object")
        return body


def _origin(url: str) -> tuple[str, str, int]:
    parsed = urllib.parse.urlsplit(url)
    try:
        port = parsed.port or 443
    except ValueError:
        return "", "", 0
    return ("https", (parsed.hostname or "").lower(), port) if parsed.scheme == "https" else ("", "", 0)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """RFC 8555 has no redirects to follow: one is answered as it is (an error), never followed
    off the server's origin."""

    def redirect_request(self, *args, **kwargs):
        return None


def _bounded(response) -> bytes:
    body = response.read(REPLY_MAX + 1)
    if len(body) > REPLY_MAX:
        raise AcmeError(f"the ACME server answered more than {REPLY_MAX} bytes")
    return body


def _problem(reply: Reply, doing: str) -> AcmeError:
    try:
        problem = json.loads(reply.body)
        text = f"{problem.get('type', '?').rsplit(':', 1)[-1]}: {str(problem.get('detail', ''))[:300]}"
    except ValueError:
        text = f"HTTP {reply.status}"
    return AcmeError(f"the ACME server refused to {doing}: {text}")


class Client:
    """One ACME directory, with one account key; `account` is the account's URL once known."""

    def __init__(self, directory: str, account_key: str, ca_file: str = "", account: str = "") -> None:
        self.directory_url = directory
        self.key = _load(account_key)
        self.account = account
        self.context = ssl.create_default_context(cafile=ca_file or None)
        self.opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=self.context), _NoRedirect())
        self.directory: dict = {}
        self.nonce = ""

    # ---------------------------------------------------------------- transport

    def _http(self, url: str, data: bytes | None = None, method: str = "GET", accept: str = "") -> Reply:
        # The server's own URLs (orders, challenges, the certificate) are followed only on its
        # origin, over HTTPS: a server is not trusted to send the controller anywhere else.
        if not isinstance(url, str) or _origin(url) != _origin(self.directory_url):
            raise AcmeError(f"the ACME server named a URL off its own origin: {str(url)[:120]!r}")
        request = urllib.request.Request(url, data=data, method=method, headers={"User-Agent": USER_AGENT})
        if data is not None:
            request.add_header("Content-Type", "application/jose+json")
        if accept:
            request.add_header("Accept", accept)
        try:
            with self.opener.open(request, timeout=HTTP_TIMEOUT_S) as response:
                reply = Reply(response.status, dict(response.headers.items()), _bounded(response))
        except urllib.error.HTTPError as exc:
            reply = Reply(exc.code, dict(exc.headers.items()), _bounded(exc))
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AcmeError(f"the ACME server {self.directory_url} cannot be reached: {reason}") from None
        if reply.headers.get("Replay-Nonce"):
            self.nonce = reply.headers["Replay-Nonce"]
        return reply

    def _start(self) -> None:
        if not self.directory:
            reply = self._http(self.directory_url)
            if reply.status != 200:
                raise _problem(reply, "give its directory")
            self.directory = reply.json()

    def post(self, url: str, payload: dict | None, doing: str, accept: str = "") -> Reply:
        """A signed POST, once more with a fresh nonce if the server says the nonce was bad."""
        self._start()
        for attempt in range(3):
            if not self.nonce:
                self._http(self.directory["newNonce"], method="HEAD")
            nonce, self.nonce = self.nonce, ""
            reply = self._http(url, signed(self.key, url, nonce, payload, self.account), "POST", accept)
            if reply.status < 400:
                return reply
            if reply.status == 400 and BAD_NONCE in reply.body.decode(errors="replace") and attempt < 2:
                continue
            raise _problem(reply, doing)
        raise AcmeError(f"the ACME server refused to {doing}: badNonce three times")

    # ---------------------------------------------------------------- the protocol

    def register(self, contact: str = "") -> str:
        """The account for this key (made if new); its URL."""
        if self.account:
            return self.account
        payload = {"termsOfServiceAgreed": True, **({"contact": [f"mailto:{contact}"]} if contact else {})}
        reply = self.post(self.url("newAccount"), payload, "create the account")
        self.account = reply.headers.get("Location", "")
        if not self.account:
            raise AcmeError("the ACME server gave the account no URL")
        return self.account

    def url(self, name: str) -> str:
        self._start()
        if name not in self.directory:
            raise AcmeError(f"the ACME directory has no {name}")
        return self.directory[name]

    def poll(self, url: str, until: tuple[str, ...], doing: str, deadline: float) -> dict:
        while True:
            body = self.post(url, None, doing).json()
            if body.get("status") in until:
                return body
            if body.get("status") == "invalid":
                raise AcmeError(f"the ACME server refused to {doing}: {_why_invalid(body)}")
            if time.monotonic() > deadline:
                raise AcmeError(f"the ACME server did not {doing} within {ORDER_DEADLINE_S:.0f}s "
                                f"(status {body.get('status')})")
            time.sleep(POLL_S)


def _why_invalid(body: dict) -> str:
    for challenge in body.get("challenges", ()):
        if challenge.get("error"):
            error = challenge["error"]
            return f"{str(error.get('type', '?')).rsplit(':', 1)[-1]}: {str(error.get('detail', ''))[:300]}"
    error = body.get("error") or {}
    return str(error.get("detail", ""))[:300] or "status invalid"


Publish = Callable[[dict[str, str]], Awaitable[None]]


async def obtain(client: Client, names: tuple[str, ...], certificate_key: str, publish: Publish,
                 contact: str = "") -> str:
    """The certificate chain (PEM) for `names`, issued for `certificate_key`. `publish` is given
    every HTTP-01 answer this order needs (token → key authorisation) and must have them served
    before it returns; it is called with {} at the end, to take them down. A reply that lacks what
    RFC 8555 says it holds is an AcmeError, like a refusal."""
    try:
        return await _obtain(client, names, certificate_key, publish, contact)
    except (KeyError, TypeError, AttributeError) as exc:
        raise AcmeError(f"the ACME server's reply lacks what the protocol needs ({type(exc).__name__}: "
                        f"{str(exc)[:80]})") from None


async def _obtain(client: Client, names: tuple[str, ...], certificate_key: str, publish: Publish,
                  contact: str) -> str:
    deadline = time.monotonic() + ORDER_DEADLINE_S
    await asyncio.to_thread(client.register, contact)
    reply = await asyncio.to_thread(client.post, client.url("newOrder"),
                                    {"identifiers": [{"type": "dns", "value": n} for n in names]}, "take the order")
    order_url, order = reply.headers.get("Location", ""), reply.json()
    answers: dict[str, str] = {}
    pending: list[str] = []
    for authorization in order.get("authorizations", ()):
        body = (await asyncio.to_thread(client.post, authorization, None, "show an authorisation")).json()
        if body.get("status") == "valid":
            continue
        challenge = next((c for c in body.get("challenges", ()) if c.get("type") == "http-01"), None)
        if challenge is None:
            raise AcmeError(f"the ACME server offers no http-01 challenge for {body.get('identifier', {}).get('value')}")
        answers[challenge["token"]] = f"{challenge['token']}.{thumbprint(client.key)}"
        pending.append(challenge["url"])
    try:
        if answers:
            await publish(answers)
            for url in pending:
                await asyncio.to_thread(client.post, url, {}, "take the challenge answer")
            for authorization in order.get("authorizations", ()):
                await asyncio.to_thread(client.poll, authorization, ("valid",), "validate a name", deadline)
        ready = await asyncio.to_thread(client.poll, order_url, ("ready", "valid"), "get the order ready", deadline)
        if ready.get("status") == "ready":
            request = csr(certificate_key, names)
            await asyncio.to_thread(client.post, ready["finalize"], {"csr": b64(request)}, "finalise the order")
        done = await asyncio.to_thread(client.poll, order_url, ("valid",), "issue the certificate", deadline)
    finally:
        if answers:
            await publish({})
    chain = await asyncio.to_thread(client.post, done["certificate"], None, "give the certificate",
                                    "application/pem-certificate-chain")
    return chain.body.decode()
