"""Secret generation and weak-secret refusal.

Theory of operation
-------------------
Every secret raftstate generates is 32 bytes from the OS CSPRNG, encoded with
``secrets.token_urlsafe(32)`` (43 characters). Secrets people type are checked
by :func:`estimate_bits`, a conservative entropy estimate in the spirit of
zxcvbn, without its dictionaries:

1. The string is split into segments, left to right, each scored as the
   cheapest explanation an attacker's guesser would try:

   * a run of one repeated character (``aaaa``): one character plus the run
     length;
   * an arithmetic sequence of step +-1 (``abcd``, ``4321``): its first
     character plus its length;
   * a keyboard walk along a row of a QWERTY keyboard (``qwerty``, ``asdf``);
   * a repeat of an earlier substring of 3+ characters (``abcXabcX``): the
     distance back plus its length;
   * a common word from :data:`COMMON_WORDS`, and any word-like letter run
     (a whole run of 4+ letters between non-letters in one case or
     Capitalised, or the parts of a CamelCase run: an unknown word): at most
     :data:`WORD_BITS` bits;
   * anything else: ``log2(alphabet)`` bits per character, where the alphabet
     is the union of the character classes present (lower, upper, digits,
     symbols).

2. The estimate is the sum over segments. :func:`check_secret` refuses less
   than :data:`MIN_BITS` (128) bits, naming the field and how to generate a
   good secret. A ``token_urlsafe(32)`` scores about 250 bits (at least 180
   in 20000 draws); ``"s" * 20``
   scores under 10; ``"correct horse battery staple"`` about 70. A 16-byte hex
   key (exactly 128 bits) is refused now and then: use 32 bytes.

Pure functions; no I/O.
"""

from __future__ import annotations

import math
import re
import secrets

from raftstate.errors import ConfigError

#: Least estimated entropy accepted for a secret.
MIN_BITS = 128.0
#: Bytes of CSPRNG output in a generated secret.
SECRET_BYTES = 32
#: Bits a dictionary-like word is worth (a 7776-word diceware list is 12.9).
WORD_BITS = 13.0
#: What to tell someone whose secret was refused.
HOW_TO_GENERATE = (
    "generate one with `raftstate secret` or "
    "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`"
)
COMMON_WORDS = frozenset(
    """password passwd secret cluster raftstate rendezvous admin root test testing
    letmein changeme default example welcome qwerty dragon master monkey shadow
    sunshine iloveyou football baseball login token private access trustno1 hunter
    node raft device super secure security""".split()
)
_ROWS = ("`1234567890-=", "qwertyuiop[]\\", "asdfghjkl;'", "zxcvbnm,./")


def generate_secret() -> str:
    """A fresh secret: :data:`SECRET_BYTES` CSPRNG bytes, URL-safe base64 (43 chars)."""
    return secrets.token_urlsafe(SECRET_BYTES)


def _alphabet_bits(text: str) -> float:
    size = 0
    if any(c.islower() for c in text):
        size += 26
    if any(c.isupper() for c in text):
        size += 26
    if any(c.isdigit() for c in text):
        size += 10
    if any(not c.isalnum() for c in text):
        size += 33
    return math.log2(max(size, 2))


def _run(text: str, i: int) -> int:
    """Length of the run of text[i] repeated from i."""
    j = i
    while j < len(text) and text[j] == text[i]:
        j += 1
    return j - i


def _sequence(text: str, i: int) -> int:
    """Length of the +-1 character sequence starting at i (at least 1)."""
    if i + 1 >= len(text):
        return 1
    step = ord(text[i + 1]) - ord(text[i])
    if step not in (1, -1):
        return 1
    j = i + 1
    while j < len(text) and ord(text[j]) - ord(text[j - 1]) == step:
        j += 1
    return j - i


def _walk(text: str, i: int) -> int:
    """Length of the keyboard-row walk starting at i (forwards or backwards)."""
    best = 1
    low = text.lower()
    for row in _ROWS:
        for line in (row, row[::-1]):
            k = line.find(low[i])
            if k < 0:
                continue
            n = 0
            while i + n < len(low) and k + n < len(line) and low[i + n] == line[k + n]:
                n += 1
            best = max(best, n)
    return best


_LETTERS = re.compile(r"[A-Za-z]+")
_ONE_WORD = re.compile(r"[a-z]{4,}|[A-Z][a-z]{3,}|[A-Z]{4,}")
_CAMEL = re.compile(r"(?:[A-Z][a-z]{2,}){2,}")
_CAMEL_PART = re.compile(r"[A-Z][a-z]{2,}")


def _word_spans(text: str) -> dict[int, int]:
    """Start -> length of each word-like letter run: a whole run of letters
    (between non-letters or the ends) in one case or Capitalised, or the
    parts of a CamelCase run. Random encodings rarely have such runs; their
    letters come in mixed-case runs."""
    spans: dict[int, int] = {}
    for m in _LETTERS.finditer(text):
        if _ONE_WORD.fullmatch(m.group()):
            spans[m.start()] = len(m.group())
        elif _CAMEL.fullmatch(m.group()):
            for part in _CAMEL_PART.finditer(m.group()):
                spans[m.start() + part.start()] = len(part.group())
    return spans


def _word(text: str, i: int, spans: dict[int, int]) -> int:
    """Length of the common word, or word-like letter run, at i (0 if none)."""
    low = text.lower()
    best = spans.get(i, 0)
    for word in COMMON_WORDS:
        if len(word) > best and low.startswith(word, i):
            best = len(word)
    return best


def _repeat(text: str, i: int) -> int:
    """Length of the longest (3+) substring at i that already began before i."""
    best = 0
    for n in range(3, len(text) - i + 1):
        if text.find(text[i : i + n]) >= i:
            break
        best = n
    return best


def estimate_bits(text: str) -> float:
    """A conservative estimate of the entropy of ``text``, in bits (see the
    module doc). Never raises."""
    if not text:
        return 0.0
    per_char = _alphabet_bits(text)
    spans = _word_spans(text)
    bits = 0.0
    i = 0
    while i < len(text):
        candidates: list[tuple[float, int]] = [(per_char, 1)]
        n = _run(text, i)
        if n >= 3:
            candidates.append((per_char + math.log2(n), n))
        n = _sequence(text, i)
        if n >= 3:
            candidates.append((per_char + 1 + math.log2(n), n))
        n = _walk(text, i)
        if n >= 3:
            candidates.append((6 + math.log2(n), n))
        n = _word(text, i, spans)
        if n:
            candidates.append((min(WORD_BITS, per_char * n), n))
        n = _repeat(text, i)
        if n:
            candidates.append((math.log2(i + 1) + math.log2(n), n))
        # The cheapest explanation per character consumed wins.
        cost, length = min(candidates, key=lambda c: c[0] / c[1])
        bits += cost
        i += length
    return bits


def check_secret(field: str, value: str) -> None:
    """Raise :class:`ConfigError` naming ``field`` unless ``value`` is
    estimated at :data:`MIN_BITS` bits or more (an empty value is the
    caller's business)."""
    bits = estimate_bits(value)
    if bits < MIN_BITS:
        raise ConfigError(
            f"{field}: too weak (about {bits:.0f} bits estimated, at least {MIN_BITS:.0f} "
            f"needed: repeated, sequential, keyboard or dictionary patterns count for "
            f"little); {HOW_TO_GENERATE}"
        )


__all__ = ["MIN_BITS", "check_secret", "estimate_bits", "generate_secret"]
