"""The ODE-pair shard formats of Staged ODE Init (paper §3.4.2): written by ``helios.ode_pairs``, read by
stage 3's ODE-init phase.

* trajectory (``source=rollout``, the reference's): one sample per teacher video: the prompt embedding and,
  per section k and pyramid stage s, the teacher's states at the distilled timesteps plus the stage's end
  (``s<k>_stage<s>_states`` [n + 1, C, T, h, w]) and those timesteps (``s<k>_stage<s>_t`` [n]).
* endpoints (``source=clips``): one sample per real clip: the conditioning (history, anchor, prompt
  embedding), the initial noise and the start and end state of every pyramid stage (``stage<k>_start/end``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from helios.core.history import HistoryLayout
from helios.data.dataset import drop_caption
from helios.data.shards import ShardIndex, list_shards, npy_bytes

ODE_MEMBERS = ("noise.npy", "prompt_embeds.npy", "json")  # members every endpoints pair has
TRAJECTORY_MEMBERS = ("prompt_embeds.npy", "json")  # members every trajectory sample has


class TensorDict(dict):
    """A batch of named tensors that moves as one (``.to(device)``)."""

    def to(self, device: torch.device) -> TensorDict:
        return TensorDict({k: v.to(device, non_blocking=True) for k, v in self.items()})


def encode_pair(key: str, arrays: dict[str, torch.Tensor], meta: dict) -> dict:
    sample = {"__key__": key, "json": json.dumps(meta, sort_keys=True).encode()}
    sample.update({f"{k}.npy": npy_bytes(v.detach().float().cpu().numpy()) for k, v in arrays.items()})
    return sample


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The random stream of one (sample, epoch): a resumed run draws the same."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_033 + index)


def padded_prompt(embeds: torch.Tensor, max_len: int) -> torch.Tensor:
    """Stored prompt embeddings cut or zero-padded to ``max_len`` tokens."""
    out = torch.zeros(max_len, embeds.shape[-1])
    out[: min(max_len, embeds.shape[0])] = embeds[:max_len]
    return out


class OdePairDataset(torch.utils.data.Dataset):
    """ODE pairs written by ``helios.ode_pairs`` (same batching interface as the clip dataset)."""

    def __init__(
        self,
        path: str | Path,
        stages: int,
        max_sequence_length: int,
        seed: int = 0,
        caption_dropout: float = 0.0,
    ) -> None:
        self.index = ShardIndex(list_shards(path), required=ODE_MEMBERS)
        self.stages, self.max_len = stages, max_sequence_length
        self.seed, self.caption_dropout = seed, caption_dropout
        self.eligible = list(range(len(self.index)))
        self.buckets = {(0, 0): self.eligible}

    def __len__(self) -> int:
        return len(self.eligible)

    def latent_hw(self) -> tuple[int, int]:
        return tuple(self[(0, 0)]["history"].shape[-2:])

    def __getitem__(self, item):
        i, epoch = item
        read = lambda name: self.index.read_array(i, name + ".npy")  # noqa: E731
        out = {"history": read("history"), "anchor": read("anchor")}
        prompt = padded_prompt(read("prompt_embeds"), self.max_len)
        out["prompt_embeds"] = drop_caption(prompt, self.caption_dropout, item_generator(self.seed, epoch, i))
        for k in range(self.stages):
            out[f"stage{k}_start"], out[f"stage{k}_end"] = read(f"stage{k}_start"), read(f"stage{k}_end")
        return out

    @staticmethod
    def collate(samples: list[dict]) -> TensorDict:
        return TensorDict({k: torch.stack([s[k] for s in samples]) for k in samples[0]})


class OdeTrajectoryDataset(torch.utils.data.Dataset):
    """Trajectory samples (the reference's pairs) as training points: per (sample, epoch) one section k of
    the teacher's video, drawn uniformly, conditioned as the teacher sampled it (history: the teacher's
    earlier sections, the anchor its first latent or, as the shard records, its second section's), and per
    pyramid stage one of the kept states (``stage<s>_x``, its timestep ``stage<s>_t``) with the stage's end
    (``stage<s>_end``)."""

    def __init__(
        self,
        path: str | Path,
        stages: int,
        max_sequence_length: int,
        layout: HistoryLayout,
        seed: int = 0,
        caption_dropout: float = 0.0,
    ) -> None:
        self.index = ShardIndex(list_shards(path), required=TRAJECTORY_MEMBERS)
        self.stages, self.max_len, self.layout, self.seed = stages, max_sequence_length, layout, seed
        self.caption_dropout = caption_dropout
        self.eligible = list(range(len(self.index)))
        self.buckets = {(0, 0): self.eligible}

    def __len__(self) -> int:
        return len(self.eligible)

    def meta(self, i: int) -> dict:
        return json.loads(self.index.read_member(i, "json"))

    def latent_hw(self) -> tuple[int, int]:
        return tuple(self.meta(0)["latent_shape"][-2:])

    def __getitem__(self, item):
        i, epoch = item
        read = lambda name: self.index.read_array(i, name + ".npy")  # noqa: E731
        meta = self.meta(i)
        gen = item_generator(self.seed, epoch, i)
        k = int(torch.randint(meta["sections"], (1,), generator=gen))
        last = self.stages - 1
        finals = [read(f"s{j}_stage{last}_states")[-1] for j in range(k)]  # the sections before k
        c, _, h, w = meta["latent_shape"]
        history = torch.zeros(c, self.layout.num_history, h, w)
        if finals:
            video = torch.cat(finals, dim=1)[:, -self.layout.num_history :]
            history[:, self.layout.num_history - video.shape[1] :] = video
        # the teacher's anchor: its first section's first latent, or from the third section on its second
        # section's (``anchor_section`` 1: sampled with ``anchor_from_second_section``)
        anchor_section = meta.get("anchor_section", 0) if k > 1 else 0
        anchor = finals[anchor_section][:, :1] if finals else torch.zeros(c, 1, h, w)
        out = {"history": history, "anchor": anchor}
        for s in range(self.stages):
            states, timesteps = read(f"s{k}_stage{s}_states"), read(f"s{k}_stage{s}_t")
            j = int(torch.randint(len(timesteps), (1,), generator=gen))
            out[f"stage{s}_x"], out[f"stage{s}_t"], out[f"stage{s}_end"] = states[j], timesteps[j], states[-1]
        prompt = padded_prompt(read("prompt_embeds"), self.max_len)
        out["prompt_embeds"] = drop_caption(prompt, self.caption_dropout, gen)  # after the draws above
        return out

    @staticmethod
    def collate(samples: list[dict]) -> TensorDict:
        return TensorDict({k: torch.stack([s[k] for s in samples]) for k in samples[0]})


def ode_pair_dataset(
    path: str | Path,
    stages: int,
    max_sequence_length: int,
    layout: HistoryLayout,
    seed: int = 0,
    caption_dropout: float = 0.0,
):
    """The dataset of an ``helios.ode_pairs`` output, by the format it was written in (``caption_dropout``:
    as the clip dataset's, :func:`~helios.data.dataset.drop_caption`)."""
    report = Path(path) / "report.json"
    source = json.loads(report.read_text()).get("source", "clips") if report.exists() else "clips"
    if source == "rollout":
        return OdeTrajectoryDataset(path, stages, max_sequence_length, layout, seed, caption_dropout)
    return OdePairDataset(path, stages, max_sequence_length, seed, caption_dropout)
