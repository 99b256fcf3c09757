"""Fuzzing: the spec loader and the planner get only clean errors, the agent gateway survives any message.

The normal suite runs a bounded number of examples; `make fuzz` runs this file with the `fuzz`
hypothesis profile (far more examples, see tests/conftest.py).
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import grpc
import psutil
import pytest
import yaml
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, event, example, given, settings, strategies as st

from controller.fleet.gateway import MAX_DESCRIPTION
from controller.state.ledger import LiveInstance, ServiceState
from controller.environments.naming import name_problem
from controller.environments.planner import DATA_COMPONENTS, Plan, plan
from controller.environments.spec import (COMPONENTS, RESERVED_ENV, Options, SpecError, code_fingerprint, key_line,
                             merge_diff, parse_options, parse_spec, spec_from_dict)
from protos import deployer_pb2 as pb
from protos import deployer_pb2_grpc as pb_grpc
from tests.harness import ROOT, Controller, wait_for

LONG_RUN = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
FILE = "fuzz.yml"


def bounded(examples: int, **kwargs) -> settings:
    """`examples` in the normal suite; under `make fuzz`, the fuzz profile's far larger number."""
    if not LONG_RUN:
        kwargs["max_examples"] = examples
    return settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], **kwargs)


# A pure function that takes longer than this on a small input hangs (an alias bomb, say); generous,
# because the suite shares its machine.
QUICK = timedelta(seconds=10)


# ---------------------------------------------------------------- generators: valid specs

LOWER, DIGITS = "abcdefghijklmnopqrstuvwxyz", "0123456789"
names = st.builds(lambda head, rest, parts: "-".join([head + rest, *parts]), st.sampled_from(LOWER),
                  st.text(LOWER + DIGITS, max_size=6), st.lists(st.text(LOWER + DIGITS, min_size=1, max_size=4),
                                                                max_size=2))
env_names = st.builds(str.__add__, st.sampled_from(LOWER.upper() + "_"),
                      st.text(LOWER.upper() + DIGITS + "_", max_size=8)).filter(lambda n: n not in RESERVED_ENV)
refs = st.sampled_from(["main", "v1.2.0", "release/2024", "0123456789abcdef0123456789abcdef01234567"])
commands = st.sampled_from(["node server.js", "./run --port $PORT", "python -m app", "sh -c 'exec x'"])


@st.composite
def service_bodies(draw, name: str, web: bool) -> dict:
    body: dict = {"source": draw(st.sampled_from(["/srv/git/shop.git", "https://git.example.com/a.git"])),
                  "ref": draw(refs), "start": draw(commands)}
    if web:
        body["path"] = "/" if name == "root" else f"/{name}"
        if draw(st.booleans()):
            body["health"] = draw(st.sampled_from(["/health", "/up?full=1"]))
    elif draw(st.booleans()):
        body["healthy_after"] = draw(st.floats(0.1, 600) | st.integers(1, 600))
    for key in ("install", "build", "migrate"):
        if draw(st.booleans()):
            body[key] = draw(commands)
    if draw(st.booleans()):
        body["root"] = draw(st.sampled_from(["web", "./apps/x/", "."]))
    secrets = draw(st.lists(env_names, unique=True, max_size=2))
    env = draw(st.dictionaries(env_names.filter(lambda n: n not in secrets),
                               st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=8)
                               | st.integers(), max_size=3))
    if secrets:
        body["secrets"] = secrets
    if env:
        body["env"] = env
    uses = draw(st.lists(st.sampled_from(COMPONENTS), unique=True))
    if uses:
        body["uses"] = uses
    return body


@st.composite
def spec_dicts(draw) -> dict:
    service_names = draw(st.lists(names, min_size=1, max_size=4, unique=True))
    services = {name: draw(service_bodies(name, draw(st.booleans()))) for name in service_names}
    return {"app": draw(names), "environment": draw(names),
            "domain": ".".join(draw(st.lists(names, min_size=1, max_size=3))), "services": services}


valid_specs = spec_dicts().map(spec_from_dict)


# ---------------------------------------------------------------- the loader's contract

def loads_cleanly(load, file: str | None = FILE):
    """Call a loader: it returns a spec (or options) or raises SpecError with one clean line."""
    try:
        return load()
    except SpecError as exc:
        message = str(exc)
        assert message and message.isprintable(), repr(message)
        assert len(message.splitlines()) == 1, repr(message)
        if file:
            assert message.startswith(file), message
        return None


def check_accepted(spec) -> None:
    """An accepted spec can be stored (canonical JSON) and read back unchanged."""
    for name in (spec.app, spec.environment, *(s.name for s in spec.services)):
        assert name_problem(name) is None
    stored = json.loads(json.dumps(spec.to_dict()))
    assert spec_from_dict(stored) == spec


def parse_and_check(text: str):
    spec = loads_cleanly(lambda: parse_spec(text, FILE))
    if spec is not None:
        check_accepted(spec)
    return spec


# ---------------------------------------------------------------- generators: broken input

yaml_scalars = (st.none() | st.booleans() | st.integers() | st.floats()
                | st.text(max_size=30) | st.sampled_from(["", "-", "~", "null", "yes", "0o17", "1e3", ".inf"]))
yaml_values = st.recursive(yaml_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=25)

# Pieces of YAML syntax, to build text the parser and the constructor find hard.
FRAGMENTS = [
    "app: shop\n", "environment: prod\n", "domain: shop.localhost\n", "services:\n", "  web:\n",
    "    path: /\n", "    source: /srv/git/shop.git\n", "    ref: main\n", "    start: node s.js\n",
    "    uses: [mysql, redis]\n", "    env: {A: 1}\n", "    secrets: [K]\n", "version: 1\n",
    "&a ", "*a", "<<: *a\n", "<<: [*a, *a]\n", "? ", ": ", "- ", "[", "]", "{", "}", ",", "'", '"', "|\n",
    ">-\n", "!!int ", "!!float ", "!!bool ", "!!timestamp ", "!!binary ", "!!str ", "!!set ", "!!omap ",
    "!!python/object:os.system ", "!custom ", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "---\n", "...\n",
    "2024-02-30", "2001-12-14t21:59:43.10-05:00", "0x1F", "0o777", "1_000", "190:20:30", "1e999", ".nan",
    "9" * 4400, "\0", "\\0", "\t", "\r\n", "\x85", "\u2028", "\ufeff", "\ud83d\ude00", "é", "#c\n", "  ", "\n",
    "\"\\x85\\L\\P\\e\\0\": 1\n", "~", "null", "yes", "on", "-1", ".inf", "''",
]
fragment_text = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=6), max_size=40).map("".join)

BASE_SPEC = """\
app: shop
environment: prod
domain: shop.localhost
services:
  web: &web
    path: /
    source: /srv/git/shop.git
    ref: main
    start: node server.js
    env:
      NODE_ENV: production
    secrets: [SESSION_KEY]
    uses: [mysql, redis]
  worker:
    <<: *web
    path: null
    start: node worker.js
    uses: [redis]
"""


@st.composite
def edited(draw, base: str = BASE_SPEC) -> str:
    """`base` with a few fragments inserted, lines dropped or duplicated."""
    lines = base.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["insert", "drop", "duplicate", "replace-value"]))
        if action == "drop" and len(lines) > 1:
            del lines[i]
        elif action == "duplicate":
            lines.insert(i, lines[i])
        elif action == "replace-value" and ":" in lines[i]:
            head = lines[i].split(":", 1)[0]
            lines[i] = f"{head}: {draw(st.sampled_from(FRAGMENTS) | st.text(max_size=20))}\n"
        else:
            column = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:column] + draw(st.sampled_from(FRAGMENTS)) + lines[i][column:]
    return "".join(lines)


SPEC_KEYS = ["version", "app", "environment", "domain", "services", "path", "source", "ref", "root",
             "install", "build", "migrate", "start", "health", "healthy_after", "env", "secrets", "uses",
             "mysql", "redis", "code", "Web", "web-", "a--b", "9x", "x" * 300, "é", "", " ", "<<"]
odd_values = (yaml_values | st.sampled_from(SPEC_KEYS) | st.text(min_size=5000, max_size=20000)
              | st.text(st.characters(codec="utf-8"), max_size=40)
              | st.integers(1, 40).map(lambda depth: json.loads("[" * depth + "]" * depth)))


@st.composite
def mutated_dicts(draw) -> dict:
    """A valid spec with some values replaced, keys added, renamed or removed, at any depth."""
    data = draw(spec_dicts())
    for _ in range(draw(st.integers(1, 3))):
        parent = data
        while isinstance(parent, dict) and parent and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(parent)))
            if not isinstance(parent[key], dict):
                break
            parent = parent[key]
        if not isinstance(parent, dict):
            continue
        action = draw(st.sampled_from(["set", "add", "remove", "rename"]))
        keys = sorted(parent)
        if action == "set" and keys:
            parent[draw(st.sampled_from(keys))] = draw(odd_values)
        elif action == "remove" and keys:
            del parent[draw(st.sampled_from(keys))]
        elif action == "rename" and keys:
            old = draw(st.sampled_from(keys))
            parent[draw(st.sampled_from(SPEC_KEYS) | st.text(max_size=25))] = parent.pop(old)
        else:
            parent[draw(st.sampled_from(SPEC_KEYS) | st.text(max_size=25))] = draw(odd_values)
    return data


# ---------------------------------------------------------------- the spec loader

ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
MERGE_BOMB = "m0: &m0 {k: 1}\n" + "".join(f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}]}}\n" for i in range(1, 40))


@bounded(300, deadline=QUICK)
@given(st.text(max_size=200) | fragment_text | edited())
@example(ALIAS_BOMB)
@example(MERGE_BOMB)
@example("[" * 5000 + "]" * 5000)
@example("".join("  " * i + "a:\n" for i in range(400)))
@example("a: &x [[[[[[[[[[*x]]]]]]]]]]\n")
@example("app: 2024-02-30\n")
@example("app: " + "9" * 5000 + "\n")
@example("app: !!timestamp x\n")
@example("app: !!bool x\n")
@example("app: !!int 0x\n")
@example("app: !!int\n")
@example("app: !!float x\n")
@example("\"a\\x85b\\u2028\\e\": 1\n")
@example("app: shop\x00\n")
def test_any_text_is_a_spec_or_one_clean_line(text):
    parse_and_check(text)


@bounded(100, deadline=QUICK)
@given(yaml_values | mutated_dicts())
def test_any_yaml_structure_is_a_spec_or_one_clean_line(data):
    text = yaml.safe_dump(data, allow_unicode=True)
    parse_and_check(text)
    if isinstance(data, dict):
        # What a stored spec would hold: the same checks, without line numbers.
        loaded = loads_cleanly(lambda: spec_from_dict(json.loads(json.dumps(data))), file=None)
        if loaded is not None:
            check_accepted(loaded)


@bounded(50, deadline=QUICK)
@given(spec_dicts())
def test_generated_specs_load_and_round_trip(data):
    spec = parse_and_check(yaml.safe_dump(data, allow_unicode=True))
    assert spec is not None
    assert spec == spec_from_dict(data)


@bounded(100, deadline=QUICK)
@given(valid_specs, st.text(max_size=120) | fragment_text | yaml_values.map(yaml.safe_dump)
       | st.fixed_dictionaries({}, optional={
           "services": yaml_values | st.lists(names), "renew": yaml_values | st.lists(st.sampled_from(COMPONENTS)),
           "refs": yaml_values | st.dictionaries(names, refs)}).map(yaml.safe_dump))
def test_deploy_options_are_options_or_one_clean_line(spec, text):
    options = loads_cleanly(lambda: parse_options(text, "deploy-options.yml", spec), file="deploy-options.yml")
    if options is None:
        return
    names_in_spec = {s.name for s in spec.services}
    assert set(options.services) <= names_in_spec and set(options.refs) <= names_in_spec
    for name, components in options.renew.items():
        assert set(components) <= set(spec.service(name).uses)
    json.dumps(options.to_dict())


@bounded(100, deadline=QUICK)
@given(valid_specs, st.text(max_size=120) | fragment_text | edited("services:\n  web:\n    ref: v2\n")
       | mutated_dicts().map(lambda d: yaml.safe_dump({k: d[k] for k in d if k not in ("app", "environment")})))
def test_environment_diffs_are_specs_or_one_clean_line(spec, text):
    stored = spec.to_dict()
    before = json.dumps(stored, sort_keys=True)
    merged = loads_cleanly(lambda: merge_diff(stored, text, "environment-diff.yml"), file="environment-diff.yml")
    assert json.dumps(stored, sort_keys=True) == before  # the stored spec is never changed in place
    if merged is not None:
        check_accepted(merged)
        assert merged.key == spec.key


@bounded(100, deadline=QUICK)
@given(st.text(max_size=120) | fragment_text | edited(),
       st.lists(st.sampled_from(["services", "web", "worker", "ref", "app"]) | st.integers(0, 3), max_size=4))
def test_key_line_never_raises(text, key):
    line = key_line(text, key)
    assert line is None or line >= 1


# ---------------------------------------------------------------- the planner

commit_pool = st.sampled_from(["1" * 40, "2" * 40, "3" * 40])


@st.composite
def planner_inputs(draw):
    spec = draw(valid_specs)
    names_in_spec = [s.name for s in spec.services]
    others = draw(st.lists(names.filter(lambda n: n not in names_in_spec), max_size=2, unique=True))
    state = {}
    for name in names_in_spec + others:
        if not draw(st.booleans()):
            continue
        service = spec.service(name) if name in names_in_spec else None
        code = None
        if draw(st.booleans()):
            fingerprint = code_fingerprint(service) if service and draw(st.booleans()) else "f" * 64
            code = LiveInstance(draw(st.integers(1, 50)), draw(commit_pool), fingerprint)
        data = {c: LiveInstance(draw(st.integers(1, 50))) if draw(st.booleans()) else None
                for c in DATA_COMPONENTS}
        state[name] = ServiceState(name, code=code, **data)
    commits = {name: draw(commit_pool) for name in names_in_spec}
    limited = tuple(sorted(draw(st.lists(st.sampled_from(names_in_spec), unique=True))))
    renew = {}
    for name in limited or names_in_spec:
        chosen = [c for c in spec.service(name).uses if draw(st.booleans())]
        if chosen:
            renew[name] = tuple(chosen)
    options = draw(st.sampled_from([None, Options(limited, renew)]))
    return spec, state, commits, options, draw(st.booleans())


def applied(spec, state: dict, the_plan: Plan, commits: dict) -> dict:
    """The ledger state once a plan has run: new instances live, destroyed services' data kept."""
    after = dict(state)
    for planned in the_plan.services:
        current = state.get(planned.service) or ServiceState(planned.service)
        if planned.action == "destroy":
            after[planned.service] = ServiceState(planned.service, None, current.mysql, current.redis)
            continue
        service = spec.service(planned.service)
        parts = {}
        for change in planned.changes:
            old = current.live(change.component)
            number = (old.number + 1 if old else 1) if change.new else change.number
            parts[change.component] = LiveInstance(number, commits[service.name], code_fingerprint(service)) \
                if change.component == "code" else LiveInstance(number)
        after[planned.service] = ServiceState(planned.service, **{c: parts.get(c, current.live(c))
                                                                 for c in ("code", *DATA_COMPONENTS)})
    return after


@bounded(100, deadline=QUICK)
@given(planner_inputs())
def test_the_planner_is_total_deterministic_and_idempotent(inputs):
    spec, state, commits, options, prune = inputs
    first = plan(spec, state, commits, options, prune)
    assert plan(spec, state, commits, options, prune) == first
    assert plan(spec, dict(reversed(state.items())), commits, options, prune) == first  # any ledger order
    json.dumps(first.to_dict())
    selected = set(options.services) if options and options.services else {s.name for s in spec.services}
    renew = dict(options.renew) if options else {}
    for planned in first.services:
        current = state.get(planned.service)
        if planned.action == "destroy":
            assert prune and planned.service not in {s.name for s in spec.services}
            continue
        assert planned.service in selected and planned.reasons
        service = spec.service(planned.service)
        assert [c.component for c in planned.changes] == ["code", *(c for c in DATA_COMPONENTS
                                                                    if c in service.uses)]
        assert any(c.new for c in planned.changes)
        code = current.code if current else None
        assert planned.changes[0].new == (code is None or code.commit != commits[service.name]
                                          or code.fingerprint != code_fingerprint(service))
        for change in planned.changes:
            live = current.live(change.component) if current else None
            if not change.new:
                assert live is not None and change.number == live.number
            elif change.component in DATA_COMPONENTS and live is not None:
                # A new database or Redis instance is asked for, never a side effect of new code.
                assert change.component in renew.get(planned.service, ())
    for name in selected - {p.service for p in first.services}:
        # Nothing planned: the live code is this commit with these settings, and every part is live.
        service, current = spec.service(name), state.get(name)
        assert current is not None and current.code is not None
        assert (current.code.commit, current.code.fingerprint) == (commits[name], code_fingerprint(service))
        assert all(current.live(c) is not None and c not in renew.get(name, ()) for c in service.uses)
    # Once the plan has run, the same order without `renew` plans nothing.
    again = Options(options.services) if options else None
    assert plan(spec, applied(spec, state, first, commits), commits, again, prune).services == ()


# ---------------------------------------------------------------- the agent gateway

CONNECT = "/deployer.v1.AgentGateway/Connect"
FUZZ_ID, VICTIM_ID, PROBE_ID = "fuzz-1", "victim-1", "probe-1"
AGENT_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")  # the gateway's rule for agent ids
KNOWN_ROLES = ("computing", "daemons", "routing")
MAX_MESSAGE = 8 << 20  # the controller's limit on one message
_END = object()


def start_controller(base: Path) -> Controller:
    """The one controller of this module, serving agents in plain gRPC on loopback."""
    return Controller(base, insecure=True).start()


def agent_channel(controller: Controller) -> grpc.Channel:
    """The agent port, dialled the way an agent dials it."""
    return grpc.insecure_channel(controller.address, options=[("grpc.max_receive_message_length", 64 << 20)])


class Stream:
    """One Connect stream driven by the test: messages (or raw bytes) out, replies in, and how it ended."""

    def __init__(self, channel: grpc.Channel, raw: bool = False, timeout: float | None = 30) -> None:
        self._out: queue.Queue = queue.Queue()
        self._in: queue.Queue = queue.Queue()
        self.status: tuple[grpc.StatusCode, str] | None = None
        connect = channel.stream_stream(
            CONNECT, request_serializer=None if raw else pb.AgentMessage.SerializeToString,
            response_deserializer=pb.ControllerMessage.FromString)
        self._call = connect(self._outgoing(), timeout=timeout)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _outgoing(self):
        while (item := self._out.get()) is not _END:
            yield item

    def _read(self) -> None:
        try:
            for message in self._call:
                self._in.put(message)
            self.status = (grpc.StatusCode.OK, "")
        except grpc.RpcError as exc:
            self.status = (exc.code(), exc.details() or "")
        self._in.put(_END)

    def send(self, *messages) -> None:
        for message in messages:
            self._out.put(message)

    def expect(self, predicate, what: str, timeout: float = 10) -> pb.ControllerMessage:
        deadline = time.monotonic() + timeout
        while True:
            try:
                message = self._in.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {what} within {timeout}s") from None
            if message is _END:
                self._in.put(_END)
                raise AssertionError(f"the stream ended with {self.status} before {what}")
            if predicate(message):
                return message

    def sync(self) -> None:
        """Returns once the controller has handled everything sent before: a result for an operation
        nobody knows is acknowledged at once, in order."""
        op_id = f"sync-{next(_counter)}"
        self.send(pb.AgentMessage(result=pb.OperationResult(op_id=op_id, outcome=pb.EXITED)))
        self.expect(lambda m: m.WhichOneof("msg") == "ack" and m.ack.op_id == op_id, f"the ack of {op_id}")

    def cancel(self) -> None:
        """Drop the stream from our side, as a dying agent would."""
        self._call.cancel()
        self._out.put(_END)

    def end(self, timeout: float = 10) -> tuple[grpc.StatusCode, str]:
        """Close our side, then wait for the controller to end the stream."""
        self._out.put(_END)
        self._reader.join(timeout)
        assert not self._reader.is_alive(), "the controller did not end the stream"
        return self.status


_counter = itertools.count(1)


def hello(agent_id: str, roles=("computing",), **fields) -> pb.AgentMessage:
    fields.setdefault("heartbeat_interval_s", 3600)  # no heartbeats needed while a test looks
    return pb.AgentMessage(hello=pb.Hello(agent_id=agent_id, roles=list(roles), **fields))


def valid_hello(message: pb.AgentMessage | None) -> bool:
    if message is None or message.WhichOneof("msg") != "hello":
        return False
    h = message.hello
    described = h.ByteSize() - sum(len(pb.Hello(held=[held]).SerializeToString()) for held in h.held)
    return bool(AGENT_ID.fullmatch(h.agent_id) and h.roles and all(r in KNOWN_ROLES for r in h.roles)
                and described <= MAX_DESCRIPTION)


def recorded(info: pb.AgentInfo | None) -> pb.AgentInfo | None:
    """What the controller keeps about an agent, without its state (which time alone changes)."""
    if info is None:
        return None
    kept = pb.AgentInfo()
    kept.CopyFrom(info)
    kept.ClearField("state")
    return kept


class Gateway:
    """The module's controller, seen by agents (raw streams) and by an operator (its socket)."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.channel = agent_channel(controller)
        self.operator_channel = grpc.insecure_channel(  # as deployctl dials it
            f"unix:{controller.socket}", options=[("grpc.max_receive_message_length", MAX_MESSAGE)])
        self.operator = pb_grpc.OperatorStub(self.operator_channel)
        self.victim_ops: list[str] = []
        self.fuzz_ops: list[str] = []

    def connect(self, agent_id: str, timeout: float | None = 30, **fields) -> Stream:
        stream = Stream(self.channel, timeout=timeout)
        stream.send(hello(agent_id, **fields))
        stream.expect(lambda m: m.WhichOneof("msg") == "welcome", f"the welcome of {agent_id}")
        return stream

    def submit(self, agent_id: str, stream: Stream, count: int) -> list[str]:
        """New operations for a connected agent, once its stream has them."""
        ids = []
        for _ in range(count):
            reply = self.operator.SubmitExec(pb.SubmitExecRequest(
                target=pb.Target(agent_ids=[agent_id]), exec=pb.ExecSpec(argv=["true"])), timeout=10)
            (submitted,) = reply.operations
            assert submitted.op_id, submitted.error
            stream.expect(lambda m: m.WhichOneof("msg") == "operation" and m.operation.id == submitted.op_id,
                          f"operation {submitted.op_id}")
            ids.append(submitted.op_id)
        return ids

    def operation(self, op_id: str) -> pb.OperationRecord:
        return self.operator.GetOperation(pb.GetOperationRequest(op_id=op_id), timeout=10)

    def output(self, op_id: str) -> bytes:
        path = self.controller.store / "operations" / op_id / "output.log"
        return path.read_bytes() if path.exists() else b""

    def agents(self) -> dict[str, pb.AgentInfo]:
        return {a.id: a for a in self.operator.ListAgents(pb.ListAgentsRequest(), timeout=10).agents}

    def check_serving(self) -> None:
        """The controller is alive, answers operators, and a well-formed agent session works."""
        assert self.controller.proc.poll() is None, "the controller died"
        assert self.agents()[VICTIM_ID].state == pb.AGENT_CONNECTED
        probe = self.connect(PROBE_ID)
        probe.sync()
        assert probe.end() == (grpc.StatusCode.OK, "")

    def close(self) -> None:
        self.operator_channel.close()
        self.channel.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    world = Gateway(start_controller(tmp_path_factory.mktemp("gateway")))
    # Another agent, connected throughout, whose operations no other agent may touch.
    victim = world.connect(VICTIM_ID, timeout=None)
    world.victim_ops = world.submit(VICTIM_ID, victim, 2)
    world.fds = psutil.Process(world.controller.proc.pid).num_fds()
    yield world
    victim.end()
    world.close()
    world.controller.stop()


# Symbolic operation ids, resolved when the session runs: its own fresh operations, one of its own
# finished in an earlier example, one of another agent, and ids nobody gave.
OP_REFS = ["own-0", "own-1", "own-0", "own-1", "old", "victim", "unknown", ""]
op_refs = st.sampled_from(OP_REFS) | st.text(st.characters(exclude_categories=["Cs"]), max_size=30)
uint64s = st.integers(0, 2 ** 64 - 1)
int32s = st.integers(-2 ** 31, 2 ** 31 - 1)
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
floats = st.floats(allow_nan=True, allow_infinity=True)
facts = st.builds(pb.HostFacts, hostname=texts, cpus=st.integers(0, 2 ** 32 - 1), load1=floats, load5=floats,
                  load15=floats, mem_total_bytes=uint64s, mem_available_bytes=uint64s, disk_free_bytes=uint64s,
                  disk_total_bytes=uint64s)


def rarely(common, rare):
    """`rare` about one time in ten."""
    return st.sampled_from([False] * 9 + [True]).flatmap(lambda pick: rare if pick else common)


# Mostly small; now and then a field of several MiB, within the controller's 8 MiB per message.
payloads = rarely(st.binary(max_size=300), st.sampled_from([1 << 20, 7 << 20]).map(bytes))
big_texts = rarely(texts, st.sampled_from([1 << 20, 6 << 20]).map(lambda n: "v" * n))
BAD_IDS = ["", "A", "-x", ".x", "x" * 64, "abc\n", "abc\r\n", "a b", "é", "a/b", "a\0b", "fuzz-1\n",
           VICTIM_ID + "\n"]
BAD_ROLES = ["", "root", "Computing", "computing\n", "daemons ", "*"]


@st.composite
def hellos(draw) -> pb.AgentMessage:
    """Mostly FUZZ_ID's well-formed hello with odd details; sometimes anything."""
    fields = dict(capabilities=draw(st.lists(texts, max_size=3)), version=draw(big_texts),
                  facts=draw(facts), services_root=draw(texts), service_driver=draw(texts),
                  settings=draw(st.dictionaries(texts, texts, max_size=3)),
                  held=[pb.HeldOperation(op_id=draw(texts), state=draw(int32s), acked_offset=draw(uint64s))
                        for _ in range(draw(st.integers(0, 2)))],
                  heartbeat_interval_s=draw(st.sampled_from([0, 3600, 2 ** 32 - 1])))
    if draw(st.integers(0, 3)):
        roles = draw(st.lists(st.sampled_from(KNOWN_ROLES), min_size=1, max_size=3))
        return hello(FUZZ_ID, roles, **fields)
    agent_id = draw(st.sampled_from(BAD_IDS) | texts | names).replace(VICTIM_ID, "v").replace(PROBE_ID, "p")
    roles = draw(st.lists(st.sampled_from(KNOWN_ROLES), min_size=1, max_size=2)
                 | st.lists(st.sampled_from(KNOWN_ROLES + tuple(BAD_ROLES)) | texts, max_size=3))
    return hello(agent_id, roles, **fields)


@st.composite
def agent_messages(draw) -> tuple:
    """(kind, fields) with symbolic op ids and offsets; built into an AgentMessage at run time."""
    kind = draw(st.sampled_from(["hello", "heartbeat", "accepted", "output", "output", "output", "result",
                                 "empty"]))
    if kind == "hello":
        return kind, draw(hellos())
    if kind == "heartbeat":
        running = draw(st.integers(0, 2 ** 32 - 1))
        return kind, pb.AgentMessage(heartbeat=pb.Heartbeat(facts=draw(facts), running=running))
    if kind == "accepted":
        return kind, (draw(op_refs), draw(st.booleans()))
    if kind == "output":
        where = draw(st.sampled_from(["next", "next", "back", "overlap", "jump", "zero", "end-of-range"]))
        return kind, (draw(op_refs), where, draw(st.integers(1, 1000)), draw(payloads),
                      draw(st.sampled_from([pb.STDOUT, pb.STDERR, 0, 99, -1])), draw(uint64s))
    if kind == "result":
        return kind, (draw(op_refs), draw(st.sampled_from(range(9)) | int32s), draw(int32s),
                      draw(floats), draw(big_texts | st.just("a\nb")), draw(uint64s))
    return kind, pb.AgentMessage()


class Model:
    """What the controller must have recorded for the operations a session touches."""

    def __init__(self, gateway: Gateway, agent_id: str | None, refs: dict[str, str]) -> None:
        self.agent_id = agent_id
        self.owner: dict[str, str] = {}
        self.state: dict[str, str] = {}
        self.outcome: dict[str, int | None] = {}
        self.output: dict[str, bytes] = {}
        for op_id in set(refs.values()):
            try:
                record = gateway.operation(op_id)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
                continue
            self.owner[op_id] = record.agent_id
            self.state[op_id] = record.state
            self.outcome[op_id] = record.result.outcome if record.state == "finished" else None
            self.output[op_id] = gateway.output(op_id)

    def own(self, op_id: str) -> bool:
        return self.owner.get(op_id) == self.agent_id is not None

    def accepted(self, op_id: str) -> None:
        if self.own(op_id) and self.state[op_id] in ("queued", "sent"):
            self.state[op_id] = "running"

    def chunk(self, op_id: str, offset: int, data: bytes) -> None:
        have = self.output.get(op_id, b"")
        if self.own(op_id) and offset <= len(have) < offset + len(data):
            self.output[op_id] = have + data[len(have) - offset:]

    def result(self, op_id: str, outcome: int) -> None:
        if self.own(op_id) and self.outcome[op_id] in (None, pb.LOST):
            self.state[op_id] = "finished"
            self.outcome[op_id] = outcome if outcome in pb.Outcome.values() else pb.OUTCOME_UNSPECIFIED


def offset_for(where: str, have: int, k: int, size: int) -> int:
    return {"next": have, "back": max(0, have - k), "overlap": max(0, have - min(k, size // 2)),
            "jump": have + k, "zero": 0, "end-of-range": 2 ** 64 - 1}[where]


def build(kind: str, fields, refs: dict[str, str], model: Model) -> pb.AgentMessage:
    """The message to send, and its effect on the model."""
    if kind in ("hello", "heartbeat", "empty"):
        return fields
    op_id = refs.get(fields[0], fields[0])
    if kind == "accepted":
        model.accepted(op_id)
        return pb.AgentMessage(accepted=pb.Accepted(op_id=op_id, duplicate=fields[1]))
    if kind == "output":
        _, where, k, data, stream, seq = fields
        offset = offset_for(where, len(model.output.get(op_id, b"")), k, len(data))
        model.chunk(op_id, offset, data)
        return pb.AgentMessage(output=pb.OutputChunk(op_id=op_id, seq=seq, offset=offset, stream=stream,
                                                     data=data))
    _, outcome, exit_code, duration, error, output_bytes = fields
    model.result(op_id, outcome)
    return pb.AgentMessage(result=pb.OperationResult(op_id=op_id, outcome=outcome, exit_code=exit_code,
                                                     duration_s=duration, error=error, output_bytes=output_bytes))


@bounded(80, deadline=None)
@given(first=rarely(hellos(), agent_messages().map(lambda m: m[1] if m[0] in ("heartbeat", "empty")
                                                   else pb.AgentMessage())),
       messages=st.lists(agent_messages(), max_size=12))
@example(first=hello("abc\n"), messages=[])
@example(first=hello(FUZZ_ID, version="v" * (6 << 20)), messages=[])
@example(first=hello("big-2", version="v" * (6 << 20)), messages=[])
@example(first=hello(FUZZ_ID), messages=[("result", ("own-0", 99, 0, 0.0, "", 0))])
@example(first=hello(FUZZ_ID), messages=[("result", ("victim", 1, 0, 0.0, "", 0)),
                                         ("output", ("victim", "next", 1, b"x", 1, 0)),
                                         ("accepted", ("victim", False))])
@example(first=hello(FUZZ_ID), messages=[("output", ("old", "next", 1, b"late", 1, 0))] * 3)
def test_any_message_sequence_gets_a_clean_answer(gateway, first, messages):
    session_agent = first.hello.agent_id if valid_hello(first) else None
    event("session of " + ("nobody" if session_agent is None else FUZZ_ID if session_agent == FUZZ_ID
                           else "another agent"))
    before = gateway.agents()
    stream = Stream(gateway.channel)
    stream.send(first)
    if session_agent is None:
        # Not a session: refused with a reason, and nothing recorded about the caller.
        code, details = stream.end()
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details, (code, details)
        refused = first.hello.agent_id  # may be known from an earlier example: it must not change
        assert recorded(gateway.agents().get(refused)) == recorded(before.get(refused))
        gateway.check_serving()
        return
    stream.expect(lambda m: m.WhichOneof("msg") == "welcome", "the welcome")
    refs = {"victim": gateway.victim_ops[0], "unknown": "op-unknown-" + str(next(_counter))}
    if gateway.fuzz_ops:
        refs["old"] = gateway.fuzz_ops[-1]
    if session_agent == FUZZ_ID:
        fresh = gateway.submit(FUZZ_ID, stream, 2)
        refs.update({"own-0": fresh[0], "own-1": fresh[1]})
    model = Model(gateway, session_agent, refs)
    stream.send(*(build(kind, fields, refs, model) for kind, fields in messages))
    stream.sync()

    for op_id, owner in model.owner.items():
        record = gateway.operation(op_id)
        assert record.state == model.state[op_id], (op_id, owner)
        assert (record.result.outcome if record.state == "finished" else None) == model.outcome[op_id], op_id
        assert gateway.output(op_id) == model.output[op_id], op_id
        assert record.output_bytes == len(model.output[op_id])
    assert gateway.agents()[session_agent].state == pb.AGENT_CONNECTED

    # The session still works: finish what is open the normal way, and close it.
    open_ops = [op_id for op_id in model.owner if model.own(op_id) and model.state[op_id] != "finished"]
    stream.send(*(pb.AgentMessage(result=pb.OperationResult(op_id=op_id, outcome=pb.EXITED))
                  for op_id in open_ops))
    stream.sync()
    assert all(gateway.operation(op_id).state == "finished" for op_id in open_ops)
    assert stream.end() == (grpc.StatusCode.OK, "")
    if session_agent == FUZZ_ID:
        gateway.fuzz_ops += [refs["own-0"], refs["own-1"]]
    gateway.check_serving()


def serialized(message: pb.AgentMessage) -> bytes:
    return message.SerializeToString()


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """`data` cut short or with a few bytes changed."""
    if data and draw(st.booleans()):
        return data[:draw(st.integers(0, len(data) - 1))]
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        if out:
            out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
    return bytes(out)


GOOD = serialized(hello("garbage-1"))
raw_messages = (st.binary(max_size=64) | st.just(GOOD) | damaged(GOOD)
                | st.sampled_from([b"", b"\xff" * 10, b"\x0a\xff\xff\xff\xff\x0f", b"\x08" + b"\x80" * 10,
                                   serialized(pb.AgentMessage(heartbeat=pb.Heartbeat())),
                                   b"\x0a\x03\x0a\x01\xff"]))


def parsed(data: bytes) -> pb.AgentMessage | None:
    try:
        return pb.AgentMessage.FromString(data)
    except DecodeError:
        return None


@bounded(60, deadline=None)
@given(st.lists(raw_messages, max_size=5))
@example([b"\xff\xff\xff"])
@example([GOOD, b"\xff\xff"])
@example([b"\x0a\x03\x0a\x01\xff"])  # a hello whose agent id is not UTF-8
@example([])
def test_bytes_that_are_not_messages_get_invalid_argument(gateway, chunks):
    stream = Stream(gateway.channel, raw=True)
    messages = [parsed(chunk) for chunk in chunks]
    stream.send(*chunks)
    if messages and valid_hello(messages[0]) and None not in messages:
        stream.expect(lambda m: m.WhichOneof("msg") == "welcome", "the welcome")
        assert stream.end() == (grpc.StatusCode.OK, "")
    else:
        code, details = stream.end()
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details, (code, details)
    gateway.check_serving()


def test_a_message_over_the_limit_is_refused_cleanly(gateway):
    stream = gateway.connect("big-1")
    stream.send(pb.AgentMessage(output=pb.OutputChunk(op_id="op-x", data=bytes(MAX_MESSAGE + 1))))
    code, _ = stream.end()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    gateway.check_serving()


def test_host_facts_beyond_the_description_limit_end_the_session_cleanly(gateway):
    stream = gateway.connect("big-3")
    stream.send(pb.AgentMessage(heartbeat=pb.Heartbeat(facts=pb.HostFacts(hostname="h" * (6 << 20)))))
    code, details = stream.end()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "host facts" in details
    assert gateway.agents()["big-3"].facts.hostname == ""
    gateway.check_serving()


def test_a_second_session_of_an_agent_replaces_the_first_cleanly(gateway):
    first = gateway.connect("twice-1")
    second = gateway.connect("twice-1")
    assert first.end() == (grpc.StatusCode.OK, "")
    second.sync()
    assert gateway.agents()["twice-1"].state == pb.AGENT_CONNECTED
    assert second.end() == (grpc.StatusCode.OK, "")
    gateway.check_serving()


def test_an_agent_that_drops_its_stream_is_disconnected_and_keeps_its_operations(gateway):
    stream = gateway.connect("drop-1")
    (op_id,) = gateway.submit("drop-1", stream, 1)
    stream.send(pb.AgentMessage(output=pb.OutputChunk(op_id=op_id, offset=0, stream=pb.STDOUT, data=b"half")))
    stream.sync()
    stream.cancel()
    wait_for(lambda: gateway.agents()["drop-1"].state == pb.AGENT_DISCONNECTED, 10, what="drop-1 disconnected")
    assert gateway.operation(op_id).state == "sent" and gateway.output(op_id) == b"half"
    again = gateway.connect("drop-1")  # the operation comes again, and its output goes on from 4 bytes
    again.expect(lambda m: m.WhichOneof("msg") == "operation" and m.operation.id == op_id, "the operation again")
    again.send(pb.AgentMessage(output=pb.OutputChunk(op_id=op_id, offset=0, stream=pb.STDOUT, data=b"half-done")),
               pb.AgentMessage(result=pb.OperationResult(op_id=op_id, outcome=pb.EXITED, output_bytes=9)))
    again.sync()
    assert gateway.operation(op_id).state == "finished" and gateway.output(op_id) == b"half-done"
    assert again.end() == (grpc.StatusCode.OK, "")
    gateway.check_serving()


def test_an_error_far_longer_than_an_agent_sends_is_cut_on_arrival(gateway):
    """A real agent keeps a result's error to about 2000 characters; a hostile one sending 1 MB
    does not get it into the store whole."""
    stream = gateway.connect("wordy-1")
    (op_id,) = gateway.submit("wordy-1", stream, 1)
    error = "start " + "e" * (1 << 20) + " end"
    stream.send(pb.AgentMessage(result=pb.OperationResult(op_id=op_id, outcome=pb.EXITED, exit_code=1, error=error)))
    stream.sync()
    kept = gateway.operation(op_id).result.error
    assert 3000 < len(kept) < 4200 and kept.startswith("start ") and kept.endswith(" end")
    assert "characters left out" in kept
    assert stream.end() == (grpc.StatusCode.OK, "")


def test_late_messages_about_finished_operations_leave_no_file_open(gateway):
    stream = gateway.connect("late-1")
    op_ids = gateway.submit("late-1", stream, 30)
    stream.send(*(pb.AgentMessage(result=pb.OperationResult(op_id=op_id, outcome=pb.EXITED)) for op_id in op_ids))
    stream.sync()
    before = psutil.Process(gateway.controller.proc.pid).num_fds()
    for op_id in op_ids:
        stream.send(pb.AgentMessage(accepted=pb.Accepted(op_id=op_id, duplicate=True)),
                    pb.AgentMessage(output=pb.OutputChunk(op_id=op_id, offset=0, stream=pb.STDOUT, data=b"late")))
    stream.sync()
    assert psutil.Process(gateway.controller.proc.pid).num_fds() < before + 10
    assert stream.end() == (grpc.StatusCode.OK, "")


def test_after_the_fuzzing_the_controller_is_whole(gateway):
    """Runs last: other agents' operations untouched, only valid ids recorded, no leaked files,
    and `deployctl agents` still reads the registry."""
    for op_id in gateway.victim_ops:
        record = gateway.operation(op_id)
        assert (record.state, record.output_bytes) == ("sent", 0) and not gateway.output(op_id)
    assert all(AGENT_ID.fullmatch(agent_id) for agent_id in gateway.agents())
    assert psutil.Process(gateway.controller.proc.pid).num_fds() < gateway.fds + 20
    env = {**os.environ, "DEPLOYER_SOCKET": str(gateway.controller.socket), "NO_COLOR": "1"}
    for args in (["agents"], ["agents", "--json"]):
        result = subprocess.run([sys.executable, "-m", "deployctl.cli", *args], cwd=ROOT, env=env,
                                capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr
    gateway.check_serving()
