"""diffusers' pyramid pipeline with two of its defects worked around, for parity tests.

Its block noise goes through a Cholesky factor of (1+γ)I − γ11ᵀ, which does not exist at γ = 1/3 (fails in
fp32 on CPU), and its CFG-Zero* path calls ``.view()`` on the model's non-contiguous output. The pipeline is
given our block-noise draw (same generator stream, same covariance) and a contiguous model output; nothing
else of it changes.
"""

from __future__ import annotations

import contextlib

from diffusers import HeliosPyramidPipeline

from helios.sampling.section import block_noise


@contextlib.contextmanager
def pyramid_pipeline_workarounds(transformer):
    def ours(self, b, c, t, h, w, patch_size=(1, 2, 2), device=None, generator=None):
        return block_noise((b, c, t, h, w), self.scheduler.config.gamma, generator, patch_size[1:], device)

    original = HeliosPyramidPipeline.sample_block_noise
    HeliosPyramidPipeline.sample_block_noise = ours
    hook = transformer.register_forward_hook(
        lambda m, i, o: (o[0].contiguous(),) if isinstance(o, tuple) else o
    )
    try:
        yield
    finally:
        hook.remove()
        HeliosPyramidPipeline.sample_block_noise = original
