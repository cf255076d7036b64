"""History layout, relative frame indices and Representation Control (paper §3.1, §3.2, §3.3.1).

A training clip of ``sum(sizes) + window`` latent frames is split into the history buffer (oldest
first: long, mid, short/"1x") and the noisy window. The first-frame anchor is kept in front of
the short history. Frame indices are *relative* (§3.2.1): the same for every section, whatever
the position of the section in the video::

    arange(1 + H + W).split([1, long, mid, 1x, W]) -> anchor 0, long, mid, short=[0, 1x], noisy

which is exactly what diffusers' ``HeliosPipeline`` feeds at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

from helios.config.schema import HistoryConfig, TaskConfig


class Task(IntEnum):
    """History formats of Representation Control (§3.1.1)."""

    T2V = 0  # everything zero, anchor included
    I2V = 1  # only the last history frame (the image) and the anchor (the same image)
    V2V_PARTIAL = 2  # only the newest k*window frames, as in the first sections of a video
    V2V = 3  # the full history


@dataclass(frozen=True)
class HistoryLayout:
    """Sizes of the history buffer and noisy window, in latent frames."""

    long: int
    mid: int
    short: int
    window: int
    anchor: bool = True
    multi_term: bool = True
    relative_rope: bool = True  # §3.2.1; False: absolute indices (the Position Shift ablation)

    @classmethod
    def from_config(cls, cfg: HistoryConfig) -> HistoryLayout:
        long, mid, short = cfg.sizes
        return cls(long, mid, short, cfg.window, cfg.anchor, cfg.multi_term_patch, cfg.relative_rope)

    def position_offset(self, position: int, batch_size: int) -> torch.Tensor | None:
        """Index offset of a section whose first noisy frame is latent frame ``position`` of the video:
        None with Relative RoPE (every section sees the same indices, §3.2.1); with absolute indices the
        offset grows with the video (index = 1 + position, the anchor keeps 0), never below 0, the
        offset training gives a clip that starts at the video's first frame."""
        if self.relative_rope:
            return None
        return torch.full((batch_size,), max(0, position - self.num_history))  # an int fill: int64

    @property
    def num_history(self) -> int:
        return self.long + self.mid + self.short

    @property
    def clip_frames(self) -> int:
        """Latent frames a training clip needs: history buffer + noisy window."""
        return self.num_history + self.window

    def tokens(self, h: int, w: int) -> dict[str, int]:
        """Noisy and history tokens of one clip at latent size h x w (§3.3.1: patch 1x2x2; mid 2x4x4 and long
        4x8x8 convs on replicate-padded inputs)."""

        def up(a: int, b: int) -> int:
            return -(-a // b)

        short = (h // 2) * (w // 2)
        if not self.multi_term:
            history = (self.num_history + 1) * short
        else:
            history = (
                (self.short + 1) * short
                + up(self.mid, 2) * up(h, 4) * up(w, 4)
                + up(self.long, 4) * up(h, 8) * up(w, 8)
            )
        return {"noisy": self.window * short, "history": history}

    def indices(self, batch_size: int, offset: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Frame indices for RoPE. ``offset`` (per sample, latent frames) switches to absolute
        indices (the ablation of Relative RoPE): every non-anchor index is shifted by it."""
        idx = torch.arange(1 + self.num_history + self.window)
        anchor, long, mid, short_1x, noisy = idx.split([1, self.long, self.mid, self.short, self.window])
        parts = {
            "indices_hidden_states": noisy,
            "indices_latents_history_long": long,
            "indices_latents_history_mid": mid,
            "indices_latents_history_short": torch.cat([anchor, short_1x]),
        }
        out = {k: v.unsqueeze(0).expand(batch_size, -1).clone() for k, v in parts.items()}
        if offset is not None:
            off = offset.view(-1, 1).to(torch.long)
            for k, v in out.items():
                if k == "indices_latents_history_short":
                    v[:, 1:] += off
                else:
                    v += off
        return out

    def model_inputs(
        self, history: torch.Tensor, anchor: torch.Tensor, offset: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Keyword arguments of ``HeliosTransformer3DModel.forward`` for the history part.

        ``history``: [B, C, H, h, w] (oldest first), ``anchor``: [B, C, 1, h, w].
        Without multi-term patchification (ablation, paper Fig. 7 baseline) every history frame
        goes through the full-resolution short patch embedding.
        """
        b = history.shape[0]
        if history.shape[2] != self.num_history:
            raise ValueError(f"history has {history.shape[2]} frames, layout expects {self.num_history}")
        if not self.anchor:
            anchor = torch.zeros_like(anchor)
        idx = self.indices(b, offset)
        long, mid, short_1x = history.split([self.long, self.mid, self.short], dim=2)
        if not self.multi_term:
            all_idx = torch.cat(
                [
                    idx["indices_latents_history_short"][:, :1],
                    idx["indices_latents_history_long"],
                    idx["indices_latents_history_mid"],
                    idx["indices_latents_history_short"][:, 1:],
                ],
                dim=1,
            )
            return {
                "indices_hidden_states": idx["indices_hidden_states"],
                "indices_latents_history_short": all_idx,
                "latents_history_short": torch.cat([anchor, history], dim=2),
            }
        return {
            **idx,
            "latents_history_long": long,
            "latents_history_mid": mid,
            "latents_history_short": torch.cat([anchor, short_1x], dim=2),
        }

    def split_clip(self, clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, C, clip_frames, h, w] -> (history [B, C, H, h, w], noisy target [B, C, W, h, w])."""
        if clip.shape[2] < self.clip_frames:
            raise ValueError(f"clip has {clip.shape[2]} latent frames, need {self.clip_frames}")
        clip = clip[:, :, -self.clip_frames :]
        return clip[:, :, : self.num_history], clip[:, :, self.num_history :]

    def partial_lengths(self) -> list[int]:
        """History lengths kept by partial V2V, as the reference draws them (it zeroes the oldest
        1 + k x window frames): k x window < H, 0 included (the anchor alone: 16/2/1 + 9 keeps 0, 9 or 18)."""
        return [k * self.window for k in range(self.num_history) if k * self.window < self.num_history]


def draw_tasks(batch_size: int, cfg: TaskConfig, generator: torch.Generator) -> torch.Tensor:
    """One history format per sample with probabilities (t2v, i2v, v2v_partial, rest=v2v)."""
    u = torch.rand(batch_size, generator=generator)
    edges = torch.tensor([cfg.t2v, cfg.t2v + cfg.i2v, cfg.t2v + cfg.i2v + cfg.v2v_partial])
    return torch.bucketize(u, edges, right=True).to(torch.long)


def apply_tasks(
    history: torch.Tensor,
    first_latent: torch.Tensor,
    tasks: torch.Tensor,
    layout: HistoryLayout,
    generator: torch.Generator,
    history_frames: torch.Tensor | None = None,
    section_format: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Representation Control: zero history frames per task (§3.1.1).

    ``history_frames`` [B]: how many of the newest history frames are real video (the rest is zero
    padding before the video start, section format); None = all. Returns (history, anchor, valid)
    where ``valid`` [B, H] marks the real, kept history frames (Frame-Aware Corrupt touches only those).

    The anchor is zero for T2V. Otherwise, in the section format it is the video's first latent
    (``first_latent``: a single-frame latent, zero for the first section), as in the reference code and
    as the sampler feeds it (the image for I2V, the input's first frame for V2V). In the clip format
    it is the video's first latent for V2V, the first kept frame for partial V2V (the video started
    there) and the image for I2V (the sampler feeds the image latent in both slots).
    """
    b, _, h_frames = history.shape[:3]
    history = history.clone()
    anchor = first_latent.clone()
    valid = torch.ones(b, h_frames, dtype=torch.bool)
    if history_frames is not None:
        for i, real in enumerate(history_frames.tolist()):
            valid[i, : h_frames - int(real)] = False
    lengths = layout.partial_lengths()
    for i, task in enumerate(tasks.tolist()):
        if task == Task.T2V:
            valid[i] = False
            anchor[i].zero_()
        elif task == Task.I2V:
            valid[i, :-1] = False
            if not section_format:
                anchor[i] = history[i, :, -1:]
        elif task == Task.V2V_PARTIAL:
            n_keep = lengths[int(torch.randint(len(lengths), (1,), generator=generator))]
            valid[i, : h_frames - n_keep] = False
            if not section_format and n_keep:
                anchor[i] = history[i, :, h_frames - n_keep : h_frames - n_keep + 1]
    mask = valid.view(b, 1, h_frames, 1, 1)
    history = history * mask.to(history.device, history.dtype)  # pragma: no mutate (bool * float is float)
    return history, anchor, valid
