"""Under torchrun: a ZeRO-3 run's first steps with ``parallel.zero_hpz_partition_size`` (argv[2]); writes each
rank's losses and how many of its parameters carry hpZ's node-local second partition."""

import json
import sys
from pathlib import Path

from helios.config import compose
from helios.trainer import Trainer


def main() -> None:
    out, hpz = Path(sys.argv[1]), sys.argv[2]
    cfg = compose(["parallel=zero3", f"parallel.zero_hpz_partition_size={hpz}", "validation.enabled=false",
                   "trainer.progress=false", "trainer.batch_size=2", "trainer.global_batch_size=8",
                   "trainer.checkpoint_every=0"])  # fmt: skip
    trainer = Trainer(cfg, out / f"run{hpz}")
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    trainer._build_data()
    trainer._build_model()
    params = list(trainer.model.parameters())
    secondary = sum(getattr(p, "ds_secondary_tensor", None) is not None for p in params)
    losses = [trainer.train_step()["loss"] for _ in range(3)]
    report = {"losses": losses, "secondary": secondary, "params": len(params)}
    (out / f"hpz{hpz}_rank{trainer.dist.rank}.json").write_text(json.dumps(report))
    trainer.close()


if __name__ == "__main__":
    main()
