"""Raw inputs for ``helios.prepare``: a folder with ``captions.jsonl`` / ``captions.csv``, webdataset tar
shards holding ``mp4`` + ``txt``/``json``, or the reference code's JSON index (``input=FILE.json``).
Inputs are grouped into *units* (one output shard each) in a fixed order, so ranks split work by unit
and a rerun finds the same units."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

CAPTION_FILES = ("captions.jsonl", "captions.csv")
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")


@dataclass
class InputItem:
    """One video to encode. ``error`` is set when the entry itself is unusable (bad caption line)."""

    name: str
    caption: str | None
    open_video: Callable[[], str | io.BytesIO] | None
    meta: dict = field(default_factory=dict)
    error: str | None = None
    cut: tuple[int, int] | None = None  # (start, end) source frames
    crop: tuple[int, int, int, int] | None = None  # (x0, x1, y0, y1) pixels


@dataclass
class Unit:
    name: str
    items: Callable[[], Iterator[InputItem]]


def _caption_error(caption) -> str | None:
    if not isinstance(caption, str) or not caption.strip():
        return "missing or empty caption"
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in caption):
        return "caption is not valid UTF-8"
    return None


def _jsonl_items(path: Path) -> list[InputItem]:
    items = []
    for n, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        name = f"{path.name}:{n}"
        try:
            entry = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            items.append(InputItem(name, None, None, error="caption line is not valid UTF-8"))
            continue
        except json.JSONDecodeError as err:
            items.append(InputItem(name, None, None, error=f"unreadable caption line: {err.msg}"))
            continue
        items.append(_folder_item(path.parent, entry, name))
    return items


def _csv_items(path: Path) -> list[InputItem]:
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"video", "caption"} <= set(reader.fieldnames):
        raise ValueError(f"{path} needs the columns video,caption (has {reader.fieldnames})")
    return [_folder_item(path.parent, row, f"{path.name}:{n}") for n, row in enumerate(reader, start=2)]


def _reference_items(path: Path) -> list[InputItem]:
    """The reference code's data index: a JSON list of ``{"path", "cap": [caption, ...], "cut": [start,
    end], "crop": [x0, x1, y0, y1], "fps", ...}`` with paths relative to the file (its toy_filter.json)."""
    try:
        entries = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"input={path}: not a JSON list of videos ({err})") from None
    if not isinstance(entries, list):
        raise ValueError(f"input={path}: expected a JSON list of {{path, cap, cut, crop, fps}} entries")
    items = []
    for n, entry in enumerate(entries):
        name = f"{path.name}[{n}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            items.append(InputItem(name, None, None, error="entry has no 'path'"))
            continue
        caps = entry.get("cap")
        caption = caps[0] if isinstance(caps, list) and caps else caps
        item = _folder_item(path.parent, {"video": entry["path"], "caption": caption}, entry["path"])
        item.meta.update({k: entry[k] for k in ("cut", "crop", "fps", "num_frames") if k in entry})
        try:
            item.cut = tuple(int(v) for v in entry["cut"]) if "cut" in entry else None
            item.crop = tuple(int(v) for v in entry["crop"]) if "crop" in entry else None
            if (item.cut and len(item.cut) != 2) or (item.crop and len(item.crop) != 4):
                raise ValueError
        except (TypeError, ValueError):
            item.error = item.error or "'cut' must be [start, end] and 'crop' [x0, x1, y0, y1]"
        items.append(item)
    return items


def _folder_item(root: Path, entry, name: str) -> InputItem:
    if not isinstance(entry, dict) or not isinstance(entry.get("video"), str):
        return InputItem(name, None, None, error="entry has no 'video' path")
    caption = entry.get("caption")
    error = _caption_error(caption)
    video = root / entry["video"]
    meta = {k: v for k, v in entry.items() if k not in ("video", "caption")}
    meta["video"] = entry["video"]
    if error is None and not video.is_file():
        error = f"missing file {entry['video']}"
    return InputItem(entry["video"], caption if error is None else None, lambda: str(video), meta, error)


def _tar_items(path: Path) -> Iterator[InputItem]:
    import webdataset as wds

    dataset = wds.WebDataset(
        str(path), shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None
    )
    for sample in dataset:
        key = sample["__key__"]
        name = f"{path.name}:{key}"
        video_ext = next((e for e in VIDEO_EXTS if e in sample), None)
        if video_ext is None:
            yield InputItem(name, None, None, error="no video member (mp4/webm/mkv/mov/avi)")
            continue
        meta: dict = {"video": name}
        caption = None
        try:
            if "json" in sample:
                meta.update(json.loads(sample["json"].decode("utf-8")))
                caption = meta.pop("caption", None)
            if caption is None and "txt" in sample:
                caption = sample["txt"].decode("utf-8")
        except UnicodeDecodeError:
            yield InputItem(name, None, None, error="caption is not valid UTF-8")
            continue
        except json.JSONDecodeError as err:
            yield InputItem(name, None, None, error=f"unreadable json: {err.msg}")
            continue
        data = sample[video_ext]
        yield InputItem(name, caption, lambda data=data: io.BytesIO(data), meta, _caption_error(caption))


def _chunked(items: list[InputItem], size: int) -> list[Unit]:
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    return [Unit(f"shard-{k:06d}", lambda chunk=chunk: iter(chunk)) for k, chunk in enumerate(chunks)]


def discover_units(input_path: str | Path, samples_per_shard: int) -> list[Unit]:
    """Units in a fixed order: chunks of a caption file, or one unit per input tar."""
    root = Path(input_path)
    if root.is_file() and root.suffix == ".json":  # the reference code's index (toy_filter.json)
        return _chunked(_reference_items(root), samples_per_shard)
    if root.is_file() and root.suffix == ".tar":
        tars = [root]
    elif root.is_dir():
        tars = sorted(root.glob("*.tar"))
        for name in CAPTION_FILES:
            if (root / name).exists():
                items = _jsonl_items(root / name) if name.endswith(".jsonl") else _csv_items(root / name)
                return _chunked(items, samples_per_shard)
    else:
        raise FileNotFoundError(f"input={input_path} does not exist")
    if not tars:
        raise FileNotFoundError(
            f"input={input_path}: expected a folder with {' or '.join(CAPTION_FILES)}, "
            "or webdataset .tar shards"
        )
    return [Unit(f"shard-{t.stem}", lambda t=t: _tar_items(t)) for t in tars]
