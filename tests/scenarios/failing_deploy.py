"""Run by tests/test_cleanup.py in a pytest of its own: a deploy world whose test fails on
purpose (or is interrupted), to show the clean-ups still remove everything it made."""

import json
import os
import time

from tests.test_deploy import apply, new_env, web_service, world, write_spec  # noqa: F401 - the fixture


def test_fails_on_purpose(world, tmp_path):  # noqa: F811
    env = new_env(world)
    report = os.environ["SCENARIO_REPORT"]
    with open(report, "w") as out:
        json.dump({"env": env, "base": str(world["base"])}, out)
    apply(world, str(write_spec(tmp_path, env, {"web": web_service(world["repo"])})))
    with open(report + ".deployed", "w"):
        pass
    if os.environ.get("SCENARIO_HANG"):
        time.sleep(600)  # until interrupted
    raise AssertionError("failing on purpose, after a deploy")
