"""The checked-in generated modules match deployer.proto exactly."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ["deployer_pb2.py", "deployer_pb2.pyi", "deployer_pb2_grpc.py"]


def test_generated_code_is_current(tmp_path):
    (tmp_path / "protos").mkdir()
    shutil.copy(ROOT / "protos" / "deployer.proto", tmp_path / "protos")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--grpc_python_out=.",
         "--pyi_out=.", "protos/deployer.proto"],
        cwd=tmp_path, check=True)
    for name in GENERATED:
        fresh = (tmp_path / "protos" / name).read_bytes()
        assert fresh == (ROOT / "protos" / name).read_bytes(), (
            f"protos/{name} is stale: run `make protos` and commit the result")
