"""Resume a run dir's newest checkpoint on this launch's world size (under torchrun or alone) and dump, whole
and on the main rank, everything the resume restored: step, learning rates, optimizer steps per role, the
data position, the gradient accumulation, the trainable weights, every AdamW moment and the EMA.

    python tests/helpers/elastic_probe.py RUN_DIR OUT.pt [overrides ...]

tests/trainer/test_cluster.py compares it with the checkpoint's own files."""

import sys
from pathlib import Path

import torch

from helios.bench.tiny_recipe import complete_tiny_distill
from helios.config import compose
from helios.infra.backend import DdpBackend, model_tensors
from helios.trainer import Trainer


def optimizer_moments(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every trainable parameter's AdamW moments, whole (collective under ZeRO): under DDP keyed
    ``<index in the optimizer>.<moment>`` (a checkpoint's ``state.pt`` numbers them so), under ZeRO
    ``<role>/<name in the engine's module>.<moment>`` (the names of DeepSpeed's universal checkpoint)."""
    out = {}
    if isinstance(trainer.backend, DdpBackend):
        state = trainer.backend.checkpoint_objects()["optimizer"]
        if state is None:  # ZeRO-1 consolidates on the main rank only
            return {}
        for index, moments in state["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{index}.{key}"] = moments[key].float().cpu()
        return out
    from deepspeed.utils import safe_get_full_optimizer_state

    for role, engine in trainer.backend.engines.engines.items():
        for name, p in engine.module.named_parameters():
            if p.requires_grad:
                for key in ("exp_avg", "exp_avg_sq"):
                    out[f"{role}/{name}.{key}"] = safe_get_full_optimizer_state(p, key).float().cpu()
    return out


def main() -> None:
    run_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = compose(["validation.enabled=false", "trainer.progress=false", *sys.argv[3:]])
    trainer = Trainer(complete_tiny_distill(cfg), run_dir)
    try:
        trainer.prepare()
        with trainer.backend.gathered():
            weights = model_tensors(trainer.model, random_base=False)["trainable"]
        moments = optimizer_moments(trainer)
        ema = trainer.ema.tensors().get("ema", {})
        lrs = [g["lr"] for opt, _, _ in trainer.backend.schedules() for g in opt.param_groups]
        if trainer.dist.is_main:
            torch.save(
                {
                    "world_size": trainer.dist.world_size,
                    "step": trainer.step,
                    "lrs": lrs,
                    "opt_steps": dict(trainer.opt_steps),
                    "consumed": trainer.sampler.state_dict()["consumed"],
                    "global_batch": trainer.global_batch(),
                    "weights": weights,
                    "moments": moments,
                    "ema": ema,
                    "ema_updates": trainer.ema.state_dict()["updates"].get("generator"),
                },
                out,
            )
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
