"""Stage 3's post-training (paper §3.4, Eq. 10-16, §4.2): DMD with real/fake scores + GAN with approximate
R1, one role's graph at a time.

* Pure Teacher Forcing: the history is real data with Frame-Aware Corrupt, one section per step
  (``distill.history_source=self_forcing``: the generator's own rollout, Table 5);
* Staged Backward Simulation (Eq. 10, :mod:`.rollout`): only the full-resolution x0 goes to the scores;
* Dynamic Re-noise: tau ~ Beta with cosine-annealed parameters, shifted for the token count;
* TTUR: the critic (fake score + heads) every step, G every ``distill.ttur`` steps.

The generator's loss (:meth:`PostPhase.generator_loss`) and the critic's (:meth:`PostPhase.critic_flow_loss`,
:meth:`PostPhase.critic_gan_loss`) are separate functions of the step's shared draws.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from helios.core.corrupt import saturate
from helios.core.distillation import (
    TTUR,
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
from helios.core.placement import to_device
from helios.data.dataset import training_dataset
from helios.data.prepare_job import EMPTY_PROMPT_FILE, NEGATIVE_PROMPT_FILE, load_empty_prompt
from helios.infra.distributed import agree_max
from helios.infra.parallel import RoleSteps
from helios.stages.distilled.phase import DistillPhase
from helios.stages.distilled.roles import DistillModule, real_score
from helios.stages.distilled.rollout import velocity

# (history inputs, clean window latents, statistics) of a clip batch: the stage's Unified History Injection
Condition = Callable[[Any, torch.Generator], tuple[dict, torch.Tensor, dict]]

EXTRA_METRICS = [
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
    "first_section",
    "time_rollout_s",
    "time_critic_s",
    "time_generator_s",
]


def cast_inputs(inputs: dict[str, torch.Tensor], like: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model inputs on ``like``'s device, floating-point ones in its dtype (indices keep theirs); a copy
    from the host does not wait for the device."""
    return {
        k: to_device(v, like.device, like.dtype if v.is_floating_point() else v.dtype)
        for k, v in inputs.items()
    }


class PostPhase(DistillPhase):
    def __init__(self, *args, condition: Condition) -> None:
        super().__init__(*args)
        self.condition = condition
        self.ttur = TTUR(self.d.ttur)
        self.renoise = RenoiseSchedule(self.d.renoise_a0, self.d.renoise_b0, self.d.renoise_anneal_steps)
        # the real score's unconditional prompt (distill.uncond), read by setup() before any step
        self.uncond: torch.Tensor | None = None  # pragma: no mutate

    def setup(self, data_path: Path | None) -> None:
        """Read the real score's unconditional prompt (the reference's negative prompt, or the empty one);
        ``zeros``: none to read (zero embeddings, what caption dropout trains)."""
        if self.d.uncond == "zeros":
            return
        name = NEGATIVE_PROMPT_FILE if self.d.uncond == "negative" else EMPTY_PROMPT_FILE
        uncond = load_empty_prompt(data_path, name)
        if uncond is None:
            raise FileNotFoundError(
                f"{data_path} has no {name}: rerun helios.prepare with the same arguments (it adds the file "
                "without re-encoding the clips)"
                + (" or use distill.uncond=empty" if self.d.uncond == "negative" else "")
            )
        n = self.cfg.model.text_encoder.max_sequence_length
        self.uncond = torch.zeros(1, n, uncond.shape[-1])  # pragma: no mutate (2-D: shape[1] is shape[-1])
        self.uncond[0, : min(n, len(uncond))] = uncond[:n]

    def unconditional(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """The real score's unconditional input beside the batch's ``prompt_embeds`` [B, L, D]."""
        if self.d.uncond == "zeros":
            return torch.zeros_like(prompt_embeds)
        return to_device(self.uncond, prompt_embeds.device, prompt_embeds.dtype).expand(
            len(prompt_embeds), -1, -1
        )

    def dataset(self, data_path: Path | None):
        return training_dataset(data_path, self.cfg)

    def metric_names(self) -> list[str]:
        tasks = [f"task_{t.name.lower()}" for t in Task]
        return ["loss", "corrupt_frac", *tasks, *EXTRA_METRICS]

    # ------------------------------------------------------------------ the step
    def step(
        self,
        m: DistillModule,
        batch,
        gen: torch.Generator,
        shared: torch.Generator,
        roles: RoleSteps,
        step: int,
    ):
        """One DMD + GAN iteration, one role's graph at a time (§4.2): the generator's rollout, its DMD
        (+ GAN) loss and backward (TTUR steps only), then the critic's losses and backward; each inside the
        placement block of the roles it computes with (with ``distill.offload`` one or two 14B bases are
        resident at each point: the generator's graph waits for its backward while the scores run on the
        critic's base). Returns each trained role's detached loss and the metrics."""
        resident = self.roles.resident
        cond, target, stats = self.condition(batch, gen)  # on the host
        device = self.device
        dtype = next(m.generator.parameters()).dtype
        like = torch.empty((), device=device, dtype=dtype)
        # the reference saturates the generator's history only; the scores see the (corrupted) history
        cond_g = cast_inputs(self.saturated(cond, gen), like)
        cond = cast_inputs(cond, like)
        target = to_device(target, device)
        update_g = self.ttur.update_generator(step)
        gan_on = m.heads is not None and step >= self.d.gan.start_step
        clock = time.perf_counter()
        # this rank's history empty: a video's first section, trained on the doubled schedule that sampling
        # uses for it (as the reference, each rank decides for its own micro-batch)
        first = self.d.history_source != "self_forcing" and stats["history_empty"] == 1.0
        exits = self.rollout.exit_steps(shared, first)
        forwards = None
        if self.cfg.parallel.role_backend("generator") == "zero3":  # equal forward counts on every rank
            forwards = agree_max([e + 1 for e in exits])
        with resident("generator", then="critic"):
            if self.d.history_source == "self_forcing":
                cond = cond_g = self.self_forcing_cond(m.generator, cond, target.shape, gen)
            x0 = roles.forward(
                "generator",
                self.rollout,
                m.generator,
                cond_g,
                target.shape,
                gen,
                update_g,
                exits,
                first,
                forwards,
            )
        metrics = dict.fromkeys(EXTRA_METRICS, float("nan"))
        metrics["update_g"] = float(update_g)
        metrics["first_section"] = float(first)
        metrics["time_rollout_s"], clock = time.perf_counter() - clock, time.perf_counter()
        draws = self.draws(target, gen, step)
        losses = {}
        if update_g:  # generator: DMD (+ GAN G) through the exit step only
            loss = self.generator_loss(m, batch, x0, cond, draws, gan_on, gen, metrics)
            with resident(*self.generator_graph(gan_on), then="critic"):
                roles.backward("generator", loss)
            losses["generator"] = loss.detach()
            metrics["time_generator_s"], clock = time.perf_counter() - clock, time.perf_counter()
        # critic: flow matching of the fake score on the generator's samples (+ GAN D with approx. R1);
        # in two parts where the role steps allow it (the flow graph freed before the GAN forwards)
        split = gan_on and self.d.critic_backward == "parts" and roles.splittable("critic")
        args = (m, x0.detach(), target, cond, draws, gen, metrics)
        with resident("critic", then="generator"):
            critic = roles.forward("critic", self.critic_flow_loss, *args, final=not split)
            if gan_on and split:
                roles.backward("critic", critic)
                gan = roles.forward("critic", self.critic_gan_loss, *args)
                roles.backward("critic", gan)
                critic = critic.detach() + gan.detach()
            elif gan_on:
                critic = critic + roles.forward("critic", self.critic_gan_loss, *args)
            if not split:
                roles.backward("critic", critic)
        losses["critic"] = critic.detach()
        metrics["time_critic_s"] = time.perf_counter() - clock
        metrics["tau_mean"] = draws["tau"].mean()
        return losses, {**stats, **metrics}

    def saturated(self, cond: dict, gen: torch.Generator) -> dict:
        """The generator's history inputs with the reference's stage-3 saturation (``mode=reference`` and
        ``history.corrupt.saturation.enabled``; the anchor is kept): [long, mid, short] in one sequence,
        oldest first, as the reference's regions count them."""
        c = self.cfg.history.corrupt
        if not (c.enabled and c.mode == "reference" and c.saturation.enabled):
            return cond
        keys = [k for k in ("latents_history_long", "latents_history_mid") if k in cond]
        parts = [cond[k] for k in keys] + [cond["latents_history_short"][:, :, 1:]]
        history = torch.cat(parts, dim=2)
        valid = history.flatten(3).abs().amax(dim=(1, 3)) > 0  # frames holding content
        out = saturate(history, valid, c.saturation, gen, self.layout.window)
        pieces = out.split([p.shape[2] for p in parts], dim=2)
        short = torch.cat([cond["latents_history_short"][:, :, :1], pieces[-1]], dim=2)
        return {**cond, **dict(zip(keys, pieces[:-1])), "latents_history_short": short}

    def draws(self, target: torch.Tensor, gen: torch.Generator, step: int) -> dict[str, Any]:
        """The step's random draws shared by the critic's and the generator's losses: the critic's flow
        time and noise (uniform t, dynamically shifted for the token count and kept off the ends as the
        reference: [20, 980]), the re-noise time tau (Dynamic Re-noise) and the GAN crop's offsets."""
        b, device = target.shape[0], target.device
        shift = shift_factor(token_count(*target.shape[2:]), self.cfg.flow.shift)
        t = to_device(shift_sigmas(torch.rand(b, generator=gen), shift).clamp(0.02, 0.98), device)
        eps = to_device(torch.randn(target.shape, generator=gen), device)
        tau = (
            shift_sigmas(self.renoise.sample(b, step, gen), shift)
            .clamp(0.02, 0.98)
            .to(device, non_blocking=True)  # pragma: no mutate (a copy hint)
        )
        ch, cw = self._crop_hw(target)
        top = 2 * int(torch.randint((target.shape[-2] - ch) // 2 + 1, (1,), generator=gen))
        left = 2 * int(torch.randint((target.shape[-1] - cw) // 2 + 1, (1,), generator=gen))
        return {"t": t, "eps": eps, "tau": tau, "top": top, "left": left}

    def generator_graph(self, gan_on: bool) -> tuple[str, ...]:
        """The roles whose weights the generator's backward reads: its own, and the critic's when the GAN
        term's graph runs through the discriminator (``distill.cache_gan_grad=false``)."""
        return ("generator", "critic") if gan_on and not self.d.cache_gan_grad else ("generator",)

    # ------------------------------------------------------------------ history variants (Table 5)
    def self_forcing_cond(self, generator, cond: dict, shape, gen: torch.Generator) -> dict:
        """Table 5 "w Self-Forcing": the history is the generator's own few-step rollout, section after
        section from an empty history (T2V, no gradients), instead of real frames (Pure Teacher Forcing)."""
        b, c, _, h, w = shape
        ref = cond["encoder_hidden_states"]
        history = torch.zeros(b, c, self.layout.num_history, h, w, device=ref.device)
        anchor = torch.zeros(b, c, 1, h, w, device=ref.device)

        def inputs() -> dict:
            return cast_inputs(
                {"encoder_hidden_states": ref, **self.layout.model_inputs(history, anchor)}, ref
            )

        for k in range(-(-self.layout.num_history // self.layout.window)):
            with torch.no_grad():
                section = self.rollout(
                    generator, inputs(), shape, gen, grad=False, first_section=k == 0
                ).float()
            anchor = section[:, :, :1] if k == 0 else anchor
            history = torch.cat([history, section], dim=2)[:, :, -self.layout.num_history :]
        return inputs()

    def bidirectional_context(self, batch, xt: torch.Tensor, tau5: torch.Tensor, gen) -> torch.Tensor | None:
        """Table 5 "w Bidirectional Teacher": the newest real history frames, re-noised to tau, that precede
        x_tau in the real score's ``distill.bidirectional_frames``-long segment."""
        if self.d.real_score == "history":
            return None
        history = self.layout.split_clip(batch.latents)[0]
        m = max(0, min(history.shape[2], self.d.bidirectional_frames - xt.shape[2]))
        ctx = to_device(history[:, :, history.shape[2] - m :], xt.device, xt.dtype)
        return (1 - tau5) * ctx + tau5 * to_device(torch.randn(ctx.shape, generator=gen), xt.device, xt.dtype)

    def real_velocity(self, m: DistillModule, xt, t_tau, cond: dict, context: torch.Tensor | None):
        """The real score's velocity on x_tau: with the history inputs (Helios-Base), or, as a bidirectional
        teacher, on [context, x_tau] without history inputs (the x_tau part returned)."""
        with real_score(m) as real:
            if context is None:
                return velocity(real, xt, t_tau, cond)
            segment = torch.cat([context, xt], dim=2)
            v = velocity(real, segment, t_tau, {"encoder_hidden_states": cond["encoder_hidden_states"]})
        return v[:, :, context.shape[2] :]

    # ------------------------------------------------------------------ the discriminator
    def _crop(self, x: torch.Tensor, top: int, left: int) -> torch.Tensor:
        ch, cw = self._crop_hw(x)
        return x[..., top : top + ch, left : left + cw]

    def _crop_hw(self, x: torch.Tensor) -> tuple[int, int]:
        h, w = x.shape[-2:]
        r = self.d.gan.crop
        return max(2, int(h * r) // 2 * 2), max(2, int(w * r) // 2 * 2)

    @staticmethod
    def _disc(m: DistillModule, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        with m.heads.capture(m.fake) as store:
            output = velocity(m.fake, x, t, cond)
        return m.heads.logits(store, (x.shape[2], x.shape[3] // 2, x.shape[4] // 2), output)

    # ------------------------------------------------------------------ the losses
    def generator_loss(
        self, m: DistillModule, batch, x0: torch.Tensor, cond: dict, draws: dict, gan_on: bool, gen, metrics
    ) -> torch.Tensor:
        """DMD (Eq. 11-12: real score with CFG vs fake score at the re-noised x0) + the GAN G term."""
        b, device = x0.shape[0], x0.device
        tau = draws["tau"]
        tau5, t_tau = tau.view(-1, 1, 1, 1, 1), tau * NUM_TRAIN_TIMESTEPS
        with self.roles.resident("critic", "real", then="generator"):  # the generator's graph waits
            eps = torch.randn(x0.shape, generator=gen)
            eps = eps.to(device, non_blocking=True)  # pragma: no mutate (a copy hint; one device on a CPU)
            x_tau = (1 - tau5) * x0 + tau5 * eps
            with torch.no_grad():
                xt = x_tau.detach()
                uncond = {**cond, "encoder_hidden_states": self.unconditional(cond["encoder_hidden_states"])}
                context = self.bidirectional_context(batch, xt, tau5, gen)
                real_x0 = cfg_x0(
                    xt,
                    tau,
                    self.real_velocity(m, xt, t_tau, cond, context),
                    self.real_velocity(m, xt, t_tau, uncond, context),
                    self.d.real_cfg,
                )
                fake_x0 = xt - tau5 * velocity(m.fake, xt, t_tau, cond)
            grad = dmd_gradient(x0.detach(), real_x0, fake_x0)
            loss_dmd = dmd_loss(x0, grad)
            total = loss_dmd
            metrics.update(
                {"loss_dmd": loss_dmd.detach(), "dmd_grad_norm": grad.detach().norm() / math.sqrt(b)}
            )
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

    def critic_flow_loss(self, m: DistillModule, x0d, target, cond: dict, draws: dict, gen, metrics):
        """The fake score's flow matching on the generator's samples (Eq. 13)."""
        t, eps = draws["t"], draws["eps"]
        t5 = t.view(-1, 1, 1, 1, 1)
        x_t = (1 - t5) * x0d + t5 * eps
        loss_flow = F.mse_loss(velocity(m.fake, x_t, t * NUM_TRAIN_TIMESTEPS, cond), eps - x0d)
        metrics["loss_flow"] = loss_flow.detach()
        return loss_flow

    def critic_gan_loss(self, m: DistillModule, x0d, target, cond: dict, draws: dict, gen, metrics):
        """The GAN D term with the approximate R1 (Eq. 14-16) on re-noised, cropped real and generated
        samples."""
        tau, top, left = draws["tau"], draws["top"], draws["left"]
        tau5, t_tau, device = tau.view(-1, 1, 1, 1, 1), tau * NUM_TRAIN_TIMESTEPS, x0d.device
        noise = [torch.randn(x.shape, generator=gen) for x in (target, x0d)]  # the real one drawn first
        real_eps, fake_eps = (e.to(device, non_blocking=True) for e in noise)  # pragma: no mutate (copy hint)
        real_tau, fake_tau = (1 - tau5) * target + tau5 * real_eps, (1 - tau5) * x0d + tau5 * fake_eps
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
