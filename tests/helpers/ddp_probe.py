"""Run the trainer for a few steps under torchrun and dump each rank's trainable weights and data, how often
it read weights and where its parameters live (node-shared /dev/shm files, by inode)."""

import json
import sys
from pathlib import Path

from node_share_probe import mapped_inode
from safetensors.torch import save_file

from helios import trainer as trainer_module
from helios.bench.tiny_recipe import complete_tiny_distill
from helios.config import compose
from helios.model import trainable_state_dict
from helios.trainer import Trainer


def main() -> None:
    out = Path(sys.argv[1])
    cfg = compose(
        [
            "trainer.max_steps=3",
            "trainer.batch_size=2",
            "trainer.checkpoint_every=0",
            "validation.enabled=false",
            "trainer.progress=false",
            *sys.argv[2:],
        ]
    )
    loads = []  # the weight sources this rank read itself
    read = trainer_module.merged_weights
    trainer_module.merged_weights = lambda source, *a, **k: loads.append(str(source)) or read(source, *a, **k)
    trainer = Trainer(complete_tiny_distill(cfg), out / "run")
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    trainer._build_data()
    planned = iter(trainer.sampler)  # the batches training will consume, in order
    seen = [[b[0][1], [i for i, *_ in b]] for b in (next(planned) for _ in range(cfg.trainer.max_steps))]
    trainer._build_model()
    trainer_module.merged_weights = read
    placement = {"frozen": set(), "trainable": set()}  # the inodes of the files the parameters map
    for p in trainer.model.parameters():
        placement["trainable" if p.requires_grad else "frozen"].add(mapped_inode(p.data_ptr()))
    if trainer.dist.rank == 0:  # the weights before any step, to show that training moved them
        save_file(trainable_state_dict(trainer.model), str(out / "init.safetensors"))
    losses = [trainer.train_step()["loss"] for _ in range(cfg.trainer.max_steps)]
    rank = trainer.dist.rank
    save_file(trainable_state_dict(trainer.model), str(out / f"rank{rank}.safetensors"))
    assembled = []  # which ranks assemble a checkpoint's tensors (the main rank alone writes them)
    original = trainer_module.model_tensors
    trainer_module.model_tensors = lambda *a, **k: assembled.append(rank) or original(*a, **k)
    saved = trainer.save_checkpoint()
    trainer_module.model_tensors = original
    report = {"seen": seen, "losses": losses, "assembled": len(assembled), "checkpoint": str(saved)}
    report.update(loads=loads, **{k: sorted(v, key=str) for k, v in placement.items()})
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    trainer.close()


if __name__ == "__main__":
    main()
