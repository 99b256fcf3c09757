import os

import pytest
from hypothesis import HealthCheck, settings

from tests.harness import Cluster

# `make fuzz`: HYPOTHESIS_PROFILE=fuzz runs tests/test_fuzz.py with far more examples. Without it,
# hypothesis keeps its default profile.
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


_run_lock: list[int] = []


def pytest_sessionstart(session):
    """Sweep what a killed earlier run left (tests/sweep.py), unless another run is alive."""
    if os.geteuid() != 0 or os.environ.get("DEPLOYER_TESTS_NO_SWEEP"):  # e.g. beside an older checkout's run
        return
    from tests.sweep import hold_and_sweep
    fd, swept = hold_and_sweep()
    _run_lock.append(fd)
    if swept:
        print(f"\nswept what an earlier test run left: {'; '.join(swept[:20])}"
              + (f" and {len(swept) - 20} more" if len(swept) > 20 else ""))
