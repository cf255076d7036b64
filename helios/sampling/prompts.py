"""Prompt schedules for interactive generation with Interactive Interpolation (§3.5, Eq. 20)."""

from __future__ import annotations

import torch


class PromptSchedule:
    """Conditioning per section: ``switches`` = [(first_section, embeds [1, L, D]), ...] in any order,
    the first at section 0; after a switch the embedding moves linearly from the previous prompt to the
    new one over ``interpolation_steps`` (M) sections: e[j] = (1 - j/(M-1)) e1 + j/(M-1) e2."""

    def __init__(self, switches: list[tuple[int, torch.Tensor]], interpolation_steps: int = 1) -> None:
        self.switches = sorted(switches, key=lambda s: s[0])
        if not self.switches or self.switches[0][0] != 0:
            raise ValueError("the first prompt must start at section 0")
        if interpolation_steps < 1:
            raise ValueError("interpolation_steps must be >= 1")
        self.m = interpolation_steps

    def __call__(self, section: int) -> torch.Tensor:
        if section < 0:
            raise ValueError(f"section {section}: sections count from 0")
        # the newest switch at or before ``section`` (the first starts at section 0)
        current = max(i for i, (start, _) in enumerate(self.switches) if start <= section)
        start, target = self.switches[current]
        if current == 0 or self.m == 1:
            return target
        j = section - start
        if j >= self.m - 1:
            return target
        lam = j / (self.m - 1)
        previous = self.switches[current - 1][1]
        return (1 - lam) * previous + lam * target


def texts_to_encode(prompts: list[str], negative_prompt: str | None) -> list[str]:
    """The texts a sampler encodes: its prompts and CFG's negative prompt (none when it is null)."""
    return sorted(set(prompts) | ({negative_prompt} if negative_prompt is not None else set()))


def unconditional_embeds(negative_prompt: str | None, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
    """CFG's unconditional input [1, L, D]: the negative prompt's embeddings from ``embeds``, or (null) zero
    embeddings of the prompts' shape: what caption dropout (the reference's "Set NULL Text") trains."""
    if negative_prompt is not None:
        return embeds[negative_prompt][None]
    return torch.zeros_like(next(iter(embeds.values())))[None]
