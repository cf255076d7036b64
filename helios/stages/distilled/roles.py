"""Stage 3's roles, declared and built in one place (paper §3.4, §4.2): the few-step generator G (LoRA on
Helios-Mid), the fake score (LoRA on Helios-Base) with the GAN heads, and the frozen real score
(Helios-Base); by default (``distill.shared_teacher``, as the reference code) the real score is the fake
score's base with the critic's LoRA off, so two 14B bases. With ``distill.offload`` the frozen bases live
in a host pool and one (or two) is resident at a time."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from helios.config.schema import DISTILL_ROLES, DistillConfig, LoraConfig, TrainConfig
from helios.core.distillation import EmaSchedule
from helios.infra.model_roles import Role
from helios.infra.node_share import NodeShare
from helios.infra.offload import OffloadPool
from helios.model import apply_lora, build_transformer
from helios.model.gan import GanHeads

StateLoader = Callable[[str, torch.dtype], dict[str, torch.Tensor]]


class DistillModule(nn.Module):
    """The roles as one module (checkpoints, ``parallel.roles``). It has no forward of its own: the phase's
    step computes with each role (under DDP through that role's own wrapper, helios/infra/parallel.py)."""

    def __init__(
        self,
        generator: nn.Module,
        fake: nn.Module | None = None,
        real: nn.Module | None = None,
        heads: GanHeads | None = None,
    ) -> None:
        super().__init__()
        self.generator, self.fake, self.real, self.heads = generator, fake, real, heads


@contextlib.contextmanager
def real_score(m: DistillModule) -> Iterator[nn.Module]:
    """The real score (Helios-Base): its own frozen copy, or (``distill.shared_teacher``, as the reference
    code) the fake score's base with the critic's LoRA switched off inside the block."""
    if m.real is not None:
        yield m.real
        return
    m.fake.disable_adapters()
    try:
        yield m.fake
    finally:
        m.fake.enable_adapters()


class DistillRoles:
    """Builds the roles of a phase (``distill.phase``: ode = the generator only; post = all), groups their
    parameters for the optimiser, and places them (the offload pool)."""

    def __init__(self, cfg: TrainConfig, load: StateLoader) -> None:
        self.cfg = cfg
        self.d: DistillConfig = cfg.distill
        self._load = load
        self.pool: OffloadPool | None = None

    def loras(self) -> dict[str, LoraConfig | None]:
        """The transformers this phase builds and their adapters (None: frozen): the generator (the run's
        LoRA); in the post phase also the fake score (critic LoRA) and the frozen real score."""
        roles: dict[str, LoraConfig | None] = {"generator": self.cfg.model.lora}
        if self.d.phase != "ode":
            roles["fake"] = LoraConfig(
                enabled=True,
                rank=self.d.fake_lora_rank,
                alpha=self.d.fake_lora_alpha,
                targets=self.cfg.model.lora.targets,
                patch_embedding=False,  # the reference excludes it from the critic
                memory_patch="frozen",
                init=self.cfg.model.lora.init,
                extra_trainable=[],
            )
            if not self.d.shared_teacher:  # else the real score is the fake score's base, adapters off
                roles["real"] = None
        return roles

    def _transformer(self, state: dict | None, lora: LoraConfig | None, dtype: torch.dtype) -> nn.Module:
        m = self.cfg.model
        model = build_transformer(m.transformer, m.kernels, m.attention, dtype, state)
        if lora is None:
            return model.requires_grad_(False).eval()
        return apply_lora(model, lora)

    def build_generator(self, base_state: dict | None, dtype: torch.dtype) -> DistillModule:
        """Only the generator (export, generate). Its base, as in :meth:`build`: ``base_state`` (the
        ``init_from`` run's merged generator), else generator_init, else the teacher (a random base is
        restored from the checkpoint instead)."""
        source = self.d.generator_init or self.d.teacher
        if base_state is None and source and self.cfg.model.transformer.source != "random":
            base_state = self._load(source, dtype)
        return DistillModule(self._transformer(base_state, self.cfg.model.lora, dtype))

    def build(self, base_state: dict | None, dtype: torch.dtype) -> DistillModule:
        """The roles, each base loaded once in ``dtype`` and held by its role itself: the generator on
        ``base_state`` (``init_from``), else ``distill.generator_init``, else the teacher; the fake score on
        the teacher (and a separate real score on its own copy with ``shared_teacher=false``). A role's own
        copy of the teacher is read again through the loader (once per node with
        ``parallel.node_shared_weights``), never cloned on each rank."""
        if base_state is not None:
            generator_state = base_state
        elif self.d.generator_init:
            generator_state = self._load(self.d.generator_init, dtype)
        else:  # read again, its own copy: two roles never share a tensor (checkpoints, offload pool, ZeRO)
            generator_state = self._load(self.d.teacher, dtype)
        loras = self.loras()
        generator = self._transformer(generator_state, loras["generator"], dtype)
        del generator_state, base_state
        if self.d.phase == "ode":
            return DistillModule(generator)
        fake = self._transformer(self._load(self.d.teacher, dtype), loras["fake"], dtype)
        real = None
        if "real" in loras:  # the paper's separate frozen copy
            real = self._transformer(self._load(self.d.teacher, dtype), loras["real"], dtype)
        shape = fake.config  # the loaded model's own shape (a checkpoint's, not the config's defaults)
        heads = (
            GanHeads(
                self.d.gan.layers,
                shape.num_layers,
                shape.num_attention_heads * shape.attention_head_dim,
                self.d.gan.dim,
                out_channels=shape.out_channels if self.d.gan.output_head else None,
            )
            if self.d.gan.enabled
            else None
        )
        return DistillModule(generator, fake, real, heads)

    def training_roles(self, model: DistillModule) -> list[Role]:
        """TTUR's roles: the generator at ``optim.lr``, the critic (the fake score's LoRA + the GAN heads) at
        ``distill.fake_lr``, and with ``shared_teacher=false`` the frozen real score; each built inside its
        own placement block (:meth:`engine_block`); the generator's EMA from ``distill.ema_start``."""
        lrs = {"generator": self.cfg.optim.lr, "critic": self.d.fake_lr}
        ema = EmaSchedule(self.d.ema_decay, self.d.ema_start)  # the generator's (Table 2)
        return [
            Role(
                name,
                module,
                [p for p in module.parameters() if p.requires_grad],
                lrs.get(name),
                resident=functools.partial(self.engine_block, name),
                ema=ema if name == "generator" else None,
                ema_sharded=self.d.ema_sharded,
            )
            for name, module in self.role_modules(model).items()
        ]

    @staticmethod
    def role_modules(model: DistillModule) -> dict[str, nn.Module]:
        """The roles as one DDP wrapper or ZeRO engine each sees them: the critic is fake score + heads."""
        if model.fake is None:
            return {"generator": model.generator}
        critic = nn.ModuleDict({"fake": model.fake, **({"heads": model.heads} if model.heads else {})})
        roles = {"generator": model.generator, "critic": critic}
        return roles if model.real is None else {**roles, "real": model.real}

    # ------------------------------------------------------------------ placement (distill.offload)
    def place(self, model: DistillModule, device: torch.device) -> bool:
        """``distill.offload``: frozen weights to the offload pool (host; each step's placement blocks bring
        them in), the rest to ``device``."""
        if not self.d.offload:
            return False
        share = NodeShare() if self.cfg.parallel.node_shared_weights else None  # collective
        self.pool = OffloadPool(self.role_modules(model), device, share)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(device)
        for module in model.modules():
            for key, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[key] = buf.to(device)
        return True

    def release(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    @contextlib.contextmanager
    def engine_block(self, role: str) -> Iterator[None]:
        """The block in which ``role``'s ZeRO engine is built: its base resident while DeepSpeed moves the
        module to the device and broadcasts it, every other frozen weight back where the pool holds it
        before and after (:meth:`OffloadPool.restore`)."""
        if self.pool is None:
            yield
            return
        self.pool.restore()
        try:
            with self.resident(role):
                yield
        finally:
            self.pool.restore()

    @contextlib.contextmanager
    def resident(self, *roles: str, then: str | None = None) -> Iterator[None]:
        """The one way a step brings frozen bases onto the device (§4.2): inside the block exactly ``roles``'
        bases are resident (a role without a base of its own, the shared real score, is skipped); with
        ``distill.offload_prefetch`` the copy of ``then``'s base starts meanwhile. After the block they may
        be released at any time (:meth:`OffloadPool.leave`): a role's forward or backward belongs inside
        its block. Without ``distill.offload`` every base stays on the device. A name that is no role is an
        error, with or without the offload (a misspelt role would otherwise never be brought in)."""
        unknown = [r for r in (*roles, then) if r is not None and r not in DISTILL_ROLES]
        if unknown:
            raise KeyError(
                f"resident({', '.join(unknown)}): not a stage-3 role (one of {', '.join(DISTILL_ROLES)})"
            )
        if self.pool is None:
            yield
            return
        self.pool.activate(*roles, prefetch=then if self.d.offload_prefetch else None)
        try:
            yield
        finally:
            self.pool.leave()
