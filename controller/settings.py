"""The controller's config file (`--config`, e.g. /etc/deployer/controller.yml): how long finished
jobs are kept and whom to notify. Every setting has a default; a file with a mistake stops the
controller at start with one line naming the file and the key (decision 031).

    jobs:
      keep: 30d            # finished jobs' folders and operation outputs older than this go …
      keep_last: 20        # … except each environment's newest 20 jobs
    notify:
      - name: ops
        url: https://hooks.example.org/deployer
        format: json       # or slack: {"text": …}, for Slack-compatible incoming webhooks
        key_file: /etc/deployer/notify-ops.key   # the HMAC key, root's, mode 0600
        events: [job.finished, service.crash_loop, agent.lost, verify.drift]   # the default: all
    notify_retry: {first: 1s, max: 60s, give_up_after: 24h}
    health: {every: 10s, failures: 3, timeout: 2s,   # checks of live web instances (decision 032)
             replace_after: 5m}                      # a web replica whose host is lost this long moves
    acme:                  # for `tls: auto` (decision 036); without it, `tls: auto` is refused
      directory: https://acme-v02.api.letsencrypt.org/directory
      contact: ops@example.org          # optional: the account's email
      ca_file: /etc/deployer/acme-ca.pem   # optional: whom to trust for that server (default: the system's CAs)
      renew_before: 30d    # a certificate with less left is renewed
      check_every: 12h     # how often the controller looks
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common import errors
from controller.environments.certificates import AcmeSettings
from controller.environments.notify import EVENTS, FORMATS, Retry, Target
from controller.environments.watch import HealthSettings
from controller.state.retention import Retention

KEYS = ("jobs", "notify", "notify_retry", "health", "acme")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
KEY_MIN_BYTES = 16


class ConfigError(errors.BadInput):
    pass


@dataclass(frozen=True)
class Settings:
    retention: Retention = Retention()
    targets: tuple[Target, ...] = ()
    retry: Retry = Retry()
    health: HealthSettings = HealthSettings()
    acme: AcmeSettings = AcmeSettings()
    source: str = field(default="", compare=False)


def load(path: Path | None) -> Settings:
    if path is None:
        return Settings()
    where = str(path)
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}{at}: not YAML: {getattr(exc, 'problem', None) or exc}") from None
    if data is None:
        return Settings(source=where)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a mapping of {', '.join(KEYS)} is expected")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}: not a setting (known: {', '.join(KEYS)})")
    targets = _targets(where, data.get("notify"))
    if targets and mode & stat.S_IROTH:
        raise ConfigError(f"{where}: readable by every user, and its webhook URLs may be secrets: chmod o-r it")
    return Settings(_retention(where, data.get("jobs")), targets, _retry(where, data.get("notify_retry")),
                    _health(where, data.get("health")), _acme(where, data.get("acme")), where)


def _acme(where: str, value: Any) -> AcmeSettings:
    value = _mapping(where, "acme", value, ("directory", "contact", "ca_file", "renew_before", "check_every"))
    default = AcmeSettings()
    if not value:
        return default
    directory = value.get("directory")
    if not isinstance(directory, str) or not re.fullmatch(r"https://[^\s/?#]+/[^\s]*", directory):
        raise ConfigError(f"{where}: acme.directory: the ACME server's directory URL is needed (https://…)")
    contact = value.get("contact", "")
    if not isinstance(contact, str) or contact and not re.fullmatch(r"[^\s@:,]+@[^\s@:,]+", contact):
        raise ConfigError(f"{where}: acme.contact: {contact!r} is not an email address")
    ca_file = value.get("ca_file", "")
    if not isinstance(ca_file, str) or ca_file and not os.path.isfile(ca_file):
        raise ConfigError(f"{where}: acme.ca_file: {ca_file!r} is not a file")
    renew = _seconds(where, "acme.renew_before", value["renew_before"]) if "renew_before" in value \
        else default.renew_before
    every = _seconds(where, "acme.check_every", value["check_every"]) if "check_every" in value \
        else default.check_every
    if not 1 <= every <= 7 * 86400:
        raise ConfigError(f"{where}: acme.check_every: from 1s to 7d")
    return AcmeSettings(directory, ca_file, contact, renew, every)


def _health(where: str, value: Any) -> HealthSettings:
    value = _mapping(where, "health", value, ("every", "failures", "timeout", "replace_after"))
    default = HealthSettings()
    every = _seconds(where, "health.every", value["every"]) if "every" in value else default.every
    timeout = _seconds(where, "health.timeout", value["timeout"]) if "timeout" in value else default.timeout
    failures = value.get("failures", default.failures)
    if not 1 <= every <= 3600:
        raise ConfigError(f"{where}: health.every: from 1s to 1h")
    if not timeout < every or timeout > 30:
        raise ConfigError(f"{where}: health.timeout: at most 30s, and shorter than health.every")
    if not isinstance(failures, int) or isinstance(failures, bool) or not 1 <= failures <= 100:
        raise ConfigError(f"{where}: health.failures: {failures!r} is not a number of rounds from 1 to 100")
    replace_after = _seconds(where, "health.replace_after", value["replace_after"]) if "replace_after" in value \
        else default.replace_after
    if not 1 <= replace_after <= 7 * 86400:
        raise ConfigError(f"{where}: health.replace_after: from 1s to 7d")
    return HealthSettings(every, failures, timeout, replace_after)


def _seconds(where: str, key: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    match = _DURATION.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(f"{where}: {key}: {value!r} is not a duration (10s, 5m, 24h, 30d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _mapping(where: str, key: str, value: Any, known: tuple[str, ...]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key}: a mapping of {', '.join(known)} is expected")
    for k in value:
        if k not in known:
            raise ConfigError(f"{where}: {key}.{k}: not a setting (known: {', '.join(known)})")
    return value


def _retention(where: str, value: Any) -> Retention:
    value = _mapping(where, "jobs", value, ("keep", "keep_last"))
    default = Retention()
    keep_last = value.get("keep_last", default.keep_last)
    if not isinstance(keep_last, int) or isinstance(keep_last, bool) or not 1 <= keep_last <= 100_000:
        raise ConfigError(f"{where}: jobs.keep_last: {keep_last!r} is not a number of jobs from 1 to 100000")
    keep = _seconds(where, "jobs.keep", value["keep"]) if "keep" in value else default.keep_s
    if keep < 3600:
        raise ConfigError(f"{where}: jobs.keep: keep finished jobs at least 1h")
    return Retention(keep, keep_last)


def _retry(where: str, value: Any) -> Retry:
    value = _mapping(where, "notify_retry", value, ("first", "max", "give_up_after"))
    default = Retry()
    retry = Retry(*(_seconds(where, f"notify_retry.{k}", value[k]) if k in value else getattr(default, k)
                    for k in ("first", "max", "give_up_after")))
    if retry.first > retry.max:
        raise ConfigError(f"{where}: notify_retry.first: longer than notify_retry.max")
    return retry


def _targets(where: str, value: Any) -> tuple[Target, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"{where}: notify: a list of targets (name, url, format, key_file, events) is expected")
    targets: list[Target] = []
    for i, item in enumerate(value):
        at = f"notify[{i}]"
        item = _mapping(where, at, item, ("name", "url", "format", "key_file", "events", "timeout"))
        name = item.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(f"{where}: {at}.name: a short name is needed (a-z, 0-9, - and _), e.g. ops")
        if any(t.name == name for t in targets):
            raise ConfigError(f"{where}: {at}.name: {name} is named twice")
        url = item.get("url")
        if not isinstance(url, str) or not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", url):
            raise ConfigError(f"{where}: {at}.url: an http:// or https:// URL is needed")
        form = item.get("format", "json")
        if form not in FORMATS:
            raise ConfigError(f"{where}: {at}.format: {form!r} is not one of {', '.join(FORMATS)}")
        events = item.get("events", list(EVENTS))
        if not isinstance(events, list) or not events or any(e not in EVENTS for e in events):
            raise ConfigError(f"{where}: {at}.events: a list of {', '.join(EVENTS)} is expected")
        timeout = _seconds(where, f"{at}.timeout", item["timeout"]) if "timeout" in item else 5.0
        key = _key(where, f"{at}.key_file", item["key_file"]) if "key_file" in item else None
        targets.append(Target(name, url, form, key, frozenset(events), min(timeout, 60.0)))
    return tuple(targets)


def _key(where: str, at: str, value: Any) -> bytes:
    """The HMAC key, from a file only root reads (a key in the config or an argv would be seen)."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise ConfigError(f"{where}: {at}: an absolute path is needed")
    try:
        fd = os.open(value, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{where}: {at}: cannot read {value}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{where}: {at}: {value} is not a file")
        if info.st_mode & 0o037 or info.st_uid not in (os.geteuid(), 0):
            raise ConfigError(f"{where}: {at}: {value} must be root's or ours, mode 0600 or 0640 (it is "
                              f"{stat.S_IMODE(info.st_mode):04o}, owner {info.st_uid})")
        key = os.read(fd, 4096).strip()
    finally:
        os.close(fd)
    if len(key) < KEY_MIN_BYTES:
        raise ConfigError(f"{where}: {at}: {value} holds fewer than {KEY_MIN_BYTES} bytes: "
                          "make one with `openssl rand -hex 32`")
    return key
