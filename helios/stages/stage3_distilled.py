"""Stage 3 (Helios-Distilled): Adversarial Hierarchical Distillation (paper §3.4, Eq. 10-16, Table 2).

Roles: the few-step generator G (LoRA on Helios-Mid), the frozen real score (Helios-Base, CFG), the fake
score (LoRA on Helios-Base) with GAN heads, and an EMA of G; by default (``distill.shared_teacher``, as the
reference code) the real score is the fake score's base with the critic's LoRA off, so two 14B bases.
``distill.phase=ode`` regresses G onto teacher ODE pairs across the pyramid stages (Staged ODE Init);
``phase=post`` trains DMD + GAN:

* Pure Teacher Forcing: the history is real data with Frame-Aware Corrupt, one section per step;
* Staged Backward Simulation (Eq. 10): G rolls out through the K stages with its few DMD steps
  (x0 = x_t - sigma v, re-noised toward the stage start), gradients only through one exit step of the
  last stage; only the full-resolution x0 goes to the scores;
* Dynamic Re-noise: tau ~ Beta with cosine-annealed parameters, shifted for the token count;
* TTUR: the critic (fake score + heads) every step, G every ``distill.ttur`` steps (G has no gradients
  on the other steps, so its optimiser group is not stepped: counted per role in the metrics).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from helios.config.schema import ConfigError, LoraConfig, TrainConfig
from helios.core.distillation import (
    TTUR,
    EmaSchedule,
    RenoiseSchedule,
    approx_r1,
    cfg_x0,
    critic_gan_term,
    dmd_gradient,
    dmd_loss,
    frozen,
    gan_d_loss,
    gan_g_loss,
)
from helios.core.flow_matching import NUM_TRAIN_TIMESTEPS, shift_factor, shift_sigmas, token_count
from helios.core.history import Task
from helios.core.pyramid import halve
from helios.data.dataset import training_dataset
from helios.data.ode_pair_shards import OdePairDataset, TensorDict
from helios.data.prepare_job import EMPTY_PROMPT_FILE, NEGATIVE_PROMPT_FILE, load_empty_prompt
from helios.infra.distributed import on_every_rank
from helios.infra.ema import ShardedEma
from helios.infra.offload import OffloadPool
from helios.infra.parallel import RoleSteps
from helios.model import apply_lora, build_transformer
from helios.model.gan import GanHeads
from helios.sampling.section import set_stage_timesteps, upsample_renoise
from helios.stages.stage import WeightsLoader
from helios.stages.stage1_base import FlowStage


def _cast(inputs: dict[str, torch.Tensor], like: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model inputs on ``like``'s device, floating-point ones in its dtype (indices keep theirs); a
    copy from the host does not wait for the device."""
    return {
        k: v.to(like.device, like.dtype if v.is_floating_point() else v.dtype, non_blocking=True)
        for k, v in inputs.items()
    }


class DistillModule(nn.Module):
    """The roles as one module (checkpoints, ``parallel.roles``); ``forward(fn, *args)`` runs
    ``fn(self, *args)``: one step over all roles (under DDP each role has its own wrapper,
    helios/infra/parallel.py)."""

    def __init__(
        self,
        generator: nn.Module,
        fake: nn.Module | None = None,
        real: nn.Module | None = None,
        heads: GanHeads | None = None,
    ) -> None:
        super().__init__()
        self.generator, self.fake, self.real, self.heads = generator, fake, real, heads

    def forward(self, fn, *args):
        return fn(self, *args)


class DistillStage(FlowStage):
    name = "distill"

    def __init__(self, cfg: TrainConfig, weights: WeightsLoader | None = None) -> None:
        super().__init__(cfg, weights)
        d = cfg.distill
        self.d = d
        self.ttur = TTUR(d.ttur)
        self.renoise = RenoiseSchedule(d.renoise_a0, d.renoise_b0, d.renoise_anneal_steps)
        self.ema_schedule = EmaSchedule(d.ema_decay, d.ema_start)
        self.ema: ShardedEma | None = None
        self.ema_updates = 0  # averaging updates since the EMA's first copy (the warm-up's n)
        self._raw: dict[str, torch.Tensor] | None = None  # the training weights while validation runs
        self.rank, self.world_size = 0, 1
        self.model: DistillModule | None = None
        self.pool = None  # helios.infra.offload.OffloadPool when distill.offload
        self.uncond: torch.Tensor | None = None  # the real score's unconditional prompt (distill.uncond)
        self._scheduler = None

    # ------------------------------------------------------------------ setup and roles
    def setup(self, data_path: Path, dist) -> None:
        """Check the teacher and the ODE pairs are named (the tiny default's: :mod:`helios.tiny_recipe`) and
        read the empty prompt (unconditional branch of the real score's CFG)."""

        super().setup(data_path, dist)
        if self.d.ema_sharded and dist is not None:
            self.rank, self.world_size = dist.rank, dist.world_size
        if self.d.teacher is None:
            raise ConfigError(
                "distill.teacher",
                "stage 3 needs the teacher (Helios-Base): a run dir, checkpoint or diffusers directory "
                "(for the tiny model, train_helios.py makes a tiny one: helios.tiny_recipe)",
            )
        if self.d.phase == "ode" and self.d.ode_pairs is None:
            raise ConfigError(
                "distill.ode_pairs", "phase=ode needs ODE pairs: python -m helios.ode_pairs ..."
            )
        name = NEGATIVE_PROMPT_FILE if self.d.uncond == "negative" else EMPTY_PROMPT_FILE
        uncond = load_empty_prompt(data_path, name)
        if uncond is None:
            raise FileNotFoundError(
                f"{data_path} has no {name}: rerun helios.prepare with the same arguments (it adds the file "
                "without re-encoding the clips)"
                + (" or use distill.uncond=empty" if self.d.uncond == "negative" else "")
            )
        n = self.cfg.model.text_encoder.max_sequence_length
        self.uncond = torch.zeros(1, n, uncond.shape[-1])
        self.uncond[0, : min(n, len(uncond))] = uncond[:n]

    def make_dataset(self, data_path: Path):
        if self.d.phase == "ode":
            return OdePairDataset(
                self.d.ode_pairs, len(self.d.steps), self.cfg.model.text_encoder.max_sequence_length
            )

        return training_dataset(data_path, self.cfg)

    def _role(self, state: dict | None, lora: LoraConfig | None, dtype: torch.dtype) -> nn.Module:
        m = self.cfg.model
        model = build_transformer(m.transformer, m.kernels, m.attention, dtype, state)
        if lora is None:
            return model.requires_grad_(False).eval()
        return apply_lora(model, lora)

    def build_inference_model(
        self, base_state: dict | None = None, dtype: torch.dtype = torch.float32
    ) -> DistillModule:
        """Only the generator (export, generate). Its base, as in :meth:`build_model`: ``base_state`` (the
        ``init_from`` run's merged generator), else generator_init, else the teacher (a random base is
        restored from the checkpoint instead)."""
        source = self.d.generator_init or self.d.teacher
        if base_state is None and source and self.cfg.model.transformer.source != "random":
            base_state = self.load_weights(source, dtype=dtype)
        return DistillModule(self._role(base_state, self.cfg.model.lora, dtype))

    def role_loras(self) -> dict[str, LoraConfig | None]:
        """The transformers this phase builds and their adapters (None: frozen): the generator (the
        run's LoRA); in the post phase also the fake score (critic LoRA) and the frozen real score."""
        roles: dict[str, LoraConfig | None] = {"generator": self.cfg.model.lora}
        if self.d.phase != "ode":
            roles["fake"] = LoraConfig(
                enabled=True,
                rank=self.d.fake_lora_rank,
                alpha=self.d.fake_lora_alpha,
                targets=self.cfg.model.lora.targets,
                memory_patch="frozen",
                extra_trainable=[],
            )
            if not self.d.shared_teacher:  # else the real score is the fake score's base, adapters off
                roles["real"] = None
        return roles

    def build_model(
        self, base_state: dict | None = None, dtype: torch.dtype = torch.float32
    ) -> DistillModule:
        """The roles, each base loaded once in ``dtype`` and held by its role itself: the generator on
        ``base_state`` (``init_from``), else ``distill.generator_init``, else the teacher; the fake score
        on the teacher (and a separate real score on its own copy with ``shared_teacher=false``). The
        teacher is read only when a role needs it."""
        teacher: dict | None = None

        def teacher_state() -> dict:
            nonlocal teacher
            if teacher is None:
                teacher = self.load_weights(self.d.teacher, dtype=dtype)
            return teacher

        if base_state is not None:
            generator_state = base_state
        elif self.d.generator_init:
            generator_state = self.load_weights(self.d.generator_init, dtype=dtype)
        else:  # its own copy: two roles never share a tensor (checkpoints, the offload pool, ZeRO)
            generator_state = {k: v.clone() for k, v in teacher_state().items()}
        loras = self.role_loras()
        generator = self._role(generator_state, loras["generator"], dtype)
        del generator_state, base_state
        if self.d.phase == "ode":
            self.model = DistillModule(generator)
            return self.model
        fake = self._role(teacher_state(), loras["fake"], dtype)
        real = None
        if "real" in loras:  # the paper's separate frozen copy
            real = self._role({k: v.clone() for k, v in teacher_state().items()}, loras["real"], dtype)
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
        self.model = DistillModule(generator, fake, real, heads)
        return self.model

    def param_groups(self, model: DistillModule) -> list[dict]:
        groups = [
            {
                "name": "generator",
                "lr": self.cfg.optim.lr,
                "params": [p for p in model.generator.parameters() if p.requires_grad],
            }
        ]
        if model.fake is not None:
            critic = [p for p in model.fake.parameters() if p.requires_grad]
            if model.heads is not None:
                critic += list(model.heads.parameters())
            groups.append({"name": "critic", "lr": self.d.fake_lr, "params": critic})
        return groups

    def place(self, model: DistillModule, device: torch.device) -> bool:
        """``distill.offload``: frozen weights to the offload pool (host), the rest to ``device``."""
        if not self.d.offload:
            return False

        roles = self.role_modules(model)
        self.pool = OffloadPool(roles, device)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(device)
        for module in model.modules():
            for key, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[key] = buf.to(device)
        self.pool.activate("generator")
        return True

    def release(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def make_resident(self, role: str | None = None) -> None:
        """The offload pool: only ``role``'s frozen base on the device (None: a step's start, the
        generator's), every other frozen weight back in host memory (ZeRO-2 engines are built one role
        at a time with that role's base resident; DeepSpeed moves and broadcasts the module)."""
        if self.pool is not None:
            self.pool.restore()
            self.pool.activate(role or "generator")

    def _activate(self, *roles: str, then: str | None = None) -> None:
        """Exactly ``roles``' frozen bases resident (``distill.offload``; a role without a base of its
        own, the shared real score, is skipped); with ``distill.offload_prefetch`` the copy of
        ``then``'s base starts meanwhile."""
        if self.pool is not None:
            prefetch = then if self.d.offload_prefetch else None
            self.pool.activate(*roles, prefetch=prefetch)

    def role_modules(self, model: DistillModule) -> dict[str, nn.Module]:
        """The roles as engines see them (``parallel=zero2|zero3``): the critic is fake score + heads."""
        if model.fake is None:
            return {"generator": model.generator}
        critic = nn.ModuleDict({"fake": model.fake, **({"heads": model.heads} if model.heads else {})})
        roles = {"generator": model.generator, "critic": critic}
        return roles if model.real is None else {**roles, "real": model.real}

    def sampling_model(self, model: DistillModule, ema: dict | None = None) -> nn.Module:
        """The generator; with ``ema`` (export, generate) a copy holding the EMA weights. During training
        validation ``before_validation`` has written the EMA into the generator itself (no copy of a 14B
        base), so the generator is returned as it is."""
        if not ema or self._partitioned(model.generator):
            return model.generator
        generator = copy.deepcopy(model.generator)
        params = dict(generator.named_parameters())
        with torch.no_grad():
            for name, tensor in ema.items():
                key = name.removeprefix("generator.")
                if key in params:
                    params[key].copy_(tensor)
        return generator

    # ------------------------------------------------------------------ steps
    def compute_loss(
        self,
        model,
        batch,
        generator: torch.Generator,
        shared: torch.Generator | None = None,
        roles: RoleSteps | None = None,
        *,
        step: int,
    ):
        """One micro-batch's losses per role at optimizer step ``step`` (TTUR, the GAN's start and the
        re-noise annealing follow it). ``roles`` (the trainer's) runs each role's forward through its DDP
        wrapper and its backward as soon as its loss is complete; without it the backwards are left to
        the caller (the graphs stay pending)."""
        phase = self._ode_step if self.d.phase == "ode" else self._post_step
        return model(phase, batch, generator, shared or generator, roles or RoleSteps(), step)

    def _scheduler_for(self):
        if self._scheduler is None:
            from diffusers import HeliosDMDScheduler

            k = len(self.d.steps)
            self._scheduler = HeliosDMDScheduler(
                stages=k,
                stage_range=[i / k for i in range(k + 1)],
                gamma=self.cfg.pyramid.gamma,
                use_dynamic_shifting=True,
                time_shift_type=self.cfg.flow.shift.type,
            )
        return self._scheduler

    def _stage_schedule(self, k: int, shape, first_section: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage k's DMD timesteps and sigmas, by the sampler's own rule (shift from this stage's token
        count; doubled steps on a video's first section when validation samples that way)."""
        sched = self._scheduler_for()
        amplify = first_section and self.cfg.validation.sampler.amplify_first
        set_stage_timesteps(sched, list(self.d.steps), k, shape, amplify_first=amplify)
        # the model sees integer timesteps, as in the sampler (and diffusers' pipelines)
        return sched.timesteps.to(torch.int64).float(), sched.sigmas.float().clone()

    @staticmethod
    def _first_section(history: torch.Tensor) -> bool:
        """Every sample's history is empty (T2V): the section is a video's first."""
        return not bool(history.abs().amax() > 0)

    @staticmethod
    def _call(model, x, t, cond) -> torch.Tensor:
        return model(hidden_states=x, timestep=t, **cond, return_dict=False)[0].float()

    def _ode_step(
        self,
        m: DistillModule,
        batch: TensorDict,
        gen: torch.Generator,
        shared: torch.Generator,
        roles: RoleSteps,
        step: int,
    ):
        """Staged ODE Init: one (stage, DMD step) point of an ODE pair, regressed onto the stage's end."""
        device = self.device
        k = int(torch.randint(len(self.d.steps), (1,), generator=gen))
        # decided on the host (the batch arrives there), then copied without waiting for the device
        first = self._first_section(batch["history"])
        batch = batch.to(device)
        start, end = batch[f"stage{k}_start"], batch[f"stage{k}_end"]
        timesteps, sigmas = self._stage_schedule(k, start.shape, first)
        j = int(torch.randint(len(timesteps), (1,), generator=gen))
        sigma = float(sigmas[j])
        x = sigma * start + (1 - sigma) * end
        cond = {
            "encoder_hidden_states": batch["prompt_embeds"],
            **self.layout.model_inputs(batch["history"], batch["anchor"]),
        }
        t = timesteps[j].expand(x.shape[0]).to(device, non_blocking=True)
        x0 = x - sigma * roles.forward("generator", self._call, m.generator, x, t, cond)
        loss = self.d.ode_weight * F.mse_loss(x0, end.float())
        return loss, {"loss_ode": loss.detach(), "ode_stage": float(k)}

    def exit_steps(self, shared: torch.Generator, first_section: bool) -> list[int]:
        """One exit step per pyramid stage, drawn from the rank-shared generator (every rank makes the
        same forward passes)."""
        counts = [
            len(self._stage_schedule(k, (1, 1, 1, 2, 2), first_section)[0]) for k in range(len(self.d.steps))
        ]
        return [int(torch.randint(n, (1,), generator=shared)) for n in counts]

    def rollout(
        self,
        generator: nn.Module,
        cond: dict,
        shape,
        gen: torch.Generator,
        grad: bool,
        exits: list[int] | None = None,
        first_section: bool = False,
    ) -> torch.Tensor:
        """Staged Backward Simulation (Eq. 10), as the reference code that trained the released models:
        each pyramid stage k runs its DMD steps up to its exit step ``exits[k]`` (all steps when
        ``exits`` is None), ``x0^k = x_t - sigma v`` at the exit initialises stage k+1 (nearest 2x +
        renoise). Only exit steps run with gradient and the hand-offs keep the graph, so the DMD/GAN
        gradient reaches stage k whenever stage k+1 exits at its first step ("through K stages"); the
        steps before an exit are simulated without gradient. Returns the full-resolution x0."""
        b, c, t, h, w = shape
        device = cond["encoder_hidden_states"].device
        k_max = len(self.d.steps)
        x = torch.randn(b, c, t, h, w, generator=gen).to(device, non_blocking=True)
        for _ in range(k_max - 1):
            x = halve(x) * 2
        sched = self._scheduler_for()
        x0 = x
        for k in range(k_max):
            if k > 0:
                x = upsample_renoise(x0, sched.ori_start_sigmas[k], self.cfg.pyramid.gamma, gen)
            start = x
            timesteps, sigmas = self._stage_schedule(k, x.shape, first_section)
            last = len(timesteps) - 1 if exits is None else exits[k]
            for j in range(last + 1):
                exiting = j == last
                with torch.set_grad_enabled(grad and exiting):
                    v = self._call(generator, x, timesteps[j].expand(b).to(device, non_blocking=True), cond)
                x0 = x - float(sigmas[j]) * v
                if not exiting:
                    nxt = float(sigmas[j + 1])
                    x = (nxt * start + (1 - nxt) * x0).detach()
        return x0

    def _self_forcing_cond(self, generator: nn.Module, cond: dict, shape, gen: torch.Generator) -> dict:
        """Table 5 "w Self-Forcing": the history is the generator's own few-step rollout, section after
        section from an empty history (T2V, no gradients), instead of real frames (Pure Teacher Forcing)."""
        b, c, _, h, w = shape
        ref = cond["encoder_hidden_states"]
        history = torch.zeros(b, c, self.layout.num_history, h, w, device=ref.device)
        anchor = torch.zeros(b, c, 1, h, w, device=ref.device)

        def inputs() -> dict:
            return _cast({"encoder_hidden_states": ref, **self.layout.model_inputs(history, anchor)}, ref)

        for k in range(-(-self.layout.num_history // self.layout.window)):
            with torch.no_grad():
                section = self.rollout(
                    generator, inputs(), shape, gen, grad=False, first_section=k == 0
                ).float()
            anchor = section[:, :, :1] if k == 0 else anchor
            history = torch.cat([history, section], dim=2)[:, :, -self.layout.num_history :]
        return inputs()

    def _bidirectional_context(self, batch, xt: torch.Tensor, tau5: torch.Tensor, gen) -> torch.Tensor | None:
        """Table 5 "w Bidirectional Teacher": the newest real history frames, re-noised to tau, that
        precede x_tau in the real score's ``distill.bidirectional_frames``-long segment."""
        if self.d.real_score == "history":
            return None
        history = self.layout.split_clip(batch.latents)[0]
        m = max(0, min(history.shape[2], self.d.bidirectional_frames - xt.shape[2]))
        ctx = history[:, :, history.shape[2] - m :].to(xt.device, xt.dtype, non_blocking=True)
        return (1 - tau5) * ctx + tau5 * torch.randn(ctx.shape, generator=gen).to(
            xt.device, xt.dtype, non_blocking=True
        )

    @staticmethod
    @contextlib.contextmanager
    def real_score(m: DistillModule):
        """The real score (Helios-Base): its own frozen copy, or (``distill.shared_teacher``, as the
        reference code) the fake score's base with the critic's LoRA switched off inside the block."""
        if m.real is not None:
            yield m.real
            return
        m.fake.disable_adapters()
        try:
            yield m.fake
        finally:
            m.fake.enable_adapters()

    def _real_velocity(self, m: DistillModule, xt, t_tau, cond: dict, context: torch.Tensor | None):
        """The real score's velocity on x_tau: with the history inputs (Helios-Base), or, as a
        bidirectional teacher, on [context, x_tau] without history inputs (the x_tau part returned)."""
        with self.real_score(m) as real:
            if context is None:
                return self._call(real, xt, t_tau, cond)
            segment = torch.cat([context, xt], dim=2)
            v = self._call(real, segment, t_tau, {"encoder_hidden_states": cond["encoder_hidden_states"]})
        return v[:, :, context.shape[2] :]

    def _crop(self, x: torch.Tensor, top: int, left: int) -> torch.Tensor:
        ch, cw = self._crop_hw(x)
        return x[..., top : top + ch, left : left + cw]

    def _crop_hw(self, x: torch.Tensor) -> tuple[int, int]:
        h, w = x.shape[-2:]
        r = self.d.gan.crop
        return max(2, int(h * r) // 2 * 2), max(2, int(w * r) // 2 * 2)

    def _disc(self, m: DistillModule, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        with m.heads.capture(m.fake) as store:
            output = self._call(m.fake, x, t, cond)
        return m.heads.logits(store, (x.shape[2], x.shape[3] // 2, x.shape[4] // 2), output)

    def _post_step(
        self,
        m: DistillModule,
        batch,
        gen: torch.Generator,
        shared: torch.Generator,
        roles: RoleSteps,
        step: int,
    ):
        """One DMD + GAN iteration, one role's graph at a time (§4.2): the generator's rollout, its
        DMD (+ GAN) loss and backward (TTUR steps only), then the critic's losses and backward. With
        ``distill.offload`` one 14B base is resident at each point (the generator's graph waits for its
        backward while the scores run on the critic's base)."""
        cond, target, stats = self.condition(batch, gen)  # on the host
        device = self.device
        dtype = next(m.generator.parameters()).dtype
        cond = _cast(cond, torch.empty((), device=device, dtype=dtype))
        target = target.to(device, non_blocking=True)
        update_g = self.ttur.update_generator(step)
        gan_on = m.heads is not None and step >= self.d.gan.start_step
        clock = time.perf_counter()
        self._activate("generator", then="critic")
        if self.d.history_source == "self_forcing":
            cond = self._self_forcing_cond(m.generator, cond, target.shape, gen)
        # every rank's history empty: the first section's amplified schedule (agreed across ranks: it
        # sets the number of rollout forwards)
        first = self.d.history_source != "self_forcing" and on_every_rank(stats["history_empty"] == 1.0)
        exits = self.exit_steps(shared, first)
        x0 = roles.forward(
            "generator", self.rollout, m.generator, cond, target.shape, gen, update_g, exits, first
        )
        metrics = dict.fromkeys(self.extra_metric_names(), float("nan"))
        metrics["update_g"] = float(update_g)
        metrics["time_rollout_s"], clock = time.perf_counter() - clock, time.perf_counter()
        draws = self._draws(target, gen, step)
        losses = {}
        if update_g:  # generator: DMD (+ GAN G) through the exit step only
            losses["generator"] = self._generator_loss(m, batch, x0, cond, draws, gan_on, gen, metrics)
            self._activate(*self._generator_graph(gan_on), then="critic")
            roles.backward("generator", losses["generator"])
            metrics["time_generator_s"], clock = time.perf_counter() - clock, time.perf_counter()
        # critic: flow matching of the fake score on the generator's samples (+ GAN D with approx. R1);
        # in two parts where the role steps allow it (the flow graph freed before the GAN forwards)
        self._activate("critic", then="generator")
        split = gan_on and self.d.critic_backward == "parts" and roles.splittable("critic")
        args = (m, x0.detach(), target, cond, draws, gen, metrics)
        critic = roles.forward("critic", self._critic_flow_loss, *args, final=not split)
        if gan_on and split:
            roles.backward("critic", critic)
            gan = roles.forward("critic", self._critic_gan_loss, *args)
            roles.backward("critic", gan)
            critic = critic.detach() + gan.detach()
        elif gan_on:
            critic = critic + roles.forward("critic", self._critic_gan_loss, *args)
        if not split:
            roles.backward("critic", critic)
        losses["critic"] = critic
        metrics["time_critic_s"] = time.perf_counter() - clock
        needed = {"critic"} if "critic" in roles.pending else set()
        if "generator" in roles.pending:
            needed |= set(self._generator_graph(gan_on))
        if needed:  # graphs left pending (no trainer's role steps): their weights for the backward
            self._activate(*sorted(needed))
        metrics["tau_mean"] = draws["tau"].mean()
        return losses, {**stats, **metrics}

    def _draws(self, target: torch.Tensor, gen: torch.Generator, step: int) -> dict[str, Any]:
        """The step's random draws shared by the critic's and the generator's losses: the critic's flow
        time and noise (uniform t, dynamically shifted for the token count and kept off the ends as the
        reference: [20, 980]), the re-noise time tau (Dynamic Re-noise) and the GAN crop's offsets."""
        b, device = target.shape[0], target.device
        shift = shift_factor(token_count(*target.shape[2:]), self.cfg.flow.shift)
        t = shift_sigmas(torch.rand(b, generator=gen), shift).clamp(0.02, 0.98).to(device, non_blocking=True)
        eps = torch.randn(target.shape, generator=gen).to(device, non_blocking=True)
        tau = (
            shift_sigmas(self.renoise.sample(b, step, gen), shift)
            .clamp(0.02, 0.98)
            .to(device, non_blocking=True)
        )
        ch, cw = self._crop_hw(target)
        top = 2 * int(torch.randint((target.shape[-2] - ch) // 2 + 1, (1,), generator=gen))
        left = 2 * int(torch.randint((target.shape[-1] - cw) // 2 + 1, (1,), generator=gen))
        return {"t": t, "eps": eps, "tau": tau, "top": top, "left": left}

    def _generator_graph(self, gan_on: bool) -> tuple[str, ...]:
        """The roles whose weights the generator's backward reads: its own, and the critic's when the
        GAN term's graph runs through the discriminator (``distill.cache_gan_grad=false``)."""
        return ("generator", "critic") if gan_on and not self.d.cache_gan_grad else ("generator",)

    def _generator_loss(
        self, m: DistillModule, batch, x0: torch.Tensor, cond: dict, draws: dict, gan_on: bool, gen, metrics
    ) -> torch.Tensor:
        """DMD (Eq. 11-12: real score with CFG vs fake score at the re-noised x0) + the GAN G term."""
        b, device, dtype = x0.shape[0], x0.device, cond["encoder_hidden_states"].dtype
        tau = draws["tau"]
        tau5, t_tau = tau.view(-1, 1, 1, 1, 1), tau * NUM_TRAIN_TIMESTEPS
        self._activate("critic", "real", then="generator")  # the generator's graph waits meanwhile
        x_tau = (1 - tau5) * x0 + tau5 * torch.randn(x0.shape, generator=gen).to(device, non_blocking=True)
        with torch.no_grad():
            xt = x_tau.detach()
            uncond = {
                **cond,
                "encoder_hidden_states": self.uncond.to(device, dtype, non_blocking=True).expand(b, -1, -1),
            }
            context = self._bidirectional_context(batch, xt, tau5, gen)
            real_x0 = cfg_x0(
                xt,
                tau,
                self._real_velocity(m, xt, t_tau, cond, context),
                self._real_velocity(m, xt, t_tau, uncond, context),
                self.d.real_cfg,
            )
            fake_x0 = xt - tau5 * self._call(m.fake, xt, t_tau, cond)
        grad = dmd_gradient(x0.detach(), real_x0, fake_x0)
        loss_dmd = dmd_loss(x0, grad)
        total = loss_dmd
        metrics.update({"loss_dmd": loss_dmd.detach(), "dmd_grad_norm": grad.detach().norm() / math.sqrt(b)})
        if gan_on:
            crop = self._crop(x_tau, draws["top"], draws["left"])
            if self.d.cache_gan_grad:  # §4.2 Cache Grad: D's input gradient now, its activations freed
                x_in = crop.detach().requires_grad_(True)
                with frozen(m.fake, m.heads):
                    loss_g = gan_g_loss(self._disc(m, x_in, t_tau, cond))
                    (g_x,) = torch.autograd.grad(self.d.gan.w_g * loss_g, x_in)
                injected = (crop * g_x).sum()  # its gradient w.r.t. the generator's sample is g_x
                total = total + injected - injected.detach() + self.d.gan.w_g * loss_g.detach()
            else:
                with frozen(m.fake, m.heads):
                    loss_g = gan_g_loss(self._disc(m, crop, t_tau, cond))
                total = total + self.d.gan.w_g * loss_g
            metrics["loss_gan_g"] = loss_g.detach()
        return total

    def _critic_flow_loss(self, m: DistillModule, x0d, target, cond: dict, draws: dict, gen, metrics):
        """The fake score's flow matching on the generator's samples (Eq. 13)."""
        t, eps = draws["t"], draws["eps"]
        t5 = t.view(-1, 1, 1, 1, 1)
        x_t = (1 - t5) * x0d + t5 * eps
        loss_flow = F.mse_loss(self._call(m.fake, x_t, t * NUM_TRAIN_TIMESTEPS, cond), eps - x0d)
        metrics["loss_flow"] = loss_flow.detach()
        return loss_flow

    def _critic_gan_loss(self, m: DistillModule, x0d, target, cond: dict, draws: dict, gen, metrics):
        """The GAN D term with the approximate R1 (Eq. 14-16) on re-noised, cropped real and generated
        samples."""
        tau, top, left = draws["tau"], draws["top"], draws["left"]
        tau5, t_tau, device = tau.view(-1, 1, 1, 1, 1), tau * NUM_TRAIN_TIMESTEPS, x0d.device
        real_tau = (1 - tau5) * target + tau5 * torch.randn(target.shape, generator=gen).to(
            device, non_blocking=True
        )
        fake_tau = (1 - tau5) * x0d + tau5 * torch.randn(x0d.shape, generator=gen).to(
            device, non_blocking=True
        )
        real_c, fake_c = self._crop(real_tau, top, left), self._crop(fake_tau, top, left)
        l_real, l_fake = self._disc(m, real_c, t_tau, cond), self._disc(m, fake_c, t_tau, cond)
        r1 = approx_r1(lambda x: self._disc(m, x, t_tau, cond), real_c, self.d.gan.r1_sigma, gen, l_real)
        g = self.d.gan
        loss_d = gan_d_loss(l_real, l_fake)
        metrics.update(
            {
                "loss_gan_d": loss_d.detach(),
                "r1": r1.detach(),
                "d_real": l_real.detach().mean(),
                "d_fake": l_fake.detach().mean(),
            }
        )
        return critic_gan_term(loss_d, r1, g.w_d, g.r1_lambda, g.r1_weighting)

    # ------------------------------------------------------------------ bookkeeping
    def metric_names(self) -> list[str]:
        if self.d.phase == "ode":
            return ["loss", "loss_ode", "ode_stage"]

        tasks = [f"task_{t.name.lower()}" for t in Task]
        return ["loss", "corrupt_frac", *tasks, *self.extra_metric_names()]

    def extra_metric_names(self) -> list[str]:
        return [
            "loss_flow",
            "loss_dmd",
            "loss_gan_g",
            "loss_gan_d",
            "r1",
            "d_real",
            "d_fake",
            "dmd_grad_norm",
            "tau_mean",
            "update_g",
            "time_rollout_s",
            "time_critic_s",
            "time_generator_s",
        ]

    def _ema_params(self, model: DistillModule) -> dict[str, torch.Tensor]:
        return {f"generator.{n}": p for n, p in model.generator.named_parameters() if p.requires_grad}

    def after_optimizer_step(self, model: DistillModule, step: int, stepped: list[str]) -> None:
        if "generator" not in stepped or not self.ema_schedule.active(step):
            return
        params = self._ema_params(model)
        if self.ema is None:  # starts as a copy of the generator at ema_start
            self.ema = ShardedEma(params, self.rank, self.world_size)
            self.ema_updates = 0
        else:
            self.ema_updates += 1
            self.ema.update(params, self.ema_schedule(self.ema_updates))

    def before_validation(self) -> None:
        """Collective: the gathered EMA is written into the generator in place on every rank (its
        trainable weights only; the training values are kept on the host and put back afterwards), so
        validation never copies the generator and its 14B base."""
        self._activate("generator")
        ema = self.ema.gather() if self.ema is not None else None
        self._raw = self._swap_generator(ema) if ema else None

    def after_validation(self) -> None:
        if self._raw is not None:
            self._swap_generator(self._raw)
        self._raw = None

    @staticmethod
    def _partitioned(module: nn.Module) -> bool:
        return any(hasattr(p, "ds_tensor") for p in module.parameters())

    def _swap_generator(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Write ``weights`` into the generator's trainable parameters (a ZeRO-3 generator: gathered,
        collective); returns the values it replaced, on the host."""
        params = {n: p for n, p in self._ema_params(self.model).items() if n in weights}
        gathered = contextlib.nullcontext()
        if self._partitioned(self.model.generator):
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0)
        with gathered:
            old = {n: p.detach().cpu().clone() for n, p in params.items()}
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(weights[n].to(p.device, p.dtype))
        return old

    def extra_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Collective: the sharded EMA is gathered for the checkpoint."""
        return {"ema": self.ema.gather()} if self.ema is not None else {}

    def load_extra_tensors(self, tensors: dict) -> None:
        full = tensors.get("ema")
        if full is None or self.model is None:
            self.ema = None
            return
        self.ema = ShardedEma(self._ema_params(self.model), self.rank, self.world_size)
        self.ema.load(full)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.d.teacher, "ode_pairs": self.d.ode_pairs, "ema_updates": self.ema_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema_updates = int(state.get("ema_updates", 0))
