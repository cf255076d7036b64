"""Training schema: optimiser, trainer loop, data parallelism (DDP / ZeRO per role) and logging."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from helios.config.schema.base import ConfigError, Validated, check, choice


@dataclass
class OptimConfig(Validated):
    """AdamW + diffusers LR schedule (Table 1: constant LR, grad clip 1.0)."""

    lr: float = 5e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    schedule: str = "constant"
    warmup_steps: int = 0

    def _validate(self, prefix: str) -> None:
        check(self.lr > 0, prefix + "lr", "must be > 0")
        check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            prefix + "betas",
            "two values in [0,1)",
        )
        check(self.eps > 0, prefix + "eps", "must be > 0")
        check(self.weight_decay >= 0, prefix + "weight_decay", "must be >= 0")
        check(self.grad_clip >= 0, prefix + "grad_clip", "must be >= 0 (0 disables clipping)")
        choice(
            self.schedule,
            ("constant", "constant_with_warmup", "linear", "cosine"),
            prefix + "schedule",
        )
        check(self.warmup_steps >= 0, prefix + "warmup_steps", "must be >= 0")


@dataclass
class TrainerConfig(Validated):
    max_steps: int = 40
    batch_size: int = 2
    grad_accum: int = 1
    # When > 0, grad_accum is derived: global_batch_size = batch_size * world_size * grad_accum.
    global_batch_size: int = 0
    log_every: int = 1
    checkpoint_every: int = 20
    keep_last: int = 3
    precision: str = "auto"
    device: str = "auto"
    # data loader processes; null: 4 on a GPU (with page-locked batches), 0 on the CPU
    num_workers: int | None = None
    progress: bool = True
    # a finite loss above this counts as divergence too (stops like a NaN, before the update); 0: off
    max_loss: float = 1.0e6
    # the device's dense bf16 peak for the dashboard's mfu (TFLOP/s); null: known GPUs by name
    # (helios/model/flops.py), none on the CPU
    peak_tflops: float | None = None

    def _validate(self, prefix: str) -> None:
        check(self.max_steps >= 0, prefix + "max_steps", "must be >= 0")
        check(self.batch_size >= 1, prefix + "batch_size", "must be >= 1")
        check(self.grad_accum >= 1, prefix + "grad_accum", "must be >= 1")
        check(self.global_batch_size >= 0, prefix + "global_batch_size", "must be >= 0")
        check(self.log_every >= 1, prefix + "log_every", "must be >= 1")
        check(self.checkpoint_every >= 0, prefix + "checkpoint_every", "must be >= 0 (0 disables)")
        check(self.keep_last >= 1, prefix + "keep_last", "must be >= 1")
        choice(self.precision, ("auto", "fp32", "bf16"), prefix + "precision")
        choice(self.device, ("auto", "cpu", "cuda"), prefix + "device")
        check(self.num_workers is None or self.num_workers >= 0, prefix + "num_workers", "must be >= 0")
        check(self.peak_tflops is None or self.peak_tflops > 0, prefix + "peak_tflops", "must be > 0")


# stage 3's roles (the real score may share the critic's base)
DISTILL_ROLES = ("generator", "critic", "real")


@dataclass
class RoleParallelConfig(Validated):
    """Per-role ZeRO stage under ``parallel=zero2|zero3`` ("" = the backend's): stage 3's ``generator``,
    ``critic`` (fake score + GAN heads) and frozen ``real`` score (zero3: partitioned, else replicated),
    or stages 1-2's ``model``."""

    model: str = ""
    generator: str = ""
    critic: str = ""
    real: str = ""

    def chosen(self) -> dict[str, str]:
        """The roles given a stage of their own."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}

    def _validate(self, prefix: str) -> None:
        for f in fields(self):
            choice(getattr(self, f.name), ("", "zero2", "zero3"), prefix + f.name)


@dataclass
class ParallelConfig(Validated):
    """Data parallelism. ``ddp`` wraps the trainable model in DistributedDataParallel; ``zero2|zero3``
    give each role a DeepSpeed ZeRO engine (helios/infra/zero.py)."""

    backend: str = "ddp"
    dist_backend: str = "auto"
    find_unused_parameters: bool = False
    # parallel=ddp on several ranks: AdamW's state sharded across the ranks (ZeRO-1, torch's
    # ZeroRedundancyOptimizer; the same updates, 1/world of the 8 bytes per trainable parameter each);
    # checkpoints hold the whole state as with false. ZeRO backends shard it themselves.
    shard_optimizer: bool = True
    # parallel=ddp: the dtype of the gradient all-reduce (bf16: half the bytes, via torch's bf16
    # compression hook; the gradients the optimiser sees stay fp32)
    grad_comm: str = "fp32"
    roles: RoleParallelConfig = field(default_factory=RoleParallelConfig)
    zero_offload_optimizer: bool = False  # ZeRO-Offload: optimiser state and step on the CPU
    zero_offload_params: bool = False  # ZeRO-3 roles keep their parameters in host memory
    zero_bucket_size: int = 50_000_000
    zero3_persistence_threshold: int = 100_000
    # ZeRO-3 roles: > 1 adds ZeRO++'s hierarchical partition (hpZ): a second copy of the weights partitioned
    # over groups of this many ranks (a node's GPUs), so the forward's all-gathers stay inside the node
    # (1/size of each 14B base more per GPU); it must divide the world size
    zero_hpz_partition_size: int = 1
    # a collective that waits longer (a hung or dead rank) fails the job instead of blocking it
    timeout_minutes: float = 10.0
    # frozen weights held in host memory once per node, the node's ranks mapping the same /dev/shm pages
    # (they are the same on every rank): the bases read at start-up (stage 3's teacher and generator init,
    # an init_from run's merged model: the node's first rank reads them, the others map them) and the offload
    # pool's buffers (distill.offload); false: one private copy per rank
    node_shared_weights: bool = True

    def role_backend(self, role: str) -> str:
        return getattr(self.roles, role, "") or self.backend

    def _validate(self, prefix: str) -> None:
        check(self.timeout_minutes > 0, prefix + "timeout_minutes", "must be > 0")
        choice(self.backend, ("ddp", "zero2", "zero3"), prefix + "backend")
        choice(self.dist_backend, ("auto", "gloo", "nccl"), prefix + "dist_backend")
        choice(self.grad_comm, ("fp32", "bf16"), prefix + "grad_comm")
        check(
            self.grad_comm == "fp32" or self.backend == "ddp",
            prefix + "grad_comm",
            "the bf16 gradient all-reduce is DDP's (ZeRO engines reduce in the gradients' own dtype)",
        )
        if self.backend == "ddp":
            for role in self.roles.chosen():
                raise ConfigError(
                    prefix + f"roles.{role}", "per-role ZeRO stages need parallel=zero2 or parallel=zero3"
                )
            for key in ("zero_offload_optimizer", "zero_offload_params"):
                check(
                    not getattr(self, key),
                    prefix + key,
                    "ZeRO offload needs parallel=zero2 or parallel=zero3",
                )
        if self.zero_offload_params:
            check(
                "zero3" in (self.backend, *self.roles.chosen().values()),
                prefix + "zero_offload_params",
                "parameter offload needs a ZeRO-3 role",
            )
        check(self.zero_bucket_size > 0, prefix + "zero_bucket_size", "must be > 0")
        check(self.zero_hpz_partition_size >= 1, prefix + "zero_hpz_partition_size", "must be >= 1")
        check(
            self.zero_hpz_partition_size == 1 or "zero3" in (self.backend, *self.roles.chosen().values()),
            prefix + "zero_hpz_partition_size",
            "partitions ZeRO-3 weights: needs a ZeRO-3 role",
        )


@dataclass
class LoggingConfig(Validated):
    """wandb (main rank): ``logging.wandb=true``; ``mode=offline`` needs no network (``wandb sync``
    later). Name and group default to the stage/phase and, in a sweep, its values and sweep dir."""

    wandb: bool = False
    project: str = "helios"
    entity: str | None = None
    mode: str = "online"
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    run_id: str | None = None  # default: kept in the run dir, so a resumed run continues its wandb run

    def _validate(self, prefix: str) -> None:
        choice(self.mode, ("online", "offline", "disabled"), prefix + "mode")
