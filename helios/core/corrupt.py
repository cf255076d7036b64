"""Frame-Aware Corrupt (paper §3.2.3): simulate drifted history during training.

Two readings (``history.corrupt.mode``):

* ``reference`` (default; how the released Helios checkpoints were trained): one decision per micro-batch:
  clean with ``reference_p_clean``, else the noise branch (``reference_p_noise`` of the rest: "noise"
  mode, 1.0; "random" mode, 0.9) or down-then-up sampling. Noise ``x <- (1 - s) x + s eps`` with ``s``
  drawn per sample and frame from ``noise``; down-up by a ratio drawn per history region (the reference's
  windows: the oldest ``H mod window`` frames, then windows of ``window`` frames; its frame-by-frame
  down-up, not its reshape that mixes channels and frames). The first-frame anchor is corrupted like a
  history frame. Stage 3 adds :func:`saturate` to the generator's history only.
* ``paper``: every history frame independently draws exposure / noise / down-up / clean with
  ``p_exposure / p_noise / p_downsample / p_clean``; the anchor is kept.

Exposure (paper) and saturation (reference) are the same operator, the reference's: ``(x - m) a + m`` with
``m`` the mean over the latent channels at each position. Zero frames (dropped history, padding) stay zero.
"""

from __future__ import annotations

from enum import IntEnum

import torch
import torch.nn.functional as F

from helios.config.schema import CorruptConfig, SaturationConfig


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
    probs = torch.tensor([cfg.p_exposure, cfg.p_noise, cfg.p_downsample, cfg.p_clean])
    # float64 weights; float32 ones draw the same except within 1e-7 of a boundary
    probs = probs.double()  # pragma: no mutate
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


def scale_around_channel_mean(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``(x - m) a + m``, ``m`` the mean over the channels at each position (x: [N, C, h, w], factor: [N])."""
    mean = x.mean(dim=1, keepdim=True)
    return mean + factor.view(-1, 1, 1, 1) * (x - mean)


def reference_regions(frames: int, window: int) -> list[tuple[int, int]]:
    """The reference code's history regions, oldest first: the ``frames mod window`` oldest frames, then
    windows of ``window`` frames (one down-up ratio or saturation decision each)."""
    tail = frames % window
    starts = ([0] if tail else []) + list(range(tail, frames, window))
    return [(s, min(s + (tail if s == 0 and tail else window), frames)) for s in starts]


def frame_aware_corrupt(
    history: torch.Tensor,
    valid: torch.Tensor,
    cfg: CorruptConfig,
    generator: torch.Generator,
    anchor: torch.Tensor | None = None,
    window: int = 9,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Corrupt history latents [B, C, T, h, w] (``valid`` [B, T]: frames that hold content) and, in the
    reference reading, the anchor [B, C, 1, h, w] where it is not zero. Returns (history, branch per frame
    [B, T] (CLEAN where not valid), anchor)."""
    b, c, t, h, w = history.shape
    clean = torch.full((b, t), int(Branch.CLEAN))  # an int fill: int64
    if not cfg.enabled:
        return history, clean, anchor
    if cfg.mode == "reference":
        return _reference(history, valid, cfg, generator, anchor, window)
    branches = draw_branches((b, t), cfg, generator)
    branches[~valid] = int(Branch.CLEAN)

    out = history.clone()
    n = b * t
    flat_branch = branches.view(n)
    frames = out.permute(0, 2, 1, 3, 4).reshape(n, c, h, w)  # copy: [B*T, C, h, w]

    exposure = _uniform(n, cfg.exposure, generator)
    noise_level = _uniform(n, cfg.noise, generator)
    # placement (one device on a CPU, where no test can tell): the levels go where the frames are
    exposure, noise_level = (x.to(history.device) for x in (exposure, noise_level))  # pragma: no mutate
    reduction = _uniform(n, cfg.downsample, generator)
    eps = torch.randn(frames.shape, generator=generator).to(history.device, frames.dtype)

    sel = (flat_branch == Branch.EXPOSURE).to(history.device)
    if sel.any():
        frames[sel] = scale_around_channel_mean(frames[sel].float(), exposure[sel]).to(frames.dtype)
    sel = (flat_branch == Branch.NOISE).to(history.device)
    if sel.any():
        s = noise_level[sel].view(-1, 1, 1, 1)
        frames[sel] = ((1.0 - s) * frames[sel].float() + s * eps[sel].float()).to(frames.dtype)
    for i in torch.nonzero(flat_branch == Branch.DOWNSAMPLE).flatten().tolist():
        frames[i] = down_up(frames[i], float(reduction[i]))

    out = frames.view(b, t, c, h, w).permute(0, 2, 1, 3, 4).contiguous()
    return out, branches, anchor


def _reference(history, valid, cfg: CorruptConfig, generator, anchor, window):
    """The released checkpoints' corrupt: one clean / branch decision per micro-batch (module docstring)."""
    b, t = history.shape[0], history.shape[2]
    u_clean, u_branch = torch.rand(2, generator=generator).tolist()
    if u_clean < cfg.reference_p_clean:
        branch = Branch.CLEAN
    else:
        branch = Branch.NOISE if u_branch < cfg.reference_p_noise else Branch.DOWNSAMPLE
    branches = torch.full((b, t), int(branch))
    branches[~valid] = int(Branch.CLEAN)
    if branch == Branch.CLEAN:
        return history, branches, anchor
    # the anchor goes first in the reference's frame order; it is corrupted where it holds content
    frames = history if anchor is None else torch.cat([anchor, history], dim=2)
    mask = (
        valid if anchor is None else torch.cat([anchor.flatten(1).abs().amax(1, keepdim=True) > 0, valid], 1)
    )
    mask5 = mask.view(b, 1, -1, 1, 1).to(history.device)
    if branch == Branch.NOISE:
        s = _uniform(b * frames.shape[2], cfg.noise, generator).view(b, 1, -1, 1, 1).to(history.device)
        eps = torch.randn(frames.shape, generator=generator).to(history.device, frames.dtype)
        noised = ((1.0 - s) * frames.float() + s * eps.float()).to(frames.dtype)
        out = torch.where(mask5, noised, frames)
    else:
        out = frames.clone()
        offset = 0 if anchor is None else 1
        regions = ([(0, 1)] if anchor is not None else []) + [
            (s + offset, e + offset) for s, e in reference_regions(t, window)
        ]
        for start, end in regions:
            reduction = float(_uniform(1, cfg.downsample, generator))
            for i in range(b):
                for f in range(start, end):
                    if mask[i, f]:
                        out[i, :, f] = down_up(frames[i, :, f], reduction)
    if anchor is None:
        return out, branches, None
    return out[:, :, 1:], branches, out[:, :, :1]


def saturate(
    history: torch.Tensor,
    valid: torch.Tensor,
    cfg: SaturationConfig,
    generator: torch.Generator,
    window: int,
) -> torch.Tensor:
    """The reference's stage-3 saturation of the generator's history (the anchor is never saturated): each
    history region (:func:`reference_regions`) holding content is kept with ``p_clean``, else scaled around
    the per-position channel mean by a factor from ``[low, 1)`` or ``(1, high]`` (even odds), one a region."""
    if not cfg.enabled:
        return history
    b, c, t, h, w = history.shape
    out = history.clone()
    for start, end in reference_regions(t, window):
        keep, side, u = torch.rand(3, generator=generator).tolist()
        if keep < cfg.p_clean or not bool(valid[:, start:end].any()):
            continue
        low, high = cfg.range
        below = side < 0.5  # pragma: no mutate (<= differs only at a draw of exactly 0.5)
        factor = low + u * (1.0 - 1e-3 - low) if below else 1.0 + 1e-3 + u * (high - 1.0 - 1e-3)
        part = history[:, :, start:end].permute(0, 2, 1, 3, 4).reshape(-1, c, h, w).float()
        scaled = scale_around_channel_mean(part, torch.full((part.shape[0],), factor))
        scaled = scaled.view(b, end - start, c, h, w).permute(0, 2, 1, 3, 4).to(history.dtype)
        region_valid = valid[:, start:end].view(b, 1, -1, 1, 1).to(history.device)
        out[:, :, start:end] = torch.where(region_valid, scaled.to(history.device), history[:, :, start:end])
    return out
