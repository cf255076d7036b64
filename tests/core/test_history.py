import pytest
import torch

from helios.config.schema import TaskConfig
from helios.core.history import HistoryLayout, Task, apply_tasks, draw_tasks

REAL = HistoryLayout(long=16, mid=2, short=1, window=9)


def test_relative_indices_real_layout():
    idx = REAL.indices(batch_size=2)
    # arange(29) split [1, 16, 2, 1, 9]: anchor 0, long 1-16, mid 17-18, short [0, 19], noisy 20-28
    assert idx["indices_latents_history_long"][0].tolist() == list(range(1, 17))
    assert idx["indices_latents_history_mid"][0].tolist() == [17, 18]
    assert idx["indices_latents_history_short"][0].tolist() == [0, 19]
    assert idx["indices_hidden_states"][0].tolist() == list(range(20, 29))
    assert all(v.shape[0] == 2 for v in idx.values())
    assert REAL.clip_frames == 28  # 109 frames -> 28 latent frames (paper §5.1)


def test_absolute_indices_shift_everything_but_the_anchor():
    idx = REAL.indices(batch_size=2, offset=torch.tensor([0, 5]))
    assert idx["indices_latents_history_short"].tolist() == [[0, 19], [0, 24]]
    assert idx["indices_hidden_states"][1].tolist() == list(range(25, 34))
    assert idx["indices_latents_history_long"][1, 0].item() == 6


def test_model_inputs_split_and_anchor():
    b, c, h, w = 2, 4, 6, 8
    clip = torch.arange(b * c * 28 * h * w, dtype=torch.float32).view(b, c, 28, h, w)
    history, target = REAL.split_clip(clip)
    assert history.shape[2] == 19 and target.shape[2] == 9
    assert torch.equal(target, clip[:, :, 19:])
    anchor = clip[:, :, :1] + 0.5
    inputs = REAL.model_inputs(history, anchor)
    assert torch.equal(inputs["latents_history_long"], clip[:, :, :16])
    assert torch.equal(inputs["latents_history_mid"], clip[:, :, 16:18])
    assert torch.equal(inputs["latents_history_short"][:, :, 0:1], anchor)
    assert torch.equal(inputs["latents_history_short"][:, :, 1:], clip[:, :, 18:19])
    with pytest.raises(ValueError, match=r"^clip has 27 latent frames, need 28$"):  # frames: dim 2
        REAL.split_clip(torch.zeros(1, 4, 27, 6, 8))


def test_no_multi_term_patch_puts_everything_in_short():
    layout = HistoryLayout(4, 2, 1, 3, multi_term=False)
    history = torch.randn(1, 2, 7, 4, 4)
    anchor = torch.randn(1, 2, 1, 4, 4)
    inputs = layout.model_inputs(history, anchor)
    assert "latents_history_mid" not in inputs and "latents_history_long" not in inputs
    assert inputs["latents_history_short"].shape[2] == 8
    assert inputs["indices_latents_history_short"][0].tolist() == list(range(8))


def test_no_anchor_zeroes_the_anchor():
    layout = HistoryLayout(4, 2, 1, 3, anchor=False)
    inputs = layout.model_inputs(torch.ones(1, 2, 7, 4, 4), torch.ones(1, 2, 1, 4, 4))
    assert inputs["latents_history_short"][:, :, 0].abs().sum() == 0


def test_tasks_formats():
    layout = HistoryLayout(4, 2, 1, 3)
    history = torch.randn(4, 2, 7, 4, 4) + 5  # no exact zeros
    first = torch.randn(4, 2, 1, 4, 4)
    tasks = torch.tensor([Task.T2V, Task.I2V, Task.V2V_PARTIAL, Task.V2V])
    gen = torch.Generator().manual_seed(0)
    out, anchor, valid = apply_tasks(history, first, tasks, layout, gen)
    # T2V: all zero including the anchor
    assert out[0].abs().sum() == 0 and anchor[0].abs().sum() == 0 and not valid[0].any()
    # I2V: only the last frame, and the anchor is that image
    assert out[1, :, :-1].abs().sum() == 0 and torch.equal(out[1, :, -1], history[1, :, -1])
    assert torch.equal(anchor[1], history[1, :, -1:]) and valid[1].tolist() == [False] * 6 + [True]
    # partial V2V (clip format): the newest k*window frames (3 or 6; 0 keeps the video's anchor alone),
    # the anchor is the first of them
    n = int(valid[2].sum())
    assert n in (0, 3, 6)
    assert out[2, :, : 7 - n].abs().sum() == 0 and torch.equal(out[2, :, 7 - n :], history[2, :, 7 - n :])
    assert torch.equal(anchor[2], history[2, :, 7 - n : 8 - n] if n else first[2])
    # full V2V: untouched, anchor = the video's first latent
    assert torch.equal(out[3], history[3]) and torch.equal(anchor[3], first[3]) and valid[3].all()


def test_tasks_in_the_section_format_keep_the_video_anchor_and_the_padding_out():
    """Section format (the reference's): the anchor stays the video's first latent for I2V and partial
    V2V (zero for T2V), and zero padding before the video start is never marked valid (so Frame-Aware
    Corrupt never touches it)."""
    layout = HistoryLayout(4, 2, 1, 3)
    history = torch.randn(4, 2, 7, 4, 4) + 5
    history[3, :, :4] = 0  # section 1 of a video: 3 real frames after 4 of padding
    first = torch.randn(4, 2, 1, 4, 4)
    tasks = torch.tensor([Task.T2V, Task.I2V, Task.V2V_PARTIAL, Task.V2V])
    real = torch.tensor([7, 7, 7, 3])
    out, anchor, valid = apply_tasks(
        history, first, tasks, layout, torch.Generator(), real, section_format=True
    )
    assert anchor[0].abs().sum() == 0 and not valid[0].any()
    assert torch.equal(anchor[1], first[1]) and valid[1].tolist() == [False] * 6 + [True]
    assert torch.equal(anchor[2], first[2]) and int(valid[2].sum()) in (0, 3, 6)  # 0: the anchor alone
    assert torch.equal(anchor[3], first[3]) and valid[3].tolist() == [False] * 4 + [True] * 3
    assert torch.equal(out[3], history[3])


def test_partial_lengths_real_layout():
    # the reference zeroes the oldest 1 + 9k frames, k in {0, 1, 2}: 18, 9 or 0 kept (the anchor alone)
    assert REAL.partial_lengths() == [0, 9, 18]
    # k * window < H: a history that is a whole number of windows is a full V2V at its last multiple
    assert HistoryLayout(2, 1, 1, 2).partial_lengths() == [0, 2]
    assert HistoryLayout(4, 2, 1, 3).partial_lengths() == [0, 3, 6]


def test_token_counts_real_layout():
    """One section at 384x640 (48x80 latents): 9 x 24 x 40 noisy tokens; history 2 x 24 x 40 (anchor + 1x)
    + 12 x 20 (mid 2 frames, 2x4x4) + 4 x 6 x 10 (long 16 frames, 4x8x8) = 2,400 (5/8 HW), or 20 x 960
    without multi-term patchification."""
    assert REAL.tokens(48, 80) == {"noisy": 8640, "history": 2400}
    assert HistoryLayout(16, 2, 1, 9, multi_term=False).tokens(48, 80) == {"noisy": 8640, "history": 19200}
    # padded: 3 mid frames are 2 temporal patches; 44x76 latents round up to 11x19 (mid), 6x10 (long)
    assert HistoryLayout(16, 3, 1, 9).tokens(44, 76)["history"] == 2 * 22 * 38 + 2 * 11 * 19 + 4 * 6 * 10
    # counts, as integers (the FLOP counter and the dashboard's trained tokens add them up)
    assert all(type(n) is int for n in REAL.tokens(48, 80).values())


def test_task_frequencies():
    cfg = TaskConfig(t2v=0.4, i2v=0.1, v2v_partial=0.2)
    tasks = draw_tasks(40_000, cfg, torch.Generator().manual_seed(1))
    freq = torch.bincount(tasks, minlength=4).float() / tasks.numel()
    expected = torch.tensor([0.4, 0.1, 0.2, 0.3])
    assert torch.allclose(freq, expected, atol=0.01), freq


def test_a_format_of_probability_zero_is_never_drawn_even_on_a_bucket_edge(monkeypatch):
    """A uniform draw that lands exactly on an edge (float32 draws are multiples of 2^-24, the edges here are
    exact) goes to the format above it: with t2v = 0, u = 0 is not a T2V sample."""
    cfg = TaskConfig(t2v=0.0, i2v=0.5, v2v_partial=0.25)
    monkeypatch.setattr(torch, "rand", lambda n, generator=None: torch.tensor([0.0, 0.5, 0.75, 0.25]))
    assert draw_tasks(4, cfg, torch.Generator()).tolist() == [1, 2, 3, 1]


def _condition(overrides: list[str]):
    """The history inputs stage 1 builds for one fixed batch (clips starting at latent frames 2 and 5)."""
    from helios.config import compose
    from helios.data.dataset import ClipBatch
    from helios.stages import Stage1Base

    cfg = compose(["history.tasks={t2v:0.0,i2v:0.0,v2v_partial:0.0}", *overrides])
    stage = Stage1Base(cfg)
    gen = torch.Generator().manual_seed(0)
    batch = ClipBatch(
        torch.randn(2, 16, stage.layout.clip_frames, 8, 8, generator=gen),
        torch.randn(2, 16, 1, 8, 8, generator=gen),
        torch.randn(2, 32, 32, generator=gen),
        torch.tensor([2, 5]),
        torch.tensor([7, 7]),
    )
    return stage.condition(batch, torch.Generator().manual_seed(1))


def test_each_history_switch_changes_the_batch_it_builds():
    """The Table-5 / §3 switches act on what the model is fed (not only on a smoke run)."""
    base, _, stats = _condition([])
    assert stats["corrupt_frac"] > 0  # stage-1 tiny: Frame-Aware Corrupt on
    clean, _, stats = _condition(["history.corrupt.enabled=false"])
    assert stats["corrupt_frac"] == 0
    assert not torch.equal(clean["latents_history_long"], base["latents_history_long"])
    absolute, _, _ = _condition(["history.relative_rope=false"])
    for key in ("indices_hidden_states", "indices_latents_history_long", "indices_latents_history_mid"):
        assert (absolute[key] - base[key]).tolist() == [[2] * base[key].shape[1], [5] * base[key].shape[1]]
    assert torch.equal(
        absolute["indices_latents_history_short"][:, 0], base["indices_latents_history_short"][:, 0]
    )
    no_anchor, _, _ = _condition(["history.anchor=false"])
    assert base["latents_history_short"][:, :, :1].abs().sum() > 0
    assert no_anchor["latents_history_short"][:, :, :1].abs().sum() == 0
    naive, _, _ = _condition(["history.multi_term_patch=false"])
    assert naive["latents_history_short"].shape[2] > base["latents_history_short"].shape[2]
    t2v, _, _ = _condition(["history.tasks={t2v:1.0,i2v:0.0,v2v_partial:0.0}"])
    assert all(t2v[k].abs().sum() == 0 for k in t2v if k.startswith("latents_history"))


@pytest.mark.parametrize("relative", [True, False])
def test_sampling_indices_grow_only_with_absolute_rope(relative):
    """Relative RoPE: every section sees the same indices; absolute: the window's indices move with the
    video (position shift), from the section where the history buffer is full."""
    from helios.sampling import PromptSchedule, SectionSampler, sample_video
    from helios.sampling.section import Guidance

    layout = HistoryLayout(4, 2, 1, 3, relative_rope=relative)
    seen = []

    class Model(torch.nn.Module):
        config = type("C", (), {"in_channels": 16})()

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, hidden_states, indices_hidden_states, return_dict=False, **_):
            seen.append(indices_hidden_states[0].tolist())
            return (hidden_states * self.w,)

    from diffusers import HeliosScheduler

    sampler = SectionSampler(HeliosScheduler(stages=1, stage_range=[0, 1]), [1], Guidance(1.0))
    sample_video(Model(), layout, sampler, PromptSchedule([(0, torch.zeros(1, 4, 8))]), None, 5, (4, 4))
    first = [8, 9, 10]  # 1 + 7 history frames, then the window
    if relative:
        assert seen == [first] * 5
    else:  # sections start at latent frames 0, 3, 6, 9, 12: offset max(0, position - 7)
        assert seen == [first, first, first, [10, 11, 12], [13, 14, 15]]


@pytest.mark.parametrize(
    "switch",
    [
        "model.transformer.guidance_cross_attn=false",
        "model.transformer.zero_history_timestep=false",
        "model.transformer.is_amplify_history=true",
        "model.transformer.history_causal_mask=true",
    ],
)
def test_each_guidance_attention_switch_changes_what_the_model_computes(switch):
    """Table 5's Guidance Attention rows act on the model (same weights, same history inputs)."""
    from helios.config import compose
    from helios.model.transformer import build_transformer

    layout = HistoryLayout(4, 2, 1, 3)
    gen = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 3, 8, 8, generator=gen),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=gen),
        **layout.model_inputs(
            torch.randn(1, 16, 7, 8, 8, generator=gen), torch.randn(1, 16, 1, 8, 8, generator=gen)
        ),
    )
    outputs = []
    for overrides in ([], [switch]):
        model = build_transformer(compose(overrides).model.transformer).eval()
        with torch.no_grad():  # a non-trivial head, the same for both
            model.proj_out.weight.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
            outputs.append(model(**inputs, return_dict=False)[0])
    assert (outputs[0] - outputs[1]).abs().max() > 1e-4


def test_a_history_of_the_wrong_length_is_refused_with_both_lengths():
    """The history buffer must hold the layout's long + mid + short frames (19 for the 14B's 16 / 2 / 1)."""
    with pytest.raises(ValueError, match=r"^history has 18 frames, layout expects 19$"):
        REAL.model_inputs(torch.zeros(1, 2, 18, 4, 4), torch.zeros(1, 2, 1, 4, 4))
