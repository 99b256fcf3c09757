import pytest

from tests.harness import Cluster


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    c.controller.start()
    yield c
    c.close()
