"""`make test`: the whole suite with the built-in supervisor and, at the same time, the tests marked
`drivers` (deploys, day-2, recovery) and `systemd` once more with the systemd service driver,
under a bare systemd of the tests' own (tests/systemd_ns.py).

The two passes share no state (every test names its own environments), so they run side by side,
and the first spreads its test files over two workers (pytest-xdist; a file's tests stay on one
worker, since they share a module's cluster). The first pass prints as it goes, the systemd
pass's output follows when it ends. This process
sweeps what a killed earlier run left, then holds the run's lock for both passes (tests/sweep.py).
Ctrl-C stops both and the namespace with everything in it.

    python -m tests.run [PYTEST ARGS…]      e.g. -x, or -k deploy (passed to both passes)
    DEPLOYER_TESTS_PASSES=supervisor|systemd   one pass only
    DEPLOYER_TESTS_WORKERS=N                   the first pass's workers, a file each at a time
                                               (default 2; 0 runs it in this one process)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests import systemd_ns
from tests.harness import ROOT

MARIADB_SOCKET_DIR = "/run/mysqld"


def pytest_argv(*extra: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-rs", *extra]


def outcome(name: str, code: int) -> str:
    if code == 5:
        return f"{name} pass: pytest collected no tests"
    return f"{name} pass: " + ("passed" if code == 0 else f"failed (exit code {code})")


def main(args: list[str]) -> int:
    passes = os.environ.get("DEPLOYER_TESTS_PASSES", "supervisor,systemd").split(",")
    env = {**os.environ, "DEPLOYER_TESTS_NO_SWEEP": "1"}
    lock = None
    if os.geteuid() == 0:
        from tests.sweep import hold
        lock, swept = hold(sweep_first=not os.environ.get("DEPLOYER_TESTS_NO_SWEEP"))
        if swept:
            print(swept, flush=True)
    # The passes run in process groups of their own, so Ctrl-C (or a SIGTERM to this process) reaches
    # each exactly once, from here: a second SIGINT would cut a pass's clean-ups short.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started in the background (see conftest.py)
    children: dict[str, subprocess.Popen] = {}
    ns_pid = 0
    folder = Path(tempfile.mkdtemp(prefix="deployer-run-"))
    log = folder / "systemd-pass.log"
    started = time.monotonic()
    try:
        if "systemd" in passes:
            keep = [str(ROOT)] + [MARIADB_SOCKET_DIR] * os.path.isdir(MARIADB_SOCKET_DIR)
            ns_pid = systemd_ns.start(keep, folder / "systemd.log")
            with open(log, "wb") as out:
                children["systemd"] = subprocess.Popen(
                    [*systemd_ns.enter(ns_pid, str(ROOT)), "env", "DEPLOYER_TEST_DRIVER=systemd",
                     f"TMPDIR={systemd_ns.TMPDIR}", "PYTHONUNBUFFERED=1", *pytest_argv("-p", "no:cacheprovider", "-m", "drivers or systemd", *args)],
                    cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    process_group=0)
        if "supervisor" in passes:
            workers = os.environ.get("DEPLOYER_TESTS_WORKERS", "2")
            spread = ["-n", workers, "--dist", "loadfile"] if workers != "0" else []
            children["supervisor"] = subprocess.Popen(pytest_argv(*spread, *args), cwd=ROOT, env=env,
                                                      process_group=0)
        codes = {name: child.wait() for name, child in children.items()}
    except KeyboardInterrupt:
        for child in children.values():
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGINT)   # as Ctrl-C reaches a foreground group
        for child in children.values():
            try:
                child.wait(120)
            except subprocess.TimeoutExpired:
                child.kill()
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if ns_pid:
            systemd_ns.stop(ns_pid)
        if "systemd" in children and log.exists():
            print("\n---- the systemd pass (agents with the systemd driver, under a bare systemd) ----",
                  flush=True)
            sys.stdout.write(log.read_text(errors="replace"))
        subprocess.run(["rm", "-rf", str(folder)])
        if lock is not None:
            os.close(lock)
    minutes = (time.monotonic() - started) / 60
    for name, code in codes.items():
        print(outcome(name, code))
    print(f"both passes took {minutes:.1f} min" if len(codes) > 1 else f"took {minutes:.1f} min")
    return 0 if all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
