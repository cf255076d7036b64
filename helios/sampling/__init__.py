"""Autoregressive long-video sampling: section samplers (UniPC, Pyramid UniPC, DMD), the history loop,
seamless streaming decode, drift statistics, adaptive anti-drifting and prompt interpolation."""

from helios.sampling.autoregressive import SampleResult, sample_video
from helios.sampling.decode import StreamingDecoder, seam_statistic
from helios.sampling.drift import AdaptiveAntiDrift, AdaptiveConfig, drift_report, section_stats
from helios.sampling.prompts import PromptSchedule
from helios.sampling.section import Guidance, SectionSampler, block_noise

__all__ = [
    "AdaptiveAntiDrift",
    "AdaptiveConfig",
    "Guidance",
    "PromptSchedule",
    "SampleResult",
    "SectionSampler",
    "StreamingDecoder",
    "block_noise",
    "drift_report",
    "sample_video",
    "seam_statistic",
    "section_stats",
]
