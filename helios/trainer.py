"""The one training loop shared by all stages: data, DDP, optimiser, logging, checkpoints, resume."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from helios.config.load import to_yaml
from helios.config.schema import ConfigError, TrainConfig
from helios.core.history import HistoryLayout
from helios.data.dataset import BucketBatchSampler, ClipBatch, make_loader, training_dataset
from helios.data.synthetic import synthetic_shards
from helios.infra import checkpoint
from helios.infra.distributed import (
    DistInfo,
    all_mean,
    barrier,
    broadcast_object,
    setup,
    teardown,
)
from helios.infra.guard import Reading, StepGuard
from helios.infra.metrics import MetricsLogger, micro_means
from helios.infra.parallel import RoleCall, TrainerRoleSteps, wrap_ddp
from helios.infra.resolve import resolve_grad_accum, resolve_num_workers, resolve_precision
from helios.infra.resume import config_changes
from helios.infra.rng import seed_everything, shared_generator
from helios.infra.tracking import WandbTracker, run_name
from helios.infra.zero import RoleEngines
from helios.loading import merged_weights, trained_latent_format
from helios.model import count_parameters, load_trainable_state_dict, trainable_state_dict
from helios.model.lora import lora_inputs_uncast
from helios.model.transformer import cast_frozen
from helios.stages import STAGES
from helios.validation import Validation

log = logging.getLogger(__name__)


STOP_FILE = "STOP"  # in the run dir: save at the next step boundary and exit (launch/helios.sbatch)


class Trainer:
    def __init__(
        self, cfg: TrainConfig, run_dir: str | Path, run_name: str | None = None, run_group: str | None = None
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_name, self.run_group = run_name, run_group
        self.tracker = None
        self.dist: DistInfo = setup(cfg.parallel, cfg.trainer)
        self.grad_accum = resolve_grad_accum(cfg, self.dist.world_size)
        self.dtype = resolve_precision(cfg, self.dist.device)
        self.stage = STAGES[cfg.stage](cfg, merged_weights)
        self.step = 0
        self.data_skipped = 0
        self.role_ddp: dict[str, DistributedDataParallel] = {}  # stage 3 under DDP: one wrapper per role
        self.guard = StepGuard(self.dist.device)  # divergence checks: one host sync per step
        self.stop_requested = False  # a STOP file seen by the main rank at the last step (all ranks agree)
        self.validation = Validation(cfg, self.dist, self.run_dir)

    # ------------------------------------------------------------------ setup
    def _build_data(self) -> None:
        cfg = self.cfg
        if cfg.data.kind == "synthetic":
            path = synthetic_shards(cfg, self.dist.is_main)
            barrier()
        else:
            path = Path(cfg.data.path)
            if not path.is_dir():
                raise FileNotFoundError(
                    f"data.path={path} does not exist; write shards with `python -m helios.prepare input=... "
                    f"output={path}` or use data=synthetic"
                )
        self.stage.setup(path, self.dist)  # e.g. stage 3: teacher, ODE pairs, the empty prompt
        own = self.stage.make_dataset(path)
        self.dataset = own if own is not None else training_dataset(path, cfg)
        self.sampler = BucketBatchSampler(
            self.dataset,
            cfg.trainer.batch_size,
            self.dist.rank,
            self.dist.world_size,
            cfg.seed,
            cfg.data.shuffle,
        )
        self._batches = None  # the loader starts after a resume has restored the data position

    def next_batch(self):
        if self._batches is None:
            cuda = self.dist.device.type == "cuda"
            workers = resolve_num_workers(self.cfg.trainer.num_workers, self.dist.device)
            self._batches = make_loader(self.dataset, self.sampler, workers, pin_memory=cuda)
        batch, (epoch, position) = next(self._batches)
        self.sampler.epoch, self.sampler.position = epoch, position  # consumed, not prefetched
        return batch

    def _source_nodes(self) -> dict[str, tuple[object, str]]:
        """The config fields that name weights to load, as (node, attribute) by their key."""
        cfg, m = self.cfg, self.cfg.model
        nodes = {"init_from": (cfg, "init_from")}
        nodes.update({f"distill.{k}": (cfg.distill, k) for k in ("teacher", "generator_init")})
        for key in ("transformer", "vae", "text_encoder"):
            node = getattr(m, key)
            if node.source in ("helios", "wan", "pretrained"):
                nodes[f"model.{key}.path"] = (node, "path")
        return nodes

    def _pin_sources(self, saved: dict[str, str | None] | None = None) -> None:
        """Weight sources as absolute paths, run dirs as their exact checkpoint: ``config.yaml`` and every
        checkpoint then name what this run started from, so export / generate / a later ``init_from``
        rebuild the same weights from any working directory. A resumed run keeps the sources it started
        with (``saved``), even when a source run has trained on since."""
        for key, (node, attr) in self._source_nodes().items():
            pinned = checkpoint.pin_source(getattr(node, attr), key)
            if saved and key in saved and saved[key] != pinned:
                if self.dist.is_main and pinned is not None:
                    log.warning("%s: resuming with the source this run started from, %s", key, saved[key])
                pinned = saved[key]
            setattr(node, attr, pinned)

    def _check_source_formats(self) -> None:
        """Weights trained on one latent format are not trained on on another (the data semantics would
        change silently: a single-frame latent at every section start, or none)."""

        want = self.cfg.data.latent_format
        for key, source in self.sources().items():
            if key in ("model.vae.path", "model.text_encoder.path"):
                continue
            found = trained_latent_format(source)
            if found not in (None, want):
                raise ConfigError(
                    "data.latent_format",
                    f"{key}={source} was trained on the {found} latent format, this run trains on {want}: "
                    f"set data.latent_format={found} (with shards prepared with clip.format={found})",
                )

    def sources(self) -> dict[str, str | None]:
        return {key: getattr(node, attr) for key, (node, attr) in self._source_nodes().items()}

    def _build_model(self, saved_sources: dict[str, str | None] | None = None) -> None:
        cfg = self.cfg
        self._pin_sources(saved_sources)
        self._check_source_formats()
        base_state = self._merged_init_weights(cfg.init_from) if cfg.init_from else None
        seed_everything(cfg.seed)  # the same initial weights (LoRA A draws) on every rank and every run
        # frozen bases loaded in the compute dtype and held once (the state's tensors are the model's)
        self.model = self.stage.build_model(base_state, self.dtype)
        del base_state
        cast_frozen(self.model, self.dtype)  # frozen base in the compute dtype (diffusers' fp32 modules kept)
        placed = self.stage.place(self.model, self.dist.device)
        if not placed:
            self.model.to(self.dist.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("model.lora", "nothing is trainable: enable LoRA or set memory_patch=full")
        o = cfg.optim
        groups = self.stage.param_groups(self.model)
        self.group_names = [g["name"] for g in groups]
        self.group_lrs = [g["lr"] for g in groups]  # the configured learning rates (applied on resume)
        self.opt_steps = dict.fromkeys(self.group_names, 0)
        from diffusers.optimization import get_scheduler

        def make_scheduler(optimizer):
            return get_scheduler(
                o.schedule,
                optimizer,
                num_warmup_steps=o.warmup_steps,
                num_training_steps=max(1, cfg.trainer.max_steps),
            )

        if cfg.parallel.backend != "ddp":
            self._build_engines(groups, make_scheduler, placed)
        else:
            self.engines = None
            self.wrapped = self.model
            if self.dist.enabled:
                # offloaded frozen weights stay where the stage put them (equal on all ranks)
                ddp = {
                    "device": self.dist.device,
                    "find_unused": cfg.parallel.find_unused_parameters,
                    "frozen_elsewhere": placed,
                    "grad_comm": cfg.parallel.grad_comm,
                }
                modules = self._role_modules()
                if modules is None:
                    self.wrapped = wrap_ddp(self.model, **ddp)
                else:  # one wrapper per trainable role: its backward all-reduces its gradients
                    self.role_ddp = {
                        name: wrap_ddp(RoleCall(modules[name]), **ddp) for name in self.group_names
                    }
            adamw = {"lr": o.lr, "betas": tuple(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
            param_groups = [{"params": g["params"], "lr": g["lr"]} for g in groups]
            if self.dist.enabled and cfg.parallel.shard_optimizer:
                self.optimizer = ZeroRedundancyOptimizer(
                    param_groups, optimizer_class=torch.optim.AdamW, **adamw
                )
            else:
                self.optimizer = torch.optim.AdamW(param_groups, **adamw)
            self.lr_scheduler = make_scheduler(self.optimizer)
        self.generator = torch.Generator().manual_seed(cfg.seed * 100_003 + self.dist.rank)
        seed_everything(cfg.seed * 100_003 + self.dist.rank)  # per-rank streams from here on

    def _role_modules(self) -> dict[str, nn.Module] | None:
        """The stage's roles (stage 3), or None: the whole model is the one role."""
        return self.stage.role_modules(self.model)

    def _build_engines(self, groups: list[dict], make_scheduler, placed: bool) -> None:
        """``parallel=zero2|zero3``: one DeepSpeed engine per role (helios/infra/zero.py)."""

        modules = self._role_modules() or {"model": self.model}
        for role in self.cfg.parallel.roles.chosen():
            if role not in modules:
                raise ConfigError(
                    f"parallel.roles.{role}",
                    f"stage {self.cfg.stage} ({self.cfg.phase}) has no role {role!r}; its roles: "
                    + ", ".join(modules),
                )
        resident = self.stage.make_resident if placed else None  # the offload pool (stage 3)
        self.engines = RoleEngines(self.cfg, modules, groups, self.grad_accum, make_scheduler, resident)
        if placed:
            self.stage.make_resident()
        self.wrapped = self.model
        self.optimizer = self.lr_scheduler = None

    # ------------------------------------------------------------------ checkpoint
    def _rank_state(self) -> dict:
        state = {
            "generator": self.generator.get_state(),
            "torch": torch.random.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "sampler": self.sampler.state_dict(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def save_checkpoint(self) -> Path:
        gathered = self.engines.gathered() if self.engines else contextlib.nullcontext()
        with gathered:  # ZeRO-3: full weights on every rank for the duration (collective)
            tensors = {"trainable": trainable_state_dict(self.model)}
            if self.cfg.model.transformer.source == "random":
                # A random base exists nowhere on disk: keep it, so export/resume never depend on init_seed.
                tensors["base"] = {
                    n: p.detach().cpu().contiguous()
                    for n, p in self.model.state_dict().items()
                    if n not in tensors["trainable"]
                }
        tensors.update(self.stage.extra_tensors())
        objects = {
            "opt_steps": self.opt_steps,
            "step": self.step,
            "stage": self.stage.state_dict(),
            "config": to_yaml(self.cfg),
        }
        if self.engines is None:
            objects["optimizer"] = self._optimizer_state()
            objects["lr_scheduler"] = self.lr_scheduler.state_dict()
        path = checkpoint.save(
            self.run_dir,
            self.step,
            self.dist,
            tensors,
            objects,
            self._rank_state(),
            self.cfg.trainer.keep_last,
            write_extra=(lambda tmp: self.engines.save(tmp / "zero")) if self.engines else None,
            sources=self.sources(),
        )
        if self.dist.is_main:
            log.info("saved checkpoint %s", path)
        return path

    def _optimizer_state(self) -> dict | None:
        """The whole optimizer state (on the main rank; collective for a sharded optimizer, whose shards
        are gathered to the main rank's host memory): the same format with or without sharding."""
        if isinstance(self.optimizer, ZeroRedundancyOptimizer):
            self.optimizer.consolidate_state_dict(to=0)
            return self.optimizer.state_dict() if self.dist.is_main else None
        return self.optimizer.state_dict()

    def _load_weights(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        if "base" in tensors:
            current = self.model.state_dict()
            self.model.load_state_dict(
                {k: v.to(current[k].dtype) for k, v in tensors["base"].items()}, strict=False
            )
        load_trainable_state_dict(self.model, tensors["trainable"])

    def _merged_init_weights(self, source: str) -> dict[str, torch.Tensor]:
        """``init_from``: the previous run's model rebuilt from its own saved config with its LoRA merged
        (for a stage-3 run: its generator): the next phase or stage starts from exactly the function the
        previous one ended with, whatever its own LoRA settings."""
        if self.dist.is_main:
            log.info("initialising from %s (LoRA merged)", source)
        return merged_weights(source, dtype=self.dtype)

    def load_checkpoint(self, path: Path) -> None:
        tensors, objects, rank_state = checkpoint.load(path, self.dist)
        if self.engines is not None:
            if not (path / "zero").is_dir():
                raise ValueError(
                    f"resume={path}: written with parallel=ddp, this run uses "
                    f"parallel={self.cfg.parallel.backend}; resume with the same backend or init_from={path}"
                )
            self.engines.load(path / "zero")  # weights, partitioned optimiser state, LR scheduler
        else:
            if "optimizer" not in objects:
                raise ValueError(
                    f"resume={path}: written with parallel=zero*, this run uses parallel=ddp; resume with "
                    f"the same backend or init_from={path}"
                )
            self._load_weights(tensors)
            self.optimizer.load_state_dict(objects["optimizer"])
            self.lr_scheduler.load_state_dict(objects["lr_scheduler"])
        self._check_resume_config(objects["config"], path, int(objects["step"]))
        self._apply_learning_rates()
        self.stage.load_state_dict(objects["stage"])
        self.stage.load_extra_tensors(tensors)
        self.opt_steps.update(objects.get("opt_steps", {}))
        self.step = int(objects["step"])
        self.generator.set_state(rank_state["generator"])
        torch.random.set_rng_state(rank_state["torch"])
        random.setstate(rank_state["python"])
        np.random.set_state(rank_state["numpy"])
        if "cuda" in rank_state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rank_state["cuda"])
        self.sampler.load_state_dict(rank_state["sampler"])
        if self.dist.is_main:
            log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ loop
    def _summary(self) -> str:
        total, trainable = count_parameters(self.model)
        t = self.cfg.trainer
        layout = HistoryLayout.from_config(self.cfg.history)
        h, w = self.dataset.latent_hw()
        clips = t.batch_size * self.dist.world_size * self.grad_accum
        tokens = self.tokens_per_clip(h, w)
        frozen_bytes = sum(
            p.numel() * p.element_size() for p in self.model.parameters() if not p.requires_grad
        )
        # trainable fp32 weights + fp32 grads + two AdamW moments
        state_bytes = trainable * 4 * 4
        return (
            f"Helios stage {self.cfg.stage} ({self.cfg.phase}) | run dir {self.run_dir}\n"
            f"  model {self.cfg.model.name}: {total / 1e6:.2f}M params, {trainable / 1e6:.3f}M trainable "
            f"(LoRA r={self.cfg.model.lora.rank}, enabled={self.cfg.model.lora.enabled})\n"
            f"  data: {len(self.dataset)} clips of {layout.clip_frames} latent frames "
            f"(history {list(self.cfg.history.sizes)} + window {layout.window}, "
            f"{self.cfg.data.latent_format} format)\n"
            f"  batch: {t.batch_size} x {self.dist.world_size} ranks x {self.grad_accum} accum = "
            f"{clips} clips/step | device {self.dist.device} "
            f"| {str(self.dtype).replace('torch.', '')} | {t.max_steps} steps\n"
            f"  tokens per clip: {tokens['noisy']} noisy + {tokens['history']} history; per step "
            f"{clips * (tokens['noisy'] + tokens['history']):,}\n"
            f"  parallel: {self._parallel_layout()} over {self.dist.world_size} rank(s) | memory per rank "
            f"(weights + grads + AdamW, activations excluded): {(frozen_bytes + state_bytes) / 2**30:.2f} GiB"
        )

    def _parallel_layout(self) -> str:
        """``ddp``, or each role's ZeRO stage, e.g. ``zero2 (generator zero2, critic zero2, real zero3)``."""
        if self.engines is None:
            return self.cfg.parallel.backend
        roles = ", ".join(f"{name} {kind}" for name, kind in self.engines.kind.items())
        return f"{self.cfg.parallel.backend} ({roles})"

    def tokens_per_clip(self, h: int, w: int) -> dict[str, int]:
        """Noisy and history tokens of one training clip (patch 1x2x2; mid 2x4x4 and long 4x8x8 convs on
        replicate-padded inputs)."""

        def up(a: int, b: int) -> int:
            return -(-a // b)

        layout = HistoryLayout.from_config(self.cfg.history)
        short = (h // 2) * (w // 2)
        if not layout.multi_term:
            history = (layout.num_history + 1) * short
        else:
            history = (
                (layout.short + 1) * short
                + up(layout.mid, 2) * up(h, 4) * up(w, 4)
                + up(layout.long, 4) * up(h, 8) * up(w, 8)
            )
        return {"noisy": layout.window * short, "history": history}

    def _micro_step(self, micro: int, last: bool) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        batch = self.next_batch()  # on the host (pinned on a GPU); the stage copies what it needs
        self.data_skipped += batch.skipped if isinstance(batch, ClipBatch) else 0
        # DDP: no gradient all-reduce before the last micro-batch (per-role wrappers: TrainerRoleSteps);
        # ZeRO engines accumulate by themselves
        whole = isinstance(self.wrapped, DistributedDataParallel)
        sync = self.wrapped.no_sync() if whole and not last else contextlib.nullcontext()
        autocast_on = self.dtype == torch.bfloat16
        autocast = torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=autocast_on)
        if self.engines is not None:
            self.engines.begin_micro_step()
        roles = TrainerRoleSteps(
            self.role_ddp, self.engines, self.grad_accum, last, self.guard, self._verify_role
        )
        with sync:
            with autocast, lora_inputs_uncast(self.model, autocast_on):
                shared = shared_generator(self.cfg.seed, self.step, micro)
                loss, stats = self.stage.compute_loss(
                    self.wrapped, batch, self.generator, shared, roles=roles, step=self.step
                )
            # a stage with several roles returns one loss per role (their graphs are disjoint); the
            # roles whose backward the stage ran already (stage 3) are not run again
            losses = loss if isinstance(loss, dict) else {self.group_names[0]: loss}
            for role, value in losses.items():
                if role not in roles.done:
                    roles.backward(role, value)
        return sum(v.detach() for v in losses.values()), stats

    def _verify_role(self, role: str) -> None:
        """Under ZeRO, at the accumulation boundary: ``role``'s losses read before its engine steps."""
        self._check_losses(self.guard.read([role]))

    def _check_losses(self, reading: Reading) -> None:
        """A non-finite loss or one above ``trainer.max_loss`` stops the run before any update (the same
        verdict on every rank: the reading is reduced over ranks)."""
        limit = self.cfg.trainer.max_loss
        for role, kind in reading.nonfinite.items():
            if kind is not None:
                self._diverged(f"the {role} loss is {kind}")
        for role, worst in reading.worst.items():
            if limit and worst > limit:
                self._diverged(f"the {role} loss is {worst:.4g} (> trainer.max_loss={limit:g})")

    def _check_resume_config(self, saved_yaml: str, path: Path, step: int) -> None:
        """The resume contract (:func:`helios.infra.resume.config_changes`); the accepted changes are
        applied (learning rates: :meth:`_apply_learning_rates`) and appended to ``config_history.jsonl``."""
        changed = config_changes(saved_yaml, self.cfg, path)
        if changed and self.dist.is_main:
            log.info("resumed with changed settings: %s", changed)
            with (self.run_dir / "config_history.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, "from": str(path), "changes": changed}) + "\n")

    def _apply_learning_rates(self) -> None:
        """After loading optimizer and scheduler state: the configured learning rates (they may change on
        resume, e.g. to continue after a divergence with a lower optim.lr), at the schedule's position."""
        lrs = dict(zip(self.group_names, self.group_lrs))
        pairs = (
            [(self.optimizer, self.lr_scheduler, list(lrs.values()))]
            if self.engines is None
            else [(e.optimizer, e.lr_scheduler, [lrs[n]]) for n, e in self.engines.engines.items()]
        )
        for optimizer, scheduler, base in pairs:
            for group, lr in zip(optimizer.param_groups, base):
                group["initial_lr"] = lr
            scheduler.base_lrs = list(base)
            with warnings.catch_warnings():  # get_lr() outside step() warns; here it is what we want
                warnings.simplefilter("ignore")
                current = scheduler.get_lr()
            for group, lr in zip(optimizer.param_groups, current):
                group["lr"] = lr
            scheduler._last_lr = list(current)

    def _resolve_resume(self) -> Path | None:
        """The checkpoint to resume from, chosen (and its files verified) by the main rank for all."""
        outcome = None
        if self.dist.is_main:
            try:
                outcome = ("ok", checkpoint.resolve_resume(self.cfg.resume, self.run_dir))
            except (FileNotFoundError, checkpoint.CorruptCheckpoint) as err:
                outcome = (type(err).__name__, str(err))
        kind, value = broadcast_object(outcome)
        if kind == "FileNotFoundError":
            raise FileNotFoundError(value)
        if kind == "CorruptCheckpoint":
            raise checkpoint.CorruptCheckpoint(value)
        return value

    def _diverged(self, what: str) -> None:
        """Stop before a non-finite loss or gradient reaches the optimizer or a checkpoint, naming the
        step, the role and the newest checkpoint, which holds weights from before the divergence."""
        done = checkpoint.list_complete(self.run_dir)
        last = f"the last checkpoint, {done[-1][1]}," if done else "no checkpoint yet; the run"
        raise FloatingPointError(
            f"{what} at step {self.step + 1}: nothing was updated or saved; {last} is unaffected. "
            "Lower optim.lr (a resumed run applies the new value) or check the data, then resume=latest"
        )

    def train_step(self, metrics: bool = True) -> dict[str, float]:
        """One optimiser step over ``grad_accum`` micro-batches. The host waits for the device once (the
        divergence check before the update, helios/infra/guard.py); ``metrics=False`` (a step that is not
        logged) returns ``{}`` and never reads the stage's metrics, which stay on the device."""
        t0 = time.perf_counter()
        records = []
        for micro in range(self.grad_accum):
            try:
                loss, stats = self._micro_step(micro, last=micro == self.grad_accum - 1)
            except torch.OutOfMemoryError as err:
                clips = self.cfg.trainer.batch_size * self.dist.world_size * self.grad_accum
                raise RuntimeError(
                    f"out of device memory at step {self.step + 1} with trainer.batch_size="
                    f"{self.cfg.trainer.batch_size}. Try trainer.batch_size=1 "
                    f"trainer.global_batch_size={clips} (the same global batch by accumulation), "
                    "model.transformer.gradient_checkpointing=true, "
                    "or fewer history/window frames"
                ) from err
            records.append({"loss": loss, **stats})
        # a STOP file (launch/helios.sbatch, on pre-emption): the main rank looks, the step's one read
        # tells every rank, and all save at this step boundary and exit
        stop = float(self.dist.is_main and (self.run_dir / STOP_FILE).exists())
        if self.engines is not None:
            lr = self.engines.lr()
            role_norms, stepped = self.engines.finish_step()
            self.stop_requested = self.guard.read([], {"stop": stop}).extra["stop"] > 0
        else:
            role_norms, stepped, lr = self._optimizer_step(stop)
        for name in stepped:
            self.opt_steps[name] += 1
        self.step += 1
        self.stage.after_optimizer_step(self.model, self.step, stepped)
        if not metrics:
            return {}
        return self._step_metrics(records, role_norms, lr, time.perf_counter() - t0)

    def _step_metrics(
        self, records: list[dict], role_norms: dict[str, float], lr: float, elapsed: float
    ) -> dict[str, float]:
        """The logged metrics of a step: the stage's, averaged over micro-batches and ranks (one
        all-reduce), gradient norms, learning rate and throughput."""
        clips = self.cfg.trainer.batch_size * self.grad_accum * self.dist.world_size
        keys = self.metric_keys(records)
        metrics: dict[str, float | torch.Tensor] = dict(micro_means(records, keys, self.dist.device))
        metrics["grad_norm"] = math.sqrt(sum(n**2 for n in role_norms.values())) if role_norms else 0.0
        metrics["data_skipped"] = float(self.data_skipped)  # corrupt samples replaced so far (on_error=skip)
        metrics = all_mean(metrics, self.dist.device, keys=[*keys, "grad_norm", "data_skipped"])
        metrics["data_skipped"] *= self.dist.world_size  # the total over ranks
        metrics.update({"lr": lr, "samples_per_s": clips / elapsed, "step_time_s": elapsed})
        if len(self.group_names) > 1:
            metrics.update({f"grad_norm_{n}": role_norms.get(n, 0.0) for n in self.group_names})
            metrics.update({f"opt_steps_{n}": float(self.opt_steps[n]) for n in self.group_names})
        return metrics

    def _optimizer_step(self, stop: float) -> tuple[dict[str, float], list[str], float]:
        """DDP / single process: per-role clipping, then one read of the losses, the gradient norms and
        the stop request (one host sync), then one AdamW step over the roles with gradients."""
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        norms = {}
        for name, group in zip(self.group_names, self.optimizer.param_groups):
            with_grad = [p for p in group["params"] if p.grad is not None]
            if with_grad:  # a role without gradients (TTUR) is not stepped: AdamW skips it
                norms[name] = torch.nn.utils.clip_grad_norm_(with_grad, clip)
        reading = self.guard.read(self.group_names, {**norms, "stop": stop})
        self.stop_requested = reading.extra["stop"] > 0
        role_norms = {name: reading.extra[name] for name in norms}
        try:
            self._check_losses(reading)
            for name, norm in role_norms.items():
                if not math.isfinite(norm):
                    self._diverged(f"the {name} gradient norm is {norm}")
        except FloatingPointError:
            self.optimizer.zero_grad(set_to_none=True)
            raise
        lr = self.lr_scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return role_norms, list(norms), lr

    def metric_keys(self, records: list[dict]) -> list[str]:
        """The stage's metric names: fixed per stage so every rank all-reduces the same list."""
        declared = self.stage.metric_names()
        return sorted(declared if declared is not None else {k for r in records for k in r})

    def run(self) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resume = self._resolve_resume()
        self._build_data()
        self._build_model(checkpoint.saved_sources(resume) if resume is not None else None)
        if resume is not None:
            self.load_checkpoint(resume)
        if self.dist.is_main:
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
            print(self._summary(), flush=True)
        if self.dist.is_main and self.cfg.logging.wandb:
            self.tracker = self._start_tracker()
        logger = MetricsLogger(
            self.run_dir, self.dist.is_main, self.cfg.trainer.max_steps, self.step, self.cfg.trainer.progress
        )
        self.wrapped.train()
        every = self.cfg.trainer.checkpoint_every
        v = self.cfg.validation
        last = self.cfg.trainer.max_steps
        while self.step < last:
            upcoming = self.step + 1
            validate = v.enabled and ((v.every and upcoming % v.every == 0) or upcoming == last)
            logged = validate or upcoming % self.cfg.trainer.log_every == 0 or upcoming == last
            metrics = self.train_step(metrics=logged)
            if validate:
                self.stage.before_validation()  # collective (e.g. gathers a sharded EMA)
                metrics.update(self.validate())  # collective: the prompts are spread over the ranks
                self.stage.after_validation()
                barrier()
            if logged:
                logger.log(self.step, metrics)
                if self.tracker is not None:
                    self.tracker.log(self.step, metrics)
            saved = (every and self.step % every == 0) or self.step == last
            if saved:
                self.save_checkpoint()
            if self.step < last and self.stop_requested:
                if not saved:
                    self.save_checkpoint()
                if self.dist.is_main:
                    (self.run_dir / STOP_FILE).unlink(missing_ok=True)
                    print(f"stop requested: checkpoint at step {self.step} saved; exiting", flush=True)
                break
        return self.run_dir

    @property
    def _zero3(self) -> bool:
        """Some role is partitioned by ZeRO-3 (its forwards are collectives)."""
        return self.engines is not None and self.engines.any_zero3

    def validate(self) -> dict[str, float]:
        """Videos and measures for the validation prompts (:class:`helios.validation.Validation`);
        collective: every rank returns every prompt's metrics."""
        return self.validation(
            self.step,
            self.model,
            self.stage.sampling_model(self.model),
            self.dataset.latent_hw(),
            self.dtype,
            self._zero3,
            self.tracker,
        )

    def _start_tracker(self):

        id_file = self.run_dir / "wandb_id.txt"
        if self.cfg.logging.run_id is None:
            import uuid

            if not id_file.exists():
                id_file.write_text(uuid.uuid4().hex[:12])
            self.cfg.logging.run_id = id_file.read_text().strip()
        return WandbTracker(self.cfg, self.run_dir, run_name(self.cfg, self.run_name or ""), self.run_group)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.finish()
        # Free what holds the process group (DDP's reducer, ZeRO engines) while it is still registered:
        # freed later, the reducer's dealloc would destroy the gloo group holding the GIL while gloo's
        # worker thread waits for the GIL to free its last work -- a deadlock at exit seen under Slurm.
        self.wrapped = self.model = self.engines = None
        self.role_ddp = {}
        self.stage.release()
        gc.collect()
        teardown()
