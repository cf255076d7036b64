"""helios.prepare: bad inputs skipped and reported, every input format, resume, ranks, then training."""

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from helios.config.schema import TextEncoderConfig, VaeConfig
from helios.data.prepare_job import ClipSpec, prepare, write_report
from helios.data.shards import ShardIndex
from helios.data.synthetic import make_synthetic_videos, write_mp4
from helios.infra.metrics import read_metrics
from helios.model.encoders import build_text_encoder, build_vae
from helios.world.shapes import RADIUS, render_clip

ROOT = Path(__file__).resolve().parents[2]
# 2 sections of 5 frames, each encoded on its own into 2 latent frames (posterior samples, seeded)
SPEC = ClipSpec(latent_frames=4, height=32, width=32, fps=None, format="sections", section_latents=2)


@pytest.fixture(scope="module")
def encoders():
    vae = build_vae(VaeConfig(source="tiny"))
    tokenizer, text = build_text_encoder(TextEncoderConfig(source="tiny", max_sequence_length=16))
    return vae, tokenizer, text


def _run(inp, out, encoders, **kw):
    vae, tok, text = encoders
    prepare(inp, out, SPEC, vae, tok, text, max_sequence_length=16, **kw)
    return write_report(out)


@pytest.fixture(scope="module")
def messy_input(tmp_path_factory):
    """6 good videos and one of every kind of bad input."""
    root = tmp_path_factory.mktemp("messy")
    make_synthetic_videos(root, 6, 13, 32, 32, 8, seed=7, radius=RADIUS)
    good = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    data = (root / "shapes_00000.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (root / "zero.mp4").write_bytes(b"")
    (root / "garbage.mp4").write_bytes(os.urandom(4096))
    video, _ = render_clip(5, 32, 32, torch.Generator().manual_seed(0))
    write_mp4(root / "short.mp4", video, 8)
    lines = [json.dumps(g).encode() for g in good[:3]]
    lines += [
        json.dumps({"video": "truncated.mp4", "caption": "a"}).encode(),
        json.dumps({"video": "zero.mp4", "caption": "b"}).encode(),
        json.dumps({"video": "garbage.mp4", "caption": "c"}).encode(),
        json.dumps({"video": "short.mp4", "caption": "d"}).encode(),
        json.dumps({"video": "missing.mp4", "caption": "e"}).encode(),
        json.dumps({"video": "shapes_00001.mp4", "caption": ""}).encode(),
        b'{"video": "shapes_00002.mp4", "caption": "caf\xe9 \xff"}',
        b"{not json",
    ]
    lines += [json.dumps(g).encode() for g in good[3:]]
    (root / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


EXPECTED_REASONS = {
    "truncated.mp4": "cannot open",
    "zero.mp4": "cannot open",
    "garbage.mp4": "cannot open",
    "short.mp4": "too short",
    "missing.mp4": "missing file",
    "shapes_00001.mp4": "empty caption",
    "captions.jsonl:10": "not valid UTF-8",
    "captions.jsonl:11": "unreadable caption line",
}


def test_bad_inputs_are_skipped_counted_and_listed(messy_input, encoders, tmp_path):
    report = _run(messy_input, tmp_path, encoders, samples_per_shard=4)
    assert report["written"] == 6 and report["skipped"] == len(EXPECTED_REASONS)
    reasons = {s["input"]: s["reason"] for s in report["skipped_inputs"]}
    for name, needle in EXPECTED_REASONS.items():
        assert needle in reasons[name], (name, reasons[name])
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == report
    index = ShardIndex.open(tmp_path)
    assert len(index) == 6
    sample = index.read(0)
    assert sample["latents"].shape == (16, 4, 4, 4)
    assert sample["meta"]["caption"] and sample["meta"]["latent_shape"] == [16, 4, 4, 4]
    assert not list(tmp_path.glob("*.tmp"))


def test_each_section_is_encoded_on_its_own(messy_input, encoders, tmp_path):
    """clip.format=sections: the shard holds the sections' latents encoded one by one, each from its own
    5 frames (its first latent a single-frame latent), exactly as the reference's data tool; the format is
    recorded with every sample. clip.format=clip encodes the 10 frames in one pass: other latents."""
    from helios.data.video import decode_clip
    from helios.model.encoders import encode_video

    vae, tok, text = encoders
    spec = replace(SPEC, posterior="mode")
    prepare(messy_input, tmp_path / "s", spec, vae, tok, text, max_sequence_length=16)
    prepare(
        messy_input,
        tmp_path / "c",
        replace(spec, format="clip", latent_frames=3),
        vae,
        tok,
        text,
        max_sequence_length=16,
    )
    sections, whole = ShardIndex.open(tmp_path / "s"), ShardIndex.open(tmp_path / "c")
    sample = sections.read(0)
    assert sample["meta"]["latent_format"] == "sections" and sample["meta"]["section_latents"] == 2
    assert sections.latent_format(0) == ("sections", 2) and whole.latent_format(0) == ("clip", None)
    clip, _ = decode_clip(str(messy_input / sample["meta"]["source"]), 10, 32, 32)
    one_by_one = torch.cat([encode_video(vae, clip[None, :, k : k + 5])[0] for k in (0, 5)], dim=1)
    torch.testing.assert_close(sample["latents"], one_by_one, atol=1e-5, rtol=1e-5)
    at_once = encode_video(vae, clip[None, :, :9])[0]  # a whole clip: only latent 0 is single-frame
    assert (whole.read(0)["latents"] - at_once).abs().max() < 1e-5
    assert (one_by_one[:, 2] - at_once[:, 2]).abs().max() > 1e-3  # section 1's first latent differs


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def test_interrupted_prepare_resumes_to_byte_identical_shards(messy_input, encoders, tmp_path):
    _run(messy_input, tmp_path / "full", encoders, samples_per_shard=4)
    part = tmp_path / "part"
    _run(messy_input, part, encoders, samples_per_shard=4)
    # Simulate a crash inside the last unit: its progress record gone, a half-written tar left behind.
    last = sorted((part / ".progress").glob("*.json"))[-1]
    unit = last.stem
    last.unlink()
    (part / f"{unit}.tar").unlink(missing_ok=True)
    (part / f"{unit}.tar.tmp").write_bytes(b"half a shard")
    kept = {p.name: p.stat().st_mtime_ns for p in part.glob("*.tar")}
    _run(messy_input, part, encoders, samples_per_shard=4)
    assert _digest(part) == _digest(tmp_path / "full")
    for name, mtime in kept.items():  # finished shards were not rewritten
        assert (part / name).stat().st_mtime_ns == mtime
    assert json.loads((part / "report.json").read_text()) == json.loads(
        (tmp_path / "full" / "report.json").read_text()
    )


def test_decoding_in_worker_processes_and_a_dead_ranks_unit_write_the_same_shards(
    messy_input, encoders, tmp_path
):
    """Videos decoded by 2 loader processes give the shards decoding here gives, byte for byte; a unit
    claimed by a rank that died (its claim's heartbeat an hour old) is taken over, not waited for; a unit a
    live rank works on is left to it, and this rank returns without writing the report."""
    import os
    import time

    from helios.data.prepare_job import PROGRESS_DIR, prepare

    _run(messy_input, tmp_path / "here", encoders, samples_per_shard=4)
    workers = tmp_path / "workers"
    (workers / PROGRESS_DIR).mkdir(parents=True)
    stale = workers / PROGRESS_DIR / "shard-000001.claim"
    stale.write_text("{}")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    _run(messy_input, workers, encoders, samples_per_shard=4, workers=2)
    assert _digest(workers) == _digest(tmp_path / "here")
    live = tmp_path / "live"
    (live / PROGRESS_DIR).mkdir(parents=True)
    (live / PROGRESS_DIR / "shard-000000.claim").write_text("{}")  # fresh: a live rank's
    vae, tok, text = encoders
    summary = prepare(messy_input, live, SPEC, vae, tok, text, max_sequence_length=16, samples_per_shard=4)
    assert summary["left"] == 1 and not (live / "shard-000000.tar").exists()


def test_csv_and_tar_inputs(tmp_path, encoders):
    videos = tmp_path / "videos"
    make_synthetic_videos(videos, 3, 13, 32, 32, 8, seed=3, radius=RADIUS)
    entries = [json.loads(line) for line in (videos / "captions.jsonl").read_text().splitlines()]
    (videos / "captions.jsonl").unlink()
    with (videos / "captions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "caption"])
        writer.writerows([[e["video"], e["caption"]] for e in entries])
    assert _run(videos, tmp_path / "from_csv", encoders)["written"] == 3

    tars = tmp_path / "tars"
    tars.mkdir()
    with tarfile.open(tars / "part-0.tar", "w") as tar:
        for i, e in enumerate(entries):
            members = {f"{i:04d}.mp4": (videos / e["video"]).read_bytes()}
            if i == 0:
                members[f"{i:04d}.json"] = json.dumps({"caption": e["caption"], "id": 7}).encode()
            else:
                members[f"{i:04d}.txt"] = e["caption"].encode()
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    report = _run(tars, tmp_path / "from_tar", encoders)
    assert report["written"] == 3 and report["shards"] == ["shard-part-0.tar"]
    index = ShardIndex.open(tmp_path / "from_tar")
    captions = sorted(index.read(i)["meta"]["caption"] for i in range(3))
    assert captions == sorted(e["caption"] for e in entries)
    assert any(index.read(i)["meta"].get("id") == 7 for i in range(3))


def test_repeated_captions_are_encoded_once(tmp_path, encoders):
    videos = tmp_path / "v"
    make_synthetic_videos(videos, 4, 13, 32, 32, 8, seed=1, radius=RADIUS)
    lines = [json.loads(x) for x in (videos / "captions.jsonl").read_text().splitlines()]
    (videos / "captions.jsonl").write_text("\n".join(json.dumps({**x, "caption": "same"}) for x in lines))
    vae, tok, text = encoders
    summary = prepare(videos, tmp_path / "o", SPEC, vae, tok, text, max_sequence_length=16)
    assert summary["prompt_cache_hits"] >= 3
    embeds = [ShardIndex.open(tmp_path / "o").read(i)["prompt_embeds"] for i in range(4)]
    assert all(torch.equal(e, embeds[0]) for e in embeds)
    assert (tmp_path / "o" / "empty_prompt_embeds.npy").exists()


@pytest.mark.slow
def test_cli_two_ranks_then_train_with_defaults(tmp_path):
    videos = tmp_path / "videos"
    make_synthetic_videos(videos, 10, 45, 64, 64, 8, seed=11, radius=RADIUS)
    out = tmp_path / "shards"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            "-m",
            "helios.prepare",
            f"input={videos}",
            f"output={out}",
            "samples_per_shard=3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["written"] == 10 and report["units"] == 4 and len(report["shards"]) == 4
    help_text = subprocess.run(
        [sys.executable, "-m", "helios.prepare", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "input=PATH output=DIR" in help_text
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "train_helios.py",
            f"data={out}",
            f"hydra.run.dir={run}",
            "trainer.max_steps=3",
            "trainer.batch_size=4",  # the 10 clips prepared here; the default takes 32 a step
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["step"] for m in read_metrics(run)][-1] == 3


def test_reference_json_index_with_cut_and_crop(encoders, tmp_path):
    """The reference code's data index (its example/toy_data/toy_filter.json): a JSON list of {path, cap,
    cut, crop, fps}; prepare encodes exactly the cut frames inside the crop."""
    from helios.data.video import decode_clip

    # frame t is dark gray t*12 on the left 16 columns and bright on the right: cut and crop are visible
    video = torch.full((3, 30, 32, 64), 0.8)
    for t in range(30):
        video[:, t, :, :16] = -1.0 + t * 12 / 127.5
    (tmp_path / "videos").mkdir()
    write_mp4(tmp_path / "videos" / "a.mp4", video, fps=24)
    index = [
        {
            "path": "videos/a.mp4",
            "cap": ["a gray square"],
            "cut": [10, 30],
            "crop": [0, 16, 0, 32],
            "fps": 24.0,
        },
        {"path": "videos/a.mp4", "cap": ["too short"], "cut": [25, 30], "crop": [0, 64, 0, 32], "fps": 24.0},
        {"path": "videos/missing.mp4", "cap": ["gone"], "cut": [0, 20], "crop": [0, 64, 0, 32]},
    ]
    (tmp_path / "toy_filter.json").write_text(json.dumps(index))
    clip, _ = decode_clip(str(tmp_path / "videos" / "a.mp4"), 13, 32, 32, None, (10, 30), (0, 16, 0, 32))
    first = (clip[:, 0].mean() + 1) * 127.5
    assert abs(float(first) - 10 * 12) < 4  # frame 10, inside the dark crop (no bright right half)
    assert float(clip.std(dim=(0, 2, 3)).max()) < 0.05  # each frame uniform: only the crop was kept
    report = _run(tmp_path / "toy_filter.json", tmp_path / "out", encoders, samples_per_shard=8)
    assert report["written"] == 1 and report["skipped"] == 2
    reasons = " ".join(s["reason"] for s in report["skipped_inputs"])
    assert "too short" in reasons and "missing file" in reasons
    index_ = ShardIndex(sorted((tmp_path / "out").glob("*.tar")))
    meta = index_.read(0)["meta"]
    assert meta["caption"] == "a gray square" and meta["cut"] == [10, 30] and meta["crop"] == [0, 16, 0, 32]


def test_rerun_with_other_settings_is_refused(messy_input, encoders, tmp_path):
    """A folder holds one setting: continuing it with another clip size or latent format would mix
    latent shapes or formats."""
    out = tmp_path / "o"
    first = _run(messy_input, out, encoders, samples_per_shard=4)
    vae, tok, text = encoders
    for other in (replace(SPEC, height=48, width=48), replace(SPEC, format="clip")):
        with pytest.raises(ValueError, match=r"other settings \(clip"):
            prepare(messy_input, out, other, vae, tok, text, max_sequence_length=16)
    assert _run(messy_input, out, encoders, samples_per_shard=4) == first  # the same settings continue


def test_cli_fails_when_every_input_was_bad(tmp_path):
    videos = tmp_path / "bad"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"not a video")
    (videos / "captions.jsonl").write_text(
        '{"video": "a.mp4", "caption": "x"}\n{"video": "b.mp4", "caption": "y"}\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "helios.prepare", f"input={videos}", f"output={tmp_path / 'out'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no clip was written: all 2 inputs were skipped" in proc.stderr


def test_a_valid_16x16_clip_is_decoded(tmp_path):
    """decord mis-decodes frames narrower than its alignment (a 16x16 stream comes back with 6 channels);
    such a clip is decoded by ffmpeg instead, frame for frame the same pixels ffmpeg gives."""
    import imageio
    import numpy as np

    from helios.data.video import decode_clip

    frames = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    path = tmp_path / "small.mp4"
    imageio.mimwrite(path, frames, fps=8, macro_block_size=1)
    clip, fps = decode_clip(path, 12, 16, 16)
    with imageio.get_reader(path, "ffmpeg") as reader:
        expected = np.stack([reader.get_data(i) for i in range(12)])
    assert clip.shape == (3, 12, 16, 16) and fps == 8
    torch.testing.assert_close(clip, torch.from_numpy(expected).permute(3, 0, 1, 2).float() / 127.5 - 1)
    with open(path, "rb") as f:  # an in-memory video (a webdataset member) the same way
        again, _ = decode_clip(io.BytesIO(f.read()), 12, 16, 16)
    torch.testing.assert_close(again, clip)


def test_without_decord_ffmpeg_decodes_the_same_clips(tmp_path, monkeypatch):
    """decord has no wheel for aarch64 (GH200 nodes): where it is not installed, ffmpeg (imageio-ffmpeg)
    opens, counts and decodes the videos; the clip (fps resampling, cut, crop, resize) is the same."""
    import imageio
    import numpy as np

    import helios.data.video as video

    frames = np.random.default_rng(1).integers(0, 256, (40, 48, 64, 3), dtype=np.uint8)
    path = tmp_path / "clip.mp4"
    imageio.mimwrite(path, frames, fps=16, macro_block_size=1)
    args = dict(fps=8, cut=(4, 40), crop=(8, 56, 0, 48))
    with_decord = video.decode_clip(path, 10, 32, 32, **args)
    monkeypatch.setattr(video, "decord_reader", lambda: None)
    without = video.decode_clip(path, 10, 32, 32, **args)
    assert without[1] == with_decord[1] == 8
    torch.testing.assert_close(without[0], with_decord[0], atol=2 / 127.5, rtol=0)
    with pytest.raises(video.VideoDecodeError, match="too short"):
        video.decode_clip(path, 30, 32, 32, fps=8)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(video.VideoDecodeError, match="cannot open"):
        video.decode_clip(tmp_path / "bad.mp4", 4, 32, 32)
