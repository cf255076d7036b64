"""The dashboard's model FLOPs and tokens (helios/model/flops.py): the formula against torch's own FLOP
counter on the DiT, the counter's conventions, and what a training run logs from them."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from helios.config import compose
from helios.core.history import HistoryLayout
from helios.model.flops import FlopCounter, forward_flops, peak_tflops, sequence_tokens
from helios.model.transformer import build_transformer
from tests.helpers.runs import train_in_process


def _math_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """Attention as two matmuls, which torch's FLOP counter sees (its CPU kernel it does not)."""
    scores = (query @ key.transpose(-1, -2)) * (scale or query.shape[-1] ** -0.5)
    return (scores if attn_mask is None else scores + attn_mask).softmax(-1) @ value


def _inputs(layout: HistoryLayout, hw: int, batch: int = 1, text: int = 32, text_dim: int = 32) -> dict:
    gen = torch.Generator().manual_seed(0)
    history = torch.randn(batch, 16, layout.num_history, hw, hw, generator=gen)
    anchor = torch.randn(batch, 16, 1, hw, hw, generator=gen)
    return dict(
        hidden_states=torch.randn(batch, 16, layout.window, hw, hw, generator=gen),
        timestep=torch.full((batch,), 400.0),
        encoder_hidden_states=torch.randn(batch, text, text_dim, generator=gen),
        **layout.model_inputs(history, anchor),
    )


@pytest.mark.parametrize("guidance_cross_attn", [True, False])
@pytest.mark.parametrize("hw", [8, 12])  # 12: the memory patches pad (3 tokens of 4x4 per row)
def test_forward_flops_are_torchs_count_of_the_dit(monkeypatch, hw, guidance_cross_attn):
    cfg = compose([f"model.transformer.guidance_cross_attn={str(guidance_cross_attn).lower()}"])
    model = build_transformer(cfg.model.transformer).eval()
    assert model.config.guidance_cross_attn == guidance_cross_attn
    inputs = _inputs(HistoryLayout.from_config(cfg.history), hw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", _math_attention)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    counts = counter.get_flop_counts()
    timestep = [
        counts[f"HeliosTransformer3DModel.condition_embedder.{m}"] for m in ("time_embedder", "time_proj")
    ]
    ours = forward_flops(model.config, sequence_tokens(inputs, (1, 2, 2)), 32)
    theirs = counts["HeliosTransformer3DModel"]
    linear = theirs[torch.ops.aten.addmm] + theirs[torch.ops.aten.convolution]
    assert ours["linear"] == linear - sum(c[torch.ops.aten.addmm] for c in timestep)
    assert ours["attention"] == theirs[torch.ops.aten.bmm]


def test_sequence_tokens_are_the_layouts_token_counts():
    cfg = compose([])
    layout = HistoryLayout.from_config(cfg.history)
    for hw in (8, 12, 14):
        tokens = sequence_tokens(_inputs(layout, hw), (1, 2, 2))
        expected = layout.tokens(hw, hw)
        assert (
            tokens["window"] == expected["noisy"]
            and sum(tokens.values()) - tokens["window"] == expected["history"]
        )


def test_the_counter_counts_a_trained_forward_three_times_and_only_its_tokens():
    cfg = compose([])
    model = build_transformer(cfg.model.transformer)
    inputs = _inputs(HistoryLayout.from_config(cfg.history), 8, batch=2)
    one = forward_flops(model.config, sequence_tokens(inputs, (1, 2, 2)), 32)
    per_sample = sum(one.values())
    counter = FlopCounter(torch.nn.ModuleDict({"a": model}))  # found inside a wrapper
    with torch.no_grad():
        model(**inputs)
    assert counter.take().flops == 2 * per_sample and counter.take().flops == 0  # take() starts over
    model(**inputs)[0].sum().backward()
    count = counter.take()
    assert count.flops == 3 * 2 * per_sample
    assert count.tokens == 2 * sum(sequence_tokens(inputs, (1, 2, 2)).values())
    counter.close()
    model(**inputs)
    assert counter.take().flops == 0


def test_peak_tflops_by_device_name(monkeypatch):
    assert peak_tflops(torch.device("cpu")) is None and peak_tflops(torch.device("cpu"), 100.0) == 100.0
    for name, expected in [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Tesla V100-SXM2-32GB", None),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, n=name: n)
        assert peak_tflops(torch.device("cuda")) == expected, name


def test_a_run_logs_throughput_and_mfu_from_the_model_flops(tmp_path):
    """tokens_per_s and mfu over the logging window: the trained clips' tokens, and three times the forward
    FLOPs of each trained micro-batch (validation's forwards excluded)."""
    cfg = compose([])
    layout = HistoryLayout.from_config(cfg.history)
    model = build_transformer(cfg.model.transformer)
    metrics = train_in_process(
        [
            "trainer.max_steps=4",
            "trainer.log_every=2",
            "trainer.checkpoint_every=0",
            "trainer.peak_tflops=1e-6",
            "validation.enabled=true",
            "validation.every=2",
            "validation.sampler.steps=[2]",
        ],
        tmp_path,
    )
    assert [m["step"] for m in metrics] == [2, 4]
    h, w = cfg.data.synthetic.height // 8, cfg.data.synthetic.width // 8  # the VAE: 8x down
    tokens = layout.tokens(h, w)
    per_clip = tokens["noisy"] + tokens["history"]
    clips = cfg.trainer.batch_size * cfg.trainer.grad_accum
    text = cfg.model.text_encoder.max_sequence_length
    inputs = _inputs(layout, h, text=text, text_dim=model.config.text_dim)
    flops = 3 * clips * sum(forward_flops(model.config, sequence_tokens(inputs, (1, 2, 2)), text).values())
    for m in metrics:
        assert m["tokens_per_s"] * m["step_time_s"] == pytest.approx(clips * per_clip)
        assert m["mfu"] * 1e6 * m["step_time_s"] == pytest.approx(flops)
        assert m["samples_per_s"] * m["step_time_s"] == pytest.approx(clips)
