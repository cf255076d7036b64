"""Latent shards: webdataset tar files of VAE latents + UMT5 embeddings + metadata (paper §4.2:
latents and text embeddings are pre-computed and offloaded to disk so the GPU holds only the DiT).

Sample members: ``latents.npy`` float32 [C, T, h, w] (normalised), ``prompt_embeds.npy`` float32
[L, D] (only the L valid tokens; zero padding is restored on load), ``json`` metadata (caption,
source, latent shape, fps, ...). Each shard ``NAME.tar`` has a sidecar ``NAME.idx.json`` with the
byte offset of every member, so a training reader fetches one sample with one seek (random access
keeps resume exact and ranks disjoint without streaming state). Shards are written under a
temporary name and renamed: a reader never sees a partial shard. Tars are reproducible (fixed
mtime), so an interrupted and resumed ``prepare`` writes byte-identical files.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

INDEX_SUFFIX = ".idx.json"
MEMBERS = ("latents.npy", "prompt_embeds.npy", "json")


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def trim_embeds(embeds: torch.Tensor) -> torch.Tensor:
    """Drop the zero padding after the last valid token: [L_max, D] -> [L, D] (at least 1 row)."""
    nonzero = embeds.abs().sum(dim=-1) > 0
    n = int(nonzero.nonzero().max()) + 1 if nonzero.any() else 1
    return embeds[:n]


def encode_sample(key: str, latents: torch.Tensor, prompt_embeds: torch.Tensor, meta: dict) -> dict:
    meta = {**meta, "latent_shape": list(latents.shape)}
    return {
        "__key__": key,
        "latents.npy": npy_bytes(latents.detach().float().cpu().numpy()),
        "prompt_embeds.npy": npy_bytes(trim_embeds(prompt_embeds.detach().float().cpu()).numpy()),
        "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
    }


def write_shard(path: str | Path, samples: list[dict], required: tuple[str, ...] = MEMBERS) -> Path:
    """Write ``samples`` to ``path`` (atomically) and its offset index; returns the tar path."""
    import webdataset as wds

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with wds.TarWriter(str(tmp), mtime=0.0) as sink:
        for sample in samples:
            sink.write(sample)
    index = scan_tar(tmp, required)
    idx_tmp = path.with_name(path.name[: -len(".tar")] + INDEX_SUFFIX + ".tmp")
    idx_tmp.write_text(json.dumps(index))
    os.replace(tmp, path)
    os.replace(idx_tmp, index_path(path))
    return path


def index_path(shard: Path) -> Path:
    return shard.with_name(shard.name[: -len(".tar")] + INDEX_SUFFIX)


def scan_tar(path: str | Path, required: tuple[str, ...] = MEMBERS) -> list[dict]:
    """Per sample: key, member offsets / sizes / CRC32 and the latent shape (read from its json)."""
    samples: dict[str, dict] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar.getmembers():
            if not member.isfile() or "." not in member.name:
                continue
            key, ext = member.name.split(".", 1)
            entry = samples.setdefault(key, {"key": key, "members": {}})
            data = tar.extractfile(member).read()
            entry["members"][ext] = [member.offset_data, member.size, zlib.crc32(data)]
            if ext == "json":
                meta = json.loads(data.decode("utf-8"))
                entry["latent_shape"] = meta.get("latent_shape")
                entry["latent_format"] = meta.get("latent_format", "clip")  # before sections: whole clips
                entry["section_latents"] = meta.get("section_latents")
    return [s for s in samples.values() if all(m in s["members"] for m in required)]


def list_shards(path: str | Path) -> list[Path]:
    shards = sorted(Path(path).glob("*.tar"))
    if not shards:
        raise FileNotFoundError(
            f"no .tar shards in {path}; write them with `python -m helios.prepare input=... output={path}`"
        )
    return shards


class CorruptSample(ValueError):
    """A sample's bytes are short, fail their checksum (the shard changed since it was indexed) or hold
    non-finite values."""


class ShardIndex:
    """Random access to every sample of a shard directory (sidecar indices, or a header scan)."""

    def __init__(
        self, shards: Iterable[Path], max_open: int = 32, required: tuple[str, ...] = MEMBERS
    ) -> None:
        self.entries: list[tuple[Path, dict]] = []
        for shard in shards:
            idx = index_path(shard)
            try:
                items = json.loads(idx.read_text()) if idx.exists() else scan_tar(shard, required)
            except (OSError, tarfile.TarError, ValueError) as err:  # truncated tar, damaged index
                raise CorruptSample(
                    f"{shard}: cannot index it ({type(err).__name__}: {err}); rerun helios.prepare on its "
                    "input, or move the shard out of the folder"
                ) from None
            self.entries.extend((shard, item) for item in items)
        self._files: OrderedDict[Path, io.BufferedReader] = OrderedDict()
        self._max_open = max_open

    @classmethod
    def open(cls, path: str | Path) -> ShardIndex:
        return cls(list_shards(path))

    def __len__(self) -> int:
        return len(self.entries)

    def latent_shape(self, i: int) -> tuple[int, ...]:
        return tuple(self.entries[i][1]["latent_shape"])

    def latent_format(self, i: int) -> tuple[str, int | None]:
        """How sample ``i`` was encoded: ("sections", latents per section) or ("clip", None)."""
        item = self.entries[i][1]
        return item.get("latent_format", "clip"), item.get("section_latents")

    def _file(self, shard: Path):
        f = self._files.pop(shard, None)
        if f is None:
            f = open(shard, "rb")  # kept open in the LRU
            while len(self._files) >= self._max_open:
                self._files.popitem(last=False)[1].close()
        self._files[shard] = f
        return f

    def read_member(self, i: int, ext: str) -> bytes:
        """One member's bytes, checked against the index (size, and CRC32 where the index has it)."""
        shard, item = self.entries[i]
        offset, size, *crc = item["members"][ext]
        try:
            f = self._file(shard)
            f.seek(offset)
            data = f.read(size)
        except OSError as err:
            raise CorruptSample(f"{shard}: sample {item['key']}: {err}") from None
        if len(data) != size:
            raise CorruptSample(
                f"{shard}: sample {item['key']}.{ext} is truncated ({len(data)} of {size} bytes)"
            )
        if crc and zlib.crc32(data) != crc[0]:
            raise CorruptSample(f"{shard}: sample {item['key']}.{ext} fails its checksum (the file changed)")
        return data

    def read_array(self, i: int, member: str) -> torch.Tensor:
        """A ``.npy`` member as a tensor. Non-finite values (NaN or inf: e.g. an encoder that overflowed,
        whose bytes still match their checksum) make the sample corrupt, named by shard, key and member."""
        shard, item = self.entries[i]
        try:
            array = torch.from_numpy(npy_load(self.read_member(i, member)))
        except CorruptSample:
            raise
        except Exception as err:  # an index without checksums: undecodable bytes
            raise CorruptSample(f"{shard}: sample {item['key']}.{member}: {err}") from None
        if array.is_floating_point() and not bool(torch.isfinite(array).all()):
            bad = int((~torch.isfinite(array)).sum())
            raise CorruptSample(
                f"{shard}: sample {item['key']}.{member} holds {bad} non-finite values (NaN or inf)"
            )
        return array

    def read(self, i: int) -> dict:
        key = self.entries[i][1]["key"]
        latents, embeds = self.read_array(i, "latents.npy"), self.read_array(i, "prompt_embeds.npy")
        try:
            meta = json.loads(self.read_member(i, "json").decode("utf-8"))
        except CorruptSample:
            raise
        except Exception as err:  # an index without checksums: undecodable bytes
            raise CorruptSample(f"{self.entries[i][0]}: sample {key}.json: {err}") from None
        return {"key": key, "latents": latents, "prompt_embeds": embeds, "meta": meta}

    def __getstate__(self):  # DataLoader workers open their own files
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()
        return state
