"""Model build in host memory (#19): bases loaded once in the compute dtype and held by the roles
themselves (no fp32 copy, no second copy of a state dict); hand-offs keep their values."""

from __future__ import annotations

import torch

from helios.bench.tiny_recipe import complete_tiny_distill
from helios.config import compose
from helios.loading import merged_weights
from helios.model import build_transformer
from helios.model.weights import keeps_fp32
from tests.helpers.runs import train_in_process as _train


def _storages(module: torch.nn.Module) -> dict[str, int]:
    return {n: p.untyped_storage().data_ptr() for n, p in module.named_parameters() if not p.requires_grad}


def test_a_state_becomes_the_models_weights_in_the_compute_dtype():
    cfg = compose([]).model.transformer
    state = {
        k: v.to(torch.bfloat16) if not keeps_fp32(k) else v
        for k, v in build_transformer(cfg).state_dict().items()
    }
    model = build_transformer(cfg, dtype=torch.bfloat16, state=state)
    params = dict(model.named_parameters())
    assert params.keys() == state.keys()
    assert all(params[k].data_ptr() == state[k].data_ptr() for k in state)  # the same tensors, no copy
    assert {p.dtype for k, p in params.items() if not keeps_fp32(k)} == {torch.bfloat16}
    assert {p.dtype for k, p in params.items() if keeps_fp32(k)} == {torch.float32}


def test_init_from_hands_over_the_merged_model_in_bf16_by_value(tmp_path):
    """stage 1 (fp32) -> stage 2 built in bf16: its base is the stage-1 merged model rounded once to bf16
    (diffusers' fp32 modules exact), its LoRA fp32."""
    from helios.trainer import Trainer

    _train(["trainer.checkpoint_every=2", "trainer.max_steps=2", "optim.lr=1e-2"], tmp_path / "s1")
    reference = merged_weights(tmp_path / "s1")  # fp32
    cfg = compose(
        [
            "stage=2",
            "trainer.precision=bf16",
            "validation.enabled=false",
            "trainer.progress=false",
            f"init_from={tmp_path / 's1'}",
        ]
    )
    trainer = Trainer(cfg, tmp_path / "s2")
    trainer._build_data()
    trainer._build_model()
    base = {
        n.replace(".base_layer.", "."): p for n, p in trainer.model.named_parameters() if not p.requires_grad
    }
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert base.keys() | trained == reference.keys() and base  # frozen base + the fully trained convs
    for name in base:
        value = reference[name]
        want = value if keeps_fp32(name) else value.to(torch.bfloat16)
        assert base[name].dtype == want.dtype and torch.equal(base[name].data, want), name
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)
    trainer.close()


def test_stage3_roles_hold_their_own_bases_in_bf16(tmp_path):
    """Each role holds its own base (two roles never share a tensor: checkpoints, the offload pool and
    ZeRO treat each parameter on its own), in bf16 but for diffusers' fp32 modules."""
    from helios.trainer import Trainer

    for shared in (True, False):
        cfg = compose(
            [
                "stage=3",
                f"distill.shared_teacher={str(shared).lower()}",
                "trainer.precision=bf16",
                "validation.enabled=false",
                "trainer.progress=false",
            ]
        )
        trainer = Trainer(complete_tiny_distill(cfg), tmp_path / str(shared))
        trainer._build_data()
        m = trainer.stage.build_model(None, torch.bfloat16)
        roles = [m.generator, m.fake] + ([] if shared else [m.real])
        storages = [set(_storages(r).values()) for r in roles]
        assert all(not (a & b) for i, a in enumerate(storages) for b in storages[i + 1 :])
        for role in roles:
            dtypes = {
                p.dtype for n, p in role.named_parameters() if not p.requires_grad and not keeps_fp32(n)
            }
            assert dtypes == {torch.bfloat16}
        trainer.close()
