"""Raw videos -> latent shards: decode (decord), VAE-encode, UMT5-encode, write (paper §4.2).

Work is split into units (one output shard each, :mod:`helios.data.inputs`) that the ranks claim one at a
time (:class:`~helios.data.work_queue.WorkQueue`: a slow or dead rank delays nobody). A unit is done when
``.progress/<unit>.json`` exists (written after its shard is renamed into place), so a rerun skips finished
units and redoes an interrupted one from scratch, writing byte-identical files. Videos are decoded in loader
worker processes while the VAE encodes the previous batch. Unusable inputs are skipped with a reason; the
job never dies on one bad video. ``report.json`` (written by the rank that finishes the last unit) lists
every skipped input.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from helios.config.schema import REFERENCE_NEGATIVE_PROMPT
from helios.data.inputs import InputItem, Unit, discover_units
from helios.data.shards import encode_sample, npy_bytes, trim_embeds, write_shard
from helios.data.video import VideoDecodeError, decode_clip
from helios.data.work_queue import WorkQueue
from helios.model.encoders import encode_prompts, encode_sections, encode_video, video_frames_for

log = logging.getLogger(__name__)

PROGRESS_DIR = ".progress"
EMPTY_PROMPT_FILE = "empty_prompt_embeds.npy"
NEGATIVE_PROMPT_FILE = "negative_prompt_embeds.npy"


@dataclass
class ClipSpec:
    """What a clip becomes (see :class:`~helios.config.schema.ClipConfig`)."""

    latent_frames: int
    height: int
    width: int
    fps: float | None
    format: str = "sections"
    section_latents: int = 3
    posterior: str = "sample"

    def __post_init__(self) -> None:
        if self.format == "sections" and (
            self.latent_frames % self.section_latents or not self.latent_frames
        ):
            raise ValueError(
                f"latent_frames={self.latent_frames} is not a whole number of sections of "
                f"{self.section_latents} latent frames"
            )

    @classmethod
    def from_config(cls, cfg) -> ClipSpec:
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})

    @property
    def video_frames(self) -> int:
        """Pixel frames a clip takes: whole sections of ``4(n-1)+1`` frames, or ``4(L-1)+1``."""
        if self.format == "sections":
            return self.latent_frames // self.section_latents * video_frames_for(self.section_latents)
        return video_frames_for(self.latent_frames)

    def latent_meta(self) -> dict:
        """Recorded with every sample: how its latents were made."""
        if self.format == "sections":
            return {"latent_format": "sections", "section_latents": self.section_latents}
        return {"latent_format": "clip"}

    def encode(self, vae, video: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:

        generator = generator if self.posterior == "sample" else None
        if self.format == "sections":
            return encode_sections(vae, video, self.section_latents, generator)
        return encode_video(vae, video, generator)


class PromptCache:
    """UMT5 embeddings by caption: repeated captions are encoded once."""

    def __init__(self, tokenizer, encoder, max_sequence_length: int, device: torch.device) -> None:
        self.tokenizer, self.encoder = tokenizer, encoder
        self.max_sequence_length, self.device = max_sequence_length, device
        self.cache: dict[str, torch.Tensor] = {}
        self.hits = 0

    def encode(self, captions: list[str]) -> list[torch.Tensor]:

        todo = sorted({c for c in captions if c not in self.cache})
        self.hits += len(captions) - len(todo)
        if todo:
            embeds = encode_prompts(self.tokenizer, self.encoder, todo, self.max_sequence_length, self.device)
            for caption, emb in zip(todo, embeds):
                self.cache[caption] = trim_embeds(emb.float().cpu())
        return [self.cache[c] for c in captions]


def _decode(item: InputItem, spec: ClipSpec) -> tuple[torch.Tensor | None, float, str | None]:
    if item.error:
        return None, 0.0, item.error
    try:
        clip, fps = decode_clip(
            item.open_video(),
            spec.video_frames,
            spec.height,
            spec.width,
            spec.fps,
            item.cut,
            item.crop,
        )
        return clip, fps, None
    except VideoDecodeError as err:
        return None, 0.0, str(err)
    except Exception as err:  # a broken container can surface as any decoder error: skip, never die
        return None, 0.0, f"decode failed: {type(err).__name__}: {err}".splitlines()[0]


class _Decoding(torch.utils.data.Dataset):
    """A unit's inputs, decoded in loader worker processes (which inherit the items by fork)."""

    def __init__(self, items: list[InputItem], spec: ClipSpec) -> None:
        self.items, self.spec = items, spec

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return (i, *_decode(self.items[i], self.spec))


def decoded(items: list[InputItem], spec: ClipSpec, workers: int):
    """(item, clip, fps, error) for every input in order, decoded by ``workers`` processes (0: here)."""
    if workers == 0:
        for item in items:
            yield (item, *_decode(item, spec))
        return
    workers = min(workers, max(1, len(items)))
    loader = torch.utils.data.DataLoader(
        _Decoding(items, spec), batch_size=None, num_workers=workers, prefetch_factor=4
    )
    for i, clip, fps, error in loader:
        yield items[i], clip, fps, error


@torch.no_grad()
def encode_unit(
    unit: Unit,
    out_dir: Path,
    spec: ClipSpec,
    vae,
    prompts: PromptCache,
    batch_size: int,
    device: torch.device,
    workers: int = 0,
) -> dict:
    """Encode one unit into ``out_dir/<unit>.tar``; returns its progress record. Posterior samples
    are drawn from a generator seeded by the unit's name, so a rerun writes the same bytes."""
    samples, skipped, pending = [], [], []
    generator = torch.Generator().manual_seed(zlib.crc32(unit.name.encode()))

    def flush() -> None:
        if not pending:
            return
        latents = spec.encode(vae, torch.stack([clip for _, clip, _ in pending]).to(device), generator)
        embeds = prompts.encode([item.caption for item, _, _ in pending])
        for (item, _, fps), lat, emb in zip(pending, latents, embeds):
            meta = {
                **item.meta,
                "caption": item.caption,
                "fps": fps,
                "source": item.name,
                "size": [spec.height, spec.width],
                **spec.latent_meta(),
            }
            samples.append(encode_sample(f"{unit.name}-{len(samples):05d}", lat.cpu(), emb, meta))
        pending.clear()

    for item, clip, fps, error in decoded(list(unit.items()), spec, workers):
        if error:
            skipped.append({"input": item.name, "reason": error})
            continue
        pending.append((item, clip, fps))
        if len(pending) >= batch_size:
            flush()
    flush()
    if samples:
        write_shard(out_dir / f"{unit.name}.tar", samples)
    return {"unit": unit.name, "written": len(samples), "skipped": skipped}


def prepare(
    input_path: str | Path,
    out_dir: str | Path,
    spec: ClipSpec,
    vae,
    tokenizer,
    text_encoder,
    *,
    max_sequence_length: int,
    samples_per_shard: int = 64,
    batch_size: int = 4,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    negative_prompt: str = REFERENCE_NEGATIVE_PROMPT,
    workers: int = 0,
) -> dict:
    """Claim and encode units until none is left; return this rank's summary. Rank 0 also writes the
    embeddings of the empty prompt and of ``negative_prompt`` (CFG's unconditional branches) once.
    ``workers``: decoding processes."""
    device = device or torch.device("cpu")
    out = Path(out_dir)
    progress_dir = out / PROGRESS_DIR
    progress_dir.mkdir(parents=True, exist_ok=True)
    units = {u.name: u for u in discover_units(input_path, samples_per_shard)}
    queue = WorkQueue(progress_dir, list(units), rank, world_size)
    check_settings(out, prepare_settings(spec, vae, text_encoder, max_sequence_length, negative_prompt), rank)
    prompts = PromptCache(tokenizer, text_encoder, max_sequence_length, device)
    for name, text in ((EMPTY_PROMPT_FILE, ""), (NEGATIVE_PROMPT_FILE, negative_prompt)):
        if rank == 0 and not (out / name).exists():  # unconditional embeddings for CFG
            tmp = out / (name + ".tmp")
            tmp.write_bytes(npy_bytes(prompts.encode([text])[0].numpy()))
            os.replace(tmp, out / name)
    left = len(queue.remaining())
    log.info("rank %d: %d of %d units left to do, claimed one at a time", rank, left, len(units))
    t0, clips, n = time.monotonic(), 0, 0
    for name in queue.claims():
        record = encode_unit(units[name], out, spec, vae, prompts, batch_size, device, workers)
        queue.finish(name, record)
        n += 1
        clips += record["written"] + len(record["skipped"])
        log.info(
            "rank %d: %s done (%d so far, %d left) %d written %d skipped | %.2f clips/s",
            rank,
            name,
            n,
            len(queue.remaining()),
            record["written"],
            len(record["skipped"]),
            clips / max(time.monotonic() - t0, 1e-9),
        )
    elapsed = time.monotonic() - t0
    return {
        "units": len(units),
        "done_now": n,
        "left": len(queue.remaining()),
        "clips_per_s": clips / elapsed if n else 0.0,
        "prompt_cache_hits": prompts.hits,
    }


SETTINGS_FILE = "prepare.json"


def prepare_settings(
    spec: ClipSpec, vae, text_encoder, max_sequence_length: int, negative_prompt: str
) -> dict:
    """What the shards of a folder depend on: clip extraction, the VAE's latent space, the text encoder."""
    return {
        "clip": dataclasses.asdict(spec),
        "vae": {k: vae.config.get(k) for k in ("z_dim", "base_dim", "latents_mean", "latents_std")},
        "text_encoder": {
            k: getattr(text_encoder.config, k, None) for k in ("d_model", "vocab_size", "num_layers")
        },
        "max_sequence_length": max_sequence_length,
        "negative_prompt": negative_prompt,
    }


def check_settings(out: Path, settings: dict, rank: int) -> None:
    """A folder holds shards of one setting: a rerun with other settings is refused (it would mix latent
    shapes or spaces), the first run records them in ``prepare.json``."""
    path = out / SETTINGS_FILE
    if path.exists():
        old = json.loads(path.read_text())
        new = json.loads(json.dumps(settings))  # the same JSON types as the recorded ones
        diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if diff:
            raise ValueError(
                f"output={out} holds shards written with other settings ({', '.join(diff)}: "
                f"{[old.get(k) for k in diff]} there, {[new.get(k) for k in diff]} now); write into a new "
                "folder, or rerun with the same settings to continue"
            )
    elif rank == 0:
        tmp = path.with_name(SETTINGS_FILE + ".tmp")
        tmp.write_text(json.dumps(settings, indent=2))
        os.replace(tmp, path)


def write_report(out_dir: str | Path) -> dict:
    """Merge the per-unit progress records into ``report.json``."""
    out = Path(out_dir)
    records = [json.loads(p.read_text()) for p in sorted((out / PROGRESS_DIR).glob("*.json"))]
    skipped = [s for r in records for s in r["skipped"]]
    report = {
        "units": len(records),
        "shards": sorted(p.name for p in out.glob("*.tar")),
        "written": sum(r["written"] for r in records),
        "skipped": len(skipped),
        "skipped_inputs": skipped,
    }
    tmp = out / f"report.json.tmp-{os.getpid()}"  # ranks finishing together may both write it
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    os.replace(tmp, out / "report.json")
    return report


def load_empty_prompt(out_dir: str | Path, name: str = EMPTY_PROMPT_FILE) -> torch.Tensor | None:
    """A prompt embedding written by :func:`prepare` (the empty prompt by default), or None."""
    path = Path(out_dir) / name
    return torch.from_numpy(np.load(path)) if path.exists() else None
