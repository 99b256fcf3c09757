"""Environment specs, deploy options and diffs: one-line errors with file, line and key; canonical form."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from hypothesis import given, strategies as st

from controller.environments import spec as spec_mod
from controller.environments.naming import name_problem
from controller.environments.spec import (Options, Service, SpecError, code_fingerprint, load_options, load_spec, merge_diff,
                             parse_options, parse_spec, spec_from_dict)

SCHEMA_PATH = Path(spec_mod.__file__).parent / "schema" / "environment.schema.json"

# Line numbers in the expected errors below count lines of this text.
BASE = """\
app: shop
environment: prod
domain: shop.localhost
services:
  web:
    path: /
    source: /srv/git/shop.git
    ref: main
    start: node server.js
    env:
      NODE_ENV: production
    secrets: [SESSION_KEY]
    uses: [mysql, redis]
  worker:
    source: /srv/git/shop.git
    ref: main
    start: node worker.js
    uses: [redis]
"""

WORKER = """\
  worker:
    source: /srv/git/shop.git
    ref: main
    start: node worker.js
    uses: [redis]
"""

SERVICES = "services:\n" + BASE.split("services:\n")[1]

DOC_EXAMPLE = """\
# yaml-language-server: $schema=../controller/schema/environment.schema.json
version: 1                      # optional; the only version today
app: shop                       # [a-z][a-z0-9-]*, at most 20 characters
environment: prod               # same rule
domain: shop.localhost          # nginx server_name for the environment's routes
services:
  web:                          # service name, same rule as app
    path: /                     # present → a web service, routed by nginx, on a `computing` agent
    source: /srv/git/shop.git   # git URL or local path to a repository
    ref: main                   # branch, tag or full commit
    root: web                   # optional: folder inside the repository holding this service
    install: npm ci --omit=dev  # optional commands, run in the release folder
    build: npm run build
    migrate: node migrate.js    # runs against the current database instance before the switch
    start: node server.js       # required: runs in the foreground, listens on $PORT
    health: /health             # web services: path polled on the instance's own port (default /)
    env:                        # plain settings (no secrets here)
      NODE_ENV: production
    secrets: [SESSION_KEY]      # names only; values set with `deployctl secret set shop/prod SESSION_KEY`
    uses: [mysql, redis]        # components besides code: mysql, redis
  worker:                       # no path → a daemon, on a `daemons` agent
    source: /srv/git/shop.git
    ref: main
    root: worker
    install: npm ci --omit=dev
    start: node worker.js
    healthy_after: 5            # daemons: seconds it must stay up to be healthy (default 5)
    uses: [redis]
"""

MANY_SERVICES = """\
app: blog
environment: pr-42
domain: PR-42.Blog.Example.com
services:
  zeta:
    path: /zeta/
    source: https://git.example.com/blog.git
    ref: v1.2.0
    root: ./apps/zeta/
    health: /healthz?full=1
    start: |
      exec python -m zeta
    env: {WORKERS: 4, RATIO: 0.5, NAME: zeta, EMPTY: ""}
  api:
    path: /api
    source: git@example.com:blog.git
    ref: 0123456789abcdef0123456789abcdef01234567
    start: ./api
    uses: [redis, mysql]
    secrets: [TOKEN_B, TOKEN_A]
  cron:
    source: /srv/git/blog.git
    ref: refs/tags/v1
    root: .
    start: ./cron
    healthy_after: 0.5
"""

GOOD_SPECS = {"base": BASE, "doc-example": DOC_EXAMPLE, "many-services": MANY_SERVICES}

# (id, text in BASE, replacement, the exact error)
BAD_SPECS = [
    ("yaml-syntax", "domain: shop.localhost", "domain: shop.localhost: x",
     "shop.yml:3: invalid YAML: mapping values are not allowed here (column 23)"),
    ("yaml-tab", "    path: /\n", "\tpath: /\n",
     "shop.yml:6: invalid YAML: while scanning for the next token, found character '\\t' that cannot start "
     "any token (column 1)"),
    ("yaml-two-documents", WORKER, WORKER + "---\napp: other\n",
     "shop.yml:19: invalid YAML: expected a single document in the stream, but found another document "
     "(column 1)"),
    ("logs-bad-size", "domain: shop.localhost\n", "domain: shop.localhost\nlogs: {file: lots}\n",
     "shop.yml:4: logs.file: 'lots' is not a size; write bytes or a number with K, M, G or T (powers of 1024), "
     "like 512M or 2G"),
    ("logs-cap-below-two-files", "domain: shop.localhost\n", "domain: shop.localhost\nlogs: {file: 10M, service: 15M}\n",
     "shop.yml:4: logs.service: 15M is out of range: between 20M and 1T"),
    ("logs-environment-too-small", "domain: shop.localhost\n",
     "domain: shop.localhost\nlogs: {file: 1M, environment: 3M}\n",
     "shop.yml:4: logs.environment: 3M for 2 services leaves each less than two files of 1M: raise "
     "logs.environment or lower logs.file"),
    ("unknown-top-level-key", "domain: shop.localhost\n", "domain: shop.localhost\nowner: me\n",
     "shop.yml:4: owner: unknown key 'owner'; known keys: version, app, environment, domain, aliases, tls, limits, logs, services"),
    ("unknown-service-key", "    path: /", "    pth: /",
     "shop.yml:6: services.web.pth: unknown key 'pth' (did you mean 'path'?); known keys: path, source, ref, "
     "root, install, build, migrate, start, health, healthy_after, drain, env, secrets, uses, redis, restart, "
     "writable, host, host_labels, replicas"),
    ("alias-twice", "domain: shop.localhost\n", "domain: shop.localhost\naliases: [www.shop.localhost, shop.localhost]\n",
     "shop.yml:4: aliases[1]: shop.localhost is named twice (the domain and aliases are each one name)"),
    ("tls-unknown", "domain: shop.localhost\n", "domain: shop.localhost\ntls: yes\n",
     "shop.yml:4: tls: 'yes' is not a TLS setting: auto (certificates by ACME), or {certificate: SECRET, key: "
     "SECRET}, the environment's secrets holding a certificate and its key"),
    ("replicas-zero", "    path: /\n", "    path: /\n    replicas: 0\n",
     "shop.yml:7: services.web.replicas: must be a whole number of replicas between 1 and 32, not '0'"),
    ("replicas-too-many", "    path: /\n", "    path: /\n    replicas: 33\n",
     "shop.yml:7: services.web.replicas: must be a whole number of replicas between 1 and 32, not '33'"),
    ("replicas-on-a-daemon", "    start: node worker.js\n", "    start: node worker.js\n    replicas: 2\n",
     "shop.yml:18: services.worker.replicas: only a web service (with a path) runs replicas behind its route; a "
     "daemon runs once"),
    ("tls-secret-name", "domain: shop.localhost\n", "domain: shop.localhost\ntls: {certificate: cert.pem, key: TLS_KEY}\n",
     "shop.yml:4: tls.certificate: 'cert.pem' is not a secret name (A-Z, 0-9 and _, like TLS_CERT): the value is set "
     "with deployctl secret set"),
    ("host-not-an-id", "    path: /\n", "    path: /\n    host: Web 1\n",
     "shop.yml:7: services.web.host: 'Web 1' is not an agent id (lowercase letters, digits and . _ -)"),
    ("host-labels-not-a-mapping", "    path: /\n", "    path: /\n    host_labels: [zone]\n",
     "shop.yml:7: services.web.host_labels: must be a mapping of labels, like {zone: eu-1}"),
    ("host-label-bad-value", "    path: /\n", "    path: /\n    host_labels: {zone: EU 1}\n",
     "shop.yml:7: services.web.host_labels.zone: zone: 'EU 1' is not a label (lowercase letters, digits and . _ -, "
     "like zone: eu-1)"),
    ("writable-escapes", "    path: /\n", "    path: /\n    writable: [../../etc/]\n",
     "shop.yml:7: services.web.writable[0]: '../../etc/' is not a relative path of letters, digits and . _ - "
     "(no .., no leading dot or slash)"),
    ("writable-absolute", "    path: /\n", "    path: /\n    writable: [/tmp]\n",
     "shop.yml:7: services.web.writable[0]: '/tmp' is not a relative path of letters, digits and . _ - "
     "(no .., no leading dot or slash)"),
    ("writable-env", "    path: /\n", "    path: /\n    writable: [.env]\n",
     "shop.yml:7: services.web.writable[0]: '.env' is not a relative path of letters, digits and . _ - "
     "(no .., no leading dot or slash)"),
    ("writable-overlap", "    path: /\n", "    path: /\n    writable: [tmp/, tmp/cache/]\n",
     "shop.yml:7: services.web.writable[1]: 'tmp/cache/' overlaps another writable path"),
    ("bad-app-name", "app: shop", "app: shop_x",
     "shop.yml:1: app: 'shop_x' contains '_'; names use lowercase letters, digits and single hyphens"),
    ("uppercase-service-name", "  web:", "  Web:",
     "shop.yml:5: services.Web: service name 'Web' has uppercase letters; names use lowercase letters, digits "
     "and single hyphens"),
    ("name-too-long", "environment: prod", "environment: production-and-staging-1",
     "shop.yml:2: environment: 'production-and-staging-1' is 24 characters long; at most 20"),
    ("double-hyphen", "environment: prod", "environment: pr--42",
     "shop.yml:2: environment: 'pr--42' contains a double hyphen"),
    ("trailing-hyphen", "  worker:", "  worker-:",
     "shop.yml:14: services.worker-: service name 'worker-' ends with a hyphen"),
    ("name-starts-with-digit", "app: shop", "app: 42shop",
     "shop.yml:1: app: '42shop' must start with a letter"),
    ("duplicate-path", "  worker:\n", "  worker:\n    path: /\n",
     "shop.yml:15: services.worker.path: path / is already used by service web"),
    ("duplicate-key", "    ref: main\n    start: node server.js",
     "    ref: main\n    ref: v2\n    start: node server.js",
     "shop.yml:9: services.web.ref: duplicate key 'ref' (first at line 8); YAML would silently keep only the "
     "last one"),
    ("duplicate-service", WORKER, WORKER + WORKER,
     "shop.yml:19: services.worker: duplicate key 'worker' (first at line 14); YAML would silently keep only "
     "the last one"),
    ("unknown-component", "uses: [mysql, redis]", "uses: [mysql, postgres]",
     "shop.yml:13: services.web.uses[1]: unknown component 'postgres'; known components: mysql, redis"),
    ("component-twice", "uses: [mysql, redis]", "uses: [mysql, mysql]",
     "shop.yml:13: services.web.uses[1]: mysql is listed twice; a service uses one mysql instance, its own or another service's"),
    ("uses-not-a-list", "    uses: [redis]", "    uses: redis",
     "shop.yml:18: services.worker.uses: must be a list, like [mysql, redis] or [web.mysql], not a string"),
    ("missing-start", "    start: node worker.js\n", "",
     "shop.yml:14: services.worker: missing required key 'start' (the command that runs the service in the "
     "foreground)"),
    ("missing-source", "    source: /srv/git/shop.git\n    ref: main\n    start: node worker.js",
     "    ref: main\n    start: node worker.js",
     "shop.yml:14: services.worker: missing required key 'source' (a git URL or a local path to a repository)"),
    ("missing-ref", "    ref: main\n    start: node worker.js", "    start: node worker.js",
     "shop.yml:14: services.worker: missing required key 'ref' (a branch, tag or full commit)"),
    ("missing-domain", "domain: shop.localhost\n", "",
     "shop.yml:1: missing required key 'domain' (the nginx server_name, like shop.example.com)"),
    ("empty-start", "    start: node worker.js", '    start: ""',
     "shop.yml:17: services.worker.start: must not be empty"),
    ("null-start", "    start: node worker.js", "    start:",
     "shop.yml:17: services.worker.start: must be a command (a string), not null"),
    ("command-not-a-string", "    start: node worker.js", "    start: [node, worker.js]",
     "shop.yml:17: services.worker.start: must be a command (a string), not a list"),
    ("env-name-lowercase", "      NODE_ENV: production", "      node_env: production",
     "shop.yml:11: services.web.env.node_env: 'node_env' is not an environment variable name (uppercase "
     "letters, digits and _, not starting with a digit)"),
    ("env-reserved", "      NODE_ENV: production", "      DATABASE_URL: mysql://x",
     "shop.yml:11: services.web.env.DATABASE_URL: DATABASE_URL is set by the deployer (reserved: PORT, "
     "DATABASE_URL, DB_HOST, DB_PORT, DB_NAME, DB_USER, DB_PASSWORD, REDIS_URL, REDIS_PREFIX)"),
    ("env-secret", "      NODE_ENV: production", "      SESSION_KEY: abc",
     "shop.yml:11: services.web.env.SESSION_KEY: SESSION_KEY is also declared in secrets; a secret's value is "
     "set with `deployctl secret set`, never in the spec"),
    ("env-boolean", "      NODE_ENV: production", "      DEBUG: yes",
     'shop.yml:11: services.web.env.DEBUG: yes is read by YAML as a boolean; quote it, like "yes"'),
    ("env-null", "      NODE_ENV: production", "      DEBUG:",
     'shop.yml:11: services.web.env.DEBUG: has no value; write "" for an empty value, or remove it'),
    ("env-list", "      NODE_ENV: production", "      HOSTS: [a, b]",
     "shop.yml:11: services.web.env.HOSTS: must be a single value, not a list"),
    ("secret-reserved", "secrets: [SESSION_KEY]", "secrets: [SESSION_KEY, DB_PASSWORD]",
     "shop.yml:12: services.web.secrets[1]: DB_PASSWORD is set by the deployer (reserved: PORT, DATABASE_URL, "
     "DB_HOST, DB_PORT, DB_NAME, DB_USER, DB_PASSWORD, REDIS_URL, REDIS_PREFIX)"),
    ("secret-twice", "secrets: [SESSION_KEY]", "secrets: [SESSION_KEY, SESSION_KEY]",
     "shop.yml:12: services.web.secrets[1]: SESSION_KEY is listed twice"),
    ("secret-bad-name", "secrets: [SESSION_KEY]", "secrets: [session-key]",
     "shop.yml:12: services.web.secrets[0]: 'session-key' is not an environment variable name (uppercase "
     "letters, digits and _, not starting with a digit)"),
    ("health-on-daemon", "    uses: [redis]\n", "    uses: [redis]\n    health: /health\n",
     "shop.yml:19: services.worker.health: a daemon's health is a mapping with a command, like {command: node "
     "check.js}; without one it is healthy once it stays up for healthy_after seconds"),
    ("healthy-after-on-web", "    path: /\n", "    path: /\n    healthy_after: 3\n",
     "shop.yml:7: services.web.healthy_after: only daemons have healthy_after; a web service is healthy when "
     "its health path answers"),
    ("healthy-after-negative", "    uses: [redis]\n", "    uses: [redis]\n    healthy_after: -1\n",
     "shop.yml:19: services.worker.healthy_after: must be a positive number of seconds, not '-1'"),
    ("healthy-after-boolean", "    uses: [redis]\n", "    uses: [redis]\n    healthy_after: true\n",
     "shop.yml:19: services.worker.healthy_after: must be a positive number of seconds, not 'true'"),
    ("health-without-slash", "    path: /\n", "    path: /\n    health: health\n",
     "shop.yml:7: services.web.health: 'health' must be a URL path starting with '/', like /health"),
    ("path-without-slash", "    path: /", "    path: api",
     "shop.yml:6: services.web.path: must start with '/', like /api"),
    ("path-dot-dot", "    path: /", "    path: /api/../admin",
     "shop.yml:6: services.web.path: '/api/../admin' contains '..'"),
    ("path-bad-char", "    path: /", "    path: /a pi",
     "shop.yml:6: services.web.path: contains ' '; a path uses letters, digits and . _ ~ / -"),
    ("root-dot-dot", "    path: /\n", "    path: /\n    root: ../other\n",
     "shop.yml:7: services.web.root: '../other' contains '..'; root must stay inside the repository"),
    ("root-absolute", "    path: /\n", "    path: /\n    root: /srv/web\n",
     "shop.yml:7: services.web.root: '/srv/web' must be relative to the repository, like web/"),
    ("empty-services", SERVICES, "services: {}\n",
     "shop.yml:4: services: must name at least one service"),
    ("services-a-list", SERVICES, "services: [web, worker]\n",
     "shop.yml:4: services: must be a mapping of service names to settings, not a list"),
    ("service-not-a-mapping", WORKER, "  worker: node worker.js\n",
     "shop.yml:14: services.worker: must be a mapping of settings, not a string"),
    ("version-2", "app: shop", "version: 2\napp: shop",
     "shop.yml:1: version: unsupported version 2; the only version is 1"),
    ("version-string", "app: shop", "version: '1'\napp: shop",
     "shop.yml:1: version: unsupported version a string; the only version is 1"),
    ("domain-invalid", "domain: shop.localhost", "domain: shop_x.localhost",
     "shop.yml:3: domain: 'shop_x.localhost' is not a hostname (letters, digits and hyphens in dot-separated "
     "labels, like shop.example.com or shop.localhost)"),
    ("domain-trailing-dot", "domain: shop.localhost", "domain: shop.localhost.",
     "shop.yml:3: domain: 'shop.localhost.' is not a hostname (letters, digits and hyphens in dot-separated "
     "labels, like shop.example.com or shop.localhost)"),
    ("ref-with-space", "    ref: main\n    start: node worker.js", '    ref: "main branch"\n    start: node worker.js',
     "shop.yml:16: services.worker.ref: 'main branch' contains spaces or control characters; a ref is a "
     "branch, tag or full commit"),
    ("ref-dash", "    ref: main\n    start: node worker.js", "    ref: --force\n    start: node worker.js",
     "shop.yml:16: services.worker.ref: '--force' starts with '-'; a ref is a branch, tag or full commit"),
    ("ref-dot-dot", "    ref: main\n    start: node worker.js", "    ref: main..dev\n    start: node worker.js",
     "shop.yml:16: services.worker.ref: 'main..dev' contains '..'; a ref is a branch, tag or full commit"),
    ("source-dash", "    source: /srv/git/shop.git\n    ref: main\n    start: node worker.js",
     "    source: --upload-pack=x\n    ref: main\n    start: node worker.js",
     "shop.yml:15: services.worker.source: '--upload-pack=x' starts with '-' (git would read it as an option)"),
    ("source-empty", "    source: /srv/git/shop.git\n    ref: main\n    start: node worker.js",
     "    source: ''\n    ref: main\n    start: node worker.js",
     "shop.yml:15: services.worker.source: must not be empty"),
]


def variant(old: str, new: str) -> str:
    assert BASE.count(old) >= 1, old
    return BASE.replace(old, new, 1)


@pytest.mark.parametrize("old, new, expected", [case[1:] for case in BAD_SPECS], ids=[c[0] for c in BAD_SPECS])
def test_bad_spec(old, new, expected):
    with pytest.raises(SpecError) as err:
        parse_spec(variant(old, new), "shop.yml")
    assert str(err.value) == expected
    assert "\n" not in str(err.value)


def test_error_attributes():
    with pytest.raises(SpecError) as err:
        parse_spec(variant("uses: [mysql, redis]", "uses: [mysql, postgres]"), "shop.yml")
    e = err.value
    assert (e.file, e.line, e.key) == ("shop.yml", 13, "services.web.uses[1]")
    assert e.message == "unknown component 'postgres'; known components: mysql, redis"
    assert isinstance(e, ValueError)


@pytest.mark.parametrize("text, expected", [
    ("", "shop.yml: the spec is empty; expected a mapping with app, environment, domain and services"),
    ("# only a comment\n",
     "shop.yml: the spec is empty; expected a mapping with app, environment, domain and services"),
    ("- web\n", "shop.yml:1: the spec must be a mapping, not a list"),
    ("app: shop\n", "shop.yml:1: missing required key 'environment' (the environment's name, like prod)"),
    ("x: !secret y\n", "shop.yml:1: invalid YAML: could not determine a constructor for the tag '!secret' (column 4)"),
    ("a: &x [*x]\n", "shop.yml:1: a[0]: an alias refers to a node that contains it; recursive values are not allowed"),
    ("a: 1\n\x07", "shop.yml:2: invalid YAML: character #x0007: special characters are not allowed"),
])
def test_documents_that_are_not_specs(text, expected):
    with pytest.raises(SpecError) as err:
        parse_spec(text, "shop.yml")
    assert str(err.value) == expected


def test_slash_variants_of_one_path_collide():
    text = variant("  worker:\n", "  worker:\n    path: /api/\n").replace("    path: /\n", "    path: /api\n")
    with pytest.raises(SpecError) as err:
        parse_spec(text, "shop.yml")
    assert str(err.value) == "shop.yml:15: services.worker.path: path /api/ is already used by service web"


def test_key_line():
    assert spec_mod.key_line(BASE, ["services", "worker", "ref"]) == 16
    assert spec_mod.key_line(BASE, ("services", "web", "uses", 1)) == 13
    assert spec_mod.key_line(BASE, ["services", "worker", "path"]) is None
    assert spec_mod.key_line("a: [", ["a"]) is None


def test_load_spec_reads_files(tmp_path):
    (tmp_path / "shop.yml").write_text(BASE)
    assert load_spec(tmp_path / "shop.yml") == parse_spec(BASE, "x")
    with pytest.raises(SpecError) as err:
        load_spec(tmp_path / "nowhere.yml")
    assert str(err.value) == f"{tmp_path}/nowhere.yml: cannot read: No such file or directory"
    (tmp_path / "latin1.yml").write_bytes(b"app: caf\xe9\n")
    with pytest.raises(SpecError, match=r"latin1.yml: not UTF-8 text \(byte 8\)$"):
        load_spec(tmp_path / "latin1.yml")


# ---------------------------------------------------------------- good specs

@pytest.mark.parametrize("name", GOOD_SPECS)
def test_good_specs_round_trip(name):
    spec = parse_spec(GOOD_SPECS[name], f"{name}.yml")
    stored = spec.to_dict()
    assert json.loads(json.dumps(stored)) == stored
    assert parse_spec(yaml.safe_dump(stored), "stored.yml") == spec
    assert spec_from_dict(stored) == spec
    assert spec_from_dict(stored).to_dict() == stored


def test_the_documented_example():
    spec = parse_spec(DOC_EXAMPLE, "shop.yml")
    assert spec.key == "shop/prod" and spec.domain == "shop.localhost" and spec.version == 1
    web, worker = spec.services
    assert web == spec.service("web") and worker == spec.service("worker")
    assert (web.is_web, web.role, web.health) == (True, "computing", "/health")
    assert (worker.is_web, worker.role, worker.health, worker.healthy_after) == (False, "daemons", None, 5.0)
    assert web.env == (("NODE_ENV", "production"),) and web.secrets == ("SESSION_KEY",)
    assert web.uses == ("mysql", "redis") and worker.uses == ("redis",)
    assert (web.root, web.install, web.build, web.migrate, web.start) == (
        "web", "npm ci --omit=dev", "npm run build", "node migrate.js", "node server.js")
    with pytest.raises(KeyError):
        spec.service("nope")


def test_canonical_form():
    spec = parse_spec(MANY_SERVICES, "blog.yml")
    assert [s.name for s in spec.services] == ["api", "cron", "zeta"]
    assert spec.to_dict() == {
        "version": 1, "app": "blog", "environment": "pr-42", "domain": "pr-42.blog.example.com",
        "services": {
            "api": {"path": "/api", "source": "git@example.com:blog.git",
                    "ref": "0123456789abcdef0123456789abcdef01234567", "start": "./api",
                    "secrets": ["TOKEN_A", "TOKEN_B"], "uses": ["mysql", "redis"]},
            "cron": {"source": "/srv/git/blog.git", "ref": "refs/tags/v1", "start": "./cron", "healthy_after": 0.5},
            "zeta": {"path": "/zeta/", "source": "https://git.example.com/blog.git", "ref": "v1.2.0",
                     "root": "apps/zeta", "start": "exec python -m zeta\n", "health": "/healthz?full=1",
                     "env": {"EMPTY": "", "NAME": "zeta", "RATIO": "0.5", "WORKERS": "4"}},
        },
    }
    # defaults written out and left out give the same spec
    explicit = variant("    path: /\n", "    path: /\n    health: /\n").replace(
        "    uses: [redis]\n", "    uses: [redis]\n    healthy_after: 5\n    build:\n    env: {}\n")
    assert parse_spec(explicit, "x") == parse_spec(BASE, "x")


def test_scalars_are_read_as_written():
    text = variant("      NODE_ENV: production", "      VERSION: 1.10\n      MODE: 0755\n      DAY: 2024-01-31\n"
                                               "      ON: yes-really\n      BIG: 1_000").replace(
        "    ref: main\n    start: node server.js", "    ref: 2.0\n    start: node server.js")
    web = parse_spec(text, "x").service("web")
    assert dict(web.env) == {"VERSION": "1.10", "MODE": "0755", "DAY": "2024-01-31", "ON": "yes-really",
                             "BIG": "1_000"}
    assert web.ref == "2.0"
    assert parse_spec(variant("environment: prod", "environment: on"), "x").environment == "on"


def test_yaml_anchors_and_merge_keys():
    text = """\
app: shop
environment: prod
domain: shop.localhost
services:
  web: &common
    path: /
    source: /srv/git/shop.git
    ref: main
    start: node server.js
  admin:
    <<: *common
    path: /admin
    start: node admin.js
"""
    admin = parse_spec(text, "x").service("admin")
    assert (admin.path, admin.source, admin.ref, admin.start) == (
        "/admin", "/srv/git/shop.git", "main", "node admin.js")


def test_root_is_normalised():
    nested = variant("    path: /\n", "    path: /\n    root: ./web//app/\n")
    assert parse_spec(nested, "x").service("web").root == "web/app"
    assert parse_spec(variant("    path: /\n", "    path: /\n    root: .\n"), "x").service("web").root is None


def test_code_fingerprint_covers_code_settings_but_not_the_ref():
    web = parse_spec(BASE, "x").service("web")
    base = code_fingerprint(web)
    assert re.fullmatch(r"[0-9a-f]{64}", base) and code_fingerprint(web) == base
    assert code_fingerprint(replace(web, ref="v2")) == base
    assert code_fingerprint(replace(web, uses=("mysql",))) == base
    for change in [dict(source="/other.git"), dict(root="web"), dict(install="npm ci"), dict(build="make"),
                   dict(migrate="m"), dict(start="node x.js"), dict(health="/h"), dict(env=(("A", "1"),)),
                   dict(secrets=("OTHER",)), dict(path="/x"), dict(healthy_after=7.0), dict(host="c-2"),
                   dict(host_labels=(("zone", "a"),))]:
        assert code_fingerprint(replace(web, **change)) != base, change


def test_aliases_and_tls_read_and_round_trip():
    for tls, expected in (("{certificate: TLS_CERT, key: TLS_KEY}", spec_mod.Tls("TLS_CERT", "TLS_KEY")),
                          ("auto", spec_mod.Tls())):
        spec = parse_spec(variant("domain: shop.localhost\n", f"domain: shop.localhost\naliases: [www.shop.localhost]\n"
                                                               f"tls: {tls}\n"), "shop.yml")
        assert spec.names == ("shop.localhost", "www.shop.localhost") and spec.tls == expected
        assert spec_mod.spec_from_dict(spec.to_dict()) == spec
        assert schema_errors(spec.to_dict(), SCHEMA) == []
    assert schema_errors({**spec.to_dict(), "tls": "manual"}, SCHEMA) != []


def test_replicas_read_round_trip_and_make_a_new_code_instance_only_when_not_one():
    spec = parse_spec(variant("    path: /\n", "    path: /\n    replicas: 3\n"), "shop.yml")
    assert spec.service("web").replicas == 3 and spec.service("web").to_dict()["replicas"] == 3
    assert spec_mod.spec_from_dict(spec.to_dict()) == spec and schema_errors(spec.to_dict(), SCHEMA) == []
    one = parse_spec(variant("    path: /\n", "    path: /\n    replicas: 1\n"), "shop.yml")
    plain = parse_spec(BASE, "shop.yml")
    assert "replicas" not in one.service("web").to_dict()
    assert code_fingerprint(one.service("web")) == code_fingerprint(plain.service("web"))
    assert code_fingerprint(spec.service("web")) != code_fingerprint(plain.service("web"))


def test_a_pin_reads_and_round_trips():
    spec = parse_spec(variant("    path: /\n", "    path: /\n    host: computing-2\n    host_labels: {zone: eu-1, disk: ssd}\n"),
                      "shop.yml")
    web = spec.service("web")
    assert (web.host, web.host_labels) == ("computing-2", (("disk", "ssd"), ("zone", "eu-1")))
    assert web.to_dict()["host"] == "computing-2" and web.to_dict()["host_labels"] == {"disk": "ssd", "zone": "eu-1"}
    assert spec_mod.spec_from_dict(spec.to_dict()) == spec


def test_service_defaults_allow_direct_construction():
    service = Service("api", path="/api", source="/s.git", ref="main", start="./api", health="/")
    assert service.role == "computing" and service.to_dict() == {"path": "/api", "source": "/s.git", "ref": "main",
                                                                   "start": "./api"}


# ---------------------------------------------------------------- deploy options

@pytest.fixture
def shop():
    return parse_spec(BASE, "shop.yml")


@pytest.mark.parametrize("text, expected", [
    ("", Options()),
    ("services: [web]\n", Options(services=("web",))),
    ("services: [worker, web]\nrenew: [redis]\n",
     Options(services=("web", "worker"), renew={"web": ("redis",), "worker": ("redis",)})),
    ("renew: [mysql]\n", Options(renew={"web": ("mysql",)})),
    ("services: [web]\nrenew: [redis, mysql]\n", Options(services=("web",), renew={"web": ("mysql", "redis")})),
    ("renew: {web: [mysql], worker: [redis]}\n", Options(renew={"web": ("mysql",), "worker": ("redis",)})),
    ("renew: {web: []}\n", Options()),
    ("refs: {web: v2, worker: 1.10}\n", Options(refs={"web": "v2", "worker": "1.10"})),
])
def test_good_options(shop, text, expected):
    options = parse_options(text, "deploy-options.yml", shop)
    assert options == expected
    assert dict(options.renew) == dict(expected.renew) and dict(options.refs) == dict(expected.refs)


@pytest.mark.parametrize("text, expected", [
    ("service: [web]\n", "deploy-options.yml:1: service: unknown key 'service' (did you mean 'services'?); "
                         "known keys: services, renew, refs"),
    ("- web\n", "deploy-options.yml:1: deploy options must be a mapping, not a list"),
    ("services: [api]\n", "deploy-options.yml:1: services[0]: no service 'api' in shop/prod (services: web, worker)"),
    ("services: []\n", "deploy-options.yml:1: services: is empty; leave it out to deploy every service"),
    ("services: web\n", "deploy-options.yml:1: services: must be a list, like [web], not a string"),
    ("services: [web, web]\n", "deploy-options.yml:1: services[1]: web is listed twice"),
    ("renew: [code]\n", "deploy-options.yml:1: renew[0]: unknown component 'code'; known components: mysql, redis"),
    ("services: [worker]\nrenew: [mysql]\n",
     "deploy-options.yml:2: renew[0]: no service in this deploy has a mysql instance of its own (services: worker)"),
    ("renew:\n  worker: [mysql]\n",
     "deploy-options.yml:2: renew.worker[0]: service worker does not use mysql (uses: redis)"),
    ("services: [web]\nrenew: {worker: [redis]}\n",
     "deploy-options.yml:2: renew.worker: service worker is not among the services this deploy is limited to (web)"),
    ("renew: mysql\n",
     "deploy-options.yml:1: renew: must be a list like [mysql] or a mapping like {web: [mysql]}, not a string"),
    ("refs: {api: v2}\n", "deploy-options.yml:1: refs.api: no service 'api' in shop/prod (services: web, worker)"),
    ("refs:\n  web: -v2\n",
     "deploy-options.yml:2: refs.web: '-v2' starts with '-'; a ref is a branch, tag or full commit"),
    ("refs: [v2]\n", "deploy-options.yml:1: refs: must be a mapping, not a list"),
])
def test_bad_options(shop, text, expected):
    with pytest.raises(SpecError) as err:
        parse_options(text, "deploy-options.yml", shop)
    assert str(err.value) == expected


def test_load_options_and_to_dict(shop, tmp_path):
    path = tmp_path / "deploy-options.yml"
    path.write_text("services: [web]\nrenew: [mysql]\nrefs: {web: v2}\n")
    options = load_options(path, shop)
    assert options.to_dict() == {"services": ["web"], "renew": {"web": ["mysql"]}, "refs": {"web": "v2"}}
    assert Options().to_dict() == {}


# ---------------------------------------------------------------- environment diffs

@pytest.fixture
def stored(shop):
    return shop.to_dict()


def test_diff_changes_a_ref(stored):
    merged = merge_diff(stored, "services:\n  web:\n    ref: v2\n", "environment-diff.yml")
    assert merged.service("web").ref == "v2"
    assert merged.service("web").uses == ("mysql", "redis")
    assert merged.service("worker") == spec_from_dict(stored).service("worker")


def test_diff_removes_a_service_with_null(stored):
    before = json.dumps(stored, sort_keys=True)
    merged = merge_diff(stored, "services: {worker: null}\n", "environment-diff.yml")
    assert [s.name for s in merged.services] == ["web"]
    assert json.dumps(stored, sort_keys=True) == before  # the stored spec is left alone


def test_diff_lists_replace_and_null_removes_keys(stored):
    diff = "services:\n  web:\n    uses: [redis]\n    secrets: null\n    env: {NODE_ENV: null, A: 1}\n"
    merged = merge_diff(stored, diff, "environment-diff.yml")
    web = merged.service("web")
    assert (web.uses, web.secrets, web.env) == (("redis",), (), (("A", "1"),))


def test_diff_adds_a_service_and_makes_a_web_service_a_daemon(stored):
    diff = "services:\n  api:\n    path: /api\n    source: /srv/git/api.git\n    ref: main\n    start: ./api\n" \
           "  web:\n    path: null\n"
    merged = merge_diff(stored, diff, "environment-diff.yml")
    assert [s.name for s in merged.services] == ["api", "web", "worker"]
    assert merged.service("web").role == "daemons" and merged.service("web").health is None


def test_empty_diff_changes_nothing(stored, shop):
    assert merge_diff(stored, "# nothing\n", "environment-diff.yml") == shop
    assert merge_diff(stored, "app: shop\nenvironment: prod\n", "environment-diff.yml") == shop


@pytest.mark.parametrize("diff, expected", [
    ("services:\n  web:\n    uses: [mongo]\n",
     "environment-diff.yml:3: services.web.uses[0]: unknown component 'mongo'; known components: mysql, redis"),
    ("services:\n  web:\n    start: null\n",
     "environment-diff.yml:2: services.web: missing required key 'start' (the command that runs the service in "
     "the foreground)"),
    ("services:\n  web:\n    path: null\n    health: /up\n",
     "environment-diff.yml:4: services.web.health: a daemon's health is a mapping with a command, like "
     "{command: node check.js}; without one it is healthy once it stays up for healthy_after seconds"),
    ("services:\n  worker:\n    path: /\n",
     "environment-diff.yml:3: services.worker.path: path / is already used by service web"),
    ("services:\n  web:\n    env:\n      SESSION_KEY: x\n",
     "environment-diff.yml:4: services.web.env.SESSION_KEY: SESSION_KEY is also declared in secrets; a secret's "
     "value is set with `deployctl secret set`, never in the spec"),
    ("services:\n  web: null\n  worker: null\n", "environment-diff.yml:1: services: must name at least one service"),
    ("domain: null\n", "environment-diff.yml:1: missing required key 'domain' (the nginx server_name, like "
                       "shop.example.com)"),
    ("app: blog\n", "environment-diff.yml:1: app: a diff cannot change the app (it is 'shop'); submit a full "
                    "spec for another environment"),
    ("services:\n  web:\n    ref: v2\n    ref: v3\n",
     "environment-diff.yml:4: services.web.ref: duplicate key 'ref' (first at line 3); YAML would silently keep "
     "only the last one"),
    ("services: [web\n", "environment-diff.yml:2: invalid YAML: while parsing a flow sequence, expected ',' or ']', "
                         "but got '<stream end>' (column 1)"),
    ("- web\n", "environment-diff.yml:1: a diff must be a mapping (a partial spec), not a list"),
    ("owner: me\n", "environment-diff.yml:1: owner: unknown key 'owner'; known keys: version, app, environment, "
                    "domain, aliases, tls, limits, logs, services"),
])
def test_bad_diffs_name_the_diff_file_and_line(stored, diff, expected):
    with pytest.raises(SpecError) as err:
        merge_diff(stored, diff, "environment-diff.yml")
    assert str(err.value) == expected


# ---------------------------------------------------------------- the JSON schema

SCHEMA = json.loads(SCHEMA_PATH.read_text())
ANNOTATIONS = {"$schema", "$id", "$defs", "title", "description"}
CHECKED = {"$ref", "const", "enum", "type", "pattern", "minLength", "maxLength", "exclusiveMinimum", "not", "allOf",
           "if", "then", "else", "required", "properties", "additionalProperties", "propertyNames", "minProperties",
           "items", "uniqueItems"}
TYPES = {"object": dict, "array": list, "string": str, "null": type(None), "boolean": bool}


def schema_errors(value, schema, where="$") -> list[str]:
    """A validator for the few JSON Schema keywords the environment schema uses (see CHECKED)."""
    if isinstance(schema, bool):
        return [] if schema else [f"{where}: not allowed"]
    errors = []
    if "$ref" in schema:
        target = SCHEMA
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        errors += schema_errors(value, target, where)
    if "const" in schema and (value != schema["const"] or isinstance(value, bool)):
        errors.append(f"{where}: must be {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: must be one of {schema['enum']}")
    if "type" in schema and not any(_is_type(value, t) for t in _as_list(schema["type"])):
        return errors + [f"{where}: must be of type {schema['type']}"]
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: must match {schema['pattern']}")
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", len(value)):
            errors.append(f"{where}: wrong length")
    if _is_type(value, "number") and "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        errors.append(f"{where}: too small")
    if "not" in schema and not schema_errors(value, schema["not"], where):
        errors.append(f"{where}: must not match {schema['not']}")
    for sub in schema.get("allOf", ()):
        errors += schema_errors(value, sub, where)
    if "if" in schema:
        branch = "then" if not schema_errors(value, schema["if"], where) else "else"
        errors += schema_errors(value, schema.get(branch, True), where)
    if isinstance(value, dict):
        errors += [f"{where}: missing {k}" for k in schema.get("required", ()) if k not in value]
        if len(value) < schema.get("minProperties", 0):
            errors.append(f"{where}: too few properties")
        for key, item in value.items():
            errors += schema_errors(key, schema.get("propertyNames", True), f"{where}.{key} (name)")
            sub = schema.get("properties", {}).get(key, schema.get("additionalProperties", True))
            errors += schema_errors(item, sub, f"{where}.{key}")
    if isinstance(value, list):
        if schema.get("uniqueItems") and len({json.dumps(v) for v in value}) != len(value):
            errors.append(f"{where}: items must be unique")
        for index, item in enumerate(value):
            errors += schema_errors(item, schema.get("items", True), f"{where}[{index}]")
    return errors


def _as_list(value):
    return value if isinstance(value, list) else [value]


def _is_type(value, name: str) -> bool:
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, TYPES[name])


def _keywords(schema) -> set[str]:
    if isinstance(schema, list):
        return set().union(*map(_keywords, schema)) if schema else set()
    if not isinstance(schema, dict):
        return set()
    found = set(schema)
    for key, sub in schema.items():
        if key in ("properties", "$defs"):
            found |= set().union(*map(_keywords, sub.values())) if sub else set()
        elif key not in ("enum", "const", "required", "type"):
            found |= _keywords(sub)
    return found


def test_the_schema_uses_only_keywords_the_test_checks():
    assert _keywords(SCHEMA) <= CHECKED | ANNOTATIONS


def test_schema_keys_match_the_loader():
    service = SCHEMA["$defs"]["service"]
    assert list(SCHEMA["properties"]) == list(spec_mod.TOP_KEYS)
    assert SCHEMA["required"] == list(spec_mod.TOP_REQUIRED)
    assert list(service["properties"]) == list(spec_mod.SERVICE_KEYS)
    assert service["required"] == list(spec_mod.SERVICE_REQUIRED)
    assert SCHEMA["$defs"]["reservedEnv"]["enum"] == list(spec_mod.RESERVED_ENV)
    assert service["properties"]["uses"]["items"]["pattern"].endswith(f"({'|'.join(spec_mod.COMPONENTS)})$")
    assert list(service["properties"]["redis"]["properties"]) == list(spec_mod.REDIS_KEYS)
    assert list(SCHEMA["properties"]["logs"]["properties"]) == list(spec_mod.LOG_KEYS)
    assert service["properties"]["redis"]["properties"]["mode"]["enum"] == list(spec_mod.REDIS_MODES)
    assert SCHEMA["additionalProperties"] is False and service["additionalProperties"] is False


@pytest.mark.parametrize("name", GOOD_SPECS)
def test_good_specs_validate_against_the_schema(name):
    assert schema_errors(yaml.safe_load(GOOD_SPECS[name]), SCHEMA) == []
    assert schema_errors(parse_spec(GOOD_SPECS[name], "x").to_dict(), SCHEMA) == []


@pytest.mark.parametrize("case", ["unknown-top-level-key", "unknown-service-key", "uppercase-service-name",
                                  "name-too-long", "unknown-component", "missing-start", "env-reserved",
                                  "health-on-daemon", "healthy-after-on-web", "path-without-slash", "root-dot-dot",
                                  "empty-services", "version-2", "ref-dash"])
def test_the_schema_rejects_what_the_loader_rejects(case):
    old, new = next(c[1:3] for c in BAD_SPECS if c[0] == case)
    assert schema_errors(yaml.safe_load(variant(old, new)), SCHEMA) != []


@given(st.text(alphabet="ab9-_A", max_size=24))
def test_schema_name_rule_is_the_loader_name_rule(text):
    rule = SCHEMA["$defs"]["name"]
    assert (re.search(rule["pattern"], text) is not None and len(text) <= rule["maxLength"]) == \
        (name_problem(text) is None)


# ---------------------------------------------------------------- shared instances and Redis modes

SHARED = """\
app: shop
environment: prod
domain: shop.test
services:
  web:
    path: /
    source: /srv/git/shop.git
    ref: main
    start: node web.js
    uses: [mysql, redis]
    redis: {mode: dedicated, maxmemory: 32mb}
  worker:
    source: /srv/git/shop.git
    ref: main
    start: node worker.js
    uses: [web.mysql, web.redis]
    env:
      QUEUE: "redis://:${REDIS_PASSWORD}@${REDIS_HOST}:${REDIS_PORT}/0"
"""


def test_a_service_uses_another_services_instances():
    spec = parse_spec(SHARED, "shop.yml")
    web, worker = spec.service("web"), spec.service("worker")
    assert worker.uses == ("mysql", "redis") and worker.owner_of("mysql") == "web" == worker.owner_of("redis")
    assert web.owner_of("mysql") == "web" and web.redis == spec_mod.RedisSettings("dedicated", 32 << 20)
    assert worker.to_dict()["uses"] == ["web.mysql", "web.redis"]
    assert web.to_dict()["redis"] == {"mode": "dedicated", "maxmemory": "32M"}
    assert spec_from_dict(spec.to_dict()) == spec
    assert schema_errors(yaml.safe_load(SHARED), SCHEMA) == []


def test_services_that_use_each_others_instances_are_refused():
    crossed = SHARED.replace("uses: [mysql, redis]", "uses: [mysql, worker.redis]", 1).replace(
        "    redis: {mode: dedicated, maxmemory: 32mb}\n", "").replace(
        "uses: [web.mysql, web.redis]", "uses: [web.mysql, redis]")
    with pytest.raises(SpecError) as err:
        parse_spec(crossed, "shop.yml")
    assert str(err.value) == ("shop.yml:10: services.web.uses: web → worker → web: these services use each other's "
                              "instances, so none of them can be made first; let one own them all")


@pytest.mark.parametrize("old, new, expected", [
    ("uses: [web.mysql, web.redis]", "uses: [api.mysql, web.redis]",
     "shop.yml:16: services.worker.uses[0]: api.mysql: no service 'api' in this spec (services: web, worker)"),
    ("uses: [mysql, redis]", "uses: [redis]",
     "shop.yml:16: services.worker.uses[0]: web.mysql: service web does not use mysql"),
    ("uses: [mysql, redis]", "uses: [worker.mysql, redis]",
     "shop.yml:10: services.web.uses[0]: worker.mysql: service worker uses this service's mysql; one of the two "
     "must have its own (mysql)"),
    ("uses: [web.mysql, web.redis]", "uses: [worker.mysql]",
     "shop.yml:16: services.worker.uses[0]: worker.mysql is this service's own instance; write mysql"),
    ("uses: [web.mysql, web.redis]", "uses: [web.mysql, mysql]",
     "shop.yml:16: services.worker.uses[1]: mysql is listed twice; a service uses one mysql instance, its own or "
     "another service's"),
    ("uses: [web.mysql, web.redis]", "uses: [web.postgres, web.redis]",
     "shop.yml:16: services.worker.uses[0]: unknown component 'postgres'; known components: mysql, redis"),
    ("uses: [web.mysql, web.redis]", "uses: [web.mysql, web.redis]\n    redis: {mode: dedicated}",
     "shop.yml:17: services.worker.redis: this service uses web's Redis instance; its mode and memory are set on "
     "service web"),
    ("{mode: dedicated, maxmemory: 32mb}", "{mode: private}",
     "shop.yml:11: services.web.redis.mode: unknown mode 'private'; known modes: prefix, dedicated"),
    ("{mode: dedicated, maxmemory: 32mb}", "{maxmemory: 32mb}",
     "shop.yml:11: services.web.redis.maxmemory: only a dedicated Redis has a memory bound of its own; a prefix "
     "user shares the server's (mode: dedicated)"),
    ("{mode: dedicated, maxmemory: 32mb}", "{mode: dedicated, maxmemory: 100k}",
     "shop.yml:11: services.web.redis.maxmemory: 100k is out of range: between 1M and 64G"),
    ("uses: [mysql, redis]\n    redis:", "uses: [mysql]\n    redis:",
     "shop.yml:11: services.web.redis: this service does not use redis (add it to uses)"),
], ids=["unknown-service", "owner-does-not-use-it", "each-uses-the-other's", "own-written-as-shared", "twice",
        "unknown-component", "mode-on-a-user", "unknown-mode", "maxmemory-in-prefix-mode", "maxmemory-too-small",
        "redis-without-redis"])
def test_bad_shared_instances_and_modes(old, new, expected):
    assert old in SHARED
    with pytest.raises(SpecError) as err:
        parse_spec(SHARED.replace(old, new, 1), "shop.yml")
    assert str(err.value) == expected


# ---------------------------------------------------------------- env values built from generated ones

WORKER_ENV = "    start: node worker.js\n    uses: [redis]\n"


@pytest.mark.parametrize("old, new, expected", [
    (WORKER_ENV, "    start: node worker.js\n    uses: [redis]\n    env:\n      DSN: mysql://${DB_USER}@x\n",
     "shop.yml:20: services.worker.env.DSN: ${DB_USER} is not a generated value of this service: this service "
     "does not use mysql (add it to uses)"),
    (WORKER_ENV, "    start: node worker.js\n    uses: [redis]\n    env:\n      LISTEN: ${PORT}\n",
     "shop.yml:20: services.worker.env.LISTEN: ${PORT} is not a generated value of this service: PORT is given to "
     "web services only (a service with a path)"),
    (WORKER_ENV, "    start: node worker.js\n    uses: [redis]\n    env:\n      X: ${HOME}/cache\n",
     "shop.yml:20: services.worker.env.X: ${HOME} is not a generated value of this service: it has REDIS_URL, "
     "REDIS_HOST, REDIS_PORT, REDIS_USER, REDIS_PASSWORD, REDIS_PREFIX; write $$ for a literal $"),
    (WORKER_ENV, "    start: node worker.js\n    uses: [redis]\n    env:\n      X: \"${REDIS_URL\"\n",
     "shop.yml:20: services.worker.env.X: ${ at offset 0 is not closed by }; write $$ for a literal $"),
    (WORKER_ENV, "    start: node worker.js\n    uses: [redis]\n    env:\n      X: \"${redis_url}\"\n",
     "shop.yml:20: services.worker.env.X: ${redis_url} is not a variable name (capitals, digits and _)"),
    (WORKER_ENV, "    start: node worker.js\n    uses: [redis]\n    env:\n      REDIS_HOST: 10.0.0.1\n",
     "shop.yml:20: services.worker.env.REDIS_HOST: REDIS_HOST is set by the deployer for this service (it uses "
     "redis); build another name from ${REDIS_HOST}"),
], ids=["unused-component", "port-in-a-daemon", "unknown-name", "unclosed", "not-a-name", "takes-a-generated-name"])
def test_bad_env_references(old, new, expected):
    with pytest.raises(SpecError) as err:
        parse_spec(variant(old, new), "shop.yml")
    assert str(err.value) == expected


def test_env_references_that_hold():
    spec = parse_spec(variant(WORKER_ENV, "    start: node worker.js\n    uses: [redis]\n    env:\n"
                                          "      QUEUE: \"${REDIS_URL}/0\"\n      PRICE: \"$$5 and $HOME\"\n"
                                          "      REDIS_HOST_FOR_NOTHING: x\n"), "shop.yml")
    assert dict(spec.service("worker").env)["QUEUE"] == "${REDIS_URL}/0"   # kept as written: built at deploy
    web_only = parse_spec(variant("      NODE_ENV: production\n",
                                  "      NODE_ENV: production\n      BIND: \"0.0.0.0:${PORT}\"\n"), "shop.yml")
    assert dict(web_only.service("web").env)["BIND"] == "0.0.0.0:${PORT}"
    # A daemon without redis may keep its own REDIS_HOST: the name is only the deployer's where it generates it.
    plain = parse_spec(variant(WORKER_ENV, "    start: node worker.js\n    env:\n      REDIS_HOST: cache.internal\n"),
                       "shop.yml")
    assert dict(plain.service("worker").env)["REDIS_HOST"] == "cache.internal"


# ---------------------------------------------------------------- health checks and drain

WEB_HEALTH = "    start: node server.js\n"


@pytest.mark.parametrize("new, expected", [
    ("    start: node server.js\n    health: {path: /login, status: [200, 700]}\n",
     "shop.yml:10: services.web.health.status[1]: '700' is not an HTTP status (100 to 599)"),
    ("    start: node server.js\n    health: {path: /login, status: []}\n",
     "shop.yml:10: services.web.health.status: lists no status; leave it out for any 2xx or 3xx"),
    ("    start: node server.js\n    health: {deadline: forever}\n",
     "shop.yml:10: services.web.health.deadline: 'forever' is not a duration between 1ms and 1 hour, like 2s, "
     "500ms or 1m"),
    ("    start: node server.js\n    health: {command: ./check}\n",
     "shop.yml:10: services.web.health.command: unknown key 'command'; known keys: path, status, timeout, "
     "interval, deadline"),
    ("    start: node server.js\n    drain: -3\n",
     "shop.yml:10: services.web.drain: '-3' is not a duration between 1ms and 1 hour, like 2s, 500ms or 1m"),
], ids=["status-out-of-range", "no-status", "bad-duration", "command-on-web", "bad-drain"])
def test_bad_health_checks(new, expected):
    with pytest.raises(SpecError) as err:
        parse_spec(variant(WEB_HEALTH, new), "shop.yml")
    assert str(err.value) == expected


def test_bad_daemon_health_and_drain():
    with pytest.raises(SpecError) as err:
        parse_spec(variant(WORKER_ENV, WORKER_ENV + "    health: {deadline: 10s}\n"), "shop.yml")
    assert str(err.value) == "shop.yml:19: services.worker.health: needs a command, like {command: node check.js}"
    with pytest.raises(SpecError) as err:
        parse_spec(variant(WORKER_ENV, WORKER_ENV + "    drain: 5s\n"), "shop.yml")
    assert str(err.value) == ("shop.yml:19: services.worker.drain: only web services (with a path) are drained; "
                              "a daemon is stopped at once")


def test_health_checks_and_drain_round_trip_in_canonical_form():
    spec = parse_spec(variant(WEB_HEALTH, "    start: node server.js\n    health: {path: /login, status: [302, 200], "
                                          "timeout: 500ms, deadline: 1m}\n    drain: 5s\n")
                      .replace(WORKER_ENV, WORKER_ENV + "    health: {command: node check.js, interval: 2}\n"), "shop.yml")
    web, worker = spec.service("web"), spec.service("worker")
    assert (web.health, web.check.statuses, web.check.timeout, web.check.deadline, web.drain) == \
        ("/login", (200, 302), 0.5, 60.0, 5.0)
    assert (worker.check.command, worker.check.interval) == ("node check.js", 2.0)
    canonical = spec.to_dict()
    assert canonical["services"]["web"]["health"] == {"path": "/login", "status": [200, 302], "timeout": 0.5,
                                                      "deadline": 60}
    assert canonical["services"]["web"]["drain"] == 5
    assert canonical["services"]["worker"]["health"] == {"command": "node check.js", "interval": 2}
    assert spec_mod.spec_from_dict(canonical) == spec
    assert schema_errors(canonical, SCHEMA) == []


def test_default_health_checks_leave_fingerprints_as_they_were():
    plain = parse_spec(BASE, "shop.yml").service("web")
    assert code_fingerprint(plain) == code_fingerprint(
        parse_spec(variant(WEB_HEALTH, "    start: node server.js\n    health: /\n    drain: 30s\n"), "shop.yml").service("web"))
    checked = parse_spec(variant(WEB_HEALTH, "    start: node server.js\n    health: {status: [204]}\n"), "shop.yml")
    assert code_fingerprint(checked.service("web")) != code_fingerprint(plain)
