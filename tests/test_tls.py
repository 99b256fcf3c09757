"""The operator's certificate and key (controller/environments/tls.py) and the nginx file of an
environment served over HTTPS (commands.nginx_config): pure, each rule a case."""

from __future__ import annotations

import datetime

import pytest

from controller.environments import acme, certificates, commands
from controller.environments.tls import TlsError, check_pair
from tests.certs import OwnCA

CA = OwnCA()


def test_a_pair_that_covers_every_name_is_taken_and_its_end_said():
    cert, key = CA.issue("shop.example", "www.shop.example", days=10)
    ends = check_pair(cert, key, ("shop.example", "www.shop.example"))
    assert datetime.timedelta(days=9) < ends - datetime.datetime.now(datetime.timezone.utc) <= datetime.timedelta(days=10)
    wildcard, wkey = CA.issue("*.shop.example")
    check_pair(wildcard, wkey, ("www.shop.example", "api.shop.example"))
    with pytest.raises(TlsError, match=r"^the certificate does not cover shop.example, a.b.shop.example "
                                       r"\(it names \*.shop.example\)$"):
        check_pair(wildcard, wkey, ("shop.example", "a.b.shop.example"))


@pytest.mark.parametrize("case", ["not-a-pair", "not-pem", "key-not-pem", "expired", "missing-alias"])
def test_a_bad_pair_is_one_line_that_never_quotes_the_key(case):
    cert, key = CA.issue("shop.example")
    names = ("shop.example",)
    expected = {"not-a-pair": "the key is not the certificate's: they are not a pair",
                "not-pem": "the certificate is not a PEM certificate (-----BEGIN CERTIFICATE-----)",
                "key-not-pem": "the key is not an unencrypted PEM private key",
                "expired": "the certificate expired on ",
                "missing-alias": "the certificate does not cover www.shop.example (it names shop.example)"}[case]
    if case == "not-a-pair":
        key = CA.other_key()
    elif case == "not-pem":
        cert = "hello"
    elif case == "key-not-pem":
        key = key.replace("PRIVATE KEY", "SECRET")
    elif case == "expired":
        cert, key = CA.issue("shop.example", days=-1)
    else:
        names = ("shop.example", "www.shop.example")
    with pytest.raises(TlsError) as raised:
        check_pair(cert, key, names)
    assert str(raised.value).startswith(expected) and "\n" not in str(raised.value)
    assert key.splitlines()[1] not in str(raised.value)


def test_an_https_environment_redirects_http_with_308_and_keeps_the_switch_probe_on_http():
    tls = commands.RouteTls("443", "/etc/nginx/conf.d/auto-tls/auto-shop-prod.crt",
                            "/etc/nginx/conf.d/auto-tls/auto-shop-prod.key")
    probe = "ab" * 16
    conf = commands.nginx_config("shop/prod", "shop.example", "80", [("/", "10.0.0.5", 20001)], "", probe,
                                 ("www.shop.example",), tls).decode()
    http, https = conf.split("server {\n")[1:]
    assert "server_name shop.example www.shop.example;" in http and "server_name shop.example www.shop.example;" in https
    assert "location / { return 308 https://$host$request_uri; }" in http
    assert f"location = /.deployer-probe-{probe} {{" in http and "proxy_pass" in http  # the probe only
    assert "location / {\n" not in http
    assert "listen 443 ssl;" in https and "ssl_certificate /etc/nginx/conf.d/auto-tls/auto-shop-prod.crt;" in https
    assert "location / {\n        proxy_pass http://10.0.0.5:20001/;" in https and "deployer-probe" not in https
    with pytest.raises(commands.RouteValueError, match="TLS file"):
        commands.nginx_config("shop/prod", "shop.example", "80", [], tls=commands.RouteTls("443", "/a b", "/k"))
    with pytest.raises(commands.RouteValueError, match="server name"):
        commands.nginx_config("shop/prod", "shop.example", "80", [], aliases=("evil; include /etc",))


def test_an_acme_environment_serves_the_challenge_answers_on_plain_http_with_or_without_https():
    folder = "/etc/nginx/conf.d/auto-acme/auto-shop-prod"
    location = f"location ^~ /.well-known/acme-challenge/ {{ alias {folder}/; default_type text/plain; }}"
    before = commands.nginx_config("shop/prod", "shop.example", "80", [("/", "10.0.0.5", 20001)],
                                   challenges=folder).decode()
    assert location in before and "ssl" not in before and "proxy_pass http://10.0.0.5:20001/;" in before
    tls = commands.RouteTls("443", "/etc/nginx/conf.d/auto-tls/auto-shop-prod.crt",
                            "/etc/nginx/conf.d/auto-tls/auto-shop-prod.key")
    http, https = commands.nginx_config("shop/prod", "shop.example", "80", [("/", "10.0.0.5", 20001)], tls=tls,
                                        challenges=folder).decode().split("server {\n")[1:]
    assert location in http and "return 308" in http and location not in https
    with pytest.raises(commands.RouteValueError):
        commands.nginx_config("shop/prod", "shop.example", "80", [], challenges="/etc/nginx/../x")


NAMES = ("shop.example", "www.shop.example")


@pytest.mark.parametrize("issued, why", [
    (None, "the environment has no certificate yet"),
    ((("shop.example",), "", "", 1e12, 0.0), "the certificate does not cover www.shop.example"),
    ((NAMES, "", "", 1000.0 + 10 * 86400, 1000.0 - 80 * 86400), "the certificate has 10 days left"),
    ((NAMES, "", "", 1000.0 + 31 * 86400, 1000.0 - 59 * 86400), ""),
    # Issued for 6 days only (less than renew_before): renewed with a third of it left, not at once.
    ((NAMES, "", "", 1000.0 + 5 * 86400, 1000.0 - 86400), ""),
    ((NAMES, "", "", 1000.0 + 86400, 1000.0 - 5 * 86400), "the certificate has 1 days left"),
])
def test_a_certificate_is_due_without_one_for_a_new_name_or_with_under_30_days_left(issued, why):
    assert certificates.due(issued, NAMES, 30 * 86400, now=1000.0) == why


def test_tls_auto_is_refused_in_one_line_without_an_acme_server_or_a_router_to_answer():
    class Router:
        def __init__(self, id, state):
            self.id, self.state = id, state
    on = certificates.AcmeSettings("https://ca.example/dir")
    assert "set acme.directory in the controller's settings file" in certificates.refusal(None, [], [])
    assert certificates.refusal(on, [], []) == \
        "auto needs a router to answer the ACME challenge, and no agent has the routing role"
    away = [Router("router-1", "lost"), Router("router-2", "disconnected")]
    assert certificates.refusal(on, away, []) == ("auto needs a router to answer the ACME challenge, and none is "
                                                  "connected (router-1 lost, router-2 disconnected)")
    assert certificates.refusal(on, away, away[:1]) == ""


def test_an_acme_request_is_a_jws_its_account_key_verifies_and_a_csr_names_every_name():
    import base64
    import json
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    def unb64(text: str) -> bytes:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    key = acme._load(acme.new_key())
    body = json.loads(acme.signed(key, "https://ca.example/order", "n1", {"a": 1}, kid="https://ca.example/acct/7"))
    protected = json.loads(unb64(body["protected"]))
    assert protected == {"alg": "ES256", "nonce": "n1", "url": "https://ca.example/order",
                         "kid": "https://ca.example/acct/7"}
    assert json.loads(unb64(body["payload"])) == {"a": 1}
    raw = unb64(body["signature"])
    key.public_key().verify(encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")),
                            f"{body['protected']}.{body['payload']}".encode(), ec.ECDSA(hashes.SHA256()))
    as_get = json.loads(acme.signed(key, "https://ca.example/x", "n2", None))
    assert as_get["payload"] == "" and "jwk" in json.loads(unb64(as_get["protected"]))
    assert len(unb64(acme.thumbprint(key))) == 32
    request = x509.load_der_x509_csr(acme.csr(acme.new_key(), NAMES))
    san = request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == list(NAMES)
