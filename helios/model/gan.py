"""GAN discriminator heads on the fake score's DiT features (paper §3.4.2, Adversarial Post-Training).

As the reference code that trained Helios-Distilled: one head per hooked transformer block (Table 2 /
reference: blocks 5, 15, 25, 35, clamped to the model's depth) on the noisy tokens laid out as a
[B, D, T, h, w] grid, plus one head on the model's output (``output_head``); each head is six 3D convs
with GroupNorm + SiLU, global pooling and a linear layer to one logit. :meth:`GanHeads.logits` returns
one logit per head, [B, heads]; the GAN losses average over heads and samples (the reference averages
the loss per head, not the logits). The heads are trainable; the fake score's base is not changed by
them (forward hooks).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# (kernel, stride, padding) of the reference's Discriminator3DHead convs
_CONVS = [
    (3, (1, 1, 1), (1, 1, 1)),
    (4, (2, 2, 2), (1, 1, 1)),
    (4, (2, 2, 2), (1, 1, 1)),
    (3, (2, 1, 1), (1, 1, 1)),
    (3, (2, 1, 1), (1, 1, 1)),
    ((1, 3, 3), (1, 1, 1), (0, 1, 1)),
]
MIN_GRID = (4, 8, 8)  # smallest (T, h, w) that leaves the last GroupNorms more than one value per group


class GanHead(nn.Module):
    """Six 3D convs (GroupNorm, SiLU), global average pooling, a linear layer: one logit per sample."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for k, (kernel, stride, padding) in enumerate(_CONVS):
            layers += [
                nn.Conv3d(in_dim if k == 0 else dim, dim, kernel, stride=stride, padding=padding),
                nn.GroupNorm(min(32, dim), dim),
                nn.SiLU(),
            ]
        self.convs = nn.Sequential(*layers)
        self.out = nn.Linear(dim, 1)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        pad = [max(0, m - s) for m, s in zip(MIN_GRID, grid.shape[2:])]
        if any(pad):  # tiny models: replicate-pad up to the heads' smallest input (no-op at real sizes)
            grid = F.pad(grid, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")
        return self.out(self.convs(grid).mean(dim=(2, 3, 4))).squeeze(-1)


class GanHeads(nn.Module):
    """Heads on ``layers`` of a ``HeliosTransformer3DModel`` with hidden size ``in_dim`` and, with
    ``out_channels``, one on its output."""

    def __init__(
        self, layers: list[int], num_blocks: int, in_dim: int, dim: int = 768, out_channels: int | None = None
    ) -> None:
        super().__init__()
        self.layers = sorted({min(max(i, 0), num_blocks - 1) for i in layers})
        self.heads = nn.ModuleDict({str(i): GanHead(in_dim, dim) for i in self.layers})
        self.output_head = GanHead(out_channels, dim) if out_channels else None

    @property
    def count(self) -> int:
        return len(self.layers) + (self.output_head is not None)

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

    def logits(
        self, store: dict[int, torch.Tensor], grid: tuple[int, int, int], output: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One logit per head, [B, heads]: the hooked blocks (``grid`` = (T, h', w') of the noisy tokens,
        the last tokens of the sequence), then the output head on the model's ``output`` [B, C, T, H, W]."""
        t, h, w = grid
        n = t * h * w
        outs = []
        for i in self.layers:
            tokens = store[i][:, -n:].float()  # [B, n, D]: the noisy context comes last
            b, _, d = tokens.shape
            outs.append(self.heads[str(i)](tokens.transpose(1, 2).reshape(b, d, t, h, w)))
        if self.output_head is not None:
            if output is None:
                raise ValueError("the output head needs the model's output")
            outs.append(self.output_head(output.float()))
        return torch.stack(outs, dim=1)
