"""GAN discriminator heads on the fake score's DiT features (paper §3.4.2, Adversarial Post-Training).

Forward hooks capture the hidden states of chosen transformer blocks (Table 2: 5/15/25/35/39, clamped
to the model's depth); each head maps the noisy-token part, laid out as a [B, D, T, h, w] grid, through
a strided 3D conv, GroupNorm, SiLU, global pooling and a linear layer to one logit; the logits of the
heads are averaged. The heads are trainable; the fake score's base is not changed by them (hooks).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class GanHead(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_dim, dim, kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.norm = nn.GroupNorm(min(32, dim), dim)
        self.out = nn.Linear(dim, 1)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.norm(self.conv(grid)))
        return self.out(h.mean(dim=(2, 3, 4))).squeeze(-1)


class GanHeads(nn.Module):
    """Heads on ``layers`` of a ``HeliosTransformer3DModel`` with hidden size ``in_dim``."""

    def __init__(self, layers: list[int], num_blocks: int, in_dim: int, dim: int = 768) -> None:
        super().__init__()
        self.layers = sorted({min(max(i, 0), num_blocks - 1) for i in layers})
        self.heads = nn.ModuleDict({str(i): GanHead(in_dim, dim) for i in self.layers})

    @contextmanager
    def capture(self, transformer: nn.Module):
        """Within the block, forward passes of ``transformer`` record the hooked blocks' outputs."""
        store: dict[int, torch.Tensor] = {}
        handles = [
            transformer.blocks[i].register_forward_hook(lambda mod, args, out, i=i: store.__setitem__(i, out))
            for i in self.layers
        ]
        try:
            yield store
        finally:
            for h in handles:
                h.remove()

    def logits(self, store: dict[int, torch.Tensor], grid: tuple[int, int, int]) -> torch.Tensor:
        """Mean logit over heads; ``grid`` = (T, h', w') of the noisy tokens (the last tokens)."""
        t, h, w = grid
        n = t * h * w
        outs = []
        for i in self.layers:
            tokens = store[i][:, -n:].float()  # [B, n, D]: the noisy context comes last
            b, _, d = tokens.shape
            outs.append(self.heads[str(i)](tokens.transpose(1, 2).reshape(b, d, t, h, w)))
        return torch.stack(outs).mean(0)
