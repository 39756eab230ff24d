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


def write_image(layout: Path, tag: str = "latest", layers: int = 3, layer_bytes: int = 64 * 1024) -> str:
    """Write an OCI layout with `layers` random layers; returns the manifest digest."""
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
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _write_blob(layout, image_config),
                "size": len(image_config),
            },
            "layers": descriptors,
        }
    ).encode()
    manifest_digest = _write_blob(layout, manifest)
    image_index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(image_index))
    return manifest_digest
