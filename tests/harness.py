"""Real processes for integration tests: a controller, agents, deployctl, and a TCP link we can cut."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from tests.netns import inside

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
# The service driver every test agent runs: the built-in supervisor, or systemd when the suite runs
# under a bare systemd of its own (tests/run.py, tests/systemd_ns.py).
DRIVER = os.environ.get("DEPLOYER_TEST_DRIVER", "supervisor")


# Ports the tests listen on: below the kernel's ephemeral range (32768-60999 here), where no
# outgoing connection takes its source port, and below the deployer's instance ports (20000-29999).
# A port the kernel handed out as free (bind to 0) is in the ephemeral range: the next client
# connection on this machine could take it before the test's server binds it.
TEST_PORTS = range(10000, 20000)


def free_port() -> int:
    import random
    for port in random.sample(TEST_PORTS, 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise AssertionError(f"no free port in {TEST_PORTS}")


def wait_for(predicate, timeout: float = 20.0, every: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def free_port_pair() -> int:
    """A port whose next port is free too: the agent port and, after it, the enrolment port."""
    for _ in range(100):
        port = free_port()
        if port + 1 not in TEST_PORTS:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise AssertionError("no two consecutive free ports")


class PortTaken(AssertionError):
    """A free port was taken by someone else before the controller could bind it."""


class Controller:
    """A controller process; its agent port requires mutual TLS unless `insecure`."""

    def __init__(self, base: Path, lost_after: float = 60.0, insecure: bool = False,
                 extra_args: tuple[str, ...] = (), host: str = "127.0.0.1") -> None:
        self.store = base / "store"
        self.socket = self.store / "control.sock"
        self.host = host  # where agents dial it: a bridge's address for namespaced hosts (tests/netns.py)
        self.port = free_port_pair()
        self.address = f"{host}:{self.port}"
        self.enroll_address = f"{host}:{self.port + 1}"
        self.log = base / "controller.log"
        self.lost_after = lost_after
        self.insecure = insecure
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self.started_once = False

    def start(self) -> "Controller":
        """Start it; if another run on this machine took one of its free ports meanwhile, on new ones
        (a test that needs fixed ports keeps them: it starts the daemon itself)."""
        for _ in range(5):
            try:
                return self._start()
            except PortTaken as exc:
                if self.started_once or "operators on" in str(exc):  # agents or the test know these ports
                    raise
                self.port = free_port_pair()
                self.address, self.enroll_address = f"{self.host}:{self.port}", f"{self.host}:{self.port + 1}"
        return self._start()

    def _start(self) -> "Controller":
        self.proc = subprocess.Popen(
            [PY, "-m", "controller.daemon", "--store", str(self.store), "--listen", self.address,
             "--log-file", str(self.log), "--lost-after", str(self.lost_after),
             *(["--insecure"] if self.insecure else []), *self.extra_args],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: self._accepting() or self.proc.poll() is not None, what="controller socket")
        except AssertionError:
            self.stop()  # a controller that never served is not left running
            raise
        if self.proc.poll() is not None:
            error = self.proc.stderr.read().decode()
            raise (PortTaken if "is already taken" in error else AssertionError)(f"controller exited: {error}")
        self.started_once = True
        return self

    def _accepting(self) -> bool:
        """Really serving: a socket file alone may be left over by a killed controller."""
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.socket))
                return True
            except OSError:
                return False

    def token(self, roles=("computing",), ttl_s: float = 600, agent_id: str = "", provides=(),
              address: str = "") -> str:
        """A fresh enrolment token, straight from the operator socket (no deployctl process);
        `provides` and `address` are what it grants the agent it enrols."""
        import grpc
        from protos import deployer_pb2 as pb
        from protos import deployer_pb2_grpc as pb_grpc
        with grpc.insecure_channel(f"unix:{self.socket}") as channel:
            return pb_grpc.OperatorStub(channel).CreateToken(
                pb.TokenRequest(roles=list(roles), ttl_s=ttl_s, agent_id=agent_id, provides=list(provides),
                                address=address), timeout=10).token

    def grant(self, agent_id: str, provides=(), address: str = "", ungrant: bool = False):
        """What `deployctl agents grant` (or `ungrant`) does, straight from the operator socket."""
        import grpc
        from protos import deployer_pb2 as pb
        from protos import deployer_pb2_grpc as pb_grpc
        with grpc.insecure_channel(f"unix:{self.socket}") as channel:
            return pb_grpc.OperatorStub(channel).GrantAgent(
                pb.GrantRequest(agent_id=agent_id, provides=list(provides), address=address, ungrant=ungrant),
                timeout=10)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def events(self, name: str) -> list[dict]:
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == name:
                out.append(record)
        return out


class Agent:
    """An agent process. `token`: enrol with it on first start (passed in the environment, never
    on the command line); `insecure`: a plain loopback link without certificates."""

    def __init__(self, base: Path, agent_id: str, controller: str, roles=("computing",),
                 heartbeat: float = 1.0, provides: dict[str, str] | None = None,
                 token: str = "", insecure: bool = False, enroll_address: str = "",
                 netns: str = "", services_root: Path | None = None) -> None:
        self.netns = netns  # run inside this network namespace (a test host: tests/netns.py)
        self.provides = provides or {}
        self.token = token
        self.insecure = insecure
        self.enroll_address = enroll_address
        self.id = agent_id
        self.controller = controller
        self.roles = roles
        self.state_dir = base / f"agent-{agent_id}"
        self.services_root = services_root or base / "srv"
        self.log = base / f"agent-{agent_id}.log"
        self.heartbeat = heartbeat
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Agent":
        argv = [PY, "-m", "agent.main", "--id", self.id, "--controller", self.controller,
                "--state-dir", str(self.state_dir), "--services-root", str(self.services_root),
                "--heartbeat-interval", str(self.heartbeat), "--service-driver", DRIVER]
        for role in self.roles:
            argv += ["--role", role]
        for key, value in self.provides.items():
            argv += ["--provide", f"{key}={value}"]
        if self.insecure:
            argv.append("--insecure")
        if self.enroll_address:
            argv += ["--enroll-address", self.enroll_address]
        env = {**os.environ, "DEPLOYER_TOKEN": self.token}
        if self.netns:  # it execs the agent (the pid is the agent's); the network namespace only (tests/netns.py)
            argv = [*inside(self.netns), *argv]
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, env=env,
                                     stderr=open(self.log, "ab"))
        return self

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop_services(self) -> None:
        _stop_services(self.state_dir)

    def services(self, prefix: str = "") -> list[dict]:
        """What the agent's driver knows of its service processes (dead ones too), as it reports them."""
        return driver_of(self.state_dir).list(prefix)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def driver_of(state_dir: Path):
    from agent.services import Supervisor
    from agent.systemd_driver import SystemdDriver
    return SystemdDriver(state_dir) if DRIVER == "systemd" else Supervisor(state_dir)


def _stop_services(state_dir: Path) -> None:
    """Service processes outlive their agent by design; a test must end them itself."""
    if DRIVER == "systemd":
        units = [f"{p.stem}.service" for p in (state_dir / "services").glob("*@*.env")]
        if units:
            subprocess.run(["systemctl", "kill", "--signal=SIGKILL", *units], capture_output=True, timeout=60)
            subprocess.run(["systemctl", "stop", *units], capture_output=True, timeout=60)
            subprocess.run(["systemctl", "reset-failed", *units], capture_output=True, timeout=60)
        return
    for state in (state_dir / "services").glob("*.json"):
        try:
            os.killpg(json.loads(state.read_text())["pid"], signal.SIGKILL)
        except (ProcessLookupError, PermissionError, ValueError, KeyError):
            pass


class Cluster:
    """A controller and its agents in one temporary folder; stops everything on close."""

    def __init__(self, base: Path, lost_after: float = 60.0, insecure: bool = False, host: str = "127.0.0.1") -> None:
        self.base = base
        self.controller = Controller(base, lost_after, insecure=insecure, host=host)
        self.agents: dict[str, Agent] = {}

    def env(self) -> dict[str, str]:
        return {**os.environ, "DEPLOYER_SOCKET": str(self.controller.socket), "NO_COLOR": "1"}

    def add_agent(self, agent_id: str, roles=("computing",), via: str | None = None,
                  provides: dict[str, str] | None = None, netns: str = "",
                  services_root: Path | None = None) -> Agent:
        """An agent configured with `provides` settings and granted what they are for, as an
        operator would: in its enrolment token, or (a plain link has no token) once it is there.
        With `netns`, it runs on that test host (tests/netns.py), with `services_root` its own."""
        insecure = self.controller.insecure
        granted = sorted({key.partition(".")[0] for key in provides or {}})
        token = "" if insecure else self.controller.token(roles, agent_id=agent_id, provides=granted)
        agent = Agent(self.base, agent_id, via or self.controller.address, roles, provides=provides,
                      token=token, insecure=insecure, enroll_address=self.controller.enroll_address,
                      netns=netns, services_root=services_root).start()
        self.agents[agent_id] = agent
        if insecure and granted:
            self.wait_connected(agent_id)
            self.controller.grant(agent_id, granted)
        return agent

    def deployctl(self, *args: str, timeout: float = 60, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "deployctl.cli", *args], cwd=ROOT, env=self.env(),
                              stdout=stdout, stderr=subprocess.PIPE, timeout=timeout)

    def deployctl_bg(self, *args: str, stdout=subprocess.PIPE) -> subprocess.Popen:
        return subprocess.Popen([PY, "-m", "deployctl.cli", *args], cwd=ROOT, env=self.env(),
                                stdout=stdout, stderr=subprocess.PIPE)

    def agents_json(self) -> dict[str, dict]:
        result = self.deployctl("agents", "--json")
        assert result.returncode == 0, result.stderr
        return {a["id"]: a for a in json.loads(result.stdout)}

    def wait_connected(self, *agent_ids: str, timeout: float = 30) -> None:
        def connected():
            agents = self.agents_json()
            return all(agents.get(a, {}).get("state") == "connected" for a in agent_ids)
        wait_for(connected, timeout, every=0.2, what=f"agents {agent_ids} connected")

    def operation(self, op_id: str) -> dict:
        result = self.deployctl("op", "show", op_id, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def wait_finished(self, op_id: str, timeout: float = 60) -> dict:
        return wait_for(lambda: (lambda o: o if o["state"] == "finished" else None)(self.operation(op_id)),
                        timeout, every=0.2, what=f"operation {op_id} finished")

    def output(self, op_id: str) -> bytes:
        """What the controller holds of an operation's output so far: its folder appears when the
        operation is submitted, its log with the first chunk."""
        log = self.controller.store / "operations" / op_id / "output.log"
        return log.read_bytes() if log.exists() else b""

    def op_ids(self) -> list[str]:
        return sorted(p.name for p in (self.controller.store / "operations").iterdir())

    def close(self) -> None:
        """Everything stops, even when stopping one of them fails."""
        import contextlib
        with contextlib.ExitStack() as each:
            each.callback(self.controller.stop)
            for agent in self.agents.values():
                each.callback(agent.stop_services)
                each.callback(agent.stop)


class CuttableProxy:
    """A TCP proxy between agents and the controller whose connections a test can cut."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.accepting = threading.Event()
        self.accepting.set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.accepting.is_set():
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self, refuse_for: float = 0.0) -> None:
        """Drop every connection (like a link going down); refuse new ones for a while."""
        if refuse_for:
            self.accepting.clear()
            threading.Timer(refuse_for, self.accepting.set).start()
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.cut()
        self.listener.close()


class PeakRss:
    """`with PeakRss(pids) as peaks:` samples the RSS of processes every 50 ms while the block
    runs; afterwards `peaks[pid]` is each one's highest sample in bytes."""

    def __init__(self, pids: list[int], every: float = 0.05) -> None:
        self.procs = [psutil.Process(pid) for pid in pids]
        self.every = every
        self.peaks = {pid: 0 for pid in pids}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            for p in self.procs:
                try:
                    self.peaks[p.pid] = max(self.peaks[p.pid], p.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(self.every)

    def __enter__(self) -> dict[int, int]:
        self._thread.start()
        return self.peaks

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
