"""The training stream: disjoint and complete across ranks, one shape per batch, exact position."""

import json
from types import SimpleNamespace

import pytest
import torch

from helios.config import compose
from helios.data.dataset import BucketBatchSampler, LatentClipDataset, make_loader, section_window
from helios.data.synthetic import ensure_synthetic_shards, make_synthetic_videos, synthetic_clip
from helios.world.shapes import RADIUS, all_scenes
from tests.helpers.runs import SMALL_WORLD


def _fake(n: int, shapes=((8, 8),)) -> SimpleNamespace:
    buckets = {s: [i for i in range(n) if i % len(shapes) == k] for k, s in enumerate(shapes)}
    return SimpleNamespace(eligible=list(range(n)), buckets=buckets)


def _epoch(sampler: BucketBatchSampler, epoch: int) -> list[list[int]]:
    return sampler.epoch_batches(epoch)


def _taken(sampler: BucketBatchSampler, n: int) -> list[list[int]]:
    it = iter(sampler)
    return [[i for i, *_ in next(it)] for _ in range(n)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_are_disjoint_and_complete(world):
    """The ranks deal the global stream of batches round-robin: disjoint, every batch of an epoch taken
    once, the same number per rank."""
    data = _fake(48)
    rounds = 12 // world  # 12 batches of 4 per epoch
    per_rank = [_taken(BucketBatchSampler(data, 4, r, world, seed=1), rounds) for r in range(world)]
    seen = [i for batches in per_rank for b in batches for i in b]
    assert len(seen) == len(set(seen)) == rounds * world * 4  # disjoint
    if 12 % world == 0:
        assert sorted(seen) == list(range(48))  # complete


@pytest.mark.parametrize(("world", "later"), [(2, 1), (1, 2), (2, 4), (4, 2), (4, 1)])
def test_the_data_position_carries_over_to_another_world_size(world, later):
    """After k steps of a global batch of G batches on ``world`` ranks, a resume on ``later`` ranks (same
    global batch, accumulation recomputed) takes exactly the batches the uninterrupted run takes next, over
    an epoch boundary too: nothing repeated, nothing skipped."""
    data = _fake(40)  # 10 batches of 4 per epoch
    global_batches, steps = 4, 7  # 7 steps x 4 = 28 batches: into the third epoch
    accum, later_accum = global_batches // world, global_batches // later
    before = [BucketBatchSampler(data, 4, r, world, seed=2) for r in range(world)]
    for sampler in before:
        it = iter(sampler)
        for _ in range(steps * accum):
            *_, sampler.position = next(it)[-1]
    state = before[0].state_dict()
    assert state["consumed"] == steps * global_batches and state["epoch"] == 2
    after = [BucketBatchSampler(data, 4, r, later, seed=2) for r in range(later)]
    for sampler in after:
        sampler.load_state_dict(state)
    taken = {tuple(b) for r in range(later) for b in _taken(after[r], later_accum)}
    reference = BucketBatchSampler(data, 4, 0, 1, seed=2)
    expected = {tuple(reference.stream_batch(steps * global_batches + k)[1]) for k in range(global_batches)}
    assert taken == expected


def test_a_position_that_a_world_size_cannot_divide_is_refused():
    sampler = BucketBatchSampler(_fake(40), 4, 0, 3, seed=0)
    with pytest.raises(ValueError, match="does not divide into 3 ranks"):
        sampler.load_state_dict({"consumed": 8, "world_size": 2, "epoch": 0})


def test_epochs_reshuffle_and_are_reproducible():
    data = _fake(40)
    a, b = BucketBatchSampler(data, 4, 0, 2, seed=3), BucketBatchSampler(data, 4, 0, 2, seed=3)
    assert _epoch(a, 0) == _epoch(b, 0)
    assert _epoch(a, 0) != _epoch(a, 1)


def test_batches_never_mix_shapes():
    data = _fake(60, shapes=((8, 8), (8, 12), (12, 8)))
    shape_of = {i: s for s, members in data.buckets.items() for i in members}
    for batch in _epoch(BucketBatchSampler(data, 4, 0, 1, seed=0), 0):
        assert len({shape_of[i] for i in batch}) == 1


def test_iteration_positions_and_resume_from_them():
    data = _fake(24)  # 6 batches per epoch: 3 per rank of 2
    sampler = BucketBatchSampler(data, 4, 0, 2, seed=0)
    it = iter(sampler)
    batches = [next(it) for _ in range(7)]
    assert [(b[0][1], b[0][2]) for b in batches] == [(0, 1), (0, 2), (0, 3), (1, 4), (1, 5), (1, 6), (2, 7)]
    assert batches[3] != batches[0]  # the next epoch reshuffles
    resumed = BucketBatchSampler(data, 4, 0, 2, seed=0)
    resumed.load_state_dict({"consumed": 8, "world_size": 2, "epoch": 1})
    assert next(iter(resumed)) == batches[4]
    old_format = BucketBatchSampler(data, 4, 0, 2, seed=0)  # written before the global stream
    old_format.load_state_dict({"epoch": 1, "position": 1, "world_size": 2})
    assert next(iter(old_format)) == batches[4]


def test_too_small_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match=r"lower trainer\.batch_size"):
        BucketBatchSampler(_fake(3), 4, 0, 1)


def _tiny_shards(latent_format: str = "sections"):
    cfg = compose([f"data.latent_format={latent_format}", *SMALL_WORLD])
    return ensure_synthetic_shards(cfg.data, cfg.model, synthetic_clip(cfg.data, 7, 3), is_main=True)


def test_loader_position_restores_the_exact_next_batch():
    path = _tiny_shards()
    dataset = LatentClipDataset(path, 7, 3, 32, seed=0)
    assert dataset.latent_hw() == (8, 8)
    sampler = BucketBatchSampler(dataset, 2, 0, 1, seed=0)
    loader = make_loader(dataset, sampler, num_workers=0)
    consumed = [next(loader) for _ in range(5)]
    resumed = BucketBatchSampler(dataset, 2, 0, 1, seed=0)
    resumed.position = consumed[2][1]  # the position after the third batch, as the trainer keeps it
    resumed.load_state_dict(resumed.state_dict())
    nxt, _ = next(make_loader(dataset, resumed, num_workers=1))  # with a worker process too
    ref = consumed[3][0]
    assert torch.equal(nxt.latents, ref.latents) and torch.equal(nxt.offset, ref.offset)
    assert torch.equal(nxt.history_frames, ref.history_frames)
    assert nxt.latents.shape[2] == 10 and nxt.prompt_embeds.shape == (2, 32, 32)


def _reference_window(vae_latent: torch.Tensor, choice_idx: int, history_sizes: list[int]):
    """The reference code's ``prepare_stage1_latent`` (dataloader_history_latents_dist.py), transcribed:
    ``vae_latent`` [S, C, n, h, w] -> (x0 anchor, history, target)."""
    x0 = vae_latent[0, :, :1].clone()
    window = vae_latent.shape[2]
    history_window = sum(history_sizes)
    flat = vae_latent.permute(1, 0, 2, 3, 4).reshape(vae_latent.shape[1], -1, *vae_latent.shape[3:])
    padding = torch.zeros(flat.shape[0], history_window, *flat.shape[2:])
    cont = torch.cat([padding, flat], dim=1)
    if choice_idx == 0:
        x0 = torch.zeros_like(x0)
    start = choice_idx * window
    return (
        x0,
        cont[:, start : start + history_window],
        cont[:, start + history_window : start + history_window + window],
    )


def test_section_windows_are_the_references():
    """Section format: the window of section s is the reference loader's (history = the 19 latents before
    the section, zero-padded before the video start; anchor = the video's first latent, zero for
    section 0), for every section of a real-layout video; real history frames = min(19, 9 s)."""
    gen = torch.Generator().manual_seed(0)
    sections = torch.randn(5, 4, 9, 2, 3, generator=gen)  # [S, C, n, h, w] as the reference stores it
    ours_latents = sections.permute(1, 0, 2, 3, 4).reshape(4, 45, 2, 3)  # our shards: sections in time
    for s in range(5):
        x0, history, target = _reference_window(sections, s, [16, 2, 1])
        clip, first, offset, real = section_window(ours_latents, s, 19, 9)
        assert torch.equal(clip[:, :19], history) and torch.equal(clip[:, 19:], target)
        assert torch.equal(first, x0) and real == min(19, 9 * s) and offset == max(0, 9 * s - 19)
        assert torch.equal(target, sections[s])  # the target is one whole, independently encoded section


def test_section_format_draws_every_section_and_pads_the_history():
    """Every section is drawn (section 0, the video start, too: its history is all padding and its anchor
    zero), and the history frames marked real are exactly the non-padding ones."""
    path = _tiny_shards()
    dataset = LatentClipDataset(path, 7, 3, 32, seed=0)
    video = dataset.index.read(0)["latents"]  # 4 sections of 3 latents
    seen = set()
    for epoch in range(40):
        item = dataset[(0, epoch)]
        real = int(item["history_frames"])
        section = real // 3 if real < 7 else None  # real = min(7, 3 s)
        history = item["latents"][:, :7]
        assert history[:, : 7 - real].abs().sum() == 0
        assert real == 0 or history[:, 7 - real :].abs().amin() > 0
        if real == 0:
            assert item["first_latent"].abs().sum() == 0
            assert torch.equal(item["latents"][:, 7:], video[:, :3])
        else:
            assert torch.equal(item["first_latent"], video[:, :1])
        seen.add(section if section is not None else ("full", int(item["offset"])))
    assert {0, 1, 2} <= seen and ("full", 2) in seen  # sections 0-2, and section 3 (offset 9 - 7)


def test_clip_format_windows_start_anywhere_and_anchor_the_video_start():
    path = _tiny_shards("clip")
    dataset = LatentClipDataset(path, 7, 3, 32, latent_format="clip", seed=0)
    sample = dataset.index.read(0)["latents"]
    item = dataset[(0, 0)]
    assert torch.equal(item["first_latent"], sample[:, :1])
    assert torch.equal(item["latents"], sample[:, int(item["offset"]) : int(item["offset"]) + 10])
    assert int(item["history_frames"]) == 7


def test_a_format_mismatch_is_refused_at_start():
    with pytest.raises(ValueError, match=r"holds clip-format latents .* data\.latent_format=clip"):
        LatentClipDataset(_tiny_shards("clip"), 7, 3, 32, latent_format="sections")
    with pytest.raises(ValueError, match=r"sections of 3 latent frames, but history\.window=2"):
        LatentClipDataset(_tiny_shards(), 7, 2, 32)


def test_a_corrupt_sample_is_named_or_skipped_and_counted(tmp_path):
    """Each shard index holds a CRC32 per member: bit rot inside one sample's latents is reported with its
    shard and key (data.on_error=raise, the default), or that sample is replaced by another of its shape
    and counted (data.on_error=skip), in the dataset and in a training run."""
    import json
    import shutil

    from helios.data.shards import CorruptSample, ShardIndex, index_path
    from helios.infra.metrics import read_metrics
    from helios.trainer import Trainer

    source = _tiny_shards()
    shards = tmp_path / "shards"
    shutil.copytree(source, shards)
    (shard,) = sorted(shards.glob("*.tar"))
    entry = json.loads(index_path(shard).read_text())[1]
    offset, size, _ = entry["members"]["latents.npy"]
    data = bytearray(shard.read_bytes())
    data[offset + size - 8 : offset + size] = b"\xff" * 8  # the last float of the latents, not the header
    shard.write_bytes(bytes(data))
    index = ShardIndex([shard])
    with pytest.raises(
        CorruptSample, match=f"{shard.name}: sample {entry['key']}.latents.npy fails its checksum"
    ):
        index.read(1)
    strict = LatentClipDataset(shards, 7, 3, 32)
    with pytest.raises(CorruptSample, match=r"data\.on_error=skip"):
        strict[(1, 0)]
    lenient = LatentClipDataset(shards, 7, 3, 32, on_error="skip")
    sample = lenient[(1, 0)]
    assert sample["skipped"] == 1 and torch.isfinite(sample["latents"]).all()
    assert lenient[(0, 0)]["skipped"] == 0
    run_cfg = compose(
        [
            f"data={shards}",
            "trainer.max_steps=3",
            "validation.enabled=false",
            "trainer.progress=false",
            "trainer.log_every=1",
            "data.on_error=skip",
            "trainer.batch_size=8",
            "data.shuffle=false",
        ]
    )
    trainer = Trainer(run_cfg, tmp_path / "run")
    try:
        trainer.run()
    finally:
        trainer.close()
    assert read_metrics(tmp_path / "run")[-1]["data_skipped"] >= 1


def test_non_finite_data_with_a_valid_checksum_is_named_where_it_is_read_or_skipped(tmp_path):
    """A NaN written by a broken encoder passes every checksum: it is caught where the sample is read, named
    by shard, key and member (not reported as a divergence of the model), and skipped and counted under
    data.on_error=skip."""
    import json
    import shutil
    import zlib

    from helios.data.shards import CorruptSample, index_path
    from helios.infra.metrics import read_metrics
    from helios.trainer import Trainer

    shards = tmp_path / "shards"
    shutil.copytree(_tiny_shards(), shards)
    (shard,) = sorted(shards.glob("*.tar"))
    entries = json.loads(index_path(shard).read_text())
    entry = entries[1]
    offset, size, _ = entry["members"]["latents.npy"]
    data = bytearray(shard.read_bytes())
    data[offset + size - 4 : offset + size] = b"\x00\x00\xc0\x7f"  # float32 NaN, the last latent value
    shard.write_bytes(bytes(data))
    entry["members"]["latents.npy"][2] = zlib.crc32(bytes(data[offset : offset + size]))  # a valid checksum
    index_path(shard).write_text(json.dumps(entries))
    with pytest.raises(
        CorruptSample, match=rf"{shard.name}: sample {entry['key']}.latents.npy holds 1 non-finite values"
    ):
        LatentClipDataset(shards, 7, 3, 32)[(1, 0)]
    common = [f"data={shards}", "trainer.max_steps=2", "validation.enabled=false", "trainer.progress=false"]
    common += ["trainer.log_every=1", "trainer.batch_size=8", "data.shuffle=false"]
    with pytest.raises(CorruptSample, match=rf"sample {entry['key']}.latents.npy holds 1 non-finite"):
        trainer = Trainer(compose(common), tmp_path / "strict")
        try:
            trainer.run()
        finally:
            trainer.close()
    trainer = Trainer(compose([*common, "data.on_error=skip"]), tmp_path / "lenient")
    try:
        trainer.run()
    finally:
        trainer.close()
    metrics = read_metrics(tmp_path / "lenient")
    assert metrics[-1]["data_skipped"] >= 1 and all(m["loss"] < 10 for m in metrics)


def test_a_truncated_shard_without_index_is_named(tmp_path):
    import shutil

    from helios.data.shards import CorruptSample, ShardIndex, index_path

    source = _tiny_shards()
    (shard,) = sorted(source.glob("*.tar"))
    broken = tmp_path / shard.name
    shutil.copy(shard, broken)
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 3])
    assert not index_path(broken).exists()
    with pytest.raises(CorruptSample, match=f"{broken.name}: cannot index it"):
        ShardIndex([broken])


def test_loader_workers_default_to_the_device():
    """``trainer.num_workers`` unset: loader processes on a GPU, none on the CPU; a set value wins."""
    from helios.infra.resolve import resolve_num_workers

    assert resolve_num_workers(None, torch.device("cpu")) == 0
    assert resolve_num_workers(None, torch.device("cuda", 0)) == 4
    assert resolve_num_workers(2, torch.device("cuda", 0)) == 2
    assert resolve_num_workers(0, torch.device("cuda", 0)) == 0


def test_caption_dropout_zeroes_a_share_of_prompts_and_keeps_the_windows():
    """``data.caption_dropout``: the reference's NULL text (embeddings zeroed), drawn per (item, epoch) so a
    resumed run drops the same ones; the windows are those of a run without it."""
    path = _tiny_shards()
    plain = LatentClipDataset(path, 7, 3, 32, seed=0)
    dropping = LatentClipDataset(path, 7, 3, 32, seed=0, caption_dropout=0.3)
    items = [(i, epoch) for i in range(len(plain)) for epoch in range(25)]
    dropped = 0
    for item in items:
        a, b = plain[item], dropping[item]
        assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["offset"], b["offset"])
        assert a["prompt_embeds"].abs().sum() > 0
        if b["prompt_embeds"].abs().sum() == 0:
            dropped += 1
        else:
            assert torch.equal(a["prompt_embeds"], b["prompt_embeds"])
        assert torch.equal(dropping[item]["prompt_embeds"], b["prompt_embeds"])  # the same draw again
    assert 0.2 < dropped / len(items) < 0.4


def test_the_synthetic_set_shows_every_scene_of_the_world(tmp_path):
    """96 clips or more cover every (colour, shape, direction, background); fewer are all different."""

    def captions(n, tmp):
        lines = (
            make_synthetic_videos(tmp / str(n), n, 1, 16, 16, 8, seed=5, radius=RADIUS)
            .read_text()
            .splitlines()
        )
        return [json.loads(line)["caption"] for line in lines]

    every, few = captions(100, tmp_path), captions(10, tmp_path)
    assert set(every) == {s.caption for s in all_scenes()} and len(set(few)) == 10
    assert every[:96] != sorted(every[:96]) and every[96:] == every[:4]  # a seeded order, cycling


def test_the_synthetic_set_draws_its_shapes_from_the_configured_radius(tmp_path):
    """``data.synthetic.radius`` reaches the written mp4s: the tiny default's range (3-4 latent pixels across,
    the schema's default) gives larger shapes than the tiny VAE's training range, and a fixed radius of a
    quarter of the frame gives a shape of that size in every clip."""
    from helios.data.video import decode_clip
    from helios.world.measures import PALETTE_NAMES, palette_labels, parse_caption

    def areas(radius, name):
        captions = make_synthetic_videos(tmp_path / name, 6, 1, 64, 64, 8, seed=5, radius=radius)
        out = []
        for line in captions.read_text().splitlines():
            row = json.loads(line)
            frame, _ = decode_clip(str(tmp_path / name / row["video"]), 1, 64, 64)
            label, _ = palette_labels(frame)
            colour = parse_caption(row["caption"]).colour
            out.append((int((label[0] == PALETTE_NAMES.index(f"fg:{colour}")).sum()), row["caption"]))
        return out

    default = compose([]).data.synthetic.radius
    assert default == [0.1875, 0.25] and tuple(default) != RADIUS
    for area, caption in areas((0.25, 0.25), "quarter"):  # radius 16: a 33-pixel square, a circle of ~800
        expected = 33 * 33 if "square" in caption else 3.14159 * 16 * 16
        assert abs(area - expected) < 0.15 * expected, (area, caption)  # the mp4's 4:2:0 colour frays edges
    small, large = areas(RADIUS, "vae"), areas(tuple(default), "default")
    assert sum(a for a, _ in large) > 1.5 * sum(a for a, _ in small)
