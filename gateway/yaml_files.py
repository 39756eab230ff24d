"""YAML as the gateway's files need it: duplicate keys are errors, dates stay text.

PyYAML keeps the last of two equal keys without a word (a second `acl:` would silently replace
the first), and turns an unquoted `2027-13-31` into a ValueError from its date constructor, not a
YAMLError. Dates are left as strings here, so that the parsers that know the key path report them.
"""

from __future__ import annotations

import difflib
import io
from collections.abc import Iterable
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode

_TIMESTAMP = "tag:yaml.org,2002:timestamp"


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"duplicate key {key!r} (first at line {seen[key].line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


# Dates and times resolve as plain strings.
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load(text: str, name: str = "<string>") -> Any:
    """The document in `text` (read from the file `name`). Raises yaml.YAMLError, with the file,
    line and column, on any problem."""
    stream = io.StringIO(text)
    stream.name = name  # what PyYAML's marks show
    return yaml.load(stream, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the nearest known key, or nothing when none is near."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
