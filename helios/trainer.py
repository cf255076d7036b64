"""The one training loop shared by all stages: data, the parallel backend, logging, checkpoints, resume.

What varies lives elsewhere: the stage (:mod:`helios.stages`: model, roles, losses), the parallel backend
(:mod:`helios.infra.backend`: DDP or ZeRO engines), step-end callbacks (validation, ``metrics.jsonl``,
wandb: :mod:`helios.infra.callbacks`) and the resume contract (:mod:`helios.infra.resume`)."""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from helios.config.load import load_config, to_yaml
from helios.config.schema import ConfigError, TrainConfig
from helios.data.dataset import BucketBatchSampler, ClipBatch, make_loader, prepared_shards, training_dataset
from helios.data.synthetic import synthetic_shards
from helios.infra import checkpoint
from helios.infra.backend import ParallelBackend, build_backend, model_tensors
from helios.infra.callbacks import StepCallback, every
from helios.infra.distributed import (
    DistInfo,
    all_mean,
    barrier,
    broadcast_object,
    host_max,
    setup,
    teardown,
)
from helios.infra.ema import ModelEma
from helios.infra.guard import StepGuard, check_reading, diverged, weight_stats
from helios.infra.metrics import MetricsLogger, memory_peaks, micro_means
from helios.infra.model_roles import Role, trained_roles
from helios.infra.node_share import NodeShare, node_shared_loader, own_trainable
from helios.infra.resolve import (
    check_installed,
    out_of_memory,
    resolve_grad_accum,
    resolve_num_workers,
    resolve_precision,
)
from helios.infra.resume import record_changes, resolve_resume
from helios.infra.rng import rank_state, restore_rank_state, seed_everything, shared_generator
from helios.infra.run_lock import RunDirBusy, RunLock
from helios.infra.signals import StopSignals
from helios.infra.summary import run_summary
from helios.infra.tracking import start_tracker
from helios.loading import check_source_formats, merged_weights, pin_sources, weight_sources
from helios.model.flops import FlopCounter, peak_tflops
from helios.model.lora import lora_inputs_uncast
from helios.model.transformer import cast_frozen
from helios.stages import STAGES
from helios.validation import Validation

log = logging.getLogger(__name__)

STOP_FILE = "STOP"  # in the run dir: save at the next step boundary and exit (launch/helios.sbatch)


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: str | Path,
        sweep_member: int | None = None,
        run_group: str | None = None,
        overrides: list[str] | None = None,
    ) -> None:
        """``sweep_member``, ``run_group``: the run's number and the sweep's name in a sweep; ``overrides``:
        the command line's, for the tracker (helios/infra/tracking.py)."""
        check_installed(cfg)  # the optional packages its settings need
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.sweep_member, self.run_group, self.overrides = sweep_member, run_group, overrides or []
        self.tracker = None
        self.dist: DistInfo = setup(cfg.parallel, cfg.trainer)
        self.grad_accum = resolve_grad_accum(cfg, self.dist.world_size)
        self.dtype = resolve_precision(cfg.trainer.precision, self.dist.device)
        # the bases read at start-up, once per node (collective)
        self.share = NodeShare() if cfg.parallel.node_shared_weights and self.dist.world_size > 1 else None
        self.load_weights = node_shared_loader(self.share, merged_weights)
        self.stage = STAGES[cfg.stage](cfg, self.load_weights)
        self.step = 0
        self.data_skipped = 0
        self.backend: ParallelBackend | None = None
        self.guard = StepGuard(self.dist.device)  # divergence checks: one host sync per step
        self.stop_requested = False  # a STOP file seen by the main rank at the last step (all ranks agree)
        self.validation = Validation(cfg, self.dist, self.run_dir)
        self.lock = RunLock(self.run_dir)  # held by the main rank while the run lives
        self.stop_signals = StopSignals()  # SIGTERM / SIGINT: checkpoint at the next step boundary, exit
        self.initial_weights_rms: float | None = None  # the trainable weights' size before training
        self.resumed_world: int | None = None  # the world size that wrote the checkpoint resumed from
        self.flops: FlopCounter | None = None  # the DiT forwards' model FLOPs since the last logged step
        self.peak_tflops = peak_tflops(self.dist.device, cfg.trainer.peak_tflops)
        self.window_steps, self.window_s = 0, 0.0  # the steps (and their seconds) since the last logged one

    # ------------------------------------------------------------------ setup
    def _build_data(self) -> None:
        cfg = self.cfg
        synthetic = cfg.data.kind == "synthetic"
        path = synthetic_shards(cfg, self.dist.is_main) if synthetic else prepared_shards(cfg.data.path)
        barrier()  # the main rank has written the synthetic shards
        self.stage.setup(path, self.dist)  # e.g. stage 3: teacher, ODE pairs, the empty prompt
        own = self.stage.make_dataset(path)
        self.dataset = own if own is not None else training_dataset(path, cfg)
        t = cfg.trainer
        self.sampler = BucketBatchSampler(
            self.dataset, t.batch_size, self.dist.rank, self.dist.world_size, cfg.seed, cfg.data.shuffle
        )
        self._batches = None  # the loader starts after a resume has restored the data position

    def next_batch(self):
        if self._batches is None:
            workers = resolve_num_workers(self.cfg.trainer.num_workers, self.dist.device)
            cuda = self.dist.device.type == "cuda"
            self._batches = make_loader(self.dataset, self.sampler, workers, pin_memory=cuda)
        batch, self.sampler.position = next(self._batches)  # consumed, not prefetched
        return batch

    def _build_model(self, saved_sources: dict[str, str | None] | None = None) -> None:
        cfg = self.cfg

        pin_sources(cfg, saved_sources, warn=self.dist.is_main)
        check_source_formats(cfg)
        # init_from: the previous run's model with its LoRA merged (stage 3's: its generator), so the next
        # phase starts from exactly the function the previous one ended with
        base_state = self.load_weights(cfg.init_from, dtype=self.dtype) if cfg.init_from else None
        seed_everything(cfg.seed)  # the same initial weights (LoRA A draws) on every rank and every run
        # frozen bases loaded in the compute dtype and held once (the state's tensors are the model's)
        self.model = self.stage.build_model(base_state, self.dtype)
        del base_state
        cast_frozen(self.model, self.dtype)  # frozen base in the compute dtype (diffusers' fp32 modules kept)
        own_trainable(self.model, self.share)
        placed = self.stage.place(self.model, self.dist.device)
        if not placed:
            self.model.to(self.dist.device)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ConfigError("model.lora", "nothing is trainable: enable LoRA or set memory_patch=full")
        self.roles = roles = self.stage.training_roles(self.model)
        self.role_lrs = {r.name: r.lr for r in trained_roles(roles)}  # configured rates (applied on resume)
        self.ema = ModelEma(roles, self.dist.rank, self.dist.world_size)  # of the roles that declare one
        self.role_names = list(self.role_lrs)
        self.opt_steps = dict.fromkeys(self.role_names, 0)
        self.backend = build_backend(
            cfg,
            self.dist,
            self.guard,
            self.grad_accum,
            self.model,
            roles,
            placed,
            universal=self.resumed_world not in (None, self.dist.world_size),
        )
        self.flops = FlopCounter(self.model)
        self.generator = torch.Generator().manual_seed(cfg.seed * 100_003 + self.dist.rank)
        seed_everything(cfg.seed * 100_003 + self.dist.rank)  # per-rank streams from here on
        with self.backend.gathered(trainable_only=True):
            self.initial_weights_rms = weight_stats(model_tensors(self.model, False)["trainable"])["rms"]

    # ------------------------------------------------------------------ checkpoint
    def save_checkpoint(self) -> Path:
        random_base = self.cfg.model.transformer.source == "random"
        # ZeRO-3: the trainable weights (a random base too) gathered on every rank meanwhile (collective)
        with self.backend.gathered(trainable_only=not random_base):
            # the main rank alone assembles what it writes (no host copy of the weights on the others)
            tensors = model_tensors(self.model, random_base) if self.dist.is_main else {"trainable": {}}
        tensors.update(self.ema.tensors())  # collective; the main rank's part
        stats = broadcast_object(weight_stats(tensors["trainable"]) if self.dist.is_main else None)
        if not stats["finite"]:  # the update of this step overflowed: never checkpoint such weights
            raise diverged(self.run_dir, self.step, "the trainable weights are not finite after the update")
        meta = {
            "weights_rms": stats["rms"],
            "initial_weights_rms": self.initial_weights_rms,
            "global_batch": self.global_batch(),
        }
        objects = {
            "opt_steps": self.opt_steps,
            "step": self.step,
            "ema": self.ema.state_dict(),
            "config": to_yaml(self.cfg),
            **self.backend.checkpoint_objects(),
        }
        ranks = {**rank_state(self.generator), "sampler": self.sampler.state_dict()}
        extra, keep = self.backend.write_extra(), self.cfg.trainer.keep_last
        path = checkpoint.save(
            self.run_dir,
            self.step,
            self.dist,
            tensors,
            objects,
            ranks,
            keep,
            extra,
            weight_sources(self.cfg),
            meta=meta,
            config=objects["config"],
        )
        if self.dist.is_main:
            log.info("saved checkpoint %s", path)
        return path

    def load_checkpoint(self, path: Path) -> None:
        tensors, objects, ranks = checkpoint.load(path, self.dist)
        self.backend.load(path, tensors, objects, self.model, checkpoint.checkpoint_dir(self.run_dir))
        self.backend.set_learning_rates(self.role_lrs)
        meta = checkpoint.read_meta(path)
        self.initial_weights_rms = meta.get("initial_weights_rms", self.initial_weights_rms)
        self.ema.load_state_dict(objects)
        self.ema.load_tensors(tensors)
        self.opt_steps.update(objects.get("opt_steps", {}))
        self.step = int(objects["step"])
        if ranks is not None:  # the world size that wrote it: every rank continues its own streams
            restore_rank_state(ranks, self.generator)
        else:  # another world size: each rank's streams start again from (seed, step, rank)
            derived = (self.cfg.seed * 1_000_003 + self.step) * 100_003 + self.dist.rank
            self.generator.manual_seed(derived)
            seed_everything(derived)
        self.sampler.load_state_dict(checkpoint.data_position(path))
        if self.dist.is_main:
            log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ one step
    def _micro_step(self, micro: int, last: bool) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        batch = self.next_batch()  # on the host (pinned on a GPU); the stage copies what it needs
        self.data_skipped += batch.skipped if isinstance(batch, ClipBatch) else 0
        autocast_on = self.dtype == torch.bfloat16
        autocast = torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=autocast_on)
        verify = lambda role: self._check(self.guard.read([role]), {})  # noqa: E731 (ZeRO: before its step)
        sync, roles = self.backend.micro_step(last, verify)
        with sync:
            with autocast, lora_inputs_uncast(self.model, autocast_on):
                shared = shared_generator(self.cfg.seed, self.step, micro)
                losses, stats = self.stage.forward_backward(
                    self.backend.wrapped, batch, self.generator, shared, roles, step=self.step
                )
        if len(self.role_names) > 1:  # each role's loss (their sum means nothing); absent: NaN
            stats = {**stats, **{f"loss/{role}": value for role, value in losses.items()}}
        return sum(losses.values()), stats

    def _check(self, reading, role_norms: dict[str, float]) -> None:
        check_reading(reading, role_norms, self.cfg.trainer.max_loss, self.run_dir, self.step + 1)

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
                raise out_of_memory(
                    self.cfg.trainer.batch_size, self.step + 1, self.dist.world_size * self.grad_accum
                ) from err
            records.append({"loss": loss, **stats})
        # a stop signal on any rank (SIGTERM from scancel or a pre-emption, SIGINT) or a STOP file
        # (launch/helios.sbatch, ahead of a time limit; the main rank looks): the step's one read tells
        # every rank, and all save at this step boundary and exit
        stop_file = self.dist.is_main and (self.run_dir / STOP_FILE).exists()
        stop = float(self.stop_signals.received or stop_file)
        lrs = self.backend.learning_rates() if metrics else {}  # this step's, before the scheduler moves
        role_norms, stepped, lr, self.stop_requested = self.backend.step(stop, self._check)
        for name in stepped:
            self.opt_steps[name] += 1
        self.step += 1
        self.ema.after_step(self.step, stepped)  # e.g. stage 3's generator EMA
        self.window_steps += 1
        self.window_s += time.perf_counter() - t0
        if not metrics:
            return {}
        return self._step_metrics(records, role_norms, lr, lrs)

    def _step_metrics(
        self, records: list[dict], role_norms: dict[str, float], lr: float, lrs: dict[str, float]
    ) -> dict[str, float]:
        """The logged metrics of a step: the stage's, averaged over micro-batches and ranks (one
        all-reduce), gradient norms, learning rates; throughput over the steps since the last logged one
        (``samples_per_s``, ``tokens_per_s``, ``mfu`` on a GPU of known peak) and the peak memory of any rank
        since then (``max_memory_gib`` allocated and ``max_memory_reserved_gib`` on the GPU, the host's
        resident set ``host_rss_gib`` and its lifetime peak ``host_max_rss_gib``)."""
        keys = self.metric_keys(records)
        metrics: dict[str, float | torch.Tensor] = dict(micro_means(records, keys, self.dist.device))
        metrics["grad_norm"] = sum(n**2 for n in role_norms.values()) ** 0.5 if role_norms else 0.0
        metrics["data_skipped"] = float(self.data_skipped)  # corrupt samples replaced so far (on_error=skip)
        count = self.flops.take()
        metrics["model_flops"], metrics["trained_tokens"] = count.flops, count.tokens
        reduced = [*keys, "grad_norm", "data_skipped", "model_flops", "trained_tokens"]
        metrics = all_mean(metrics, self.dist.device, keys=reduced)
        metrics["data_skipped"] *= self.dist.world_size  # the total over ranks
        steps, seconds = self.window_steps, max(self.window_s, 1e-9)
        self.window_steps, self.window_s = 0, 0.0
        flops, tokens = metrics.pop("model_flops"), metrics.pop("trained_tokens")
        metrics.update(
            {
                "lr": lr,
                "samples_per_s": self.global_batch() * steps / seconds,
                "tokens_per_s": tokens * self.dist.world_size / seconds,
                "step_time_s": seconds / steps,
            }
        )
        if self.peak_tflops is not None:
            metrics["mfu"] = flops / seconds / (self.peak_tflops * 1e12)
        peaks = memory_peaks(self.dist.device)
        metrics.update(zip(peaks, host_max(list(peaks.values()))))
        if len(self.role_names) > 1:
            metrics.update({f"lr/{n}": lrs[n] for n in self.role_names if n in lrs})
            metrics.update({f"grad_norm_{n}": role_norms.get(n, 0.0) for n in self.role_names})
            metrics.update({f"opt_steps_{n}": float(self.opt_steps[n]) for n in self.role_names})
        return metrics

    def metric_keys(self, records: list[dict]) -> list[str]:
        """The stage's metric names: fixed per stage so every rank all-reduces the same list."""
        declared = self.stage.metric_names()
        if declared is None:
            return sorted({k for r in records for k in r})
        roles = [f"loss/{n}" for n in self.role_names] if len(self.role_names) > 1 else []
        return sorted({*declared, *roles})

    # ------------------------------------------------------------------ the loop
    def _callbacks(self) -> list[StepCallback]:
        """Validation first (its metrics join the step's), then the loggers of every logged step."""
        t, v = self.cfg.trainer, self.cfg.validation
        logger = MetricsLogger(self.run_dir, self.dist.is_main, t.max_steps, self.step, t.progress)
        callbacks = [
            StepCallback(every(v.every) if v.enabled else lambda s, last: False, self._validate_into)
        ]
        callbacks.append(StepCallback(every(t.log_every), logger.log, on_logged=True))
        if self.tracker is not None:
            callbacks.append(StepCallback(every(t.log_every), self.tracker.log, on_logged=True))
        return callbacks

    def global_batch(self) -> int:
        """Clips per optimizer step over all ranks."""
        return self.cfg.trainer.batch_size * self.grad_accum * self.dist.world_size

    def _adapt_to_world(self, saved_yaml: str, meta: dict) -> None:
        """A checkpoint written on another world size resumes with the same global batch: the gradient
        accumulation is recomputed (refused, naming the settings, where no whole number meets it); the data
        position carries over in global batches, the random streams are derived again per rank."""
        self.resumed_world = old = int(meta["world_size"])
        new = self.dist.world_size
        if old == new:
            return
        saved = load_config(OmegaConf.create(saved_yaml))
        target = meta.get("global_batch") or saved.trainer.batch_size * old * resolve_grad_accum(saved, old)
        per_step = self.cfg.trainer.batch_size * new
        if target % per_step:
            fits = [b for b in range(self.cfg.trainer.batch_size, 0, -1) if target % (b * new) == 0]
            raise ConfigError(
                "trainer.batch_size",
                f"the checkpoint was trained with a global batch of {target} on {old} ranks; {new} ranks x "
                f"batch_size {self.cfg.trainer.batch_size} cannot meet it with a whole gradient accumulation"
                + (f" (trainer.batch_size={fits[0]} can)" if fits else "")
                + "; or start a new run from it with init_from",
            )
        previous = target // (saved.trainer.batch_size * old)
        self.grad_accum = target // per_step
        if self.dist.is_main:
            print(
                f"resuming on {new} ranks (the checkpoint: {old}): gradient accumulation {previous} -> "
                f"{self.grad_accum} (global batch {target} kept); data position kept in global batches, "
                "each rank's random streams derived again from (seed, step, rank)",
                flush=True,
            )

    def _hold_run_dir(self) -> None:
        """The main rank takes the run dir's lock (a second live run is refused, naming the holder)."""
        refusal = None
        if self.dist.is_main:
            try:
                self.lock.acquire()
            except RunDirBusy as err:
                refusal = str(err)
        refusal = broadcast_object(refusal)
        if refusal:
            raise RunDirBusy(refusal)

    def prepare(self) -> Path | None:
        """Everything before the first step: the run dir's lock, the checkpoint to resume (its config and
        world size checked before anything is built), data, model, backend, the resumed state. Returns the
        checkpoint resumed from."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._hold_run_dir()
        resume = resolve_resume(self.cfg, self.run_dir, self.dist)
        if resume is not None:  # the resume contract and the world size, before data or models are built
            saved, meta = checkpoint.saved_config(resume), checkpoint.read_meta(resume)
            record_changes(saved, self.cfg, resume, meta["step"], self.run_dir, self.dist.is_main)
            self._adapt_to_world(saved, meta)
        if self.dist.is_main:
            checkpoint.start_branch(self.run_dir, resume)  # newer checkpoints move aside, kept
        barrier()
        if self.cfg.validation.enabled:  # before the models: no text encoder while training runs
            self.validation.encode_prompts()
        self._build_data()
        self._build_model(checkpoint.saved_sources(resume) if resume is not None else None)
        if resume is not None:
            self.load_checkpoint(resume)
        return resume

    def run(self) -> Path:
        self.prepare()
        if self.dist.is_main:
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
            d, hw = self.dist, self.dataset.latent_hw()
            args = (self.model, len(self.dataset), hw, d.world_size, self.grad_accum, d.device, self.dtype)
            print(run_summary(self.cfg, self.run_dir, *args, self.backend.layout()), flush=True)
        if self.dist.is_main and self.cfg.logging.wandb:
            self.tracker = start_tracker(
                self.cfg, self.run_dir, self.sweep_member, self.run_group, self.overrides
            )
        callbacks = self._callbacks()
        self.backend.wrapped.train()
        every_ckpt, last = self.cfg.trainer.checkpoint_every, self.cfg.trainer.max_steps
        with self.stop_signals:
            while self.step < last:
                due = [c.due(self.step + 1, last) for c in callbacks]
                metrics = self.train_step(metrics=any(due))
                for callback, wanted in zip(callbacks, due):
                    if wanted or (callback.on_logged and any(due)):
                        callback.run(self.step, metrics)
                saved = (every_ckpt and self.step % every_ckpt == 0) or self.step == last
                if saved:
                    self.save_checkpoint()
                if self.step < last and self.stop_requested:
                    if not saved:
                        self.save_checkpoint()
                    if self.dist.is_main:
                        why = self.stop_signals.name or f"a {STOP_FILE} file"
                        print(f"stop ({why}): checkpoint at step {self.step} saved; exiting", flush=True)
                    break
        if self.dist.is_main:  # a stop asked for at the last step must not stop the next launch
            (self.run_dir / STOP_FILE).unlink(missing_ok=True)
        return self.run_dir

    def _validate_into(self, step: int, metrics: dict[str, float]) -> None:
        with self.flops.paused():  # its forwards are not the training's throughput
            # the sampled role's base resident (the offload pool), its EMA written into it (collective)
            with self._sampled_role().resident(), self.ema.swapped_in():
                metrics.update(self.validate())  # collective: the prompts are spread over the ranks
        barrier()

    def _sampled_role(self) -> Role:
        """The role whose module validation samples (stage 3: the generator; stages 1-2: the model)."""
        sampled = self.stage.sampling_model(self.model)
        for role in self.roles:
            if role.module is sampled:
                return role
        raise RuntimeError(f"{type(self.stage).__name__} samples a module that is none of its roles")

    def validate(self) -> dict[str, float]:
        """Videos and measures for the validation prompts (:class:`helios.validation.Validation`);
        collective: every rank returns every prompt's metrics."""
        sampling = self.stage.sampling_model(self.model)
        hw = self.dataset.latent_hw()
        return self.validation(
            self.step, self.model, sampling, hw, self.dtype, self.backend.zero3, self.tracker
        )

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.finish()
        # Free what holds the process group (DDP's reducer, ZeRO engines) while it is still registered:
        # freed later, the reducer's dealloc would destroy the gloo group holding the GIL while gloo's
        # worker thread waits for the GIL to free its last work -- a deadlock at exit seen under Slurm.
        self.backend = self.model = None
        self.stage.release()
        gc.collect()
        self.lock.release()
        teardown()
