"""Resolving refs against real git repositories made in a temporary folder."""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
import time

import pytest

from controller.environments.sources import SourceError, is_local, resolve_ref, sanitise

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid", "PATH": "/usr/bin:/bin"}


def git(repo, *args) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=GIT_ENV).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """main with two commits, branch `feature` at the first, tags v1 (light) and v2 (annotated)."""
    path = tmp_path / "shop"
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True, env=GIT_ENV)
    git(path, "commit", "-q", "--allow-empty", "-m", "one")
    git(path, "branch", "feature")
    git(path, "tag", "v1")
    git(path, "commit", "-q", "--allow-empty", "-m", "two")
    git(path, "tag", "-a", "v2", "-m", "release 2")
    return path


def test_branch(repo):
    assert resolve_ref(str(repo), "main") == git(repo, "rev-parse", "main")
    assert resolve_ref(str(repo), "feature") == git(repo, "rev-parse", "main~1")


def test_lightweight_and_annotated_tags_give_the_commit(repo):
    assert resolve_ref(str(repo), "v1") == git(repo, "rev-parse", "main~1")
    assert resolve_ref(str(repo), "v2") == git(repo, "rev-parse", "main")
    assert resolve_ref(str(repo), "refs/tags/v2") == git(repo, "rev-parse", "main")


def test_full_commit_is_verified_in_a_local_repository(repo):
    first = git(repo, "rev-parse", "main~1")
    assert resolve_ref(str(repo), first) == first
    assert resolve_ref(str(repo), first.upper()) == first
    assert resolve_ref(f"file://{repo}", first) == first
    missing = "0" * 40
    with pytest.raises(SourceError) as err:
        resolve_ref(str(repo), missing)
    assert str(err.value) == f"commit {missing} not found in {repo}"


def test_full_commit_of_a_remote_is_accepted_as_is():
    commit = "ab" * 20
    assert resolve_ref("https://example.invalid/shop.git", commit) == commit


def test_a_bare_repository_works(repo, tmp_path):
    bare = tmp_path / "shop.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(bare)], check=True, env=GIT_ENV)
    assert resolve_ref(str(bare), "v2") == git(repo, "rev-parse", "main")


def test_missing_ref(repo):
    with pytest.raises(SourceError) as err:
        resolve_ref(str(repo), "nope")
    assert str(err.value) == f"ref 'nope' not found in {repo} (branches and tags checked)"


def test_short_commit_gets_a_hint(repo):
    short = git(repo, "rev-parse", "--short", "main")
    with pytest.raises(SourceError, match="a commit must be given in full, 40 hex characters"):
        resolve_ref(str(repo), short)


def test_a_ref_that_is_both_branch_and_tag_is_ambiguous(repo):
    git(repo, "tag", "feature", "main")
    with pytest.raises(SourceError) as err:
        resolve_ref(str(repo), "feature")
    assert str(err.value) == (f"ref 'feature' is ambiguous in {repo}: both a branch and a tag; "
                              "use refs/heads/feature or refs/tags/feature")
    assert resolve_ref(str(repo), "refs/heads/feature") == git(repo, "rev-parse", "main~1")


def test_a_ref_is_not_matched_by_its_tail(repo):
    git(repo, "branch", "team/main", "main~1")
    assert resolve_ref(str(repo), "main") == git(repo, "rev-parse", "main")


def test_missing_repository(tmp_path):
    with pytest.raises(SourceError) as err:
        resolve_ref(str(tmp_path / "nowhere"), "main")
    assert str(err.value) == (f"cannot reach repository {tmp_path}/nowhere: fatal: "
                              f"'{tmp_path}/nowhere' does not appear to be a git repository")


def test_a_folder_inside_a_repository_is_not_that_repository(repo):
    inner = repo / "sub"
    inner.mkdir()
    with pytest.raises(SourceError, match=f"^cannot reach repository {inner}: fatal: not a git repository"):
        resolve_ref(str(inner), git(repo, "rev-parse", "main"))


def test_credentials_never_show(tmp_path):
    with pytest.raises(SourceError) as err:
        resolve_ref("https://deploy:s3cret@127.0.0.1:1/shop.git", "main", timeout=10)
    text = str(err.value)
    assert "s3cret" not in text and "\n" not in text
    assert text.startswith("cannot reach repository https://***@127.0.0.1:1/shop.git: ")


def test_timeout_kills_the_whole_process_group(monkeypatch):
    # git appends its arguments to GIT_SSH_COMMAND; the comment swallows them, so "ssh" just hangs
    marker = f"hangs-{os.getpid()}-{time.time_ns()}"
    monkeypatch.setenv("GIT_SSH_COMMAND", f"sleep 300 # {marker}")
    with pytest.raises(SourceError) as err:
        resolve_ref("ssh://git@example.invalid/shop.git", "main", timeout=1)
    assert str(err.value) == "timed out after 1s reaching repository ssh://git@example.invalid/shop.git"
    # git and the "ssh" it started are gone, not left hanging (sleep 300 would outlive the test).
    # A killed orphan is reaped by init a moment later: allow that moment, not the 300 s.
    deadline = time.monotonic() + 5
    while (left := subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)).returncode == 0 \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left.returncode == 1, left.stdout


class AskForPassword(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="git"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_never_prompts_for_a_password():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AskForPassword)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/shop.git"
    try:
        with pytest.raises(SourceError) as err:
            resolve_ref(url, "main", timeout=15)
    finally:
        server.shutdown()
        server.server_close()
    # Refused at once rather than waiting on a prompt (which would end as "timed out after 15s").
    assert str(err.value).startswith(f"cannot reach repository {url}: fatal: could not read Username")


def test_options_are_not_smuggled_in():
    with pytest.raises(SourceError, match="starting with '-'"):
        resolve_ref("--upload-pack=touch /tmp/x", "main")
    with pytest.raises(SourceError, match="starting with '-'"):
        resolve_ref("/srv/git/shop.git", "--output=/tmp/x")


@pytest.mark.parametrize("source, local", [
    ("/srv/git/shop.git", True), ("shop", True), ("./a:b", True), ("file:///srv/git/x", True),
    ("git@github.com:me/shop.git", False), ("https://github.com/me/shop.git", False),
    ("ssh://git@host/shop.git", False), ("host:shop.git", False),
])
def test_is_local(source, local):
    assert is_local(source) is local


def test_sanitise():
    assert sanitise("https://user:pw@host/x and http://tok@h/y") == "https://***@host/x and http://***@h/y"
    assert sanitise("ssh://git:pw@host/x ssh://git@host/y") == "ssh://git:***@host/x ssh://git@host/y"
    assert sanitise("git@github.com:me/shop.git") == "git@github.com:me/shop.git"
