"""Atomic checkpoints: ``checkpoints/step_<N>/`` appears only once complete.

Each save writes into ``step_<N>.tmp-<pid>/``: rank-0 files (trainable weights, optimizer, LR
scheduler, stage state, config) and one RNG/data-position file per rank, then a ``COMPLETE``
marker, then renames the folder. ``resume=latest`` only considers folders with the marker, so a
crash mid-save never leaves a checkpoint that resume would pick.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from helios.infra.distributed import DistInfo, barrier, broadcast_object

log = logging.getLogger(__name__)
MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d+)$")


MANIFEST = "manifest.json"


class CorruptCheckpoint(ValueError):
    """A checkpoint file is missing, truncated or changed since it was written."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Size and SHA-256 of every file of a checkpoint (DeepSpeed's partitions included)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, MARKER))
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps(entries, indent=1))


def verify(folder: Path) -> None:
    """Raise :class:`CorruptCheckpoint` naming the first file that does not match the manifest (a
    checkpoint written before manifests existed passes)."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        return
    for name, entry in json.loads(manifest.read_text()).items():
        path = folder / name
        if not path.is_file():
            raise CorruptCheckpoint(f"{path} is missing")
        if path.stat().st_size != entry["bytes"]:
            raise CorruptCheckpoint(f"{path} has {path.stat().st_size} bytes, {entry['bytes']} were written")
        if _sha256(path) != entry["sha256"]:
            raise CorruptCheckpoint(f"{path} changed since it was written (checksum mismatch)")


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_complete(run_dir: Path) -> list[tuple[int, Path]]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if m and (child / MARKER).exists():
            found.append((int(m.group(1)), child))
    return sorted(found)


def resolve_resume(resume: str, run_dir: Path, key: str = "resume") -> Path | None:
    """``latest`` -> newest complete checkpoint of this run dir (or None), ``none`` -> None,
    otherwise a checkpoint folder (or a run dir, whose newest checkpoint is used)."""
    if resume == "none":
        return None
    if resume == "latest":
        return newest_verified(list_complete(run_dir), key)
    path = Path(resume).expanduser()
    if (path / MARKER).exists():
        try:
            verify(path)
        except CorruptCheckpoint as err:
            older = [c for c in list_complete(path.parent.parent) if c[0] < _step_of(path)]
            hint = newest_verified(older, key, quiet=True)
            raise CorruptCheckpoint(
                f"{key}={resume}: {err}" + (f"; {hint} verifies: {key}={hint}" if hint else "")
            ) from None
        return path
    done = list_complete(path)
    if done:
        return newest_verified(done, key)
    raise FileNotFoundError(
        f"{key}={resume}: no complete checkpoint there "
        f"(a folder checkpoints/step_<N>/ with a {MARKER} file)"
        + ("; use resume=latest, resume=none or a checkpoint path" if key == "resume" else "")
    )


def pin_source(source: str | None, key: str) -> str | None:
    """A weight source named so that it always means what this run loaded: an absolute path; a run dir
    becomes its newest complete checkpoint (a run that trains on afterwards does not change what a reload
    of this run rebuilds). Names that are not local paths (hub ids) are kept as they are."""
    if not source:
        return source
    path = Path(source).expanduser()
    if not path.exists():
        return source
    path = path.resolve()
    if (path / MARKER).exists() or list_complete(path):
        return str(resolve_resume(str(path), path, key))
    return str(path)


def _step_of(path: Path) -> int:
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else -1


def newest_verified(done: list[tuple[int, Path]], key: str = "resume", quiet: bool = False) -> Path | None:
    """The newest complete checkpoint whose files match their manifest; each one skipped is reported."""
    for _, path in reversed(done):
        try:
            verify(path)
            return path
        except CorruptCheckpoint as err:
            if not quiet:
                log.warning("%s: skipping %s: %s; trying the one before", key, path.name, err)
    if done and not quiet:
        raise CorruptCheckpoint(f"{key}: none of the {len(done)} checkpoints verifies (last: {done[-1][1]})")
    return None


def save(
    run_dir: Path,
    step: int,
    dist_info: DistInfo,
    tensors: dict[str, dict[str, torch.Tensor]],
    objects: dict[str, Any],
    rank_state: dict[str, Any],
    keep_last: int,
    write_extra: Callable[[Path], None] | None = None,
    sources: dict[str, str | None] | None = None,
) -> Path:
    """Save a checkpoint collectively (every rank calls this). ``write_extra(tmp_dir)`` runs on every
    rank before the marker (e.g. DeepSpeed's per-rank optimiser partitions)."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step}"
    tmp_name = broadcast_object(f"step_{step}.tmp-{os.getpid()}" if dist_info.is_main else None)
    tmp = root / tmp_name
    if dist_info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rank_state, tmp / f"rank_{dist_info.rank:05d}.pt")
    if dist_info.is_main:
        for name, tensor_dict in tensors.items():
            save_file(tensor_dict, str(tmp / f"{name}.safetensors"))
        torch.save(objects, tmp / "state.pt")
        meta = {"step": step, "world_size": dist_info.world_size, "sources": sources or {}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if write_extra is not None:
        write_extra(tmp)
    barrier()
    if dist_info.is_main:
        write_manifest(tmp)  # before the marker: a COMPLETE checkpoint can always be verified
        (tmp / MARKER).write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_complete(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob("step_*.tmp-*"):  # left by a crashed save
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def saved_sources(path: Path) -> dict[str, str | None]:
    """The pinned weight sources a checkpoint's run started from (see :func:`pin_source`)."""
    return json.loads((path / "meta.json").read_text()).get("sources", {})


def load(path: Path, dist_info: DistInfo) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    """(tensors by file stem, rank-0 objects, this rank's state)."""
    meta = json.loads((path / "meta.json").read_text())
    if meta["world_size"] != dist_info.world_size:
        raise ValueError(
            f"checkpoint {path} was written by {meta['world_size']} ranks; "
            f"this run has {dist_info.world_size}. "
            "Exact resume needs the same world size"
        )
    tensors = load_tensors(path)
    objects = _torch_load(path / "state.pt")
    rank_state = _torch_load(path / f"rank_{dist_info.rank:05d}.pt")
    return tensors, objects, rank_state


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or missing pickle surfaces in several forms
        raise CorruptCheckpoint(f"{path} cannot be read: {str(err).splitlines()[0]}") from None


def load_tensors(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The weight files of a checkpoint by stem (``trainable``, and ``base`` for a random base)."""
    out = {}
    for p in Path(path).glob("*.safetensors"):
        try:
            out[p.stem] = load_file(str(p))
        except Exception as err:  # safetensors raises its own error types for a damaged file
            raise CorruptCheckpoint(f"{p} cannot be read: {err}") from None
    if "trainable" not in out:
        raise CorruptCheckpoint(f"{path}/trainable.safetensors is missing")
    return out
