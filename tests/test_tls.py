"""The operator's certificate and key (controller/environments/tls.py) and the nginx file of an
environment served over HTTPS (commands.nginx_config): pure, each rule a case."""

from __future__ import annotations

import datetime

import pytest

from controller.environments import commands
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
