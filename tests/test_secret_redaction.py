"""Secrets echoed by commands, for real: the job folder and every CLI output show `***`, and no
raw value (nor its base64) is anywhere in the store, the logs or the agents' state."""

from __future__ import annotations

import base64
import secrets
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from controller.state.vault import Vault
from tests.deploy_harness import deploy_world, example_repo, unique_env
from tests.harness import ROOT, wait_for

pytestmark = pytest.mark.slow
INSTALL = "npm ci --omit=dev --no-audit --no-fund --prefer-offline"

# What a careless build prints: each secret plainly, inside multi-line output, in base64 (GNU
# base64 wraps LONG_KEY's at 76 columns), and the generated database and Redis credentials.
ECHO = """\
echo "single: $SHOP_TOKEN"
printf 'multi-line:\\n%s\\nmiddle\\n%s\\nend\\n' "$SHOP_TOKEN" "$LONG_KEY"
printf %s "$SHOP_TOKEN" | base64
echo "$SHOP_TOKEN" | base64
printf %s "$LONG_KEY" | base64
echo "$LONG_KEY" | base64
echo "db: $DB_PASSWORD"
echo "url: $DATABASE_URL"
echo "$DB_PASSWORD" | base64
echo "redis: $REDIS_URL" >&2
echo "pem follows:"
echo "$PEM_KEY"
echo "pem done"
printf %s "$PEM_KEY" | base64
"""


def spec(folder: Path, env: str, repo: Path, build: str, name: str) -> Path:
    web = {"path": "/", "source": str(repo), "ref": "main", "root": "web", "install": INSTALL,
           "build": build, "migrate": "node migrate.js",
           "start": "sh -c 'echo \"starting with $SHOP_TOKEN\"; exec node server.js'",
           "health": "/health", "uses": ["mysql", "redis"], "secrets": ["SHOP_TOKEN", "LONG_KEY", "PEM_KEY"]}
    path = folder / name
    path.write_text(yaml.safe_dump({"app": "shop", "environment": env, "domain": f"{env}.shop.test",
                                    "services": {"web": web}}, sort_keys=False))
    return path


def encodings(value: str) -> list[bytes]:
    """The raw value and the base64 a command prints of it, whole and as GNU wraps it."""
    out = [value.encode()]
    for payload in (value.encode(), value.encode() + b"\n"):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            whole = encode(payload)
            out.append(whole)
            if len(whole) > 76:
                out += [whole[i:i + 76] for i in range(0, len(whole), 76)]
    return out


def files_under(*roots: Path) -> list[Path]:
    return [p for root in roots for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()]


@pytest.fixture(scope="module")
def world():
    with deploy_world("deployer-redaction-", "shop") as made:
        yield {**made, "repo": example_repo(made["base"])}


def test_echoed_secrets_show_as_stars_and_are_nowhere_raw(world, tmp_path):
    base, cluster, repo = world["base"], world["cluster"], world["repo"]
    env = unique_env()
    world["envs"].append(env)
    token = "tok-" + secrets.token_urlsafe(18) + "/+="
    long_key = "lk-" + secrets.token_hex(60)                # 123 bytes: its base64 wraps
    pem_lines = [base64.b64encode(secrets.token_bytes(48)).decode() for _ in range(3)]
    pem_key = "-----BEGIN TEST KEY-----\n" + "\n".join(pem_lines) + "\n-----END TEST KEY-----"
    outputs: list[subprocess.CompletedProcess] = []
    for name, value in (("SHOP_TOKEN", token), ("LONG_KEY", long_key), ("PEM_KEY", pem_key)):
        outputs.append(subprocess.run([sys.executable, "-m", "deployctl.cli", "secret", "set", f"shop/{env}", name],
                                      input=value.encode(), capture_output=True, env=cluster.env(), cwd=ROOT))
        assert outputs[-1].returncode == 0, outputs[-1].stderr

    good = cluster.deployctl("apply", str(spec(tmp_path, env, repo, ECHO + "npm run build\n", "good.yml")),
                             timeout=600)
    assert good.returncode == 0, good.stdout.decode() + good.stderr.decode()
    failing = "echo \"token: $SHOP_TOKEN\"\necho \"$SHOP_TOKEN\" | base64\necho \"db: $DB_PASSWORD\"\nexit 3\n"
    bad = cluster.deployctl("apply", str(spec(tmp_path, env, repo, failing, "bad.yml")), timeout=600)
    assert bad.returncode == 1
    assert b"build failed: exit 3" in bad.stderr
    assert b"token: ***" in bad.stderr and b"db: ***" in bad.stderr       # the failed step's tail
    outputs += [good, bad]

    jobs = [line.split()[1] for line in (good.stdout + bad.stdout).decode().splitlines()
            if line.startswith("job ") and len(line.split()) == 2]
    assert len(jobs) == 2
    for job in jobs:
        outputs.append(cluster.deployctl("logs", job))
        assert outputs[-1].returncode == 0, outputs[-1].stderr
    good_log = outputs[-2].stdout
    for expected in (b"single: ***\n", b"multi-line:\n***\nmiddle\n***\nend\n", b"db: ***\n",
                     b"redis: redis://", b":***@"):
        assert expected in good_log, good_log.decode()
    assert b"url: mysql://" in good_log and b":***@127.0.0.1:3306/" in good_log
    # A multi-line secret reaches the command whole (through .env) and leaves as stars.
    assert b"pem follows:\n***\npem done\n" in good_log, good_log.decode()

    store = cluster.controller.store
    job_output = b"".join(p.read_bytes() for p in (store / "jobs" / jobs[0]).rglob("output.log"))
    assert b"single: ***" in job_output and b"db: ***" in job_output

    service_log = cluster.deployctl("logs", f"shop/{env}/web", "--tail", "200")
    assert b"starting with ***" in service_log.stdout, service_log.stdout + service_log.stderr
    env_file = next((base / "srv").glob(f"auto-shop-{env}-web/releases/1/.env"))
    assert token.encode() in env_file.read_bytes()          # the service itself has the value
    assert all(line.encode() in env_file.read_bytes() for line in pem_lines)
    adhoc = cluster.deployctl("exec", "--agent", "computing-1", "--", "cat", str(env_file))
    assert adhoc.returncode == 0, adhoc.stderr
    assert b"SHOP_TOKEN=***" in adhoc.stdout and b"DB_PASSWORD=***" in adhoc.stdout
    outputs += [service_log, adhoc]

    # Every operation acknowledged: the agents' journals keep no payload (nor redact list).
    state_dirs = [agent.state_dir for agent in cluster.agents.values()]
    wait_for(lambda: all((folder / "done").exists() for d in state_dirs
                         for folder in (d / "operations").iterdir()), 30, what="every operation done")

    vault = Vault.for_store(store / "secrets.key", create=False)
    with sqlite3.connect(f"file:{store / 'deployer.db'}?mode=ro", uri=True) as db:
        passwords = [vault.open_text(row[0]) for row in
                     db.execute("SELECT password FROM credentials WHERE env_key=?", (f"shop/{env}",))]
    assert len(passwords) == 2                               # mysql 1 and redis 1
    needles = [n for value in (token, long_key, pem_key, *pem_lines, *passwords) for n in encodings(value)]
    haystacks = {f"cli output {i}": o.stdout + o.stderr for i, o in enumerate(outputs)}
    logs = [cluster.controller.log, *(agent.log for agent in cluster.agents.values())]
    for path in files_under(store, *logs, *state_dirs):
        haystacks[str(path)] = path.read_bytes()
    assert str(store / "deployer.db") in haystacks and str(store / "deployer.db-wal") in haystacks
    leaks = [(where, needle) for where, data in haystacks.items() for needle in needles if needle in data]
    assert not leaks, leaks[:5]

    # Rotated: release 1's .env still holds the former value, which stays redacted.
    rotated = subprocess.run([sys.executable, "-m", "deployctl.cli", "secret", "set", f"shop/{env}", "SHOP_TOKEN"],
                             input=b"tok-rotated-" + secrets.token_hex(12).encode(), capture_output=True,
                             env=cluster.env(), cwd=ROOT)
    assert rotated.returncode == 0, rotated.stderr
    after = cluster.deployctl("exec", "--agent", "computing-1", "--", "cat", str(env_file))
    assert after.returncode == 0 and b"SHOP_TOKEN=***" in after.stdout, after.stdout + after.stderr
    assert not [n for n in encodings(token) if n in after.stdout + after.stderr]
