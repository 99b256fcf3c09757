"""Redaction of secret values in operation output: forms, streaming, and the agent's executor."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import urllib.parse

import pytest
from hypothesis import assume, given, settings, strategies as st

from agent import executor
from common.redact import MIN_LINE_BYTES, MIN_VALUE_BYTES, Patterns, forms
from agent.spool import Spool
from protos import deployer_pb2 as pb

SECRET = "s3cr3t-Value_42"
PEM = ("-----BEGIN TEST KEY-----\nMIIBVgIBADANBgkqhkiG9w0BAQEFAASCAUAwggE8AgEAAkEAq7BFUpkGp3+\n"
       "  Lo1Lkq2FSkbuU5V0pPMQZ4aW1qQxCkzyJ0uXnDzYAn\n}\n-----END TEST KEY-----")


def redact(values, text: str | bytes, chunk: int = 0) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    patterns = Patterns(values)
    if not chunk:
        return patterns.redact(data)
    redactor = patterns.redactor()
    out = [redactor.feed(data[i:i + chunk]) for i in range(0, len(data), chunk)]
    return b"".join(out) + redactor.flush()


def shell(script: str, value: str) -> bytes:
    """What a real command prints, with the value in $S."""
    return subprocess.run(["sh", "-c", script], env={"S": value, "PATH": "/usr/bin:/bin"},
                          capture_output=True, check=True).stdout


def test_a_value_is_replaced_wherever_it_is():
    assert redact([SECRET], f"key={SECRET}\n{SECRET}{SECRET} end") == b"key=***\n****** end"


def test_values_too_short_are_not_patterns():
    assert forms("abc") == set() and MIN_VALUE_BYTES == 4
    assert redact(["abc", "x"], "abc x abc") == b"abc x abc"
    assert redact(["abcd"], "abc abcd") == b"abc ***"


def test_each_line_of_a_multi_line_value_is_replaced_on_its_own():
    out = redact([PEM], "header\n" + PEM.split("\n")[1] + "\n" + PEM.split("\n")[2].strip() + "\n}\n")
    assert out == b"header\n***\n***\n}\n"        # `}` is shorter than MIN_LINE_BYTES: kept
    assert redact([PEM], PEM) == b"***"
    assert all(len(f) >= MIN_LINE_BYTES for f in forms(PEM) if b"\n" not in f and PEM.encode() not in f)


@pytest.mark.parametrize("script", [
    'printf %s "$S" | base64',
    'echo "$S" | base64',
    'printf %s "$S" | base64 | tr "+/" "-_"',
    'echo "$S" | base64 -w0',
    'printf %s "$S" | basenc --base64url',
])
@pytest.mark.parametrize("value", [SECRET, "x" * 61 + "-long-enough-to-wrap-at-76-columns", PEM])
def test_base64_as_printed_by_the_base64_command(script, value):
    printed = shell(script, value)
    out = redact([value], printed)
    assert b"***" in out
    leftover = out.replace(b"***", b"").strip()
    assert len(leftover) <= 3, (printed, out)     # at most the padding and one dependent character


@pytest.mark.parametrize("before", [b"", b"a", b"ab", b"abc", b"user:"])
@pytest.mark.parametrize("after", [b"", b"\n", b"x", b"xy", b":rest of it"])
def test_base64_inside_a_larger_input_at_every_alignment(before, after):
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        printed = encode(before + SECRET.encode() + after)
        out = redact([SECRET], printed)
        assert b"***" in out, (printed, out)
        # What is left next to *** are only characters that also depend on the bytes around it.
        head, _, tail = out.partition(b"***")
        assert len(head) <= len(encode(before))
        assert len(tail.rstrip(b"=")) <= len(encode(after).rstrip(b"=")) + 1


def test_url_encoded_forms():
    value = "p@ss word/with+odd&chars"
    text = f"a={urllib.parse.quote(value, safe='')}&b={urllib.parse.quote_plus(value)}"
    assert redact([value], text) == b"a=***&b=***"


def test_the_longest_match_wins():
    short, long = "hunter22", "hunter22-and-more"
    assert redact([short, long], f"{long} {short}") == b"*** ***"
    assert redact([short, long], f"{long} {short}", chunk=3) == b"*** ***"


def test_a_value_split_across_reads_is_caught_at_every_split():
    text = f"before {SECRET} after".encode()
    for split in range(len(text) + 1):
        redactor = Patterns([SECRET]).redactor()
        out = redactor.feed(text[:split]) + redactor.feed(text[split:]) + redactor.flush()
        assert out == b"before *** after", split


def test_ordinary_output_is_not_held_back():
    redactor = Patterns([SECRET]).redactor()
    assert redactor.feed(b"npm WARN deprecated\n") == b"npm WARN deprecated\n"
    assert redactor.feed(b"almost s3cr") == b"almost "      # could be the start of the secret
    assert redactor.held == b"s3cr"
    assert redactor.feed(b"ew\n") == b"s3crew\n"


def test_without_values_output_passes_untouched():
    redactor = Patterns([]).redactor()
    assert redactor.feed(b"anything") == b"anything" and redactor.flush() == b""


# ---------------------------------------------------------------- properties

values_st = st.lists(st.text(st.characters(blacklist_characters="*", blacklist_categories=("Cs",)),
                             min_size=MIN_VALUE_BYTES, max_size=40), min_size=1, max_size=3)
filler_st = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


@st.composite
def chunked(draw, data: bytes):
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


def run_chunks(patterns: Patterns, chunks: list[bytes]) -> bytes:
    redactor = patterns.redactor()
    out = []
    for chunk in chunks:
        out.append(redactor.feed(chunk))
        assert len(redactor.held) < max(patterns.longest, 1)
    return b"".join(out) + redactor.flush()


@settings(max_examples=300, deadline=None)
@given(values=values_st, fillers=st.lists(filler_st, min_size=1, max_size=5), data=st.data())
def test_property_no_value_survives_any_chunking(values, fillers, data):
    pieces = []
    for filler in fillers:
        value = data.draw(st.sampled_from(values))
        encoded = data.draw(st.sampled_from([
            value.encode(), base64.b64encode(value.encode()), base64.b64encode(value.encode() + b"\n"),
            urllib.parse.quote(value, safe="").encode()]))
        pieces += [filler.encode(), encoded]
    text = b"".join(pieces)
    patterns = Patterns(values)
    out = run_chunks(patterns, data.draw(chunked(text)))
    for value in values:
        assert value.encode() not in out
        assert base64.b64encode(value.encode()) not in out
        assert base64.b64encode(value.encode() + b"\n") not in out
    assert out == patterns.redact(text)           # streaming changes nothing


@settings(max_examples=300, deadline=None)
@given(values=values_st, text=st.binary(max_size=300), data=st.data())
def test_property_text_without_secrets_passes_unchanged(values, text, data):
    patterns = Patterns(values)
    assume(not any(form in text for form in patterns.forms))
    assert run_chunks(patterns, data.draw(chunked(text))) == text


# ---------------------------------------------------------------- the executor

def test_the_executor_spools_only_redacted_output(tmp_path):
    """A real command prints a multi-line secret in pieces, on both streams: the spool (what is
    sent, and what offsets count) never holds a raw line of it."""
    script = ('printf "%s" "$A"; sleep 0.2; printf "%s\\n" "$B"; sleep 0.2; echo "$S" | base64 >&2; '
              'printf "tail\\n"')
    pem_lines = PEM.split("\n")
    first = pem_lines[1]
    a, b = first[:20], first[20:]
    spec = pb.ExecSpec(argv=["sh", "-c", script], env={"A": a, "B": b, "S": PEM})
    spool = Spool(tmp_path / "spool")

    async def main() -> pb.OperationResult:
        run = executor.spawn("op-1", spec, str(tmp_path), spool, lambda: None, Patterns([PEM]))
        return await executor.supervise(run, spec)

    result = asyncio.run(main())
    out = b"".join(r.data for r in spool.read(0))
    streams = {r.stream for r in spool.read(0)}
    assert result.exit_code == 0 and streams == {pb.STDOUT, pb.STDERR}
    assert out.count(b"***") >= 2 and out.endswith(b"tail\n")
    assert result.output_bytes == len(out)
    raw = b"".join(p.read_bytes() for p in (tmp_path / "spool").rglob("*") if p.is_file())
    for line in pem_lines:
        if len(line.strip()) >= MIN_LINE_BYTES:
            assert line.strip().encode() not in out and line.strip().encode() not in raw
    assert base64.b64encode(PEM.encode() + b"\n")[:76] not in raw


def test_the_agent_redacts_errors_and_its_journal_forgets_the_values(tmp_path):
    from agent.journal import Journal
    from agent.operations import Operations
    from agent.services import Supervisor

    async def main() -> pb.OperationResult:
        ops = Operations(Journal(tmp_path / "state"), tmp_path, Supervisor(tmp_path / "state"))
        held, _, _ = ops.receive(pb.Operation(id="op-1", redact=[SECRET],
                                              exec=pb.ExecSpec(argv=[f"/nonexistent/{SECRET}"])))
        await held.task
        ops.ack("op-1", held.result.output_bytes, True)
        return held.result

    result = asyncio.run(main())
    assert result.outcome == pb.FAILED_TO_START and "***" in result.error and SECRET not in result.error
    state = b"".join(p.read_bytes() for p in (tmp_path / "state").rglob("*") if p.is_file())
    assert SECRET.encode() not in state
