"""What the pages show of a manifest, its config and the policy. Pure: no I/O.

Everything here is data for templates, which escape every value: nothing is trusted."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


@dataclass(frozen=True)
class Layer:
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class Platform:
    digest: str
    os: str
    architecture: str
    variant: str
    size: int


@dataclass(frozen=True)
class ManifestView:
    media_type: str
    is_index: bool
    layers: tuple[Layer, ...] = ()
    platforms: tuple[Platform, ...] = ()
    config_digest: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def total_size(self) -> int:
        return sum(layer.size for layer in self.layers)


@dataclass(frozen=True)
class ConfigView:
    created: str | None
    labels: dict[str, str]
    os: str | None
    architecture: str | None


class NotAManifest(ValueError):
    pass


def _int(value: Any) -> int:
    """A size as a registry would give it: a non-negative integer below 2**53, else 0."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53
    return value if ok else 0


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _strings(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items() if isinstance(v, str | int | float | bool)}


def parse_manifest(body: bytes, content_type: str) -> ManifestView:
    try:
        data = json.loads(body)
    except ValueError:
        raise NotAManifest("not JSON") from None
    if not isinstance(data, dict):
        raise NotAManifest("not a JSON object")
    media_type = _str(data.get("mediaType")) or content_type.split(";", 1)[0].strip()
    annotations = _strings(data.get("annotations"))
    if media_type in INDEX_TYPES or isinstance(data.get("manifests"), list):
        platforms = []
        for entry in _list(data.get("manifests")):
            if not isinstance(entry, dict):
                continue
            platform = _object(entry.get("platform"))
            platforms.append(
                Platform(
                    _str(entry.get("digest")),
                    _str(platform.get("os")) or "?",
                    _str(platform.get("architecture")) or "?",
                    _str(platform.get("variant")),
                    _int(entry.get("size")),
                )
            )
        return ManifestView(media_type, True, platforms=tuple(platforms), annotations=annotations)
    layers = tuple(
        Layer(_str(layer.get("digest")), _int(layer.get("size")), _str(layer.get("mediaType")))
        for layer in _list(data.get("layers"))
        if isinstance(layer, dict)
    )
    config = _object(data.get("config"))
    return ManifestView(
        media_type,
        False,
        layers=layers,
        config_digest=_str(config.get("digest")) or None,
        annotations=annotations,
    )


def parse_config(body: bytes) -> ConfigView:
    try:
        data = json.loads(body)
    except ValueError:
        return ConfigView(None, {}, None, None)
    if not isinstance(data, dict):
        return ConfigView(None, {}, None, None)
    inner = _object(data.get("config"))
    return ConfigView(
        _str(data.get("created")) or None,
        _strings(inner.get("Labels")),
        _str(data.get("os")) or None,
        _str(data.get("architecture")) or None,
    )


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


@dataclass(frozen=True)
class Permission:
    action: str
    allowed: bool
    why: str  # "granted by acl[0] (comment)", "denied by acl[1]", "no rule matched"
