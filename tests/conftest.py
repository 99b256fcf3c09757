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
