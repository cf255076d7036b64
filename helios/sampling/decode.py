"""Seamless decoding of a growing latent video with the causal Wan VAE.

Decoding each section on its own restarts the VAE's causal cache, so the first frames of every
section are decoded as if the video began there: visible seams (the reference code's issue #115).
:class:`StreamingDecoder` keeps the decoder's causal cache across sections, which gives exactly the
frames of decoding the whole latent sequence at once (tested), at the cost of one section at a time.
"""

from __future__ import annotations

import torch


class StreamingDecoder:
    """``push(latents)`` normalised section latents [B, C, T, h, w] -> pixels [B, 3, T', H, W] in [-1, 1]."""

    def __init__(self, vae) -> None:
        from helios.model.encoders import latent_stats

        self.vae = vae
        self.mean, self.std = latent_stats(vae)
        self.reset()

    def reset(self) -> None:
        self.feat_map = [None] * self.vae._cached_conv_counts["decoder"]
        self.first = True

    @torch.no_grad()
    def push(self, latents: torch.Tensor) -> torch.Tensor:
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        vae = self.vae
        param = next(vae.parameters())
        z = latents.float() * self.std.to(latents.device) + self.mean.to(latents.device)
        x = vae.post_quant_conv(z.to(param.device, param.dtype))
        frames = []
        for i in range(x.shape[2]):
            idx = [0]
            frames.append(
                vae.decoder(
                    x[:, :, i : i + 1], feat_cache=self.feat_map, feat_idx=idx, first_chunk=self.first
                )
            )
            self.first = False
        out = torch.cat(frames, dim=2)
        if vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.float().clamp(-1.0, 1.0)


def decode_sections_independently(vae, sections: list[torch.Tensor]) -> torch.Tensor:
    """What decoding each section on its own gives (the seam-prone baseline), for comparison."""
    outs = []
    for section in sections:
        dec = StreamingDecoder(vae)
        outs.append(dec.push(section))
    return torch.cat(outs, dim=2)


def seam_statistic(video: torch.Tensor, section_frames: int, first_section_frames: int | None = None) -> dict:
    """Mean absolute frame difference at section boundaries vs inside sections. [B, 3, T, H, W]."""
    diffs = (video[:, :, 1:] - video[:, :, :-1]).abs().mean(dim=(0, 1, 3, 4))  # diff between t and t+1
    first = first_section_frames or section_frames
    boundaries = {b - 1 for b in range(first, video.shape[2], section_frames)}
    at = [float(diffs[i]) for i in boundaries if i < len(diffs)]
    inside = [float(d) for i, d in enumerate(diffs) if i not in boundaries]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return {
        "boundary_diff": mean(at),
        "inside_diff": mean(inside),
        "ratio": mean(at) / max(mean(inside), 1e-8),
    }
