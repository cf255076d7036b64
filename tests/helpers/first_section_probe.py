"""Two stage-3 steps under torchrun where the ranks differ: rank 0's micro-batch has an empty history (a
video's first section), rank 1's has a real one. Writes each rank's generator timesteps and step metrics.

    torchrun --nproc_per_node=2 tests/helpers/first_section_probe.py OUT_DIR [overrides ...]
"""

import json
import sys
from pathlib import Path

import torch

from helios.bench.tiny_recipe import complete_tiny_distill
from helios.config import compose
from helios.trainer import Trainer


def main() -> None:
    out = Path(sys.argv[1])
    cfg = compose(
        [
            "stage=3",
            "trainer.batch_size=1",
            "trainer.checkpoint_every=0",
            "validation.enabled=false",
            "trainer.progress=false",
            "distill.ttur=1",
            *sys.argv[2:],
        ]
    )
    trainer = Trainer(complete_tiny_distill(cfg), out / "run")
    trainer.prepare()
    rank = trainer.dist.rank
    condition = trainer.stage.phase.condition

    def differing(batch, gen):
        cond, target, stats = condition(batch, gen)
        for key, value in cond.items():
            if key.startswith("latents_history"):
                cond[key] = torch.zeros_like(value) if rank == 0 else value + 1.0
        return cond, target, {**stats, "history_empty": 1.0 if rank == 0 else 0.0}

    trainer.stage.phase.condition = differing
    seen: list[float] = []
    generator = trainer.model.generator
    original = generator.forward

    def recording(*args, **kwargs):
        seen.append(float(kwargs["timestep"].flatten()[0]))
        return original(*args, **kwargs)

    generator.forward = recording
    metrics = [trainer.train_step() for _ in range(2)]
    (out / f"rank{rank}.json").write_text(
        json.dumps({"timesteps": seen, "first_section": [m["first_section"] for m in metrics]})
    )
    trainer.close()


if __name__ == "__main__":
    main()
