"""Decode a video file into a clip tensor: fps resampling, resize + centre crop (decord; ffmpeg where
decord is not installed or fails on a valid stream)."""

from __future__ import annotations

import contextlib
import io
import math
import tempfile

import torch
import torch.nn.functional as F


class VideoDecodeError(RuntimeError):
    """The file cannot be decoded into a clip (corrupt, truncated, too short, no frames)."""


def frame_indices(
    num_source: int, source_fps: float, target_fps: float, num_frames: int, start: int = 0
) -> list[int]:
    """Indices of ``num_frames`` frames sampled at ``target_fps`` from a ``source_fps`` stream."""
    step = source_fps / target_fps if target_fps > 0 else 1.0
    idx = [start + math.floor(i * step + 1e-6) for i in range(num_frames)]
    if not idx or idx[-1] >= num_source:
        raise VideoDecodeError(
            f"too short: need {num_frames} frames at {target_fps} fps, "
            f"the video has {num_source} at {source_fps:.2f}"
        )
    return idx


def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[T, H, W, 3] uint8 -> [3, T, height, width] float in [-1, 1] (shorter side scaled, centre crop)."""
    x = frames.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    return (x / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()


@contextlib.contextmanager
def _as_path(source: str | io.BytesIO):
    """A file path for ``source`` (an in-memory video is written to a temporary file)."""
    if not isinstance(source, io.BytesIO):
        yield str(source)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/clip.mp4"
        with open(path, "wb") as f:
            f.write(source.getvalue())
        yield path


def ffmpeg_frames(
    source: str | io.BytesIO, idx: list[int], first_error: BaseException | None
) -> torch.Tensor:
    """Frames ``idx`` as [T, H, W, 3] uint8, decoded by an ffmpeg process (imageio-ffmpeg)."""
    import imageio
    import numpy as np

    with _as_path(source) as path:
        try:
            with imageio.get_reader(path, "ffmpeg") as reader:
                frames = np.stack([reader.get_data(i)[..., :3] for i in idx])
        except Exception as err:
            reason = f"{first_error}".splitlines()[0] if first_error else ""
            raise VideoDecodeError(f"decode failed: {reason}; ffmpeg: {err}".splitlines()[0]) from None
    return torch.from_numpy(frames)


def ffmpeg_probe(source: str | io.BytesIO) -> tuple[int, float]:
    """(frames, fps) of a video, read by ffmpeg (imageio-ffmpeg)."""
    import imageio

    with _as_path(source) as path:
        try:
            with imageio.get_reader(path, "ffmpeg") as reader:
                return reader.count_frames(), float(reader.get_meta_data().get("fps") or 0.0)
        except Exception as err:
            raise VideoDecodeError(f"cannot open: {err}".splitlines()[0]) from None


def decord_reader():
    """decord where it is installed (its wheels: x86-64 only); None elsewhere (aarch64, e.g. GH200 nodes),
    where ffmpeg (imageio-ffmpeg) decodes every video."""
    try:
        import decord
    except ImportError:
        return None
    return decord


def decode_clip(
    source: str | io.BytesIO,
    num_frames: int,
    height: int,
    width: int,
    fps: float | None = None,
    cut: tuple[int, int] | None = None,
    crop: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, float]:
    """The first ``num_frames`` frames of a file path or in-memory video at ``fps`` (source fps when
    None) as [3, T, H, W] in [-1, 1], and the frame rate actually sampled. ``cut`` = (start, end) source
    frames and ``crop`` = (x0, x1, y0, y1) pixels restrict it first (the reference code's data index).
    Decoded by decord, or by ffmpeg where decord is not installed or fails on a valid stream."""
    decord = decord_reader()
    reader = None
    if decord is None:
        n, source_fps = ffmpeg_probe(source)
    else:
        try:
            reader = decord.VideoReader(
                source if isinstance(source, io.BytesIO) else str(source), ctx=decord.cpu(0), num_threads=1
            )
        except Exception as err:  # decord raises its own DECORDError / RuntimeError variants
            raise VideoDecodeError(f"cannot open: {err}".splitlines()[0]) from None
        n, source_fps = len(reader), float(reader.get_avg_fps() or 0.0)
    if n == 0:
        raise VideoDecodeError("no frames")
    source_fps = source_fps or fps or 1.0
    start, end = cut if cut is not None else (0, n)
    if not 0 <= start < end:
        raise VideoDecodeError(f"bad cut {list(cut)}")
    idx = frame_indices(min(end, n), source_fps, fps or source_fps, num_frames, start=start)
    if reader is None:
        frames = ffmpeg_frames(source, idx, None)
    else:
        try:
            frames = torch.from_numpy(reader.get_batch(idx).asnumpy())
            if frames.ndim != 4 or frames.shape[-1] != 3:
                raise VideoDecodeError(f"decord returned frames of shape {tuple(frames.shape)}")
        except Exception as err:
            # decord mis-decodes some valid streams (e.g. frames narrower than its 32-pixel alignment);
            # ffmpeg itself (imageio-ffmpeg) reads them, frame by frame
            frames = ffmpeg_frames(source, idx, err)
    if frames.shape[0] != num_frames or frames.numel() == 0:
        raise VideoDecodeError(f"decoded {frames.shape[0]} of {num_frames} frames")
    if crop is not None:
        x0, x1, y0, y1 = crop
        if not (0 <= x0 < x1 <= frames.shape[2] and 0 <= y0 < y1 <= frames.shape[1]):
            raise VideoDecodeError(
                f"crop {list(crop)} is outside the {frames.shape[2]}x{frames.shape[1]} frame"
            )
        frames = frames[:, y0:y1, x0:x1]
    return resize_center_crop(frames, height, width), float(fps or source_fps)
