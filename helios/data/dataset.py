"""Training clips from latent shards: random access, shape buckets, per-rank-disjoint batches and a
data position that is part of the checkpoint (exact resume, no repeated or skipped data)."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from helios.config.schema import TrainConfig
from helios.data.shards import CorruptSample, ShardIndex

log = logging.getLogger(__name__)


@dataclass
class ClipBatch:
    """One micro-batch: clip latents [B, C, H + W, h, w] (history, then the noisy window's clean
    latents), the video's first latent [B, C, 1, h, w] (zero when the window is the video's first
    section), prompt embeddings [B, S, D], the window's RoPE offset [B] (latent frames; used with
    absolute indices only) and how many of the newest history frames are real video [B] (the rest is
    zero padding before the video start)."""

    latents: torch.Tensor
    first_latent: torch.Tensor
    prompt_embeds: torch.Tensor
    offset: torch.Tensor
    history_frames: torch.Tensor
    skipped: int = 0  # corrupt samples replaced in this batch (data.on_error=skip)

    FIELDS = ("latents", "first_latent", "prompt_embeds", "offset", "history_frames")

    def to(self, device: torch.device) -> ClipBatch:
        moved = (getattr(self, k).to(device, non_blocking=True) for k in self.FIELDS)
        return ClipBatch(*moved, skipped=self.skipped)

    def pin_memory(self) -> ClipBatch:
        """Page-locked copies (the DataLoader's ``pin_memory``): the copy to the GPU runs asynchronously."""
        return ClipBatch(*(getattr(self, k).pin_memory() for k in self.FIELDS), skipped=self.skipped)


def _seed(*parts: int) -> int:
    return zlib.crc32(",".join(map(str, parts)).encode())


def drop_caption(embeds: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """``embeds`` zeroed with probability ``p`` (the reference's caption dropout: the "NULL text" CFG's
    unconditional branch is trained on); no draw when ``p`` is 0, so the other draws keep their stream."""
    if p and float(torch.rand(1, generator=generator)) < p:
        return torch.zeros_like(embeds)
    return embeds


def section_window(
    latents: torch.Tensor, section: int, num_history: int, window: int
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The reference's section-aligned training window of a video in the section format ([C, S*n, h, w],
    ``n = window``): the clean latents of ``section`` preceded by the ``num_history`` latents before
    it, zero-padded before the video start. Returns (clip [C, H + n, h, w], first latent [C, 1, h, w],
    zero for section 0 as in the reference, RoPE offset, real history frames)."""
    c, _, h, w = latents.shape
    padded = torch.cat([latents.new_zeros(c, num_history, h, w), latents], dim=1)
    start = section * window
    clip = padded[:, start : start + num_history + window]
    first = latents[:, :1] if section > 0 else torch.zeros_like(latents[:, :1])
    return clip, first, max(0, start - num_history), min(num_history, start)


def random_section_window(
    latents: torch.Tensor, num_history: int, window: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """:func:`section_window` of a section drawn uniformly from the video's whole sections."""
    section = int(torch.randint(latents.shape[1] // window, (1,), generator=generator))
    return section_window(latents, section, num_history, window)


class LatentClipDataset(torch.utils.data.Dataset):
    """Item ``(i, epoch)`` is one training window of sample ``i``, drawn deterministically from seed,
    epoch and index (a resumed run reads the same windows):

    - ``latent_format="sections"`` (the released checkpoints'): a section drawn uniformly from the
      video's sections (section 0, the video start, included), with its history zero-padded
      (:func:`section_window`);
    - ``"clip"``: ``num_history + window`` latent frames at a random start of a whole-clip latent.

    Shards must hold the format asked for (recorded per sample by ``helios.prepare``). A share
    ``caption_dropout`` of the items have their prompt embeddings zeroed (:func:`drop_caption`)."""

    def __init__(
        self,
        path: str | Path,
        num_history: int,
        window: int,
        max_sequence_length: int,
        *,
        latent_format: str = "sections",
        seed: int = 0,
        on_error: str = "raise",
        caption_dropout: float = 0.0,
    ) -> None:
        self.index = ShardIndex.open(path)
        self.caption_dropout = caption_dropout
        self.on_error = on_error
        self.num_history, self.window, self.latent_format = num_history, window, latent_format
        self.clip_frames = num_history + window
        self.max_sequence_length = max_sequence_length
        self.seed = seed
        self._check_format(path)
        need = window if latent_format == "sections" else self.clip_frames
        self.eligible = [i for i in range(len(self.index)) if self.index.latent_shape(i)[1] >= need]
        self.skipped_too_short = len(self.index) - len(self.eligible)
        if not self.eligible:
            raise ValueError(
                f"no sample in {path} has the {need} latent frames a training clip needs "
                f"({self.skipped_too_short} too short); prepare longer clips or reduce history.sizes / window"
            )
        self.buckets: dict[tuple[int, int], list[int]] = {}
        for i in self.eligible:
            _, _, h, w = self.index.latent_shape(i)
            self.buckets.setdefault((h, w), []).append(i)

    def _check_format(self, path: str | Path) -> None:
        """Every sample was encoded in this run's format (sections of one window each)."""
        formats = {self.index.latent_format(i) for i in range(len(self.index))}
        for fmt, section_latents in sorted(formats, key=str):
            if fmt != self.latent_format:
                raise ValueError(
                    f"data.path={path} holds {fmt}-format latents (helios.prepare clip.format={fmt}) but "
                    f"data.latent_format={self.latent_format}: train with data.latent_format={fmt}, or "
                    f"prepare the videos again with clip.format={self.latent_format}"
                )
            if fmt == "sections" and section_latents != self.window:
                raise ValueError(
                    f"data.path={path} holds sections of {section_latents} latent frames, but "
                    f"history.window={self.window}: section-aligned training needs one section per window "
                    f"(prepare with clip.section_latents={self.window}, or train with "
                    f"history.window={section_latents})"
                )

    def __len__(self) -> int:
        return len(self.eligible)

    def latent_hw(self) -> tuple[int, int]:
        """The most common latent (h, w) bucket."""
        return max(self.buckets, key=lambda k: len(self.buckets[k]))

    @staticmethod
    def collate(samples: list[dict[str, torch.Tensor]]) -> ClipBatch:
        stacked = (torch.stack([s[k] for s in samples]) for k in ClipBatch.FIELDS)
        return ClipBatch(*stacked, skipped=sum(s.get("skipped", 0) for s in samples))

    def _read(self, index: int) -> tuple[dict, int]:
        """Sample ``index``; with ``on_error=skip`` a corrupt one is replaced by the next readable sample
        of its shape bucket (deterministic, so a resumed run reads the same), counted."""
        try:
            return self.index.read(index), 0
        except CorruptSample as err:
            if self.on_error != "skip":
                raise CorruptSample(
                    f"{err} (data.on_error=skip skips such samples and counts them)"
                ) from None
            log.warning("skipping a corrupt sample: %s", err)
        shape = self.index.latent_shape(index)[2:]
        bucket = self.buckets[shape]
        start = bucket.index(index)
        for k in range(1, len(bucket)):
            try:
                return self.index.read(bucket[(start + k) % len(bucket)]), 1
            except CorruptSample as err:
                log.warning("skipping a corrupt sample: %s", err)
        raise CorruptSample(f"every sample of shape {shape} is corrupt")

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, epoch = item
        sample, skipped = self._read(index)
        latents = sample["latents"]
        gen = torch.Generator().manual_seed(_seed(self.seed, epoch, index))
        if self.latent_format == "sections":
            clip, first, offset, real = random_section_window(latents, self.num_history, self.window, gen)
        else:
            spare = latents.shape[1] - self.clip_frames
            offset = int(torch.randint(spare + 1, (1,), generator=gen)) if spare > 0 else 0
            clip, first, real = (
                latents[:, offset : offset + self.clip_frames],
                latents[:, :1],
                self.num_history,
            )
        embeds = sample["prompt_embeds"][: self.max_sequence_length]
        padded = torch.zeros(self.max_sequence_length, embeds.shape[-1])
        padded[: embeds.shape[0]] = embeds
        return {
            "latents": clip,
            "first_latent": first,
            "prompt_embeds": drop_caption(padded, self.caption_dropout, gen),
            "offset": torch.tensor(offset),
            "history_frames": torch.tensor(real),
            "skipped": skipped,
        }


def prepared_shards(path: str | Path) -> Path:
    """``data.path``: a directory of latent shards written by ``helios.prepare``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"data.path={path} does not exist; write shards with `python -m helios.prepare input=... "
            f"output={path}` or use data=synthetic"
        )
    return path


def training_dataset(path: str | Path, cfg: TrainConfig) -> LatentClipDataset:
    """The training windows of a run: its history layout, latent format, seed and error policy."""
    return LatentClipDataset(
        path,
        sum(cfg.history.sizes),
        cfg.history.window,
        cfg.model.text_encoder.max_sequence_length,
        latent_format=cfg.data.latent_format,
        seed=cfg.seed,
        on_error=cfg.data.on_error,
        caption_dropout=cfg.data.caption_dropout,
    )


class BucketBatchSampler:
    """Batches of one shape bucket, disjoint across ranks, in an order that does not depend on the world size.

    Epoch ``e``: permute the eligible samples with ``seed + e`` and fill per-bucket batches in that order
    (a partial batch left at the end of a bucket is dropped; every epoch has the same number of batches).
    The epochs, one after the other, form one global stream of batches; with W ranks, rank r takes the
    stream's batches r, r + W, r + 2W, ... So after a step every rank has taken the same number of batches,
    and the global position (batches of the stream consumed by all ranks) is what the checkpoint keeps: a run
    resumed on another world size with the same global batch continues at exactly that position, no batch
    repeated or skipped.
    """

    def __init__(
        self,
        dataset: LatentClipDataset,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.dataset, self.batch_size = dataset, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.position = 0  # batches this rank has consumed (the same on every rank at a step boundary)
        self._cache: tuple[int, list[list[int]]] | None = None
        if not self.epoch_batches(0):
            raise ValueError(
                f"{len(dataset.eligible)} clips make no batch of {batch_size} in any shape bucket; lower "
                "trainer.batch_size or add data"
            )

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of epoch ``epoch``, in stream order (all ranks')."""
        if self._cache and self._cache[0] == epoch:
            return self._cache[1]
        order = list(self.dataset.eligible)
        if self.shuffle:
            perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(self.seed + epoch))
            order = [order[i] for i in perm.tolist()]
        shape_of = {i: key for key, members in self.dataset.buckets.items() for i in members}
        filling: dict[tuple[int, int], list[int]] = {}
        batches: list[list[int]] = []
        for i in order:
            bucket = filling.setdefault(shape_of[i], [])
            bucket.append(i)
            if len(bucket) == self.batch_size:
                batches.append(bucket)
                filling[shape_of[i]] = []
        self._cache = (epoch, batches)
        return batches

    def stream_batch(self, index: int) -> tuple[int, list[int]]:
        """(epoch, batch) at position ``index`` of the global stream."""
        per_epoch = len(self.epoch_batches(0))
        epoch, within = divmod(index, per_epoch)
        return epoch, self.epoch_batches(epoch)[within]

    @property
    def epoch(self) -> int:
        """The epoch of this rank's next batch."""
        return (self.position * self.world_size + self.rank) // len(self.epoch_batches(0))

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        """Infinite: each batch is a list of (index, epoch, position after this batch)."""
        position = self.position
        while True:
            epoch, batch = self.stream_batch(position * self.world_size + self.rank)
            position += 1
            yield [(i, epoch, position) for i in batch]

    def state_dict(self) -> dict:
        return {
            "consumed": self.position * self.world_size,
            "world_size": self.world_size,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        """The position of a checkpoint, on any world size that divides the global batches consumed (a
        resume that keeps the global batch always does)."""
        consumed = state.get("consumed")
        if consumed is None:  # written before the global stream: (epoch, position) of one world size
            per_epoch = len(self.epoch_batches(0)) // state["world_size"] * state["world_size"]
            consumed = state["epoch"] * per_epoch + state["position"] * state["world_size"]
        if consumed % self.world_size:
            raise ValueError(
                f"the checkpoint's data position ({consumed} batches of all ranks) does not divide into "
                f"{self.world_size} ranks; resume on a world size that keeps the global batch"
            )
        self.position = consumed // self.world_size


class _Collate:
    """Stacks a batch with the dataset's own ``collate`` and passes the position along."""

    def __init__(self, collate) -> None:
        self.collate = collate

    def __call__(self, items: list[tuple[dict[str, torch.Tensor], tuple[int, int]]]):
        return self.collate([s for s, _ in items]), items[-1][1]


class _WithPosition(torch.utils.data.Dataset):
    def __init__(self, dataset: LatentClipDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int, int]):
        index, epoch, position_after = item
        return self.dataset[(index, epoch)], position_after


def make_loader(
    dataset: LatentClipDataset, sampler: BucketBatchSampler, num_workers: int, pin_memory: bool = False
) -> Iterator:
    """Yields (ClipBatch, the sampler's position after this batch), prefetching in ``num_workers`` processes
    (``pin_memory``: batches page-locked for asynchronous copies to the GPU).

    The caller records the position of the batches it has *consumed*; workers may run ahead.
    """
    loader = torch.utils.data.DataLoader(
        _WithPosition(dataset),
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=_Collate(dataset.collate),
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
    )
    return iter(loader)
