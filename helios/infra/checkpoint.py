"""Atomic checkpoints: ``checkpoints/step_<N>/`` appears only once complete, and nothing good is lost.

Each save writes into ``step_<N>.tmp-<pid>/``: rank-0 files (trainable weights, optimizer, LR
scheduler, stage state, config) and one RNG/data-position file per rank, then a manifest (size and
SHA-256 of every file) and a ``COMPLETE`` marker, then renames the folder. ``resume=latest`` only
considers folders with the marker whose files match their manifest, so a crash mid-save never leaves a
checkpoint that resume would pick. A save that fails (a full disk) removes its temporary folder and says
why in one line; only then is an older checkpoint deleted (``trainer.keep_last``), after a newer one
exists. Resuming from a checkpoint older than the newest starts a new branch: the newer checkpoints move
aside to ``checkpoints/abandoned/`` (kept, named, never picked by ``latest``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from helios.infra.distributed import DistInfo, barrier, broadcast_object, on_every_rank

log = logging.getLogger(__name__)
MARKER = "COMPLETE"
MANIFEST = "manifest.json"
CONFIG = "config.yaml"  # the run's config at this checkpoint (read before anything is built)
ABANDONED = "abandoned"  # checkpoints/abandoned/<when>-from_step_<N>/: branches a resume left behind
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_GLOB = "step_*.tmp-*"
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CorruptCheckpoint(ValueError):
    """A checkpoint file is missing, truncated or changed since it was written."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, quota, file-size limit); nothing was left behind."""


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
    (folder / MANIFEST).write_text(json.dumps(entries, indent=1))  # pragma: no mutate (layout for readers)


def verify(folder: Path) -> None:
    """Raise :class:`CorruptCheckpoint` naming the first file that does not match the manifest (a
    checkpoint written before manifests existed passes; a damaged manifest fails)."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        return
    try:
        entries = json.loads(manifest.read_text())
        items = [(name, int(e["bytes"]), str(e["sha256"])) for name, e in entries.items()]
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as err:
        raise CorruptCheckpoint(f"{manifest} cannot be read ({type(err).__name__}: {err})") from None
    for name, size, sha in items:
        path = folder / name
        if not path.is_file():
            raise CorruptCheckpoint(f"{path} is missing")
        if path.stat().st_size != size:
            raise CorruptCheckpoint(f"{path} has {path.stat().st_size} bytes, {size} were written")
        if _sha256(path) != sha:
            raise CorruptCheckpoint(f"{path} changed since it was written (checksum mismatch)")


def read_meta(path: Path) -> dict:
    """A checkpoint's ``meta.json`` (step, world size, weight sources, weight statistics)."""
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise CorruptCheckpoint(
            f"{path / 'meta.json'} cannot be read ({type(err).__name__}: {err})"
        ) from None


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
            hint = newest_verified(older, key, quiet=True)  # pragma: no mutate (quiet: key unused)
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


def newest_verified(done: list[tuple[int, Path]], key: str, quiet: bool = False) -> Path | None:
    """The newest complete checkpoint whose files match their manifest; each one skipped is reported under
    ``key`` (the setting that named it: ``resume``, ``init_from``, a weight source)."""
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


# ---------------------------------------------------------------------------------------------- branches
def start_branch(run_dir: Path, resumed: Path | None) -> list[Path]:
    """A run continues this run dir's line of checkpoints only where nothing newer than its start exists:
    the checkpoints after ``resumed`` (all of them when the run starts afresh, ``resumed=None``, or from
    another run dir's checkpoint) belong to a branch it abandons. They move to
    ``checkpoints/abandoned/<when>-from_step_<N>/`` (kept and named, never picked by ``resume=latest``, never
    rotated away). Returns where they went."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    here = resumed is not None and resumed.resolve().parent == root.resolve()
    start = _step_of(resumed) if here else -1
    newer = sorted(
        (c for c in root.iterdir() if _STEP_RE.match(c.name) and _step_of(c) > start), key=_step_of
    )
    if not newer:
        return []
    origin = (
        f"from_step_{_step_of(resumed)}"
        if here
        else ("from_" + resumed.parent.parent.name if resumed else "fresh")
    )
    target = _aside_dir(root, origin)
    moved = []
    for child in newer:
        os.replace(child, target / child.name)
        moved.append(target / child.name)
    log.warning(
        "%s starts a new branch: %s moved to %s (kept; resume=<its path> continues that branch)",
        f"resuming from {resumed}" if resumed else "starting afresh",
        ", ".join(p.name for p in moved),
        target,
    )
    return moved


def _aside_dir(root: Path, label: str) -> Path:
    """A new, empty ``checkpoints/abandoned/<when>-<label>[-<n>]/``: two set aside within one second (a
    rerun saving the same step twice, two resumes) never share a folder."""
    base = root / ABANDONED / f"{time.strftime('%Y%m%d-%H%M%S')}-{label}"
    base.parent.mkdir(exist_ok=True)  # checkpoints/ exists: it holds what is set aside
    n = 1
    while True:
        target = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            target.mkdir()
            return target
        except FileExistsError:
            n += 1


# ---------------------------------------------------------------------------------------------- save
def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Temporary folders of saves that never completed (a crash, a kill): this run dir's live run holds its
    lock, so none of them is being written."""
    stale = sorted(checkpoint_dir(run_dir).glob(_TMP_GLOB))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def payload_bytes(tensors: dict[str, dict[str, torch.Tensor]], objects: Any) -> int:
    """Bytes of the tensors a checkpoint writes (the files are a little larger: headers, pickles)."""

    def size(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(size(v) for v in obj.values())
        if isinstance(obj, list | tuple):
            return sum(size(v) for v in obj)
        return 0

    return size(tensors) + size(objects)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _disk_full(err: BaseException | None) -> bool:
    """A write cut short by the file system: errno ENOSPC / EDQUOT / EFBIG, or a library error wrapping one
    (torch's zip writer reports a short write as 'unexpected pos', safetensors an 'I/O error')."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in _FULL:
            return True
        text = str(err)
        if any(s in text for s in ("unexpected pos", "No space left", "File too large", "Disk quota")):
            return True
        err = err.__cause__ or err.__context__
    return False


def _write_failed(step: int, root: Path, need: int, err: BaseException | None, last: Path | None) -> str:
    free = shutil.disk_usage(root).free
    intact = f"the last checkpoint, {last}, is intact" if last else "no earlier checkpoint exists"
    first = (str(err).splitlines() or [type(err).__name__])[0] if err is not None else ""
    if free < need:
        why = f"the disk is full ({_gib(free)} free on {root}, the checkpoint needs about {_gib(need)})"
    elif _disk_full(err):
        why = (
            f"the write was cut short ({first}) although {_gib(free)} is free on {root}: a disk quota or a "
            "file-size limit (ulimit -f)"
        )
    else:
        why = f"{type(err).__name__}: {first}"
    return (
        f"checkpoint step_{step} was not saved: {why}. Its partial files were removed; {intact}. "
        "Free space and rerun with resume=latest"
    )


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
    meta: dict[str, Any] | None = None,
    config: str | None = None,
) -> Path:
    """Save a checkpoint collectively (every rank calls this). ``write_extra(tmp_dir)`` runs on every
    rank before the marker (e.g. DeepSpeed's per-rank optimiser partitions). A save that fails on any rank
    (or that the free space cannot hold) leaves the disk as it was and raises :class:`CheckpointWriteError`
    on every rank; the older checkpoints are rotated (``keep_last``) only after this one is complete."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step}"
    last = list_complete(run_dir)[-1][1] if dist_info.is_main and list_complete(run_dir) else None
    need = payload_bytes(tensors, objects)  # only the main rank checks the free space (tensor sizes only)
    problem = None  # pragma: no mutate (falsy as the empty text)
    if dist_info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir)
        if shutil.disk_usage(root).free < need:
            problem = _write_failed(step, root, need, None, last)
    problem = broadcast_object(problem)
    if problem:
        raise CheckpointWriteError(problem)
    tmp = root / broadcast_object(f"step_{step}.tmp-{os.getpid()}" if dist_info.is_main else None)
    failure: BaseException | None = None
    try:
        if dist_info.is_main:
            tmp.mkdir(parents=True)
        barrier()
        torch.save(rank_state, tmp / f"rank_{dist_info.rank:05d}.pt")
        if dist_info.is_main:
            for name, tensor_dict in tensors.items():
                save_file(tensor_dict, str(tmp / f"{name}.safetensors"))
            torch.save(objects, tmp / "state.pt")
            info = {
                "step": step,
                "world_size": dist_info.world_size,
                "sources": sources or {},
                **(meta or {}),
            }
            (tmp / "meta.json").write_text(json.dumps(info, indent=1))
            if config is not None:
                (tmp / CONFIG).write_text(config)
        if write_extra is not None:
            write_extra(tmp)
    except Exception as err:  # any failed write: every rank agrees before the cleanup
        failure = err
    ok = on_every_rank(failure is None)
    if ok and dist_info.is_main:
        try:
            write_manifest(tmp)  # before the marker: a COMPLETE checkpoint can always be verified
            (tmp / MARKER).write_text("ok\n")
        except OSError as err:
            failure, ok = err, False
    ok = broadcast_object(ok)
    if not ok:
        if dist_info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        message = _write_failed(step, root, need, failure, last) if dist_info.is_main else None
        message = broadcast_object(message)
        raise CheckpointWriteError(message) from failure
    if dist_info.is_main:
        if final.exists():  # the same step again (a rerun of a finished run): the old one is kept aside
            os.replace(final, _aside_dir(root, "replaced") / final.name)
        os.replace(tmp, final)
        rotate(run_dir, keep_last)
    barrier()
    return final


def rotate(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete the complete checkpoints of this run dir's line beyond the newest ``keep_last``. Called right
    after a save completed, so the newest (the one just written and manifested) exists: a checkpoint is
    deleted only after a newer one on the same branch is complete; abandoned branches are never touched."""
    done = list_complete(run_dir)
    old = [path for _, path in done[: max(0, len(done) - max(1, keep_last))]]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def saved_sources(path: Path) -> dict[str, str | None]:
    """The pinned weight sources a checkpoint's run started from (see :func:`pin_source`)."""
    return read_meta(path).get("sources", {})


def saved_config(path: Path) -> str:
    """The config a checkpoint was trained with, as YAML, read without loading its weights or optimizer
    (``config.yaml`` in the checkpoint; older checkpoints: their ``state.pt``)."""
    if (path / CONFIG).is_file():
        return (path / CONFIG).read_text()
    return _torch_load(path / "state.pt")["config"]


def load(path: Path, dist_info: DistInfo) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict | None]:
    """(tensors by file stem, rank-0 objects, this rank's state), on any world size: a rank's state (its
    random streams) exists only where the world size is the one that wrote the checkpoint, else None."""
    meta = read_meta(path)
    tensors = load_tensors(path)
    objects = _torch_load(path / "state.pt")
    same_world = meta["world_size"] == dist_info.world_size
    rank_state = _torch_load(path / f"rank_{dist_info.rank:05d}.pt") if same_world else None
    return tensors, objects, rank_state


def data_position(path: Path) -> dict:
    """The data position of a checkpoint (the same on every rank: main rank's file)."""
    return _torch_load(path / "rank_00000.pt")["sampler"]


def _torch_load(path: Path):
    try:
        # mapped, not read: the node's ranks share the file's pages (a resume reads the optimizer state
        # once per node into the page cache, not once per rank into its own memory)
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
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
