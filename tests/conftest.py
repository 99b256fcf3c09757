import os
import signal

import pytest
from hypothesis import HealthCheck, settings

from tests.harness import DRIVER, Cluster

# `make fuzz`: HYPOTHESIS_PROFILE=fuzz runs tests/test_fuzz.py with far more examples. Without it,
# hypothesis keeps its default profile.
# A run started in the background by a non-interactive shell (`make test &`, some CI runners)
# inherits SIGINT and SIGQUIT ignored, and so would every process the tests start: the tests of
# Ctrl-C would then send a signal nobody hears. The suite puts the default back for its own.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

settings.register_profile("fuzz", max_examples=3000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    c.controller.start()
    yield c
    c.close()


def pytest_sessionfinish(session, exitstatus):
    """Under CI=true a skipped test fails the run: a skip there means a promise of the README went
    untested without anyone noticing (the project's own set-up installs what the tests need)."""
    if os.environ.get("CI") != "true" or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        for report in skipped:
            reporter.write_line(f"unexpected skip under CI: {report.nodeid}: {report.longrepr[-1]}")
        session.exitstatus = 1


def pytest_collection_modifyitems(config, items):
    """Tests marked `systemd` need systemd as PID 1: they run in the systemd pass of `make test`
    (tests/run.py), and are deselected (not skipped) in the supervisor's pass."""
    if DRIVER == "systemd":
        if not os.path.isdir("/run/systemd/system"):
            raise pytest.UsageError("DEPLOYER_TEST_DRIVER=systemd, but systemd is not PID 1 here: "
                                    "run it through tests/run.py, which starts a bare systemd")
        return
    kept = [item for item in items if item.get_closest_marker("systemd") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("systemd")])
        items[:] = kept


_run_lock: list[int] = []


def pytest_sessionstart(session):
    """Sweep what a killed earlier run left (tests/sweep.py), unless another run is alive. A run
    that does not sweep (DEPLOYER_TESTS_NO_SWEEP, e.g. beside an older checkout's run) still holds
    the lock, so no other run's sweep takes its things for leftovers."""
    if os.geteuid() != 0:
        return
    from tests.sweep import hold
    fd, swept = hold(sweep_first=not os.environ.get("DEPLOYER_TESTS_NO_SWEEP"))
    _run_lock.append(fd)
    if swept:
        print("\n" + swept)
