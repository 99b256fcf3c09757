"""Resolving a service's git ref to the exact commit to deploy, with `git ls-remote`."""

from __future__ import annotations

import os
import re
import signal
import subprocess

from common.redact import sanitise
from common import errors

_FULL_COMMIT = re.compile(r"[0-9a-fA-F]{40}")
_SHORT_COMMIT = re.compile(r"[0-9a-fA-F]{4,39}")


class SourceError(errors.BadInput):
    """A repository or ref that cannot be resolved; str() is one line."""


def resolve_ref(source: str, ref: str, timeout: float = 20) -> str:
    """The full commit that `ref` (a branch, tag, full commit or `refs/...` name) names in `source`."""
    if source.startswith("-") or ref.startswith("-"):
        raise SourceError(f"refusing a source or ref starting with '-': {sanitise(source)} {ref}")
    if _FULL_COMMIT.fullmatch(ref):
        return _verify_commit(source, ref.lower(), timeout)
    # ls-remote lists an annotated tag's commit (`^{}`) only when asked for it by name
    patterns = [name + peel for name in _candidates(ref) for peel in ("", "^{}")]
    listing = _git(["ls-remote", "--", source, *patterns], source, timeout)
    found = _match(listing, ref)
    if len(found) > 1:
        raise SourceError(f"ref {ref!r} is ambiguous in {sanitise(source)}: both a branch and a tag; "
                          f"use refs/heads/{ref} or refs/tags/{ref}")
    if not found:
        hint = "; a commit must be given in full, 40 hex characters" if _SHORT_COMMIT.fullmatch(ref) else ""
        raise SourceError(f"ref {ref!r} not found in {sanitise(source)} (branches and tags checked{hint})")
    return next(iter(found.values()))


def is_local(source: str) -> bool:
    """Whether git reads `source` from this machine's disk rather than over a network."""
    if "://" in source:
        return source.lower().startswith("file://")
    colon, slash = source.find(":"), source.find("/")
    # git reads `host:path` (a colon before any slash) as ssh
    return colon < 0 or 0 <= slash < colon


def _candidates(ref: str) -> list[str]:
    if ref.startswith("refs/") or ref == "HEAD":
        return [ref]
    return [f"refs/heads/{ref}", f"refs/tags/{ref}"]


def _match(listing: str, ref: str) -> dict[str, str]:
    """The refs in an ls-remote listing that `ref` names exactly, each with its commit (tags peeled)."""
    wanted = set(_candidates(ref))
    commits: dict[str, str] = {}
    for line in listing.splitlines():
        commit, _, name = line.partition("\t")
        if name.endswith("^{}") and name[:-3] in wanted:
            commits[name[:-3]] = commit  # the commit an annotated tag points to
        elif name in wanted:
            commits.setdefault(name, commit)
    return commits


def _verify_commit(source: str, commit: str, timeout: float) -> str:
    if not is_local(source):
        return commit  # a remote cannot be asked about a single commit without fetching it
    path = source[len("file://"):] if source.lower().startswith("file://") else source
    _git(["-C", path, "rev-parse", "--git-dir"], source, timeout, ceiling=path)
    try:
        _git(["-C", path, "cat-file", "-e", f"{commit}^{{commit}}"], source, timeout, ceiling=path)
    except SourceError:
        raise SourceError(f"commit {commit} not found in {sanitise(source)}") from None
    return commit


def _git(args: list[str], source: str, timeout: float, ceiling: str | None = None) -> str:
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", LC_ALL="C",
               GIT_SSH_COMMAND=f"{os.environ.get('GIT_SSH_COMMAND') or 'ssh'} -o BatchMode=yes")
    if ceiling is not None:
        # stop git from using an enclosing repository when `source` itself is not one
        env["GIT_CEILING_DIRECTORIES"] = os.path.dirname(os.path.abspath(ceiling))
    try:
        process = subprocess.Popen(["git", *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=env, text=True, errors="replace",
                                   start_new_session=True)
    except FileNotFoundError:
        raise SourceError("git is not installed") from None
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # git's ssh or http helper runs in the same new session, so this ends it too
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise SourceError(f"timed out after {timeout:g}s reaching repository {sanitise(source)}") from None
    if process.returncode != 0:
        first = next((line.strip() for line in err.splitlines() if line.strip()), f"exit {process.returncode}")
        raise SourceError(f"cannot reach repository {sanitise(source)}: {sanitise(first)}")
    return out
