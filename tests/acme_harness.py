"""An ACME server for the HTTPS tests: pebble, and its DNS (pebble-challtestsrv), both from
Debian's packages, run in the root namespace in a folder of the test's. Every name resolves to
the router address the test gives, so pebble's HTTP-01 requests go to a router over the bridge,
on port 80, as a public CA's would. Pebble's own HTTPS is signed by a CA of the test's, which the
controller is told to trust (`acme.ca_file`); the certificates pebble issues chain up to a root
it makes at start (`root()`)."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import urllib.request
from pathlib import Path

from tests.certs import OwnCA
from tests.harness import free_port, wait_for


class Pebble:
    def __init__(self, base: Path) -> None:
        self.dir = base / "pebble"
        self.dir.mkdir(parents=True, exist_ok=True)
        ca = OwnCA("the test's CA for pebble's own HTTPS")
        certificate, key = ca.issue("127.0.0.1")
        self.ca_file = self.dir / "ca.pem"
        self.ca_file.write_text(ca.pem)
        (self.dir / "cert.pem").write_text(certificate)
        (self.dir / "key.pem").write_text(key)
        self.port, self.management, self.dns, self.dns_management = (free_port() for _ in range(4))
        self.directory = f"https://127.0.0.1:{self.port}/dir"
        (self.dir / "pebble.json").write_text(json.dumps({"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}", "managementListenAddress": f"127.0.0.1:{self.management}",
            "certificate": "cert.pem", "privateKey": "key.pem", "httpPort": 80, "tlsPort": 443,
            "ocspResponderURL": "", "externalAccountBindingRequired": False}}))
        self.processes: list[subprocess.Popen] = []

    def settings_file(self, **acme: str) -> Path:
        """A controller settings file that points `tls: auto` at this server."""
        path = self.dir / "controller.yml"
        path.write_text(json.dumps({"acme": {"directory": self.directory, "ca_file": str(self.ca_file),
                                             "contact": "ops@fleet.test", **acme}}))
        os.chmod(path, 0o600)
        return path

    def start(self, answer_at: str) -> "Pebble":
        """Both servers, every name resolving to `answer_at` (a router's address)."""
        def run(name: str, *argv: str, **env: str) -> None:
            log = open(self.dir / f"{name}.log", "ab")
            self.processes.append(subprocess.Popen([name, *argv], cwd=self.dir, stdout=log, stderr=log,
                                                   env={**os.environ, **env}))
        run("pebble-challtestsrv", "-defaultIPv4", answer_at, "-defaultIPv6", "", "-dns01", f"127.0.0.1:{self.dns}",
            "-http01", "", "-https01", "", "-tlsalpn01", "", "-management", f"127.0.0.1:{self.dns_management}")
        # No random sleeps before validating; pebble still rejects 5% of good nonces, as it does by
        # default, which the client must retry.
        run("pebble", "-config", "pebble.json", "-dnsserver", f"127.0.0.1:{self.dns}", PEBBLE_VA_NOSLEEP="1")
        wait_for(lambda: self._get(self.directory) is not None, timeout=30, what="pebble answering")
        return self

    def _get(self, url: str) -> bytes | None:
        try:
            with urllib.request.urlopen(url, timeout=5, context=ssl.create_default_context(
                    cafile=str(self.ca_file))) as reply:
                return reply.read()
        except OSError:
            return None

    def root(self) -> str:
        """The root the certificates pebble issues chain up to (made at its start)."""
        return self._get(f"https://127.0.0.1:{self.management}/roots/0").decode()

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
