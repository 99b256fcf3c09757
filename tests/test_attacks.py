"""Attacks on a shared server, replayed for real: each test plays a hostile tenant, a rogue agent
or a local user, and asserts that the concrete harm did not happen (not merely that an error was
printed). Where it can be shown safely, a test also shows the attack works without its defence.

Sections are independent (each builds what it needs); see docs/decisions/013-threat-model.md.
"""

from __future__ import annotations


# ---------------------------------------------------------------- 1. ownership before destruction


# ---------------------------------------------------------------- 2. tenant code without root


# ---------------------------------------------------------------- 3. agents prove what they provide


# ---------------------------------------------------------------- 4. operators authenticate


# ---------------------------------------------------------------- 5. limits per environment


# ---------------------------------------------------------------- 6. shared Redis stays available


# ---------------------------------------------------------------- 7. acknowledged output is kept

import time

import pytest

from tests.fault_harness import Tmpfs, can_mount_tmpfs
from tests.harness import Cluster, wait_for

# Prints a part, waits for a file, prints the next part, and so on: the test fills the controller's
# disk between parts. Lines are numbered, so a lost or shifted byte shows.
_PARTS = ("import os, sys, time\n"
          "def part(n, lines):\n"
          "    sys.stdout.write(''.join(f'{n}:{i:06d} ' + 'o' * 90 + '\\n' for i in range(lines)))\n"
          "    sys.stdout.flush()\n"
          "def wait(path):\n"
          "    while not os.path.exists(path): time.sleep(0.02)\n"
          "part(1, 2000)\n"
          "wait(sys.argv[1]); part(2, 20000)\n"
          "open(sys.argv[2], 'w').close()\n"
          "wait(sys.argv[3]); part(3, 2000)\n")


def _parts(*sizes: tuple[int, int]) -> bytes:
    return "".join(f"{n}:{i:06d} " + "o" * 90 + "\n" for n, lines in sizes for i in range(lines)).encode()


def test_output_the_controllers_full_disk_refused_is_sent_again_and_whole(tmp_path):
    """The controller's whole store is a small disk that fills while a command prints 2 MB: the
    bytes its disk does not take are never acknowledged, the agent keeps them and sends them again
    once there is room, and the output is whole, byte for byte. (Before, the controller ignored a
    short write: it acknowledged bytes it never wrote, and every later offset was shifted.)"""
    if not can_mount_tmpfs(tmp_path):
        pytest.skip("needs root to mount a small tmpfs")
    disk = Tmpfs(tmp_path / "store", "16m").mount()
    cluster = Cluster(tmp_path)
    try:
        cluster.controller.start()
        cluster.add_agent("computing-1")
        cluster.wait_connected("computing-1")
        go, printed, go2 = tmp_path / "go", tmp_path / "printed", tmp_path / "go2"
        cli = cluster.deployctl_bg("exec", "--agent", "computing-1", "--", "python3", "-c", _PARTS,
                                   str(go), str(printed), str(go2))
        first = _parts((1, 2000))
        op_id = wait_for(lambda: [o for o in cluster.op_ids()
                                   if len(cluster.output(o)) >= len(first)], what="part 1 received")[0]
        disk.fill()
        go.touch()
        wait_for(lambda: cluster.controller.events("op.output_refused"), what="the controller refusing")
        wait_for(printed.exists, what="part 2 printed")
        time.sleep(3)  # a few rounds of the agent sending again into a disk still full
        held = len(cluster.output(op_id))
        assert len(first) <= held < len(first) + len(_parts((2, 20000)))
        (disk.path / "filler").unlink()
        go2.touch()
        record = cluster.wait_finished(op_id, timeout=60)
        assert record["result"]["outcome"] == "exited" and record["result"]["exit_code"] == 0, record
        assert record["result"]["error"] == ""
        expected = _parts((1, 2000), (2, 20000), (3, 2000))
        assert cluster.output(op_id) == expected
        out, err = cli.communicate(timeout=60)
        assert cli.returncode == 0, err
        assert out.replace(b"computing-1 | ", b"") == expected
        assert b"computing-1: the controller cannot write the output in " in err, err
        refused = cluster.controller.events("op.output_refused")
        assert len(refused) == 1 and refused[0]["error"] == "No space left on device", refused
        assert cluster.controller.events("op.output_kept_again")
        assert not cluster.controller.events("op.output_gap")
        assert not cluster.controller.events("op.output_incomplete")
        print(f"held {held} of {len(expected)} bytes while the disk was full; sessions: "
              f"{len(cluster.controller.events('agent.connected'))}")
    finally:
        cluster.close()
        disk.unmount()


# ---------------------------------------------------------------- 8. least knowledge


# ---------------------------------------------------------------- 9. one owner per port
