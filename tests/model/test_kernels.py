"""Flash Norm / Flash RoPE against torch (TRITON_INTERPRET=1 on CPU), and the patched model."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_helios import HeliosAttnProcessor, apply_rotary_emb_transposed

from helios.config import compose
from helios.kernels import flash_layer_norm, flash_rms_norm, flash_rope
from helios.model.attention import HeliosProcessor, set_processors
from helios.model.transformer import build_transformer
from tests.helpers.model_inputs import tiny_model_inputs

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}  # relative, METHOD.md


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5, 37), (2, 130), (1, 1, 4, 96)])
@pytest.mark.parametrize("kind", ["layer", "layer_noaffine", "rms", "rms_noaffine"])
def test_flash_norm_matches_torch(dtype, shape, kind):
    gen = torch.Generator().manual_seed(0)
    d = shape[-1]
    x = torch.randn(*shape, generator=gen).to(dtype) * 2 + 0.5
    affine = not kind.endswith("noaffine")
    w = torch.randn(d, generator=gen).to(dtype) if affine else None
    b = torch.randn(d, generator=gen).to(dtype) if affine and kind.startswith("layer") else None
    dy = torch.randn(*shape, generator=gen).to(dtype)
    params = [p for p in (w, b) if p is not None]

    def run(fn):
        xs, ps = _leaf(x), [_leaf(p) for p in params]
        out = fn(xs, *ps)
        grads = torch.autograd.grad(out, [xs, *ps], dy)
        return out, grads

    if kind.startswith("layer"):
        ours = run(lambda xs, *ps: flash_layer_norm(xs, *(list(ps) + [None] * (2 - len(ps))), 1e-6))
        ref = run(
            lambda xs, *ps: F.layer_norm(xs.float(), (d,), *[p.float() for p in ps], eps=1e-6).to(dtype)
        )
    else:
        ours = run(lambda xs, *ps: flash_rms_norm(xs, ps[0] if ps else None, 1e-6))
        ref = run(lambda xs, *ps: F.rms_norm(xs.float(), (d,), ps[0].float() if ps else None, 1e-6).to(dtype))
    assert ours[0].dtype == dtype and ours[0].shape == x.shape
    assert rel(ours[0], ref[0]) < TOL[dtype]
    for g, r in zip(ours[1], ref[1]):
        assert g.dtype == r.dtype and rel(g, r) < TOL[dtype]


def test_flash_norm_non_contiguous_and_saves_only_row_statistics():
    base = torch.randn(6, 64, 40)
    x = _leaf(base[:, ::2, :33])  # row stride != D, last dim contiguous
    w = _leaf(torch.randn(33))
    out = flash_rms_norm(x, w, 1e-6)
    ref = F.rms_norm(x, (33,), w, 1e-6)
    assert rel(out, ref) < 1e-5
    xt = _leaf(torch.randn(33, 12).t())  # last-dim stride != 1
    assert rel(flash_layer_norm(xt, None, None, 1e-6), F.layer_norm(xt, (33,), eps=1e-6)) < 1e-5
    saved = [t for t in out.grad_fn.saved_tensors if t is not None]
    stats = [t for t in saved if t.dim() == 1 and t.numel() == 6 * 32]
    assert stats and all(t.dtype == torch.float32 for t in stats)  # per-row rstd
    # besides the input itself and the weight, only per-row statistics: no normalised [rows, D] tensor
    extra = [t for t in saved if t.dim() > 1 and not torch.equal(t, x.reshape(-1, 33))]
    assert extra == []


def _rope_table(batch: int, seq: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    angles = torch.randn(batch, seq, dim // 2, generator=gen).repeat_interleave(2, dim=-1)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("b", "seq", "h", "d", "table_batch"), [(2, 13, 3, 12, 1), (1, 7, 5, 6, 1), (3, 4, 2, 128, 3)]
)
def test_flash_rope_matches_diffusers(dtype, b, seq, h, d, table_batch):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, seq, h, d, generator=gen).to(dtype)
    freqs = _rope_table(table_batch, seq, d, gen)
    dy = torch.randn(b, seq, h, d, generator=gen).to(dtype)
    xs, xr = _leaf(x), _leaf(x)
    ours, ref = flash_rope(xs, freqs), apply_rotary_emb_transposed(xr, freqs)
    assert ours.dtype == dtype and rel(ours, ref) < TOL[dtype]
    (g,), (r,) = torch.autograd.grad(ours, xs, dy), torch.autograd.grad(ref, xr, dy)
    assert rel(g, r) < TOL[dtype]


def test_flash_rope_non_contiguous_heads():
    gen = torch.Generator().manual_seed(2)
    big = torch.randn(2, 9, 6, 16, generator=gen)
    x = big[:, :, ::2]  # every other head: non-contiguous head stride
    freqs = _rope_table(1, 9, 16, gen)
    assert rel(flash_rope(x, freqs), apply_rotary_emb_transposed(x, freqs)) < 1e-6


def test_processor_reimplementation_equals_diffusers():
    cfg = compose(["model.transformer.is_amplify_history=true"])
    model = build_transformer(cfg.model.transformer).eval()
    with torch.no_grad():
        ref = model(**tiny_model_inputs(), return_dict=False)[0]
        set_processors(model, rope="torch")
        assert isinstance(model.blocks[0].attn1.processor, HeliosProcessor)
        ours = model(**tiny_model_inputs(), return_dict=False)[0]
    assert torch.equal(ours, ref)
    assert (
        type(build_transformer(compose([]).model.transformer).blocks[0].attn1.processor)
        is HeliosAttnProcessor
    )


def test_attention_gets_one_dtype_under_autocast_and_the_same_output(monkeypatch):
    """Under CUDA's bf16 autocast the q/k norms return fp32 (rms_norm is on its fp32 list; emulated here,
    CPU autocast keeps bf16) and v is bf16; flash kernels take one dtype, so the processor casts q/k to
    v's (SDPA casts to bf16 under autocast itself: the same output)."""
    import helios.model.attention as attention

    class Fp32Out(torch.nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.norm = norm

        def forward(self, x):
            return self.norm(x).float()

    cfg = compose([])
    model = build_transformer(cfg.model.transformer).eval()
    for block in model.blocks:
        block.attn1.norm_q, block.attn1.norm_k = Fp32Out(block.attn1.norm_q), Fp32Out(block.attn1.norm_k)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(**tiny_model_inputs(), return_dict=False)[0]
        set_processors(model, rope="torch")
        dtypes = []
        original = attention.dispatch_attention_fn

        def spy(q, k, v, **kw):
            dtypes.append((q.dtype, k.dtype, v.dtype))
            return original(q, k, v, **kw)

        monkeypatch.setattr(attention, "dispatch_attention_fn", spy)
        ours = model(**tiny_model_inputs(), return_dict=False)[0]
    assert dtypes and all(d == (torch.bfloat16,) * 3 for d in dtypes)
    assert torch.equal(ours, ref)


def test_patched_model_matches_unpatched_outputs_and_gradients():
    plain = build_transformer(compose([]).model.transformer)
    cfg = compose(["model.kernels.norm=triton", "model.kernels.rope=triton"])
    patched = build_transformer(cfg.model.transformer, cfg.model.kernels)
    assert type(patched.blocks[0].norm1).__name__ == "FlashLayerNorm"
    assert type(patched.blocks[0].attn1.norm_q).__name__ == "FlashRMSNorm"
    assert patched.state_dict().keys() == plain.state_dict().keys()
    out_p, out_t = (
        patched(**tiny_model_inputs(), return_dict=False)[0],
        plain(**tiny_model_inputs(), return_dict=False)[0],
    )
    assert rel(out_p, out_t) < 1e-5
    out_p.square().mean().backward()
    out_t.square().mean().backward()
    for (name, p), (_, q) in zip(patched.named_parameters(), plain.named_parameters()):
        if q.grad is not None and q.grad.norm() > 0:
            assert rel(p.grad, q.grad) < 1e-4, name


def test_triton_without_gpu_or_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose(["model.kernels.norm=triton"])
    with pytest.raises(RuntimeError, match=r"model\.kernels\.norm=torch"):
        build_transformer(cfg.model.transformer, cfg.model.kernels)


def test_missing_flash_attention_falls_back_to_sdpa(caplog):
    cfg = compose(["model.attention=flash"])
    model = build_transformer(cfg.model.transformer, cfg.model.kernels, cfg.model.attention)
    assert "using SDPA" in caplog.text
    assert model(**tiny_model_inputs(), return_dict=False)[0].isfinite().all()


def test_tiny_training_with_kernels(tmp_path):
    from tests.helpers.runs import train_in_process as _train

    metrics = _train(
        [
            "model.kernels.norm=triton",
            "model.kernels.rope=triton",
            "trainer.max_steps=1",
            "trainer.batch_size=2",
            "trainer.checkpoint_every=0",
        ],
        tmp_path,
    )
    assert len(metrics) == 1 and metrics[0]["grad_norm"] > 0


@pytest.mark.slow
def test_gpu_benchmark_suite_runs_in_smoke_mode(tmp_path):
    """The GPU suite's code paths on tiny shapes (CPU, interpreter): timings are meaningless here."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "bench/bench_kernels.py", "--smoke", "--out", str(out)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["kernels"]) == {"rms_norm", "layer_norm", "rope"}
    assert {"baseline", "ours", "speedup_fwd_bwd"} <= set(result["dit"])
