"""The ODE-pair shard format of Staged ODE Init (paper §3.4.2): written by ``helios.ode_pairs``, read by
stage 3's ODE-init phase. Each sample: the conditioning (history, anchor, prompt embedding), the initial
noise and the start and end state of every pyramid stage (``stage<k>_start/end``), as ``.npy`` members."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from helios.data.shards import ShardIndex, list_shards, npy_bytes

ODE_MEMBERS = ("noise.npy", "prompt_embeds.npy", "json")  # members every pair has


class TensorDict(dict):
    """A batch of named tensors that moves as one (``.to(device)``)."""

    def to(self, device: torch.device) -> TensorDict:
        return TensorDict({k: v.to(device, non_blocking=True) for k, v in self.items()})


def encode_pair(key: str, arrays: dict[str, torch.Tensor], meta: dict) -> dict:
    sample = {"__key__": key, "json": json.dumps(meta, sort_keys=True).encode()}
    sample.update({f"{k}.npy": npy_bytes(v.detach().float().cpu().numpy()) for k, v in arrays.items()})
    return sample


class OdePairDataset(torch.utils.data.Dataset):
    """ODE pairs written by ``helios.ode_pairs`` (same batching interface as the clip dataset)."""

    def __init__(self, path: str | Path, stages: int, max_sequence_length: int) -> None:
        self.index = ShardIndex(list_shards(path), required=ODE_MEMBERS)
        self.stages, self.max_len = stages, max_sequence_length
        self.eligible = list(range(len(self.index)))
        self.buckets = {(0, 0): self.eligible}

    def __len__(self) -> int:
        return len(self.eligible)

    def latent_hw(self) -> tuple[int, int]:
        return tuple(self[(0, 0)]["history"].shape[-2:])

    def __getitem__(self, item):
        i, _ = item
        read = lambda name: self.index.read_array(i, name + ".npy")  # noqa: E731
        out = {"history": read("history"), "anchor": read("anchor")}
        emb = read("prompt_embeds")[: self.max_len]
        out["prompt_embeds"] = torch.zeros(self.max_len, emb.shape[-1])
        out["prompt_embeds"][: emb.shape[0]] = emb
        for k in range(self.stages):
            out[f"stage{k}_start"], out[f"stage{k}_end"] = read(f"stage{k}_start"), read(f"stage{k}_end")
        return out

    @staticmethod
    def collate(samples: list[dict]) -> TensorDict:
        return TensorDict({k: torch.stack([s[k] for s in samples]) for k in samples[0]})
