"""The README says what the code does: its CLI tables list exactly the flags
each command's ``--help`` offers, its configuration table names real fields
with their real defaults, and its test command is what CI runs.

The CLI tables are the README's Markdown tables whose header starts with
``| command | flags |``: the first cell names one or more commands in
backticks (``raftstate device get ID``, ``sudo raftstate lab status``), the
second lists the flags (every ``--word`` in it) and says "client flags" when
the command takes them. The row whose first cell is ``client flags`` lists
those.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from chaos.proxy.__main__ import build_parser as build_toxiproxy_parser
from raftstate.cli.clientflags import FLAGS as CLIENT_FLAGS
from raftstate.cli.main import build_parser
from raftstate.config import NodeConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
FLAG = re.compile(r"--[a-z][a-z0-9-]*")
COMMAND_WORD = re.compile(r"[a-z][a-z-]*")


def table_rows(text: str, header: str) -> Iterator[list[str]]:
    """The cells of every body row of every table whose header starts with
    ``header`` (``\\|`` inside a cell is not a separator)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith(header):
            continue
        for row in lines[i + 2 :]:
            if not row.startswith("|"):
                break
            cells = re.split(r"(?<!\\)\|", row.strip().strip("|"))
            yield [c.strip() for c in cells]


def documented() -> tuple[dict[tuple[str, ...], tuple[set[str], bool]], set[str]]:
    """README: command path -> (its flags, whether it says 'client flags'),
    and the client flags' row."""
    commands: dict[tuple[str, ...], tuple[set[str], bool]] = {}
    client: set[str] = set()
    for cells in table_rows(README, "| command | flags |"):
        first, flags_cell = cells[0], cells[1]
        flags = set(FLAG.findall(flags_cell))
        if first == "client flags":
            client = flags
            continue
        names = re.findall(r"`([^`]+)`", first)
        assert names, f"README CLI row names no command in backticks: {first!r}"
        for name in names:
            words = name.split()
            if words[0] == "sudo":
                words = words[1:]
            path = [words[0]]
            for word in words[1:]:
                if not COMMAND_WORD.fullmatch(word):
                    break  # ID, TOKEN_ID|TOKEN: a positional placeholder
                path.append(word)
            key = tuple(path)
            assert key not in commands, f"README documents {name!r} twice"
            commands[key] = (flags, "client flags" in flags_cell)
    return commands, client


def leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from leaves(sub, (*path, name))


def offered(parser: argparse.ArgumentParser) -> set[str]:
    """The long options ``parser --help`` shows (not -h/--help)."""
    return {
        opt
        for action in parser._actions
        if action.help != argparse.SUPPRESS
        for opt in action.option_strings
        if opt.startswith("--") and opt != "--help"
    }


def every_command() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    found = dict(leaves(build_parser(lazily=False), ("raftstate",)))
    found[("raftstate-toxiproxy",)] = build_toxiproxy_parser()
    return found


def test_client_flags_row_matches_the_client_flags() -> None:
    _, client = documented()
    assert client == {f.option for f in CLIENT_FLAGS}
    top = build_parser()
    assert offered(top) == client  # the flags the top level takes, before any command


def test_every_command_is_in_the_readme_with_exactly_its_flags() -> None:
    docs, client = documented()
    problems = []
    for path, parser in every_command().items():
        name = " ".join(path)
        if path not in docs:
            problems.append(f"{name}: not in the README's CLI tables")
            continue
        flags, says_client = docs[path]
        options = offered(parser)
        takes_client = client <= options
        if takes_client != says_client:
            problems.append(
                f"{name}: takes client flags: {takes_client}, README says {says_client}"
            )
        own = options - client if takes_client else options
        if missing := own - flags:
            problems.append(f"{name}: --help has {sorted(missing)}, the README does not")
        if extra := flags - own:
            problems.append(f"{name}: the README lists {sorted(extra)}, --help does not")
        help_text = parser.format_help()
        problems += [f"{name}: {f} missing from --help" for f in flags if f not in help_text]
    assert not problems, "\n".join(problems)


def test_the_readme_documents_no_command_that_does_not_exist() -> None:
    docs, _ = documented()
    assert set(docs) - set(every_command()) == set()


def test_the_issue_flags_are_documented() -> None:
    """The flags an earlier README omitted."""
    docs, _ = documented()
    assert {"--grpc-port", "--raft-port", "--size", "--for-seconds"} <= docs[
        ("raftstate", "cluster", "up")
    ][0]


def test_configuration_table_names_real_fields_with_their_defaults() -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(NodeConfig)}
    rows = list(table_rows(README, "| field | default |"))
    assert len(rows) >= 20
    for cells in rows:
        field = cells[0].strip("`")
        assert field in defaults, f"README config table: {field} is not a NodeConfig field"
        value = tomllib.loads(f"x = {cells[1].strip('`')}")["x"]
        assert value == defaults[field], (
            f"README says {field} = {value!r}, config.py {defaults[field]!r}"
        )


def test_the_two_commands_come_first_and_the_test_command_is_what_ci_runs() -> None:
    blocks = re.findall(r"```sh\n(.*?)```", README, re.S)
    assert blocks[:2] == ["./scripts/bootstrap.sh && raftstate cluster up\n", "./scripts/test.sh\n"]
    assert README.index(blocks[0]) < README.index("## ")  # before any section
    ci = (ROOT / ".ci" / "run").read_text()
    assert "exec ./scripts/test.sh\n" in ci
    assert (ROOT / "scripts" / "test.sh").stat().st_mode & 0o111


@pytest.mark.parametrize("doc", ["docs/benchmarks.md", "docs/operating.md"])
def test_readme_links_to_docs_that_exist(doc: str) -> None:
    assert f"]({doc}" in README
    assert (ROOT / doc).exists()


def test_every_option_explains_itself_in_help() -> None:
    bare = [
        f"{' '.join(path)} {action.option_strings[0]}"
        for path, parser in every_command().items()
        for action in parser._actions
        if action.option_strings and action.help is None
    ]
    assert not bare, f"options without a help line: {bare}"
