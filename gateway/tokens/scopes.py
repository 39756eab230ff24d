"""Scopes as clients ask for them, and as challenges announce them. Pure: no I/O.

Grammar (distribution's token spec, as moby, containerd and containers/image send it):
`type[(class)]:name:actions`, several separated by spaces in one `scope` value or given as
repeated `scope` parameters. The name may itself hold colons (a registry host with a port), so
the type ends at the first colon and the actions start after the last one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gateway.routes import CATALOG, Operation, Route


@dataclass(frozen=True)
class Scope:
    type: str  # "repository" or "registry"
    name: str
    actions: frozenset[str]

    def claim(self) -> dict[str, object]:
        """The entry of a token's `access` claim."""
        return {"type": self.type, "name": self.name, "actions": sorted(self.actions)}

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(sorted(self.actions))}"


MAX_SCOPES = 16  # names; a push asks for two or three (a mount's source); more is not a client


def parse_scopes(values: Iterable[str]) -> list[Scope]:
    """Every well-formed scope in `values`, merged by (type, name) as `merge` does, for at most
    MAX_SCOPES names (a repeated scope never pushes a later name out); malformed ones are skipped
    (they grant nothing)."""
    merged: dict[tuple[str, str], frozenset[str]] = {}
    for value in values:
        for text in value.split():
            scope = parse_scope(text)
            if scope is None:
                continue
            key = (scope.type, scope.name)
            if key in merged:
                merged[key] |= scope.actions
            elif len(merged) < MAX_SCOPES:
                merged[key] = scope.actions
    return [Scope(kind, name, actions) for (kind, name), actions in merged.items()]


def parse_scope(text: str) -> Scope | None:
    kind, sep, rest = text.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not kind or not name:
        return None
    kind = kind.split("(", 1)[0]  # `repository(plugin)`: the class does not change the decision
    wanted = frozenset(a for a in actions.split(",") if a)
    if kind not in ("repository", "registry") or not wanted:
        return None
    return Scope(kind, name, wanted)


def merge(scopes: Iterable[Scope]) -> list[Scope]:
    """One scope per (type, name), with the union of the actions, in first-seen order."""
    merged: dict[tuple[str, str], set[str]] = {}
    for scope in scopes:
        merged.setdefault((scope.type, scope.name), set()).update(scope.actions)
    return [Scope(t, n, frozenset(a)) for (t, n), a in merged.items()]


def needed(operation: Operation) -> list[Scope]:
    """What a token must grant for this operation (none: any valid token will do)."""
    if operation.route is Route.BASE:
        return []
    if operation.route is Route.CATALOG:
        return [Scope("registry", "catalog", frozenset({CATALOG}))]
    if operation.repository is None:
        return []
    scopes = [Scope("repository", operation.repository, operation.actions)]
    if operation.mount_from is not None:
        scopes.append(Scope("repository", operation.mount_from, frozenset({"pull"})))
    return scopes


def covers(granted: Iterable[Scope], wanted: Scope) -> bool:
    """Whether the granted scopes include every action of `wanted` (`*` grants every action)."""
    have: set[str] = set()
    for scope in granted:
        if scope.type == wanted.type and scope.name == wanted.name:
            have |= scope.actions
    return "*" in have or wanted.actions <= have
