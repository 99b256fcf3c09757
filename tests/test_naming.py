"""The auto-* names: limits, determinism, distinctness, and the readable common case."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import assume, given, settings, strategies as st

from controller.environments import naming

names = st.from_regex(r"[a-z](-?[a-z0-9]){0,19}", fullmatch=True).filter(lambda s: len(s) <= naming.NAME_MAX)
numbers = st.integers(min_value=1, max_value=10**6)
triples = st.tuples(names, names, names)

INSTANCE_NAMES = {  # function of (app, env, service, n) → its limit
    naming.database_name: 64,
    naming.database_user: 32,
    naming.redis_user: 64,
    naming.redis_prefix: 65,
}


def test_the_common_case_is_readable():
    assert naming.service_dir("/srv/services", "shop", "prod", "api") == "/srv/services/auto-shop-prod-api"
    assert naming.database_name("shop", "prod", "api", 2) == "auto-shop-prod-api-2"
    assert naming.database_user("shop", "pr-42", "api", 2) == "auto-shop-pr-42-api-2"
    assert naming.redis_user("shop", "prod", "api", 2) == "auto-shop-prod-api-2"
    assert naming.redis_prefix("shop", "prod", "api", 2) == "auto-shop-prod-api-2:"
    assert naming.nginx_file("shop", "prod") == "auto-shop-prod.conf"
    assert naming.unit_base("shop", "prod", "api") == "auto-shop-prod-api"
    assert naming.unit_template("shop", "prod", "api") == "auto-shop-prod-api@.service"
    assert naming.unit_instance("shop", "prod", "api", 3) == "auto-shop-prod-api@3.service"
    assert naming.unix_user("shop", "prod") == "auto-shop-prod"


def test_long_names_keep_a_readable_prefix_the_instance_and_a_hash():
    app, env, service = "a" * 20, "b" * 20, "c" * 20
    user = naming.database_user(app, env, service, 7)
    digest = hashlib.sha256(f"{app}/{env}/{service}/7".encode()).hexdigest()[:8]
    assert user == f"auto-{'a' * 16}-7-{digest}" and len(user) == 32
    assert len(naming.unix_user(app, env)) == 32
    database = naming.database_name(app, env, service, 7)
    assert database.startswith("auto-" + app + "-" + env + "-cc") and database.endswith("-7-" + database[-8:])
    assert len(database) == 64


def test_hyphens_cannot_make_two_environments_share_a_name():
    # my-shop/prod and my/shop-prod join to the same text, so both get a hash of their own
    first = naming.database_name("my-shop", "prod", "api", 1)
    second = naming.database_name("my", "shop-prod", "api", 1)
    assert first != second
    assert first.startswith("auto-my-shop-prod-api-1-") and second.startswith("auto-my-shop-prod-api-1-")
    assert naming.unix_user("my-shop", "prod") != naming.unix_user("my", "shop-prod")
    assert naming.unit_template("a-b", "c", "d") != naming.unit_template("a", "b-c", "d")


def test_digits_after_a_hyphen_keep_the_readable_form():
    # "42" cannot begin a name, so shop/pr-42/api has only one reading
    assert naming.database_name("shop", "pr-42", "api", 1) == "auto-shop-pr-42-api-1"


@pytest.mark.parametrize("bad", ["", "Shop", "-shop", "shop-", "sh--op", "1shop", "shop_x", "a" * 21, "../x", None])
def test_invalid_names_are_refused(bad):
    with pytest.raises(ValueError):
        naming.database_name("shop", "prod", bad, 1)
    with pytest.raises(ValueError):
        naming.service_dir("/srv/services", bad, "prod", "api")


@pytest.mark.parametrize("n", [0, -1, True, 1.0, "1"])
def test_instance_numbers_start_at_one(n):
    with pytest.raises(ValueError):
        naming.database_name("shop", "prod", "api", n)
    with pytest.raises(ValueError):
        naming.unit_instance("shop", "prod", "api", n)


def test_is_ours_and_parse_unit_instance():
    assert naming.is_ours("auto-shop-prod-api@3.service") and not naming.is_ours("nginx.service")
    assert naming.parse_unit_instance("auto-shop-prod-api@3.service") == ("auto-shop-prod-api@.service", 3)
    assert naming.parse_unit_instance("auto-shop-prod-api@.service") is None
    assert naming.parse_unit_instance("nginx@1.service") is None
    assert naming.parse_unit_instance("auto-x@01.service") is None


@settings(max_examples=300)
@given(triple=triples, n=numbers)
def test_every_name_fits_starts_with_auto_and_is_deterministic(triple, n):
    for make, limit in INSTANCE_NAMES.items():
        name = make(*triple, n)
        assert len(name) <= limit and name.startswith("auto-") and naming.is_ours(name)
        assert make(*triple, n) == name
    assert naming.redis_prefix(*triple, n) == naming.database_name(*triple, n) + ":"
    assert len(naming.unix_user(*triple[:2])) <= 32
    for name in (naming.unix_user(*triple[:2]), naming.nginx_file(*triple[:2]),
                 naming.unit_template(*triple), naming.unit_instance(*triple, n),
                 naming.service_dir("/srv/services", *triple).rsplit("/", 1)[1]):
        assert name.startswith("auto-") and len(name) <= 255 and "/" not in name
    assert naming.parse_unit_instance(naming.unit_instance(*triple, n)) == (naming.unit_template(*triple), n)


@settings(max_examples=300)
@given(first=triples, second=triples, n=numbers, m=numbers)
def test_distinct_inputs_give_distinct_names(first, second, n, m):
    assume((first, n) != (second, m))
    for make in INSTANCE_NAMES:
        assert make(*first, n) != make(*second, m)
    if first != second:
        assert naming.service_dir("/r", *first) != naming.service_dir("/r", *second)
        assert naming.unit_template(*first) != naming.unit_template(*second)
        assert naming.unit_base(*first) != naming.unit_base(*second)
    if first[:2] != second[:2]:
        assert naming.unix_user(*first[:2]) != naming.unix_user(*second[:2])
        assert naming.nginx_file(*first[:2]) != naming.nginx_file(*second[:2])


@given(triple=triples, n=numbers, m=numbers)
def test_instances_of_one_service_differ(triple, n, m):
    assume(n != m)
    for make in INSTANCE_NAMES:
        assert make(*triple, n) != make(*triple, m)
    assert naming.unit_instance(*triple, n) != naming.unit_instance(*triple, m)


@given(parts=st.lists(st.sampled_from(["a", "b", "a-b", "b-a", "a-1", "ab", "1"]), min_size=6, max_size=6))
def test_hyphen_splits_collide_nowhere(parts):
    # a small alphabet makes hyphen-joined collisions likely, unlike the random names above
    first, second = tuple(parts[:3]), tuple(parts[3:])
    assume(all(naming.name_problem(p) is None for p in parts) and first != second)
    assert naming.database_user(*first, 1) != naming.database_user(*second, 1)
    assert naming.service_dir("/r", *first) != naming.service_dir("/r", *second)


LOGIN_NAME = r"[a-z_][a-z0-9_-]*"  # what useradd accepts (NAME_REGEX_SYSTEM on Debian), at most 32


def test_a_long_unix_user_keeps_a_readable_prefix_and_a_hash():
    app, env = "a" * 20, "b" * 20
    digest = hashlib.sha256(f"{app}/{env}".encode()).hexdigest()[:8]
    assert naming.unix_user(app, env) == f"auto-{'a' * 18}-{digest}"
    assert naming.unix_user("shop", "pr-42") == "auto-shop-pr-42"


@settings(max_examples=300)
@given(app=names, env=names)
def test_every_unix_user_is_a_valid_login_name(app, env):
    import re
    user = naming.unix_user(app, env)
    assert re.fullmatch(LOGIN_NAME, user) and len(user) <= naming.UNIX_USER_MAX
    assert naming.unix_user(app, env) == user
