"""The .env format: what the controller writes is what the agent (and systemd) read back."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from common import envfile
from agent.launcher import read_env_file
from controller.environments import commands as operations

NAMES = st.from_regex(r"[A-Z][A-Z0-9_]{0,12}", fullmatch=True)
VALUES = st.text(st.characters(exclude_characters="\0", exclude_categories=("Cs",)), max_size=60)


@given(st.dictionaries(NAMES, VALUES, max_size=6))
def test_every_value_survives_the_round_trip(values):
    assert envfile.parse(envfile.render(values).decode()) == values


def test_plain_values_stay_readable_and_others_are_quoted():
    text = envfile.render({"PORT": "8080", "URL": "mysql://u:p@h/db", "PEM": "-----BEGIN-----\nAAA=\n-----END-----",
                           "ODD": 'say "hi" $HOME `x` \\ ', "EMPTY": ""}).decode()
    assert "PORT=8080\n" in text and "URL=mysql://u:p@h/db\n" in text and "EMPTY=\n" in text
    assert 'PEM="-----BEGIN-----\nAAA=\n-----END-----"\n' in text            # systemd/dotenv syntax
    assert 'ODD="say \\"hi\\" \\$HOME \\`x\\` \\\\ "\n' in text


def test_comments_blank_lines_and_hand_written_values(tmp_path):
    path = tmp_path / ".env"
    path.write_text('# written by hand\n\nA=1\nB="two\nlines"\nC=x=y\nnot a variable\n')
    assert read_env_file(str(path)) == {"A": "1", "B": "two\nlines", "C": "x=y"}


def test_a_nul_byte_cannot_be_written():
    try:
        operations.env_file({"K": "a\0b"})
    except ValueError as exc:
        assert "K" in str(exc)
    else:
        raise AssertionError("a NUL byte was accepted")


# ---------------------------------------------------------------- values built from generated ones

@pytest.mark.parametrize("template, expected", [
    ("mysql+pymysql://${DB_USER}:${DB_PASSWORD}@${DB_HOST}:${DB_PORT}/${DB_NAME}",
     "mysql+pymysql://u:p@w$rd@10.0.0.7:3306/auto-shop-prod-web-1"),
    ("$$5, $HOME and ${DB_USER}$", "$5, $HOME and u$"),
    ("no reference", "no reference"),
    ("${DB_PASSWORD}${DB_PASSWORD}", "p@w$rdp@w$rd"),
    ("$${DB_USER}", "${DB_USER}"),
])
def test_expand_replaces_references_and_keeps_the_rest(template, expected):
    values = {"DB_USER": "u", "DB_PASSWORD": "p@w$rd", "DB_HOST": "10.0.0.7", "DB_PORT": "3306",
              "DB_NAME": "auto-shop-prod-web-1"}
    assert envfile.expand(template, values) == expected


def test_a_value_is_never_expanded_twice():
    """A generated value holding `${…}` (a password could) is put in as it is."""
    assert envfile.expand("x=${A}", {"A": "${B}", "B": "no"}) == "x=${B}"


@pytest.mark.parametrize("template, error", [
    ("${A", "${ at offset 0 is not closed by }; write $$ for a literal $"),
    ("x ${a-b}", "${a-b} is not a variable name (capitals, digits and _)"),
    ("${}", "${} is not a variable name (capitals, digits and _)"),
])
def test_malformed_references_are_refused(template, error):
    with pytest.raises(ValueError) as raised:
        envfile.references(template)
    assert str(raised.value) == error
