"""Latent shards: webdataset tar files of VAE latents + UMT5 embeddings + metadata (paper §4.2:
latents and text embeddings are pre-computed and offloaded to disk so the GPU holds only the DiT).

Sample members: ``latents.npy`` float32 [C, T, h, w] (normalised), ``prompt_embeds.npy`` float32
[L, D] (only the L valid tokens; zero padding is restored on load), ``json`` metadata (caption,
source, shape, fps). A shard is written under a temporary name and renamed when complete, so a
reader never sees a partial shard.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

COMPLETE_MARKER = "_COMPLETE"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def trim_embeds(embeds: torch.Tensor) -> torch.Tensor:
    """Drop the zero padding after the last valid token: [L_max, D] -> [L, D] (at least 1 row)."""
    nonzero = embeds.abs().sum(dim=-1) > 0
    n = int(nonzero.nonzero().max()) + 1 if nonzero.any() else 1
    return embeds[:n]


class ShardWriter:
    """Writes samples into ``{prefix}-{index:06d}.tar`` files of ``samples_per_shard`` samples."""

    def __init__(self, out_dir: str | Path, prefix: str = "shard", samples_per_shard: int = 64) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.index = 0
        self._buffer: list[dict[str, bytes]] = []
        self.written: list[Path] = []

    def add(self, key: str, latents: torch.Tensor, prompt_embeds: torch.Tensor, meta: dict) -> None:
        meta = {**meta, "latent_shape": list(latents.shape)}
        self._buffer.append(
            {
                "__key__": key,
                "latents.npy": _npy_bytes(latents.detach().float().cpu().numpy()),
                "prompt_embeds.npy": _npy_bytes(trim_embeds(prompt_embeds.detach().float().cpu()).numpy()),
                "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
            }
        )
        if len(self._buffer) >= self.samples_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        import webdataset as wds

        final = self.out_dir / f"{self.prefix}-{self.index:06d}.tar"
        tmp = final.with_name(final.name + ".tmp")
        with wds.TarWriter(str(tmp)) as sink:
            for sample in self._buffer:
                sink.write(sample)
        os.replace(tmp, final)
        self.written.append(final)
        self._buffer = []
        self.index += 1

    def close(self) -> list[Path]:
        self.flush()
        return self.written


def list_shards(path: str | Path) -> list[Path]:
    shards = sorted(Path(path).glob("*.tar"))
    if not shards:
        raise FileNotFoundError(
            f"no .tar shards in {path}; write them with `python -m helios.prepare input=... output={path}`"
        )
    return shards


def iter_shard_samples(shards: Iterable[Path]) -> Iterator[dict]:
    """Decoded samples: latents [C, T, h, w], prompt_embeds [L, D], meta dict, key."""
    import webdataset as wds

    # Every caller reads the shards it was given: rank/worker splitting happens upstream.
    dataset = wds.WebDataset(
        [str(s) for s in shards],
        shardshuffle=False,
        empty_check=False,
        nodesplitter=None,
        workersplitter=None,
    )
    for sample in dataset:
        yield {
            "key": sample["__key__"],
            "latents": torch.from_numpy(_npy_load(sample["latents.npy"])),
            "prompt_embeds": torch.from_numpy(_npy_load(sample["prompt_embeds.npy"])),
            "meta": json.loads(sample["json"].decode("utf-8")),
        }
