"""Frame-Aware Corrupt (paper §3.2.3): simulate drifted history during training.

Applied to the valid history latents only; the first-frame anchor is never corrupted.
"""

from __future__ import annotations

from enum import IntEnum

import torch
import torch.nn.functional as F

from helios.config.schema import CorruptConfig


class Branch(IntEnum):
    EXPOSURE = 0
    NOISE = 1
    DOWNSAMPLE = 2
    CLEAN = 3


def _uniform(n: int, lo_hi: list[float], generator: torch.Generator) -> torch.Tensor:
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def draw_branches(shape: tuple[int, ...], cfg: CorruptConfig, generator: torch.Generator) -> torch.Tensor:
    """Branch per entry with probabilities (p_exposure, p_noise, p_downsample, p_clean)."""
    probs = torch.tensor([cfg.p_exposure, cfg.p_noise, cfg.p_downsample, cfg.p_clean], dtype=torch.float64)
    flat = torch.multinomial(probs, int(torch.tensor(shape).prod()), replacement=True, generator=generator)
    return flat.view(shape)


def down_up(frame: torch.Tensor, reduction: float) -> torch.Tensor:
    """Bilinear (anti-aliased) downsample by ``1 - reduction`` then upsample back. frame: [C, h, w]."""
    h, w = frame.shape[-2:]
    size = (max(1, round(h * (1.0 - reduction))), max(1, round(w * (1.0 - reduction))))
    if size == (h, w):
        return frame
    x = frame.unsqueeze(0).float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x[0].to(frame.dtype)


def frame_aware_corrupt(
    history: torch.Tensor,
    valid: torch.Tensor,
    cfg: CorruptConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt history latents [B, C, T, h, w]; ``valid`` [B, T] marks frames that hold content.

    ``mode=paper``: each frame draws its own branch (T independent decisions, §3.2.3).
    ``mode=reference``: one branch per sample, shared by its frames (the public code's behaviour).
    Returns the corrupted history and the branch per frame ([B, T], CLEAN where not valid).
    """
    b, c, t, h, w = history.shape
    if not cfg.enabled:
        return history, torch.full((b, t), int(Branch.CLEAN), dtype=torch.long)
    if cfg.mode == "paper":
        branches = draw_branches((b, t), cfg, generator)
    else:
        branches = draw_branches((b, 1), cfg, generator).expand(b, t).clone()
    branches[~valid] = int(Branch.CLEAN)

    out = history.clone()
    n = b * t
    flat_branch = branches.view(n)
    frames = out.permute(0, 2, 1, 3, 4).reshape(n, c, h, w)  # copy: [B*T, C, h, w]

    exposure = _uniform(n, cfg.exposure, generator).to(history.device, torch.float32)
    noise_level = _uniform(n, cfg.noise, generator).to(history.device, torch.float32)
    reduction = _uniform(n, cfg.downsample, generator)
    eps = torch.randn(frames.shape, generator=generator).to(history.device, frames.dtype)

    sel = (flat_branch == Branch.EXPOSURE).to(history.device)
    if sel.any():
        x = frames[sel].float()
        mean = x.mean(dim=(2, 3), keepdim=True)
        frames[sel] = (mean + exposure[sel].view(-1, 1, 1, 1) * (x - mean)).to(frames.dtype)
    sel = (flat_branch == Branch.NOISE).to(history.device)
    if sel.any():
        s = noise_level[sel].view(-1, 1, 1, 1)
        frames[sel] = ((1.0 - s) * frames[sel].float() + s * eps[sel].float()).to(frames.dtype)
    for i in torch.nonzero(flat_branch == Branch.DOWNSAMPLE).flatten().tolist():
        frames[i] = down_up(frames[i], float(reduction[i]))

    out = frames.view(b, t, c, h, w).permute(0, 2, 1, 3, 4).contiguous()
    return out, branches
