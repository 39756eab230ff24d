"""docker_auth-style access control lists: which actions a request is granted. Pure: no I/O.

Semantics follow cesanta/docker_auth's static ACL (`authz/acl.go`), so its `acl:` section can be
pasted unchanged:
- a pattern is a glob (Go's `path.Match`: `*` and `?` never cross `/`) or, between slashes, an
  unanchored regular expression (`/^ci-.*$/`);
- `${account}`, `${name}`, `${type}`, `${service}` are replaced by the request's values, escaped,
  and `${labels:KEY}` by each value of the user's label KEY in turn (the pattern matches when any
  combination does);
- `labels:` in a match requires, for each key, that some value of the user's label matches;
- `ip:` takes an address or a CIDR;
- every field of a match must hold; the first entry that matches decides; `actions: ["*"]` grants
  everything asked for, any other list grants its intersection with what was asked; no match
  grants nothing.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from gateway.addresses import IPNetwork, parse_ip

_VARIABLE = re.compile(r"\$\{(account|name|type|service|labels:[^}]+)\}")
_LABEL_VARIABLE = re.compile(r"\$\{labels:([^}]+)\}")


@dataclass(frozen=True)
class Request:
    """What an ACL is asked about."""

    account: str  # "" for anonymous
    type: str  # "repository" or "registry"
    name: str  # repository name, or "catalog"
    actions: frozenset[str]
    ip: str | None = None
    service: str = "registry"
    labels: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def is_regex(pattern: str) -> bool:
    return len(pattern) > 2 and pattern[0] == "/" and pattern[-1] == "/"


def glob_to_regex(pattern: str) -> str:
    """Translate a Go path.Match pattern to an anchored Python regex. Raises ValueError if malformed."""
    out = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "\\":
            i += 1
            if i >= len(pattern):
                raise ValueError("pattern ends with a backslash")
            out.append(re.escape(pattern[i]))
        elif ch == "[":
            end = i + 1
            if end < len(pattern) and pattern[end] == "^":
                end += 1
            if end < len(pattern) and pattern[end] == "]":
                raise ValueError("empty character class")
            while end < len(pattern) and pattern[end] != "]":
                if pattern[end] == "\\":
                    end += 1
                end += 1
            if end >= len(pattern):
                raise ValueError("unterminated character class")
            body = pattern[i + 1 : end]
            negate = body.startswith("^")
            if negate:
                body = body[1:]
            out.append(("[^/" if negate else "[") + _class_body(body) + "]")
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    # \Z, not $: Python's $ also matches before a final newline, Go's does not.
    return "^" + "".join(out) + r"\Z"


def _class_body(body: str) -> str:
    """A glob character class body as a regex class body: ranges kept, everything else literal."""
    out = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            i += 1
            out.append(re.escape(body[i]))
        elif ch == "-":
            out.append("-")
        else:
            out.append(re.escape(ch) if ch in "[]^\\&~|" else ch)
        i += 1
    return "".join(out)


@functools.lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The compiled form of a glob or /regex/ pattern (cached: substituted patterns repeat)."""
    with warnings.catch_warnings():
        # "Possible nested set", "possible set difference" (a glob class such as `[:--]`): valid
        # today, only a note about future Pythons.
        warnings.simplefilter("ignore", FutureWarning)
        if is_regex(pattern):
            return re.compile(pattern[1:-1])
        return re.compile(glob_to_regex(pattern), re.DOTALL)


def validate_pattern(pattern: str) -> str | None:
    """Why a pattern cannot be used, or None."""
    try:
        compile_pattern(_VARIABLE.sub("x", pattern))
    except (re.error, ValueError) as exc:
        kind = "regex" if is_regex(pattern) else "glob"
        return f"invalid {kind} {pattern!r}: {exc}"
    return None


def _escape_glob(value: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", value)


def _substitutions(pattern: str, request: Request) -> Iterable[str]:
    """Every form of the pattern with variables replaced (several when a label has several values)."""
    if "${" not in pattern:
        yield pattern
        return
    escape = re.escape if is_regex(pattern) else _escape_glob
    fixed = {
        "account": escape(request.account),
        "name": escape(request.name),
        "type": escape(request.type),
        "service": escape(request.service),
    }
    label_keys = sorted(set(_LABEL_VARIABLE.findall(pattern)))
    choices = [request.labels.get(key, ()) for key in label_keys]
    if any(not values for values in choices):
        # A label the user does not have leaves nothing to substitute: that pattern cannot match.
        return
    for combination in itertools.product(*choices):
        values = dict(fixed)
        values.update({f"labels:{k}": escape(v) for k, v in zip(label_keys, combination, strict=True)})
        yield _VARIABLE.sub(functools.partial(_lookup, values), pattern)


def _lookup(values: Mapping[str, str], match: re.Match[str]) -> str:
    return values[match.group(1)]


def match_pattern(pattern: str | None, value: str, request: Request) -> bool:
    if pattern is None:
        return True
    return any(compile_pattern(candidate).search(value) for candidate in _substitutions(pattern, request))


@dataclass(frozen=True)
class Match:
    account: str | None = None
    type: str | None = None
    name: str | None = None
    service: str | None = None
    ip: IPNetwork | None = None
    labels: tuple[tuple[str, str], ...] = ()

    def matches(self, request: Request) -> bool:
        if self.ip is not None:
            if request.ip is None:
                return False
            ip = parse_ip(request.ip)
            if ip is None or ip not in self.ip:
                return False
        if not (
            match_pattern(self.account, request.account, request)
            and match_pattern(self.type, request.type, request)
            and match_pattern(self.name, request.name, request)
            and match_pattern(self.service, request.service, request)
        ):
            return False
        for key, pattern in self.labels:
            if not any(match_pattern(pattern, value, request) for value in request.labels.get(key, ())):
                return False
        return True


@dataclass(frozen=True)
class Entry:
    match: Match
    actions: frozenset[str]
    comment: str | None = None


@dataclass(frozen=True)
class Verdict:
    granted: frozenset[str]
    entry_index: int | None  # None: no entry matched
    comment: str | None = None

    def allows(self, needed: Iterable[str]) -> bool:
        return set(needed) <= self.granted


def literal_account(pattern: str | None) -> str | None:
    """The one account a pattern can match, when it is a plain string; else None."""
    if pattern is None or is_regex(pattern) or "${" in pattern or any(c in pattern for c in "*?[\\"):
        return None
    return pattern


@dataclass(frozen=True)
class Rules:
    """An ACL with an index: entries whose account is a plain name are only tried for that name.

    First match is kept: the candidates for an account are its own entries and the entries with
    any other account pattern, merged in their original order. With thousands of per-user rules a
    request then looks at a handful of entries instead of all of them.
    """

    entries: tuple[Entry, ...]
    by_account: Mapping[str, tuple[int, ...]]
    generic: tuple[int, ...]
    _memo: dict[str, tuple[int, ...]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, entries: tuple[Entry, ...]) -> Rules:
        by_account: dict[str, list[int]] = {}
        generic: list[int] = []
        for index, entry in enumerate(entries):
            account = literal_account(entry.match.account)
            if account is None:
                generic.append(index)
            else:
                by_account.setdefault(account, []).append(index)
        return cls(entries, {k: tuple(v) for k, v in by_account.items()}, tuple(generic))

    def candidates(self, account: str) -> tuple[int, ...]:
        found = self._memo.get(account)
        if found is None:
            found = tuple(heapq.merge(self.by_account.get(account, ()), self.generic))
            if len(self._memo) < MEMO_LIMIT:
                self._memo[account] = found
        return found


MEMO_LIMIT = 100_000


def evaluate(rules: Rules | tuple[Entry, ...], request: Request) -> Verdict:
    """The first matching entry's grant, intersected with what the request asks for."""
    if isinstance(rules, Rules):
        entries = rules.entries
        order: Iterable[int] = rules.candidates(request.account)
    else:
        entries, order = rules, range(len(rules))
    for index in order:
        entry = entries[index]
        if entry.match.matches(request):
            if entry.actions == frozenset({"*"}):
                granted = request.actions
            else:
                granted = request.actions & entry.actions
            return Verdict(frozenset(granted), index, entry.comment)
    return Verdict(frozenset(), None)


MATCH_ALL = frozenset({"/.*/", "/^.*$/", "/^.*/", "/.*$/", "/(.*)/", "/^(.*)$/"})


def _literal(pattern: str) -> bool:
    """Matches exactly itself: no glob character, no /regex/, no ${...}."""
    return not is_regex(pattern) and not any(ch in pattern for ch in "*?[\\") and "${" not in pattern


def covers_pattern(mine: str | None, theirs: str | None) -> bool:
    """Whether the pattern `mine` matches every value `theirs` does (None: any value). Conservative:
    True for the same pattern, a match-all regex (`/.*/`), or a literal `theirs` that `mine`
    matches (`alice/*` covers `alice/app`, `/.+/` covers `alice`); False when in doubt."""
    if mine is None or mine == theirs:
        return True
    if mine in MATCH_ALL:
        return True
    if theirs is None or "${" in mine or not _literal(theirs):
        return False
    return compile_pattern(mine).search(theirs) is not None


def shadowed_by(earlier: Match, later: Match) -> bool:
    """A conservative check that `earlier` matches every request `later` matches: each field
    `earlier` constrains covers `later`'s (covers_pattern: the same, a literal it matches, or a
    match-all regex; for ip, a supernet), and each of its label patterns covers one of `later`'s
    for the same label. Catches copy-paste duplicates and rules put after a broader one."""
    for name in ("account", "type", "name", "service"):
        if not covers_pattern(getattr(earlier, name), getattr(later, name)):
            return False
    if earlier.ip is not None and (later.ip is None or not _subnet(later.ip, earlier.ip)):
        return False
    return all(
        any(key == theirs_key and covers_pattern(mine, theirs) for theirs_key, theirs in later.labels)
        for key, mine in earlier.labels
    )


def _broad(match: Match) -> bool:
    """Whether some pattern of `match` may cover another value than its own (not a literal)."""
    patterns = [getattr(match, name) for name in PATTERN_FIELDS] + [pattern for _, pattern in match.labels]
    return any(pattern is not None and not _literal(pattern) for pattern in patterns)


PATTERN_FIELDS = ("account", "type", "name", "service")


def shadowed_entries(entries: Iterable[Entry]) -> list[tuple[int, int]]:
    """(later, earlier) pairs where `shadowed_by` holds, found without comparing every pair.

    An earlier entry can only shadow a later one if the pattern fields it constrains are a subset
    of the later one's, with the same values; so earlier entries are filed under exactly those
    (field, value) pairs, and each later entry looks in the 16 buckets its fields allow.
    """
    buckets: dict[tuple[tuple[str, str], ...], list[tuple[int, Match]]] = {}
    broad: list[tuple[int, Match]] = []  # entries with globs or regexes: compared with each later one
    found = []
    for index, entry in enumerate(entries):
        fields = [
            (name, value) for name in PATTERN_FIELDS if (value := getattr(entry.match, name)) is not None
        ]
        shadow = None
        for size in range(len(fields) + 1):
            for subset in itertools.combinations(fields, size):
                for earlier_index, earlier in buckets.get(subset, ()):
                    if shadowed_by(earlier, entry.match) and (shadow is None or earlier_index < shadow):
                        shadow = earlier_index
                        break
        for earlier_index, earlier in broad:
            if shadow is not None and earlier_index > shadow:
                break
            if shadowed_by(earlier, entry.match):
                shadow = earlier_index
                break
        if shadow is not None:
            found.append((index, shadow))
        buckets.setdefault(tuple(fields), []).append((index, entry.match))
        if _broad(entry.match):
            broad.append((index, entry.match))
    return found


def _subnet(inner: IPNetwork, outer: IPNetwork) -> bool:
    return inner.version == outer.version and inner.subnet_of(outer)  # type: ignore[arg-type]
