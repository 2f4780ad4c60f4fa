r"""Config patterns, matched without backtracking: a pattern from a file cannot hang a load.

`target_modules` / `exclude_modules` (a str), the keys of `rank_pattern` / `alpha_pattern`,
`layers_pattern` and `modules_to_save` entries are Python regular expressions (PEFT's rules).
Python's `re` backtracks, so `(.+)+z` takes exponential time on a long site name, and so would
a downloaded `adapter_config.json`. Here a pattern is parsed by Python's own parser (the syntax
and the errors of `re`) and matched over sets of positions, the bits of an int:

    ends(node, S) = every position where `node` can stop when it starts anywhere in S
    a character class:  ((S & M) << 1)          M: the positions whose character is in the class
    `c*` over one class: ((S & M) + M) ^ M | S  (the carry runs along each run of M)
    any other repeat:   the fixpoint of S | ends(body, S), new positions only

so a match takes time polynomial in the pattern and the name (no choice is ever retried), and a
step budget bounds it as well. Only whether a name matches is computed, which is all PEFT's rules
ask; greedy and lazy repeats match the same names.

Rules:
1. A pattern `re` cannot compile raises `ConfigError` naming the field.
2. Backreferences, conditionals, atomic groups and possessive repeats need backtracking; they
   raise `ConfigError` naming the field.
3. A match that takes more than `STEP_BUDGET` steps raises `ConfigError` naming the field, the
   pattern and the name (no real pattern comes near it).
4. Character classes, anchors and word boundaries are matched by `re` itself, one character or
   one position at a time, with the pattern's flags, so they mean exactly what `re` means.
5. `layer_index` takes the first layer position from the left, and at one position the shortest
   match of the pattern (Python's `re` would prefer the pattern's own greedy choice; the two
   differ only for a `layers_pattern` that matches several lengths before `.<index>.`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator

from lora_fx.errors import ConfigError

try:
    from re import _constants as _c
    from re import _parser
except ImportError:  # Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _parser  # type: ignore[no-redef]

__all__ = [
    "STEP_BUDGET",
    "check_pattern",
    "fullmatch",
    "layer_index",
    "module_match",
    "suffix_match",
]

STEP_BUDGET = 100_000

_CHARS = (_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN)
_REPEATS = (_c.MAX_REPEAT, _c.MIN_REPEAT)
_LOOKS = (_c.ASSERT, _c.ASSERT_NOT)
_REFUSED = {
    getattr(_c, name): what
    for name, what in (
        ("GROUPREF", "a backreference"),
        ("GROUPREF_EXISTS", "a conditional group"),
        ("ATOMIC_GROUP", "an atomic group"),
        ("POSSESSIVE_REPEAT", "a possessive repeat"),
    )
    if hasattr(_c, name)
}
_CATEGORIES = {
    _c.CATEGORY_DIGIT: r"\d",
    _c.CATEGORY_NOT_DIGIT: r"\D",
    _c.CATEGORY_SPACE: r"\s",
    _c.CATEGORY_NOT_SPACE: r"\S",
    _c.CATEGORY_WORD: r"\w",
    _c.CATEGORY_NOT_WORD: r"\W",
}
_ANCHORS = {
    _c.AT_BEGINNING: "^",
    _c.AT_BEGINNING_STRING: r"\A",
    _c.AT_END: "$",
    _c.AT_END_STRING: r"\Z",
    _c.AT_BOUNDARY: r"\b",
    _c.AT_NON_BOUNDARY: r"\B",
}
# Flags that change what one character or one anchor matches (UNICODE is the default for str).
_FLAGS = re.IGNORECASE | re.ASCII | re.DOTALL | re.MULTILINE
_INDEX = re.compile(r"\.(\d+)\.")  # lora_fx's own: `.<layer index>.` after layers_pattern


class _Refused(Exception):
    """A construct the matcher does not take; the message says which."""


class _TooLong(Exception):
    """A match ran past STEP_BUDGET."""


class _Char:
    """One character from a class, matched by `re` (rule 4); results cached per character."""

    __slots__ = ("cache", "rx")

    def __init__(self, rx: re.Pattern) -> None:
        self.rx, self.cache = rx, {}


class _Anchor:
    r"""A zero-width test at a position (`^`, `$`, `\b`, ...), found with `re.finditer`."""

    __slots__ = ("rx",)

    def __init__(self, rx: re.Pattern) -> None:
        self.rx = rx


class _Seq:
    """Items in order."""

    __slots__ = ("items",)

    def __init__(self, items: list) -> None:
        self.items = items


class _Alt:
    """Alternatives (`a|b`)."""

    __slots__ = ("options",)

    def __init__(self, options: list) -> None:
        self.options = options


class _Repeat:
    """`body{lo,hi}`; hi is `_c.MAXREPEAT` when unbounded."""

    __slots__ = ("body", "hi", "lo")

    def __init__(self, lo: int, hi: int, body) -> None:
        self.lo, self.hi, self.body = lo, hi, body


class _Look:
    """A lookahead, or a fixed-width lookbehind; `negate` for `(?!...)` / `(?<!...)`."""

    __slots__ = ("behind", "body", "negate", "width")

    def __init__(self, behind: bool, negate: bool, width: int, body) -> None:
        self.behind, self.negate, self.width, self.body = behind, negate, width, body


def check_pattern(pattern: str, *, field: str) -> None:
    """Raise `ConfigError` naming `field` unless `pattern` compiles for this matcher (rules 1-2)."""
    _compiled(pattern, field)


def fullmatch(pattern: str, name: str, *, field: str) -> bool:
    """Whether `pattern` matches all of `name` (`re.fullmatch`)."""
    return bool(_ends(pattern, name, 1, field) >> len(name) & 1)


def suffix_match(pattern: str, name: str, *, field: str) -> bool:
    r"""PEFT's `(.*\.)?(pattern)$`: the whole name or a dotted suffix of it."""
    return bool(_ends(pattern, name, _after_dots(name), field) >> len(name) & 1)


def module_match(pattern: str, name: str, *, field: str) -> bool:
    r"""PEFT's `(^|.*\.)pattern($|\..*)`: a dotted run of the name's components."""
    stops = 1 << len(name) | sum(1 << i for i, ch in enumerate(name) if ch == ".")
    return bool(_ends(pattern, name, _after_dots(name), field) & stops)


def layer_index(pattern: str, name: str, *, field: str) -> int | None:
    r"""PEFT's `(?:^|.*?\.)pattern\.(\d+)\.`: the layer index after `pattern` (rule 5)."""
    for start in _bits(_after_dots(name)):
        for end in _bits(_ends(pattern, name, 1 << start, field)):
            found = _INDEX.match(name, end)
            if found:
                return int(found[1])
    return None


def _ends(pattern: str, name: str, starts: int, field: str) -> int:
    """Positions where `pattern` can end in `name` from `starts`, with the field's errors."""
    root = _compiled(pattern, field)
    try:
        return _Run(name).ends(root, starts)
    except _TooLong:
        raise ConfigError(
            f"{field}={pattern!r} took more than {STEP_BUDGET:,d} steps to match {name!r}; "
            "simplify the pattern or list the names"
        ) from None


def _compiled(pattern: str, field: str):
    """The matcher tree of `pattern`, or ConfigError naming the field."""
    if not isinstance(pattern, str):
        raise ConfigError(f"{field} pattern {pattern!r} is invalid; expected a str (a regex)")
    try:
        return _compile(pattern)
    except re.error as e:
        raise ConfigError(f"{field}={pattern!r} is not a valid regular expression: {e}") from None
    except _Refused as e:
        raise ConfigError(
            f"{field}={pattern!r} uses {e}, which lora_fx does not match: its matcher never "
            "backtracks, so no pattern can hang a load; rewrite it without it"
        ) from None


@functools.lru_cache(maxsize=256)
def _compile(pattern: str):
    """Parse with `re`'s parser and build the matcher tree (cached, as `re` caches)."""
    parsed = _parser.parse(pattern, 0)
    return _build(parsed.data, parsed.state.flags)


def _build(data, flags: int):
    """A tree node for one parsed sequence."""
    items = [_item(op, av, flags) for op, av in data]
    return items[0] if len(items) == 1 else _Seq(items)


def _item(op, av, flags: int):
    """A tree node for one parsed item."""
    if op in _CHARS:
        return _Char(re.compile(_char_source(op, av), flags & _FLAGS))
    if op is _c.AT:
        return _Anchor(re.compile(_ANCHORS[av], flags & _FLAGS))
    if op is _c.BRANCH:
        return _Alt([_build(p.data, flags) for p in av[1]])
    if op is _c.SUBPATTERN:
        _, add, remove, p = av
        return _build(p.data, (flags | add) & ~remove)
    if op in _REPEATS:
        lo, hi, p = av
        return _Repeat(lo, hi, _build(p.data, flags))
    if op in _LOOKS:
        direction, p = av
        width = p.getwidth()[0]  # re refuses a lookbehind without one fixed width
        return _Look(direction < 0, op is _c.ASSERT_NOT, width, _build(p.data, flags))
    raise _Refused(_REFUSED.get(op, f"the construct {op}"))


def _char_source(op, av) -> str:
    r"""A one-character regex for a parsed character item (literals as `\U` escapes)."""
    if op is _c.ANY:
        return "."
    if op is _c.LITERAL:
        return _escape(av)
    if op is _c.NOT_LITERAL:
        return f"[^{_escape(av)}]"
    parts = []
    for item, value in av:
        if item is _c.NEGATE:
            parts.append("^")
        elif item is _c.LITERAL:
            parts.append(_escape(value))
        elif item is _c.RANGE:
            parts.append(f"{_escape(value[0])}-{_escape(value[1])}")
        elif item is _c.CATEGORY and value in _CATEGORIES:
            parts.append(_CATEGORIES[value])
        else:
            raise _Refused(f"the character set item {item}")
    return "[" + "".join(parts) + "]"


def _escape(code: int) -> str:
    """A code point as a regex escape that needs no quoting anywhere."""
    return f"\\U{code:08x}"


def _after_dots(name: str) -> int:
    """Start positions of the name and of each dotted suffix."""
    return 1 | sum(1 << (i + 1) for i, ch in enumerate(name) if ch == ".")


def _bits(mask: int) -> Iterator[int]:
    """Set bit positions, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


class _Run:
    """One name being matched: per-name masks, lookaround results and the step count."""

    def __init__(self, name: str) -> None:
        self.name, self.steps = name, 0
        self.where: dict[str, int] = {}  # character -> positions holding it
        for i, ch in enumerate(name):
            self.where[ch] = self.where.get(ch, 0) | 1 << i
        self.masks: dict[int, int] = {}  # id(node) -> positions it accepts
        self.looks: dict[tuple[int, int], bool] = {}

    def ends(self, node, starts: int) -> int:
        """Positions where `node` can stop, starting anywhere in `starts` (a bit set)."""
        self.steps += 1
        if self.steps > STEP_BUDGET:
            raise _TooLong
        if not starts:
            return 0
        kind = type(node)
        if kind is _Char:
            return (starts & self._char_mask(node)) << 1
        if kind is _Anchor:
            return starts & self._anchor_mask(node)
        if kind is _Seq:
            for item in node.items:
                starts = self.ends(item, starts)
            return starts
        if kind is _Alt:
            found = 0
            for option in node.options:
                found |= self.ends(option, starts)
            return found
        if kind is _Repeat:
            return self._repeat(node, starts)
        return starts & self._look_mask(node, starts)

    def _repeat(self, node: _Repeat, starts: int) -> int:
        """`body{lo,hi}`: exactly lo steps, then a breadth-first fixpoint up to hi."""
        current = starts
        for _ in range(node.lo):
            after = self.ends(node.body, current)
            if after == current:
                break  # a fixed point: more steps change nothing
            current = after
        if node.hi == node.lo or not current:
            return current
        if type(node.body) is _Char and node.hi == _c.MAXREPEAT:
            mask = self._char_mask(node.body)
            return (((current & mask) + mask) ^ mask) | current
        reach, frontier, count = current, current, node.lo
        while frontier and count < node.hi:
            frontier = self.ends(node.body, frontier) & ~reach
            reach |= frontier
            count += 1
        return reach

    def _char_mask(self, node: _Char) -> int:
        key = id(node)
        if key not in self.masks:
            mask = 0
            for ch, where in self.where.items():
                hit = node.cache.get(ch)
                if hit is None:
                    hit = node.cache[ch] = node.rx.fullmatch(ch) is not None
                if hit:
                    mask |= where
            self.masks[key] = mask
        return self.masks[key]

    def _anchor_mask(self, node: _Anchor) -> int:
        key = id(node)
        if key not in self.masks:
            self.masks[key] = sum(1 << m.start() for m in node.rx.finditer(self.name))
        return self.masks[key]

    def _look_mask(self, node: _Look, starts: int) -> int:
        mask = 0
        for pos in _bits(starts):
            key = (id(node), pos)
            if key not in self.looks:
                if node.behind:
                    begin = pos - node.width
                    hit = begin >= 0 and bool(self.ends(node.body, 1 << begin) >> pos & 1)
                else:
                    hit = bool(self.ends(node.body, 1 << pos))
                self.looks[key] = hit != node.negate
            if self.looks[key]:
                mask |= 1 << pos
        return mask
