"""Raw inputs for ``helios.prepare``: a folder with ``captions.jsonl`` / ``captions.csv``, or
webdataset tar shards holding ``mp4`` + ``txt``/``json``. Inputs are grouped into *units* (one output
shard each) in a fixed order, so ranks split work by unit and a rerun finds the same units."""

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


def discover_units(input_path: str | Path, samples_per_shard: int) -> list[Unit]:
    """Units in a fixed order: chunks of a caption file, or one unit per input tar."""
    root = Path(input_path)
    if root.is_file() and root.suffix == ".tar":
        tars = [root]
    elif root.is_dir():
        tars = sorted(root.glob("*.tar"))
        for name in CAPTION_FILES:
            if (root / name).exists():
                items = _jsonl_items(root / name) if name.endswith(".jsonl") else _csv_items(root / name)
                chunks = [items[i : i + samples_per_shard] for i in range(0, len(items), samples_per_shard)]
                return [
                    Unit(f"shard-{k:06d}", lambda chunk=chunk: iter(chunk)) for k, chunk in enumerate(chunks)
                ]
    else:
        raise FileNotFoundError(f"input={input_path} does not exist")
    if not tars:
        raise FileNotFoundError(
            f"input={input_path}: expected a folder with {' or '.join(CAPTION_FILES)}, "
            "or webdataset .tar shards"
        )
    return [Unit(f"shard-{t.stem}", lambda t=t: _tar_items(t)) for t in tars]
