"""Wan-2.1 -> Helios initialisation: a converted model reproduces Wan with no history."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import HeliosTransformer3DModel, WanTransformer3DModel

from helios.model.wan_init import convert_wan_state_dict, helios_config_from_wan, load_wan_as_helios

TINY_WAN = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=24,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    torch.manual_seed(0)
    wan = WanTransformer3DModel(**TINY_WAN)
    # Non-trivial output modulation so the renamed table matters.
    with torch.no_grad():
        wan.scale_shift_table.normal_()
    path = tmp_path_factory.mktemp("wan") / "transformer"
    wan.save_pretrained(path)
    return path


def test_config_mapping_gives_wan_rope_split():
    cfg = helios_config_from_wan({**TINY_WAN, "eps": 1e-6})
    assert cfg["rope_dim"] == (8, 8, 8)
    assert helios_config_from_wan({**TINY_WAN, "attention_head_dim": 128, "eps": 1e-6})["rope_dim"] == (
        44,
        42,
        42,
    )


def test_converted_model_reproduces_wan_without_history(wan_dir):
    wan = WanTransformer3DModel.from_pretrained(wan_dir).eval()
    helios = load_wan_as_helios(str(wan_dir)).eval()
    assert isinstance(helios, HeliosTransformer3DModel)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, 8, 8, generator=gen)
    t = torch.tensor([250.0, 900.0])
    text = torch.randn(2, 7, 32, generator=gen)
    with torch.no_grad():
        ref = wan(x, t, text, return_dict=False)[0]
        out = helios(x, t, text, return_dict=False)[0]
    assert ref.shape == out.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_every_wan_weight_is_copied(wan_dir):
    wan = WanTransformer3DModel.from_pretrained(wan_dir)
    helios = load_wan_as_helios(str(wan_dir))
    h_sd = helios.state_dict()
    for key, value in wan.state_dict().items():
        target = "norm_out.scale_shift_table" if key == "scale_shift_table" else key
        assert torch.equal(h_sd[target], value), key
    assert not any(p.is_meta for p in helios.parameters())


def test_interleave_init_embeds_the_average_pooled_latent(wan_dir):
    """The reference's rule: a mid (long) token starts as the patch embedding of the 2x (4x) average-pooled
    latent (its kernel every element repeated over the block, divided by 8 / 64)."""
    helios = load_wan_as_helios(str(wan_dir))
    x = torch.randn(1, 16, 4, 16, 16)
    with torch.no_grad():
        mid, long = helios.patch_mid(x), helios.patch_long(x)  # [1, D, 2, 4, 4], [1, D, 1, 2, 2]
        torch.testing.assert_close(mid, helios.patch_short(F.avg_pool3d(x, 2)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(long, helios.patch_short(F.avg_pool3d(x, 4)), rtol=1e-4, atol=1e-5)
    kernel = torch.arange(4.0).view(1, 1, 1, 2, 2)  # [[0, 1], [2, 3]]: rows as the review showed them
    sd = convert_wan_state_dict({"patch_embedding.weight": kernel, "patch_embedding.bias": torch.zeros(1)})
    assert (sd["patch_mid.weight"][0, 0, 0] * 8).tolist() == [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [2, 2, 3, 3],
        [2, 2, 3, 3],
    ]


def test_random_init_is_what_the_reference_run_started_from_and_unknown_mode_fails():
    """``random``: the reference applied its rule to the xavier-initialised patch embedding before Wan's
    weights loaded: the memory patches (short included) start from a seeded random kernel, interleaved."""
    sd = {"patch_embedding.weight": torch.randn(64, 16, 1, 2, 2), "patch_embedding.bias": torch.randn(64)}
    out = convert_wan_state_dict(sd, "random", seed=3)
    assert not torch.equal(out["patch_short.weight"], sd["patch_embedding.weight"])
    assert torch.equal(out["patch_embedding.weight"], sd["patch_embedding.weight"])  # Wan's own stays
    bound = (6 / (16 * 4 + 64)) ** 0.5  # xavier-uniform over the flattened kernel
    assert out["patch_short.weight"].abs().max() <= bound and out["patch_short.weight"].std() > bound / 3
    torch.testing.assert_close(
        out["patch_mid.weight"][:, :, :2, :2, :2].mean(), out["patch_short.weight"][:, :, 0, 0, 0].mean() / 8
    )
    assert torch.equal(
        convert_wan_state_dict(sd, "random", seed=3)["patch_long.weight"], out["patch_long.weight"]
    )
    with pytest.raises(ValueError, match="memory_patch_init"):
        convert_wan_state_dict(sd, "bogus")


def test_i2v_checkpoint_is_rejected():
    with pytest.raises(ValueError, match="T2V"):
        helios_config_from_wan({**TINY_WAN, "eps": 1e-6, "image_dim": 1280})


def test_a_wan_directory_serves_as_teacher_weights(wan_dir):
    """``distill.teacher`` (and ``init_from``) may name a Wan-2.1 diffusers directory, e.g. the bidirectional
    teacher of Table 5: its weights arrive converted to Helios names, whether the path is the pipeline
    folder or its transformer subfolder."""
    from helios.loading import merged_weights

    expected = load_wan_as_helios(str(wan_dir)).state_dict()
    for path in (wan_dir, wan_dir.parent):
        state = merged_weights(str(path))
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
