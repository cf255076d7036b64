"""Decoding a growing latent video with the causal Wan VAE, in the latent format the model was
trained on (:class:`SectionDecoder`).

- ``sections`` (the released checkpoints, diffusers' pipelines): every section was encoded on its own,
  so its first latent is a single-frame latent; each section is decoded on its own
  (``4(n-1)+1`` frames per section). Carrying the cache across such sections would decode each
  single-frame latent as four frames.
- ``clip`` (whole-clip latents): :class:`StreamingDecoder` keeps the decoder's causal cache across
  sections, which gives exactly the frames of decoding the whole latent sequence at once (tested):
  no seams at section boundaries (the reference code's issue #115), ``4n`` frames per later section.
"""

from __future__ import annotations

import torch

from helios.model.encoders import latent_stats


class StreamingDecoder:
    """``push(latents)`` normalised section latents [B, C, T, h, w] -> pixels [B, 3, T', H, W] in [-1, 1]."""

    def __init__(self, vae) -> None:

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
    """Each section decoded on its own (the section format; diffusers' pipelines do the same)."""
    return torch.cat([StreamingDecoder(vae).push(section) for section in sections], dim=2)


DECODE_MODES = {"sections": "sections", "clip": "stream"}  # latent format -> how it is decoded


class SectionDecoder:
    """``push(section latents)`` -> pixels, decoded as the model's ``latent_format`` requires: each
    section on its own (``sections``) or with the causal cache carried over (``clip``)."""

    def __init__(self, vae, latent_format: str) -> None:
        if latent_format not in DECODE_MODES:
            raise ValueError(f"unknown latent format {latent_format!r}; one of {sorted(DECODE_MODES)}")
        self.vae, self.latent_format = vae, latent_format
        self.stream = StreamingDecoder(vae) if latent_format == "clip" else None

    def push(self, latents: torch.Tensor) -> torch.Tensor:
        if self.stream is not None:
            return self.stream.push(latents)
        return StreamingDecoder(self.vae).push(latents)

    def push_conditioning(self, latents: torch.Tensor, section_latents: int) -> torch.Tensor:
        """The conditioning latents (I2V image, V2V video) as pixels: in the section format, a single
        latent (the image) alone and a video section by section."""
        if self.stream is not None or latents.shape[2] == 1:
            return self.push(latents)
        return decode_sections_independently(self.vae, list(latents.split(section_latents, dim=2)))


def section_frames(window: int, latent_format: str) -> tuple[int, int]:
    """Pixel frames of (the first, every later) section: ``4(n-1)+1`` each for the section format;
    with the streaming decode of whole-clip latents ``4(n-1)+1`` and then ``4n``."""
    first = 4 * (window - 1) + 1
    return first, (first if latent_format == "sections" else 4 * window)


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
