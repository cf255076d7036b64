"""Flash RoPE (paper §4.3): the rotary embedding of diffusers' Helios attention in one Triton kernel.

Layout as in ``apply_rotary_emb_transposed``: ``x`` [B, L, H, Dh] with interleaved (even, odd) pairs,
``freqs`` [B, L, 2*Dh] = [cos | sin], each repeated per pair. One program per (token, head) row:
out_even = x_even cos - x_odd sin, out_odd = x_even sin + x_odd cos. Backward is the same kernel with
the sine negated (the inverse rotation); nothing but the inputs is saved.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope(
    X,
    F,
    Y,
    H,
    stride_xb,
    stride_xl,
    stride_xh,
    stride_fb,
    stride_fl,
    stride_yb,
    stride_yl,
    stride_yh,
    L,
    HALF: tl.constexpr,
    SIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)  # over B * L * H
    h = row % H
    bl = row // H
    l_idx = bl % L
    b = bl // L
    i = tl.arange(0, BLOCK)
    mask = i < HALF
    x_base = X + b * stride_xb + l_idx * stride_xl + h * stride_xh
    f_base = F + b * stride_fb + l_idx * stride_fl
    x1 = tl.load(x_base + 2 * i, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_base + 2 * i + 1, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(f_base + 2 * i, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(f_base + 2 * HALF + 2 * i + 1, mask=mask, other=0.0).to(tl.float32) * SIGN
    y_base = Y + b * stride_yb + l_idx * stride_yl + h * stride_yh
    tl.store(y_base + 2 * i, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_base + 2 * i + 1, (x1 * sin + x2 * cos).to(Y.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, freqs: torch.Tensor, sign: float) -> torch.Tensor:
    b, seq, h, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    if freqs.stride(-1) != 1:
        freqs = freqs.contiguous()
    fb = freqs.stride(0) if freqs.shape[0] > 1 else 0  # a batch-1 table broadcasts
    y = torch.empty((b, seq, h, d), dtype=x.dtype, device=x.device)
    half = d // 2
    _rope[(b * seq * h,)](
        x,
        freqs,
        y,
        h,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        fb,
        freqs.stride(1),
        y.stride(0),
        y.stride(1),
        y.stride(2),
        seq,
        HALF=half,
        SIGN=sign,
        BLOCK=triton.next_power_of_2(half),
        num_warps=1,
    )
    return y


class _FlashRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, freqs):
        ctx.save_for_backward(freqs)
        return _launch(x, freqs, 1.0)

    @staticmethod
    def backward(ctx, dy):
        (freqs,) = ctx.saved_tensors
        return _launch(dy, freqs, -1.0), None


def flash_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``x`` [B, L, H, Dh], ``freqs`` [B or 1, L, 2*Dh] (diffusers' rotary table) -> rotated ``x``."""
    if x.shape[-1] % 2 or freqs.shape[-1] != 2 * x.shape[-1]:
        raise ValueError(f"flash_rope: head dim {x.shape[-1]} and table {freqs.shape[-1]} do not match")
    return _FlashRope.apply(x, freqs.detach())
