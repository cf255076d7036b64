"""Flash Norm (paper §4.3): fused RMSNorm / LayerNorm in Triton, forward and backward.

One program per row (token); statistics in fp32; input and output in the input's dtype; only the
per-row statistics (``rstd``, and ``mean`` for LayerNorm) are saved for backward: O(rows) instead of
O(rows x D). Weight/bias gradients are reduced per program over a strided set of rows, then summed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_fwd(
    X,
    Y,
    W,
    B,
    Mean,
    Rstd,
    stride_x,
    stride_y,
    D,
    eps,
    IS_RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        mean = 0.0
        xc = x
    else:
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Rstd + row, rstd)
    if not IS_RMS:
        tl.store(Mean + row, mean)


@triton.jit
def _norm_bwd(
    X,
    DY,
    DX,
    W,
    Mean,
    Rstd,
    DW,
    DB,
    stride_x,
    stride_dy,
    stride_dx,
    N,
    D,
    rows_per_prog,
    IS_RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    start = pid * rows_per_prog
    for i in range(0, rows_per_prog):
        row = start + i
        if row < N:
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(Rstd + row)
            if IS_RMS:
                xhat = x * rstd
            else:
                xhat = tl.where(mask, (x - tl.load(Mean + row)) * rstd, 0.0)
            if HAS_W:
                g = dy * w
            else:
                g = dy
            c1 = tl.sum(xhat * g, axis=0) / D
            if IS_RMS:
                dx = (g - xhat * c1) * rstd
            else:
                c2 = tl.sum(g, axis=0) / D
                dx = (g - c2 - xhat * c1) * rstd
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += dy * xhat
            db_acc += dy
    if HAS_W:
        tl.store(DW + pid * D + cols, dw_acc, mask=mask)
    if HAS_B:
        tl.store(DB + pid * D + cols, db_acc, mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


class _FlashNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, is_rms: bool):
        shape = x.shape
        x2 = _rows(x)
        n, d = x2.shape
        y = torch.empty((n, d), dtype=x.dtype, device=x.device)
        rstd = torch.empty(n, dtype=torch.float32, device=x.device)
        mean = torch.empty(n if not is_rms else 1, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(d)
        _norm_fwd[(n,)](
            x2,
            y,
            weight if weight is not None else x2,
            bias if bias is not None else x2,
            mean,
            rstd,
            x2.stride(0),
            y.stride(0),
            d,
            eps,
            IS_RMS=is_rms,
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
        )
        ctx.save_for_backward(x2, weight, bias, mean, rstd)
        ctx.is_rms, ctx.shape = is_rms, shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, bias, mean, rstd = ctx.saved_tensors
        n, d = x2.shape
        dy2 = _rows(dy)
        dx = torch.empty_like(x2)
        programs = max(
            1,
            min(
                n,
                4 * (torch.cuda.get_device_properties(x2.device).multi_processor_count if x2.is_cuda else 1),
            ),
        )
        rows_per_prog = -(-n // programs)
        programs = -(-n // rows_per_prog)
        dw = torch.empty((programs, d), dtype=torch.float32, device=x2.device) if weight is not None else None
        db = torch.empty((programs, d), dtype=torch.float32, device=x2.device) if bias is not None else None
        block = triton.next_power_of_2(d)
        _norm_bwd[(programs,)](
            x2,
            dy2,
            dx,
            weight if weight is not None else x2,
            mean,
            rstd,
            dw if dw is not None else rstd,
            db if db is not None else rstd,
            x2.stride(0),
            dy2.stride(0),
            dx.stride(0),
            n,
            d,
            rows_per_prog,
            IS_RMS=ctx.is_rms,
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
        )
        dweight = dw.sum(0).to(weight.dtype) if weight is not None else None
        dbias = db.sum(0).to(bias.dtype) if bias is not None else None
        return dx.view(ctx.shape), dweight, dbias, None, None


def flash_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _FlashNorm.apply(x, weight, None, eps, True)


def flash_layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    return _FlashNorm.apply(x, weight, bias, eps, False)


class FlashRMSNorm(torch.nn.Module):
    """Drop-in for ``torch.nn.RMSNorm`` over the last dimension; shares the original ``weight``."""

    def __init__(self, source: torch.nn.RMSNorm) -> None:
        super().__init__()
        self.weight = source.weight
        self.eps = source.eps if source.eps is not None else torch.finfo(torch.float32).eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return flash_rms_norm(x, self.weight, self.eps)


class FlashLayerNorm(torch.nn.Module):
    """Drop-in for ``nn.LayerNorm`` / diffusers ``FP32LayerNorm`` (fp32 statistics, the input's dtype
    out) over the last dimension; shares the original ``weight``/``bias``."""

    def __init__(self, source: torch.nn.LayerNorm) -> None:
        super().__init__()
        self.weight = source.weight
        self.bias = source.bias
        self.eps = source.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return flash_layer_norm(x, self.weight, self.bias, self.eps)
