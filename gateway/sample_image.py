"""Write a small multi-layer OCI image layout to disk, for the demo, the tests and the benchmark.

skopeo reads it as `oci:DIR:TAG`; no image has to be downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path


def _write_blob(layout: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}"


def _layer(files: dict[str, bytes]) -> tuple[bytes, str]:
    """A gzipped tar layer and its diff id (digest of the uncompressed tar)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(content))
    uncompressed = raw.getvalue()
    return gzip.compress(uncompressed, mtime=0), "sha256:" + hashlib.sha256(uncompressed).hexdigest()


def _image(
    layout: Path,
    layers: int,
    layer_bytes: int,
    architecture: str = "amd64",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> tuple[str, int]:
    """One image's layers, config and manifest in `layout`; the manifest's digest and size."""
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    descriptors, diff_ids = [], []
    for index in range(layers):
        blob, diff_id = _layer({f"layer{index}.bin": os.urandom(layer_bytes)})
        descriptors.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": _write_blob(layout, blob),
                "size": len(blob),
            }
        )
        diff_ids.append(diff_id)
    image_config = json.dumps(
        {
            "architecture": architecture,
            "os": "linux",
            "created": "2026-01-02T03:04:05Z",
            "config": {"Labels": labels} if labels else {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    manifest_body: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": _write_blob(layout, image_config),
            "size": len(image_config),
        },
        "layers": descriptors,
    }
    if annotations:
        manifest_body["annotations"] = annotations
    manifest = json.dumps(manifest_body).encode()
    return _write_blob(layout, manifest), len(manifest)


def _tag(layout: Path, tag: str, media_type: str, digest: str, size: int) -> None:
    entry = {
        "mediaType": media_type,
        "digest": digest,
        "size": size,
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))


def write_image(
    layout: Path,
    tag: str = "latest",
    layers: int = 3,
    layer_bytes: int = 64 * 1024,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> str:
    """Write an OCI layout with `layers` random layers; returns the manifest digest."""
    digest, size = _image(layout, layers, layer_bytes, labels=labels, annotations=annotations)
    _tag(layout, tag, "application/vnd.oci.image.manifest.v1+json", digest, size)
    return digest


def write_index(
    layout: Path, tag: str, architectures: list[str], layers: int = 2, layer_bytes: int = 4096
) -> str:
    """Write an OCI layout whose `tag` is an image index of one image per architecture (linux);
    returns the index's digest. `skopeo copy --all` pushes it whole."""
    entries = []
    for architecture in architectures:
        digest, size = _image(layout, layers, layer_bytes, architecture)
        entries.append(
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest,
                "size": size,
                "platform": {"os": "linux", "architecture": architecture},
            }
        )
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}
    ).encode()
    digest = _write_blob(layout, index)
    _tag(layout, tag, "application/vnd.oci.image.index.v1+json", digest, len(index))
    return digest
