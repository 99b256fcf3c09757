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
