"""Argument types and the parser class of the ``raftstate`` command line.

Every number a flag takes is checked against its range while the command
line is parsed, so a bad value ends the command before it does anything,
with exit status 2 and one line naming the flag, the range and the value::

    raftstate device heartbeat: --seq: must be an integer from 1 to 18446744073709551615, got -1

The types are plain callables for ``add_argument(type=...)``: they return the
parsed value or raise :class:`argparse.ArgumentTypeError` with that text.
:class:`CliParser` turns argparse's usage-plus-error output into that single
line (subcommand parsers inherit the class). Its subcommands can be *lazy*
(:func:`lazy`): their options are added only when the command is chosen,
so a command does not pay for importing every other command's module.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, cast

#: Largest uint64 (``seq``).
UINT64_MAX = 2**64 - 1
#: Longest duration any flag takes, in seconds (ten years): far beyond any
#: real deadline or run, and small enough for every timer API it reaches.
SECONDS_MAX = 10 * 365 * 86400.0


if TYPE_CHECKING:
    _SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    _SubParsers = argparse._SubParsersAction


class LazySubParsers(_SubParsers):
    """Subcommands whose options a builder adds when the command is chosen."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("metavar") is None:
            kwargs["metavar"] = "COMMAND"  # "required: COMMAND", not the dest's name
        super().__init__(*args, **kwargs)
        self._builders: dict[str, Callable[[argparse.ArgumentParser], None]] = {}

    def add_lazy(
        self, name: str, builder: Callable[[argparse.ArgumentParser], None], **kwargs: Any
    ) -> argparse.ArgumentParser:
        """Add subcommand ``name`` (``kwargs`` as for ``add_parser``) whose
        options ``builder(parser)`` adds on first use."""
        parser = self.add_parser(name, **kwargs)
        self._builders[name] = builder
        return parser

    def build(self, name: str) -> None:
        """Run ``name``'s builder if it has not run yet."""
        builder = self._builders.pop(name, None)
        if builder is not None:
            builder(self._name_parser_map[name])

    def build_all(self) -> None:
        """Run every pending builder, and those of the subcommands below."""
        for name in list(self._builders):
            self.build(name)
        for parser in self._name_parser_map.values():
            build_all(parser)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        if values and isinstance(values, Sequence) and not isinstance(values, str):
            self.build(str(values[0]))
        super().__call__(parser, namespace, values, option_string)


def lazy(
    sub: Any, name: str, builder: Callable[[argparse.ArgumentParser], None], **kwargs: Any
) -> argparse.ArgumentParser:
    """``sub.add_parser(name, **kwargs)``, its options added by ``builder``
    only when ``name`` is chosen (``sub`` is a :class:`CliParser`'s)."""
    return cast(LazySubParsers, sub).add_lazy(name, builder, **kwargs)


def build_all(parser: argparse.ArgumentParser) -> None:
    """Add the options of every lazy subcommand under ``parser`` now."""
    for action in parser._actions:
        if isinstance(action, LazySubParsers):
            action.build_all()
        elif isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                build_all(sub)


class CliParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr, exit 2,
    and whose subcommands may be lazy (:func:`lazy`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", LazySubParsers)

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: MESSAGE (see PROG --help)`` and exit with status 2."""
        if message.startswith("argument "):
            message = message[len("argument ") :]  # "--seq: must be ..." names the flag
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


@dataclass(frozen=True, slots=True)
class Integer:
    """A base-10 integer in ``[lo, hi]`` (``hi=None``: no upper bound)."""

    lo: int
    hi: int | None = None

    def describe(self) -> str:
        """The range in words, for messages and help."""
        if self.hi is None:
            return f"an integer of at least {self.lo}"
        return f"an integer from {self.lo} to {self.hi}"

    def __call__(self, text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        if value < self.lo or (self.hi is not None and value > self.hi):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text.strip()}")
        return value


@dataclass(frozen=True, slots=True)
class Real:
    """A finite decimal number in ``(lo, hi]`` or ``[lo, hi]``."""

    lo: float
    hi: float
    lo_inclusive: bool = False
    unit: str = ""

    def describe(self) -> str:
        """The range in words, for messages and help."""
        unit = f" {self.unit}" if self.unit else ""
        low = f"at least {self.lo:g}" if self.lo_inclusive else f"above {self.lo:g}"
        return f"a number {low} and at most {_number(self.hi)}{unit}"

    def __call__(self, text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        low_ok = value >= self.lo if self.lo_inclusive else value > self.lo
        if not (math.isfinite(value) and low_ok and value <= self.hi):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text.strip()}")
        return value


def _number(x: float) -> str:
    """``315,360,000`` rather than ``3.1536e+08``."""
    return f"{int(x):,}" if x == int(x) else f"{x:g}"


def key_value(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (the value may be empty or hold ``=``) as a pair."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expects KEY=VALUE, got {text!r}")
    return key, value


def readable_file(text: str) -> str:
    """A path to a file this process can read (returned unchanged)."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a file")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text!r} is not readable")
    return text


#: A TCP/UDP port to bind or dial (0 excluded: a fixed port is needed).
PORT = Integer(1, 65535)
#: A port where 0 means "pick a free one".
PORT_OR_ZERO = Integer(0, 65535)
#: Counts of things (devices, processes, streams, heartbeats...).
COUNT = Integer(1)
#: A duration that must be positive (deadlines, run lengths, intervals).
SECONDS = Real(0.0, SECONDS_MAX, unit="seconds")
#: A duration that may be zero (warm-ups).
SECONDS_OR_ZERO = Real(0.0, SECONDS_MAX, lo_inclusive=True, unit="seconds")
#: Events per second offered (heartbeats, reads); positive.
RATE = Real(0.0, 1e9, unit="per second")
#: Events per second where 0 switches the load off.
RATE_OR_ZERO = Real(0.0, 1e9, lo_inclusive=True, unit="per second")


def fail(prog: str, message: str) -> NoReturn:
    """Exit with status 2 after one line ``PROG: MESSAGE`` (checks that
    span flags, after parsing)."""
    print(f"{prog}: {message}", file=sys.stderr)
    raise SystemExit(2)


__all__ = [
    "COUNT",
    "PORT",
    "PORT_OR_ZERO",
    "RATE",
    "RATE_OR_ZERO",
    "SECONDS",
    "SECONDS_MAX",
    "SECONDS_OR_ZERO",
    "UINT64_MAX",
    "CliParser",
    "Integer",
    "LazySubParsers",
    "Real",
    "build_all",
    "lazy",
    "fail",
    "key_value",
    "readable_file",
]
