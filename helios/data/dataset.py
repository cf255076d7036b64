"""Training clips from latent shards, with a resumable per-rank sampler."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from helios.data.shards import iter_shard_samples, list_shards


@dataclass
class ClipBatch:
    """One micro-batch: clip latents [B, C, L, h, w], the video's first latent [B, C, 1, h, w],
    prompt embeddings [B, S, D] and each clip's start in its video (latent frames) [B]."""

    latents: torch.Tensor
    first_latent: torch.Tensor
    prompt_embeds: torch.Tensor
    offset: torch.Tensor

    def to(self, device: torch.device) -> ClipBatch:
        return ClipBatch(
            *(
                t.to(device, non_blocking=True)
                for t in (self.latents, self.first_latent, self.prompt_embeds, self.offset)
            )
        )


class LatentClipDataset:
    """Every sample of a shard directory held in host memory; item ``i`` is a random window of
    ``clip_frames`` latent frames of video ``i`` (deterministic in seed, epoch and index, so a
    resumed run draws the same windows). Streaming of large sets is the shard reader's job."""

    def __init__(self, path: str | Path, clip_frames: int, max_sequence_length: int, seed: int = 0) -> None:
        self.clip_frames = clip_frames
        self.max_sequence_length = max_sequence_length
        self.seed = seed
        self.samples = []
        too_short = 0
        for sample in iter_shard_samples(list_shards(path)):
            if sample["latents"].shape[1] < clip_frames:
                too_short += 1
                continue
            self.samples.append(sample)
        if not self.samples:
            raise ValueError(
                f"no sample in {path} has the {clip_frames} latent frames a training clip needs "
                f"({too_short} too short); prepare longer clips or reduce history.sizes / history.window"
            )
        self.skipped_too_short = too_short

    def __len__(self) -> int:
        return len(self.samples)

    def item(self, index: int, epoch: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        latents = sample["latents"]
        spare = latents.shape[1] - self.clip_frames
        gen = torch.Generator().manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF)
        start = int(torch.randint(spare + 1, (1,), generator=gen)) if spare > 0 else 0
        embeds = sample["prompt_embeds"][: self.max_sequence_length]
        padded = torch.zeros(self.max_sequence_length, embeds.shape[-1])
        padded[: embeds.shape[0]] = embeds
        return {
            "latents": latents[:, start : start + self.clip_frames],
            "first_latent": latents[:, :1],
            "prompt_embeds": padded,
            "offset": torch.tensor(start),
        }

    def batch(self, indices: list[int], epoch: int) -> ClipBatch:
        items = [self.item(i, epoch) for i in indices]
        return ClipBatch(
            *(
                torch.stack([it[k] for it in items])
                for k in ("latents", "first_latent", "prompt_embeds", "offset")
            )
        )


class ResumableSampler:
    """Per-rank disjoint, epoch-shuffled indices whose position is part of the checkpoint.

    Each epoch permutes ``range(n)`` with ``seed + epoch``, pads it to a multiple of the world size
    (as ``DistributedSampler`` does) and gives rank ``r`` the entries ``r::world``.
    """

    def __init__(
        self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True
    ) -> None:
        self.n, self.rank, self.world_size, self.seed, self.shuffle = n, rank, world_size, seed, shuffle
        self.epoch = 0
        self.position = 0

    def _epoch_indices(self) -> list[int]:
        if self.shuffle:
            order = torch.randperm(
                self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)
            ).tolist()
        else:
            order = list(range(self.n))
        total = -(-self.n // self.world_size) * self.world_size
        order += order[: total - self.n]
        return order[self.rank :: self.world_size]

    def take(self, count: int) -> tuple[list[int], int]:
        """The next ``count`` indices of this rank and the epoch of the first of them."""
        out: list[int] = []
        epoch = self.epoch
        while len(out) < count:
            indices = self._epoch_indices()
            need = count - len(out)
            out += indices[self.position : self.position + need]
            self.position += need
            if self.position >= len(indices):
                self.epoch += 1
                self.position = 0
        return out, epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "n": self.n, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n or state["world_size"] != self.world_size:
            raise ValueError(
                f"data position was saved for {state['n']} samples on {state['world_size']} ranks, "
                f"this run has {self.n} on {self.world_size}; resume with the same data and world size"
            )
        self.epoch, self.position = state["epoch"], state["position"]
