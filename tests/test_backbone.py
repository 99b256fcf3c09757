"""Controller ⇄ agent backbone with real processes over real gRPC: nothing lost, nothing twice."""

from __future__ import annotations

import os
import signal
import subprocess

import psutil
import pytest

from tests.harness import CuttableProxy, PeakRss, wait_for

LINES = 50_000
# Prints LINES numbered lines in bursts, slowly enough that a test can strike mid-stream.
NUMBERED = ("import sys, time\n"
            f"for i in range({LINES}):\n"
            "    sys.stdout.write(f'{i}\\n')\n"
            "    if i % 1000 == 999:\n"
            "        sys.stdout.flush(); time.sleep(0.06)\n")
EXPECTED = "".join(f"{i}\n" for i in range(LINES)).encode()


def strip_prefix(stdout: bytes, agent_id: str) -> bytes:
    prefix = f"{agent_id} | ".encode()
    lines = stdout.splitlines(keepends=True)
    assert all(line.startswith(prefix) for line in lines), lines[:3]
    return b"".join(line[len(prefix):] for line in lines)


def only_op(cluster) -> str:
    ids = wait_for(lambda: cluster.op_ids() if (cluster.controller.store / "operations").exists() else None,
                   what="an operation")
    assert len(ids) == 1, ids
    return ids[0]


def test_agents_listed_and_lines_stream_live(cluster):
    cluster.add_agent("computing-1", ["computing"])
    cluster.add_agent("daemons-1", ["daemons"])
    cluster.wait_connected("computing-1", "daemons-1")
    agents = cluster.agents_json()
    assert agents["daemons-1"]["roles"] == ["daemons"]
    assert agents["computing-1"]["facts"]["cpus"] >= 1
    table = cluster.deployctl("agents").stdout.decode()
    assert "computing-1" in table and "connected" in table

    proc = cluster.deployctl_bg("exec", "--all", "--", "sh", "-c",
                                "for i in 1 2 3; do echo $i; sleep 1; done")
    first = proc.stdout.readline().decode()
    assert first.rstrip().endswith("| 1")
    # The first line reached us while the command was still running: it streams, not batches.
    states = {cluster.operation(op)["state"] for op in cluster.op_ids()}
    assert states != {"finished"}
    rest = proc.stdout.read().decode()
    assert proc.wait(30) == 0
    lines = [first.rstrip(), *rest.splitlines()]
    for agent in ("computing-1", "daemons-1"):
        assert [l.split("| ")[1] for l in lines if l.startswith(agent)] == ["1", "2", "3"]
    assert "2 succeeded, 0 failed" in proc.stderr.read().decode()


def test_controller_kill9_mid_stream_loses_nothing(cluster):
    """(a) kill -9 of the controller while 50,000 numbered lines stream, then a restart."""
    cluster.add_agent("computing-1")
    cluster.wait_connected("computing-1")
    cli = cluster.deployctl_bg("exec", "--agent", "computing-1", "--", "python3", "-c", NUMBERED)
    op_id = only_op(cluster)
    wait_for(lambda: len(cluster.output(op_id)) > 20_000, what="output flowing")
    cluster.controller.kill9()
    had = len(cluster.output(op_id))
    assert had < len(EXPECTED), "the command had finished before the kill: nothing was cut"
    cluster.controller.start()
    record = cluster.wait_finished(op_id)
    assert record["result"]["outcome"] == "exited" and record["result"]["exit_code"] == 0
    assert cluster.output(op_id) == EXPECTED  # complete, in order, exactly once
    out, err = cli.communicate(timeout=60)
    assert cli.returncode == 0, err
    assert strip_prefix(out, "computing-1") == EXPECTED
    assert b"waiting for it to come back" in err


def test_link_cut_mid_operation_loses_nothing(cluster):
    """(b) the agent's connection is cut mid-operation."""
    proxy = CuttableProxy(cluster.controller.port)
    try:
        cluster.add_agent("computing-1", via=proxy.address)
        cluster.wait_connected("computing-1")
        cli = cluster.deployctl_bg("exec", "--agent", "computing-1", "--", "python3", "-c", NUMBERED)
        op_id = only_op(cluster)
        wait_for(lambda: len(cluster.output(op_id)) > 20_000, what="output flowing")
        proxy.cut(refuse_for=1.0)
        assert len(cluster.output(op_id)) < len(EXPECTED), "the command had finished before the cut"
        record = cluster.wait_finished(op_id)
        assert record["result"]["outcome"] == "exited"
        assert cluster.output(op_id) == EXPECTED
        out, err = cli.communicate(timeout=60)
        assert cli.returncode == 0, err
        assert strip_prefix(out, "computing-1") == EXPECTED
        assert len(cluster.controller.events("agent.connected")) >= 2  # it really reconnected
    finally:
        proxy.close()


def test_operation_resent_after_reconnect_runs_once(cluster, tmp_path):
    """(c) every reconnect re-sends unfinished operations; the journal keeps them from rerunning."""
    counter = tmp_path / "counter"
    proxy = CuttableProxy(cluster.controller.port)
    try:
        cluster.add_agent("computing-1", via=proxy.address)
        cluster.wait_connected("computing-1")
        script = f"echo run >> {counter}; for i in 1 2 3 4 5 6; do echo $i; sleep 0.5; done"
        cli = cluster.deployctl_bg("exec", "--agent", "computing-1", "--", "sh", "-c", script)
        op_id = only_op(cluster)
        wait_for(counter.exists, what="the command started")
        proxy.cut(refuse_for=0.5)
        wait_for(lambda: cluster.controller.events("op.duplicate"), what="the operation re-sent")
        cluster.wait_finished(op_id)
        assert cli.wait(60) == 0
        assert counter.read_text() == "run\n"
        assert [e["op_id"] for e in cluster.controller.events("op.duplicate")] == [op_id]
        assert cluster.output(op_id) == b"1\n2\n3\n4\n5\n6\n"
    finally:
        proxy.close()


def test_agent_kill9_reports_interrupted(cluster, tmp_path):
    """(d) kill -9 of the agent mid-operation: `interrupted` once it is back, nothing rerun."""
    pids = tmp_path / "pids"
    counter = tmp_path / "counter"
    agent = cluster.add_agent("computing-1")
    cluster.wait_connected("computing-1")
    script = f"echo run >> {counter}; sleep 300 & echo $$ $! > {pids}; wait"
    cli = cluster.deployctl_bg("exec", "--agent", "computing-1", "--", "sh", "-c", script)
    op_id = only_op(cluster)
    wait_for(lambda: pids.exists() and pids.read_text().strip(), what="command running")
    agent.kill9()
    agent.start()
    record = cluster.wait_finished(op_id)
    assert record["result"]["outcome"] == "interrupted"
    assert "not run again" in record["result"]["error"]
    assert counter.read_text() == "run\n"
    for pid in map(int, pids.read_text().split()):  # the orphans of the dead agent were ended
        wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                 timeout=10, what=f"process {pid} gone")
    _, err = cli.communicate(timeout=30)
    assert cli.returncode == 1
    assert b"computing-1: interrupted: the agent stopped" in err


def test_agent_kill9_during_output_keeps_every_byte_it_had_read(cluster):
    """(d') kill -9 of the agent while a command prints: the output the controller ends with is
    exactly what the command printed up to then, from the first byte, with no hole and nothing
    twice (the agent's spool on disk is resent after its restart); the result is `interrupted`."""
    agent = cluster.add_agent("computing-1")
    cluster.wait_connected("computing-1")
    cli = cluster.deployctl_bg("exec", "--agent", "computing-1", "--", "python3", "-c", NUMBERED)
    op_id = only_op(cluster)
    wait_for(lambda: len(cluster.output(op_id)) > 20_000, what="output flowing")
    # The controller is stopped for a moment, so the agent reads output only its disk holds.
    spool = agent.state_dir / "operations" / op_id / "spool"
    controller = cluster.controller.proc.pid
    os.kill(controller, signal.SIGSTOP)
    try:
        wait_for(lambda: spooled_end(spool) > len(cluster.output(op_id)) + 5_000, what="output only the agent has")
        agent.kill9()
    finally:
        os.kill(controller, signal.SIGCONT)
    read, had = spooled_end(spool), len(cluster.output(op_id))
    assert had < read < len(EXPECTED), (had, read, "the command had finished before the kill: nothing was cut")
    agent.start()
    record = cluster.wait_finished(op_id)
    assert record["result"]["outcome"] == "interrupted"
    kept = cluster.output(op_id)
    assert len(kept) >= read and EXPECTED.startswith(kept), kept[-200:]
    import json
    reported = json.loads((cluster.controller.store / "operations" / op_id / "result.json").read_text())
    assert reported["output_bytes"] == len(kept), reported   # the agent's own count: all it had read
    cli.communicate(timeout=60)


def process_state(pid: int) -> str:
    """What the kernel says of a process that does not react: its state and signal masks, its
    freezer cgroup, where each of its threads waits."""
    from pathlib import Path
    proc = Path(f"/proc/{pid}")
    try:
        status = [line for line in (proc / "status").read_text().splitlines()
                  if line.split(":")[0] in ("State", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")]
        freezer = [line for line in (proc / "cgroup").read_text().splitlines() if "freezer" in line]
        waits = sorted({(t / "wchan").read_text() for t in (proc / "task").iterdir()})
        return "; ".join(status + freezer + [f"threads wait in {waits}"])
    except OSError as exc:
        return f"(gone: {exc})"


def spooled_end(folder) -> int:
    """Where the output an agent's spool holds ends (its segments' framed records)."""
    from agent.spool import _HEADER
    end = 0
    for segment in sorted(folder.glob("*")) if folder.is_dir() else ():
        data, at = segment.read_bytes(), 0
        while at + _HEADER.size <= len(data):
            _, offset, _, length = _HEADER.unpack_from(data, at)
            if at + _HEADER.size + length > len(data):
                break
            end, at = max(end, offset + length), at + _HEADER.size + length
    return end


def test_ctrl_c_cancels_whole_tree(cluster, tmp_path):
    """(e) cancel ends a process tree, including a grandchild that ignores SIGTERM."""
    pids = tmp_path / "pids"
    cluster.add_agent("computing-1")
    cluster.wait_connected("computing-1")
    stubborn = tmp_path / "stubborn.sh"
    stubborn.write_text(f"trap '' TERM\nsleep 300 &\necho $! >> {pids}\nwait\n")
    script = f"sh {stubborn} & echo $$ $! >> {pids}; wait"
    cli = cluster.deployctl_bg("exec", "--agent", "computing-1", "--", "sh", "-c", script)
    op_id = only_op(cluster)
    wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 3, what="tree started")
    tree = [psutil.Process(int(p)) for p in pids.read_text().split()]
    cli.send_signal(signal.SIGINT)
    try:
        _, err = cli.communicate(timeout=180)  # a generous deadline: the machine may be busy
    except subprocess.TimeoutExpired:
        raise AssertionError(f"deployctl did not end after SIGINT: {process_state(cli.pid)}") from None
    assert cli.returncode == 130, err
    record = cluster.wait_finished(op_id)
    assert record["result"]["outcome"] == "cancelled"
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, alive
    assert b"cancelled: interrupted by the operator" in err


def test_200mb_of_output_keeps_memory_bounded(cluster):
    """(f) an operation writing 200 MB: controller and agent stay under 150 MB RSS each."""
    agent = cluster.add_agent("computing-1")
    cluster.wait_connected("computing-1")
    size = 200_000_000
    with PeakRss([cluster.controller.proc.pid, agent.proc.pid]) as peaks:
        result = cluster.deployctl("exec", "--agent", "computing-1", "--", "sh", "-c",
                                   f"yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c {size}",
                                   stdout=subprocess.DEVNULL, timeout=300)
    assert result.returncode == 0, result.stderr
    op_id = only_op(cluster)
    assert len(cluster.output(op_id)) == size
    limit = 150 * 1024 * 1024
    assert peaks[cluster.controller.proc.pid] < limit, peaks
    assert peaks[agent.proc.pid] < limit, peaks


@pytest.mark.parametrize("args, expected", [
    (["--agent", "ghost", "--", "true"], ["ghost: unknown agent 'ghost'"]),
    (["--all", "--", "no-such-command-xyz"],
     ["computing-1: failed to start: command not found: no-such-command-xyz",
      "computing-2: failed to start: command not found: no-such-command-xyz"]),
    (["--all", "--cwd", "/nonexistent", "--", "true"],
     ["computing-1: failed to start: working directory /nonexistent does not exist",
      "computing-2: failed to start: working directory /nonexistent does not exist"]),
    (["--all", "--timeout", "1", "--", "sleep", "60"],
     ["computing-1: timed out after 1s", "computing-2: timed out after 1s"]),
    (["--role", "daemons", "--", "true"], ["deployctl: no connected agent has role 'daemons'"]),
    (["--role", "web", "--", "true"], ["deployctl: unknown role 'web' (roles: computing, daemons, routing)"]),
])
def test_bad_input_gives_one_clear_line_per_agent(cluster, args, expected):
    cluster.add_agent("computing-1")
    cluster.add_agent("computing-2")
    cluster.wait_connected("computing-1", "computing-2")
    result = cluster.deployctl("exec", *args, timeout=30)
    assert result.returncode == 1
    err = result.stderr.decode().splitlines()
    for line in expected:
        assert sum(1 for l in err if l.startswith(line)) == 1, (line, err)


def test_disconnected_and_unreachable(cluster, tmp_path):
    agent = cluster.add_agent("computing-1")
    cluster.wait_connected("computing-1")
    agent.stop()
    wait_for(lambda: cluster.agents_json()["computing-1"]["state"] == "disconnected", what="disconnected")
    result = cluster.deployctl("exec", "--agent", "computing-1", "--", "true")
    assert result.returncode == 1
    assert "computing-1: agent computing-1 is disconnected" in result.stderr.decode()
    cluster.controller.stop()
    result = cluster.deployctl("agents")
    assert result.returncode == 3
    assert result.stderr.decode().startswith("deployctl: cannot reach the controller")
