"""Immutable tags: the policy file's `immutable:` section, and what it refuses. Pure: no I/O.

    immutable:
      - name: "prod/*"          # repositories (a glob or /regex/, as in acl:)
        tags: ["v*", "!latest"] # tags it covers: any pattern matches, none of the `!` ones

A tag a rule covers cannot change once pushed: a manifest PUT to it with another digest is
refused (the same digest again is accepted: docker retries), and so is a DELETE of the tag or of
a manifest such a tag points to. Manifests PUT by digest move no tag and pass. How the gateway
learns what a tag points to (a HEAD to the registry before the PUT, the tags list before a
delete by digest) is gateway.app's, with the races that remain (docs/immutable-tags.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from gateway import acl
from gateway.routes import Operation, Route

MANIFEST_DIGEST_PREFIX = "sha256:"


@dataclass(frozen=True)
class ImmutableRule:
    index: int
    name: str
    tags: tuple[str, ...]

    def covers_repository(self, repository: str) -> bool:
        return _matches(self.name, repository)

    def covers(self, repository: str, tag: str) -> bool:
        if not self.covers_repository(repository):
            return False
        wanted = [p for p in self.tags if not p.startswith("!")] or ["*"]
        return any(_matches(p, tag) for p in wanted) and not any(
            _matches(p[1:], tag) for p in self.tags if p.startswith("!")
        )

    def describe(self) -> str:
        return f"immutable[{self.index}] (name {self.name}, tags {', '.join(self.tags)})"


def _matches(pattern: str, value: str) -> bool:
    """As acl: `*` never crosses `/`, a glob matches whole, a /regex/ wherever it finds."""
    return acl.compile_pattern(pattern).search(value) is not None


def parse(value: Any, bad: Any) -> tuple[ImmutableRule, ...]:
    """The section's rules; `bad(path, message)` is told of each problem (policyfile's collector)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        bad("immutable", "expected a list of {name, tags}")
        return ()
    rules = []
    for index, entry in enumerate(value):
        path = f"immutable[{index}]"
        if not isinstance(entry, dict):
            bad(path, "expected a mapping with name and tags")
            continue
        unknown = sorted(set(entry) - {"name", "tags", "comment"})
        if unknown:
            bad(f"{path}.{unknown[0]}", "unknown key (expected one of: name, tags, comment)")
        name, tags = entry.get("name"), entry.get("tags", ["*"])
        if isinstance(tags, str):
            tags = [tags]
        if not isinstance(name, str) or not name:
            bad(f"{path}.name", "expected a repository name, glob or /regex/")
            continue
        if (
            not isinstance(tags, list)
            or not tags
            or not all(isinstance(t, str) and t.strip("!") for t in tags)
        ):
            bad(f"{path}.tags", "expected a list of tag globs, `!` before those left mutable")
            continue
        problems = [(f"{path}.name", acl.validate_pattern(name))]
        problems += [(f"{path}.tags", acl.validate_pattern(t.removeprefix("!"))) for t in tags]
        found = [(where, problem) for where, problem in problems if problem is not None]
        for where, problem in found:
            bad(where, problem)
        if not found:
            rules.append(ImmutableRule(index, name, tuple(tags)))
    return tuple(rules)


def rule_for(rules: Iterable[ImmutableRule], repository: str, tag: str) -> ImmutableRule | None:
    """The first rule that makes `tag` of `repository` immutable."""
    return next((rule for rule in rules if rule.covers(repository, tag)), None)


@dataclass(frozen=True)
class Guard:
    """What must be looked at in the registry before it gets the request."""

    kind: Literal["put_tag", "delete_tag", "delete_digest", "delete_blob", "tag_query"]
    repository: str
    reference: str  # the tag, or the digest
    rules: tuple[ImmutableRule, ...]  # the tag's rule; for a digest, every rule of the repository


def guard(rules: tuple[ImmutableRule, ...], operation: Operation) -> Guard | None:
    """Whether `operation` could change or remove an immutable tag (None: it cannot)."""
    if not rules or operation.method not in ("PUT", "DELETE"):
        return None
    repository, reference = operation.repository, operation.reference
    if repository is None or reference is None:
        return None
    covering = tuple(rule for rule in rules if rule.covers_repository(repository))
    if operation.route is Route.BLOB and operation.method == "DELETE" and covering:
        # A layer or config of an immutable release, or of one of an index's platforms, gone:
        # the tag would still name it, and nothing could pull it. Blobs go by garbage collection.
        return Guard("delete_blob", repository, reference, covering)
    if operation.route is not Route.MANIFEST:
        return None
    if operation.method == "PUT" and "tag" in operation.params and covering:
        # OCI 1.1's `?tag=` tags a manifest as it is pushed (distribution 3 reads every one of
        # them; 2.8 none): not looked into here, so refused where any tag could be immutable.
        return Guard("tag_query", repository, reference, covering)
    if ":" in reference:  # a digest: a PUT by digest moves no tag
        if operation.method == "PUT":
            return None
        return Guard("delete_digest", repository, reference, covering) if covering else None
    rule = rule_for(rules, repository, reference)
    if rule is None:
        return None
    return Guard("put_tag" if operation.method == "PUT" else "delete_tag", repository, reference, (rule,))


@dataclass(frozen=True)
class Refusal:
    message: str  # for the client (DENIED) and the log


def on_put(rule: ImmutableRule, tag: str, existing: str | None, pushed: str) -> Refusal | None:
    """A manifest PUT to an immutable tag: the first push, or the same manifest again, passes."""
    if existing is None or existing == pushed:
        return None
    return Refusal(f"tag {tag} is immutable by {rule.describe()}: it is {existing}; push a new tag")


def on_tag_query(rule: ImmutableRule) -> Refusal:
    return Refusal(f"tags given as ?tag= are not accepted where {rule.describe()} applies: push by tag")


def on_delete_blob(rule: ImmutableRule, digest: str) -> Refusal:
    return Refusal(
        f"blob {digest} is not deleted where {rule.describe()} applies: an immutable tag may need "
        "it (the registry's garbage collection removes blobs no manifest uses)"
    )


def on_delete_tag(rule: ImmutableRule, tag: str) -> Refusal:
    return Refusal(f"tag {tag} is immutable by {rule.describe()}: it cannot be deleted")


def on_delete_digest(digest: str, pointing: Mapping[str, ImmutableRule]) -> Refusal | None:
    """A manifest DELETE by digest, given the immutable tags that are it or an index listing it."""
    if not pointing:
        return None
    tag, rule = sorted(pointing.items())[0]
    return Refusal(
        f"manifest {digest} is tag {tag} or one of its platforms, immutable by {rule.describe()}: "
        "it cannot be deleted"
    )
