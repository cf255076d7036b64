"""Checkpoint files against their manifest: sizes and SHA-256 checksums."""

import os
import re
from pathlib import Path

import pytest

from helios.infra import checkpoint


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "step_1"
    (folder / "zero").mkdir(parents=True)
    (folder / "trainable.safetensors").write_bytes(b"abcdef" * 10)
    (folder / "zero" / "part.pt").write_bytes(b"\x00" * 33)
    checkpoint.write_manifest(folder)
    checkpoint.verify(folder)  # as written: verifies
    return folder


@pytest.mark.parametrize("name", ["trainable.safetensors", "zero/part.pt"])
def test_a_changed_byte_of_the_same_size_fails_verification(tmp_path, name):
    folder = _folder(tmp_path)
    path = folder / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CorruptCheckpoint, match="checksum"):
        checkpoint.verify(folder)


def test_a_truncated_or_missing_file_fails_verification(tmp_path):
    folder = _folder(tmp_path)
    (folder / "trainable.safetensors").write_bytes(b"abc")
    with pytest.raises(checkpoint.CorruptCheckpoint, match="bytes"):
        checkpoint.verify(folder)
    (folder / "zero" / "part.pt").unlink()
    with pytest.raises(checkpoint.CorruptCheckpoint, match="missing"):
        checkpoint.verify(folder)


def _info():
    import torch

    from helios.infra.distributed import DistInfo

    return DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def _save(run: Path, step: int, keep_last: int = 3, **kwargs) -> Path:
    import torch

    weights = {"trainable": {"w": torch.full((4,), float(step))}}
    return checkpoint.save(run, step, _info(), weights, {"step": step}, {}, keep_last=keep_last, **kwargs)


def _undeletable(monkeypatch, name: str) -> None:
    """Files called ``name`` cannot be deleted (another user's, a busy mount); others can."""
    import os

    unlink = os.unlink

    def refuse(path, *args, **kwargs):
        if str(path).endswith(name):
            raise PermissionError(13, "Permission denied", str(path))
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refuse)


def _tree(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


def test_a_damaged_manifest_is_named_and_resume_falls_back(tmp_path, caplog):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    (newest / "manifest.json").write_text('{"trainable.safetensors": {"bytes": 1')  # cut short
    with pytest.raises(
        checkpoint.CorruptCheckpoint, match=r"step_2/manifest.json cannot be read \(JSONDecodeError"
    ):
        checkpoint.verify(newest)
    with caplog.at_level("WARNING"):
        assert checkpoint.resolve_resume("latest", tmp_path).name == "step_1"
    assert "skipping step_2" in caplog.text and "manifest.json" in caplog.text


def _flip_a_byte(folder: Path) -> None:
    path = folder / "trainable.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_resume_that_cannot_be_used_names_its_key_and_what_would_work(tmp_path, caplog):
    """Every refusal starts with the key and the value the user gave (``resume=...``, or the weight source's
    own key) and says what would work instead."""
    nowhere = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"^resume={nowhere}: no complete checkpoint.*resume=latest"):
        checkpoint.resolve_resume(str(nowhere), tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        checkpoint.resolve_resume(str(nowhere), tmp_path, key="distill.teacher")
    assert str(err.value).startswith(f"distill.teacher={nowhere}: ") and "resume=" not in str(err.value)

    run = tmp_path / "run"
    first, second = _save(run, 1), _save(run, 2)
    _flip_a_byte(second)  # the newest checkpoint is named with the one that verifies
    refusal = rf"^resume={second}: .*checksum.*; {first} verifies"
    with pytest.raises(checkpoint.CorruptCheckpoint, match=refusal):
        checkpoint.resolve_resume(str(second), run)
    _flip_a_byte(first)  # none verifies: each refusal names its own checkpoint or the run, no hint
    with pytest.raises(checkpoint.CorruptCheckpoint) as err:
        checkpoint.resolve_resume(str(second), run)
    assert str(err.value).startswith(f"resume={second}: ") and "verifies" not in str(err.value)
    try:
        checkpoint.verify(second)
    except checkpoint.CorruptCheckpoint as own:  # no hint: the refusal is the checkpoint's own error, whole
        assert str(err.value) == f"resume={second}: {own}"
    for value in ("latest", str(run)):
        with caplog.at_level("WARNING"), pytest.raises(checkpoint.CorruptCheckpoint) as err:
            checkpoint.resolve_resume(value, run)
        assert str(err.value).startswith("resume: none of the 2 checkpoints verifies"), value
    assert "resume: skipping step_2" in caplog.text and "resume: skipping step_1" in caplog.text


def test_a_failed_save_leaves_the_disk_as_it_was_and_deletes_nothing(tmp_path):
    """A write that fails (here: the engines' partitions) removes its temporary folder, raises one clear
    error, and rotation never ran: with keep_last=1 the older checkpoint is still there."""
    _save(tmp_path, 1, keep_last=1)
    before = _tree(tmp_path)

    def crash(tmp: Path) -> None:
        (tmp / "zero").mkdir()
        (tmp / "zero" / "part.pt").write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")

    with pytest.raises(checkpoint.CheckpointWriteError, match=r"step_2 was not saved: .*step_1, is intact"):
        _save(tmp_path, 2, keep_last=1, write_extra=crash)
    assert _tree(tmp_path) == before


def test_a_save_the_free_space_cannot_hold_is_refused_before_writing(tmp_path, monkeypatch):
    from collections import namedtuple

    _save(tmp_path, 1)
    before = _tree(tmp_path)
    usage, asked = namedtuple("usage", "total used free"), []
    monkeypatch.setattr(
        checkpoint.shutil, "disk_usage", lambda path: asked.append(path) or usage(10**9, 10**9 - 8, 8)
    )
    root = tmp_path / "checkpoints"
    full = (
        rf"checkpoint step_2 was not saved: the disk is full \(0.0 MiB free on {re.escape(str(root))}, "
        r"the checkpoint needs about [0-9.]+ [KMG]iB\)\. Its partial files were removed; the last "
        rf"checkpoint, {re.escape(str(root / 'step_1'))}, is intact\. Free space and rerun with resume=latest"
    )
    with pytest.raises(checkpoint.CheckpointWriteError) as raised:
        _save(tmp_path, 2)
    assert re.fullmatch(full, str(raised.value)), str(raised.value)
    assert asked and set(asked) == {root}  # the free space of the checkpoints' own file system
    assert _tree(tmp_path) == before


def test_the_free_space_check_counts_the_optimizer_state_not_only_the_weights(tmp_path, monkeypatch):
    """Adam's moments are twice the trainable weights: a disk that holds the weights but not the moments
    refuses the save before writing anything."""
    from collections import namedtuple

    import torch

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    weights = {"trainable": {"w": torch.zeros(100)}}  # 400 bytes: fit
    objects = {"optimizer": {"exp_avg": [torch.zeros(100)], "exp_avg_sq": [torch.zeros(100)]}}  # +800
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"the disk is full .*needs about"):
        checkpoint.save(tmp_path, 1, _info(), weights, objects, {}, keep_last=1)
    assert not list((tmp_path / "checkpoints").glob("step_1*"))


def test_a_manifest_that_cannot_be_written_fails_the_save_and_leaves_no_checkpoint(tmp_path, monkeypatch):
    """The manifest and the completion marker are the last writes: when they fail the save is not
    complete, the temporary folder is removed and the older checkpoint stays the newest."""
    _save(tmp_path, 1, keep_last=1)
    before = _tree(tmp_path)

    def refuse(folder: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(checkpoint, "write_manifest", refuse)
    failed = r"step_2 was not saved: OSError.*step_1, is intact"
    with pytest.raises(checkpoint.CheckpointWriteError, match=failed):
        _save(tmp_path, 2, keep_last=1)
    assert _tree(tmp_path) == before


def test_stale_temporaries_are_removed_before_a_save_not_only_after_one(tmp_path):
    _save(tmp_path, 1)
    stale = tmp_path / "checkpoints" / "step_2.tmp-99999"
    stale.mkdir()
    (stale / "state.pt").write_bytes(b"\0" * 1000)

    def crash(tmp: Path) -> None:
        assert not stale.exists()  # gone before this save wrote anything
        raise OSError(28, "No space left on device")

    with pytest.raises(checkpoint.CheckpointWriteError):
        _save(tmp_path, 2, write_extra=crash)
    assert not list((tmp_path / "checkpoints").glob("*.tmp-*"))


def test_a_stale_temporary_that_cannot_be_removed_does_not_stop_the_save(tmp_path, monkeypatch):
    """Removing a crashed save's leftovers is best effort: a file in it that cannot be deleted (another
    user's, a busy mount) leaves the folder for the next save, and this save completes."""

    _save(tmp_path, 1)
    stale = tmp_path / "checkpoints" / "step_2.tmp-99999"
    stale.mkdir()
    (stale / "busy.pt").write_bytes(b"\0" * 10)
    _undeletable(monkeypatch, "busy.pt")
    _save(tmp_path, 2)
    assert [s for s, _ in checkpoint.list_complete(tmp_path)] == [1, 2]
    assert (stale / "busy.pt").exists()


def test_a_failed_save_whose_partial_files_cannot_be_removed_still_names_the_failure(tmp_path, monkeypatch):
    """The cleanup after a failed write is best effort too: a partial file that cannot be deleted does not
    replace the save's own error (what the user must fix) with the cleanup's."""

    _save(tmp_path, 1)
    _undeletable(monkeypatch, "part.pt")

    def crash(tmp: Path) -> None:
        (tmp / "part.pt").write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")

    with pytest.raises(checkpoint.CheckpointWriteError, match=r"step_2 was not saved: .*step_1, is intact"):
        _save(tmp_path, 2, write_extra=crash)
    assert [s for s, _ in checkpoint.list_complete(tmp_path)] == [1]


def test_rotation_keeps_the_newest_and_never_touches_abandoned_branches(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, keep_last=2)
    assert [s for s, _ in checkpoint.list_complete(tmp_path)] == [2, 3]
    moved = checkpoint.start_branch(tmp_path, tmp_path / "checkpoints" / "step_2")
    assert [p.name for p in moved] == ["step_3"] and moved[0].parent.name.endswith("-from_step_2")
    assert (moved[0] / checkpoint.MARKER).exists()
    for step in (3, 4, 5):
        _save(tmp_path, step, keep_last=1)
    assert [s for s, _ in checkpoint.list_complete(tmp_path)] == [5]
    assert moved[0].exists()  # the abandoned branch is kept
    assert checkpoint.resolve_resume("latest", tmp_path).name == "step_5"


def test_a_fresh_start_or_a_foreign_checkpoint_moves_the_run_dirs_checkpoints_aside(tmp_path, caplog):
    other = tmp_path / "other"
    _save(other, 7)
    run = tmp_path / "run"
    _save(run, 1)
    _save(run, 2)
    moved = checkpoint.start_branch(run, other / "checkpoints" / "step_7")
    assert sorted(p.name for p in moved) == ["step_1", "step_2"]
    assert moved[0].parent.name.endswith("-from_other")
    assert checkpoint.list_complete(run) == []
    _save(run, 1)
    with caplog.at_level("WARNING"):
        moved = checkpoint.start_branch(run, None)  # resume=none
    assert [p.name for p in moved] == ["step_1"] and moved[0].parent.name.endswith("-fresh")
    assert caplog.records[-1].getMessage().startswith("starting afresh starts a new branch: step_1 moved")
    assert checkpoint.start_branch(run, None) == []
    for step in (2, 10, 9):  # the warning names the moved checkpoints in step order, not name order
        _save(run, step)
    with caplog.at_level("WARNING"):
        moved = checkpoint.start_branch(run, run / "checkpoints" / "step_2")
    assert [p.name for p in moved] == ["step_9", "step_10"]
    warning = caplog.records[-1].getMessage()
    start = run / "checkpoints" / "step_2"
    assert warning.startswith(f"resuming from {start} starts a new branch: step_9, step_10 moved to")
    assert warning.endswith(f"{moved[0].parent} (kept; resume=<its path> continues that branch)")


def test_two_fresh_starts_within_one_second_set_their_checkpoints_aside_apart(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.time, "strftime", lambda fmt: "20261206-000000")
    kept = []
    for value in (1.0, 2.0):
        _save(tmp_path, 1)
        (tmp_path / "checkpoints" / "step_1" / "note").write_text(str(value))
        kept += checkpoint.start_branch(tmp_path, None)
    assert [p.parent.name for p in kept] == ["20261206-000000-fresh", "20261206-000000-fresh-2"]
    assert [(p / "note").read_text() for p in kept] == ["1.0", "2.0"]


def test_a_checkpoint_loaded_on_another_world_size_gives_no_rank_state(tmp_path):
    """The ranks' random streams are per rank: restored only on the world size that wrote them."""
    import dataclasses

    path = _save(tmp_path, 1)
    assert checkpoint.load(path, _info())[2] is not None
    assert checkpoint.load(path, dataclasses.replace(_info(), world_size=2))[2] is None


def test_a_checkpoint_written_on_a_gpu_host_loads_on_a_cpu_only_one(tmp_path, monkeypatch):
    """The pickled state of a checkpoint written on a GPU (the optimizer's moments, a rank's state) is tagged
    with the tensors' device; export, generate or a resume on a host without one maps it to the CPU."""
    import torch

    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    objects = {"step": 1, "optimizer": {"exp_avg": torch.full((3,), 0.5)}}
    weights, rank_state = {"trainable": {"w": torch.ones(4)}}, {"rng": torch.ones(2)}
    path = checkpoint.save(tmp_path, 1, _info(), weights, objects, rank_state, keep_last=3)
    monkeypatch.undo()
    _, loaded, rank_state = checkpoint.load(path, _info())
    assert torch.equal(loaded["optimizer"]["exp_avg"], torch.full((3,), 0.5))
    assert loaded["optimizer"]["exp_avg"].device.type == "cpu" and torch.equal(
        rank_state["rng"], torch.ones(2)
    )


def test_saving_a_step_that_exists_keeps_the_old_one_aside(tmp_path, monkeypatch):
    """Each replaced copy gets a folder of its own, also when two are set aside within one second."""
    import torch
    from safetensors.torch import load_file

    # one second, in the format the folder names sort by (year first)
    monkeypatch.setattr(checkpoint.time, "strftime", {"%Y%m%d-%H%M%S": "20261206-000000"}.__getitem__)
    first = _save(tmp_path, 1)
    versions = [(first / "trainable.safetensors").read_bytes()]
    for value in (0.0, 2.0):
        weights = {"trainable": {"w": torch.full((4,), value)}}
        checkpoint.save(tmp_path, 1, _info(), weights, {"step": 1}, {}, keep_last=3)
        assert torch.equal(load_file(str(first / "trainable.safetensors"))["w"], torch.full((4,), value))
        versions.append((first / "trainable.safetensors").read_bytes())
    abandoned = tmp_path / "checkpoints" / checkpoint.ABANDONED
    assert sorted(p.name for p in abandoned.iterdir()) == [
        "20261206-000000-replaced",
        "20261206-000000-replaced-2",
    ]
    kept = [abandoned / name / "step_1" / "trainable.safetensors" for name in sorted(os.listdir(abandoned))]
    assert [k.read_bytes() for k in kept] == versions[:2]  # every earlier version, none written over


def test_a_weight_source_is_pinned_to_what_the_run_loaded(tmp_path):
    """A diffusers directory becomes its absolute path; names that are not local paths stay as given."""
    from helios.infra.checkpoint import pin_source

    published = tmp_path / "Helios-Base"
    (published / "transformer").mkdir(parents=True)
    assert pin_source(str(published), "model.transformer.path") == str(published.resolve())
    assert pin_source("BestWishYsh/Helios-Base", "distill.teacher") == "BestWishYsh/Helios-Base"
    assert pin_source(None, "init_from") is None


def test_a_checkpoint_names_the_weight_sources_its_run_started_from(tmp_path):
    """``saved_sources``: the sources ``save`` recorded; a checkpoint that recorded none (written before
    sources were kept) gives an empty mapping, not None."""
    import json

    saved = _save(tmp_path, 1, sources={"distill.teacher": "/runs/base/checkpoints/step_9"})
    assert checkpoint.saved_sources(saved) == {"distill.teacher": "/runs/base/checkpoints/step_9"}
    meta = json.loads((saved / "meta.json").read_text())
    del meta["sources"]
    (saved / "meta.json").write_text(json.dumps(meta))
    assert checkpoint.saved_sources(saved) == {}


def test_a_run_dir_named_as_a_weight_source_is_pinned_to_its_newest_verified_checkpoint(tmp_path, caplog):
    """``init_from=RUN_DIR``: its newest complete checkpoint that verifies; a damaged one is skipped, named
    under the source's own key, and none verifying is refused under that key."""
    from helios.infra.checkpoint import pin_source

    _save(tmp_path, 1)
    _flip_a_byte(_save(tmp_path, 2))
    with caplog.at_level("WARNING"):
        assert pin_source(str(tmp_path), "init_from") == str((tmp_path / "checkpoints" / "step_1").resolve())
    assert "init_from: skipping step_2" in caplog.text
    _flip_a_byte(tmp_path / "checkpoints" / "step_1")
    with pytest.raises(checkpoint.CorruptCheckpoint, match=r"^init_from: none of the 2 checkpoints verifies"):
        pin_source(str(tmp_path), "init_from")


def _mapped_from(tensor, path: Path) -> bool:
    """The tensor's bytes lie in a mapping of ``path`` (/proc/self/maps): read through the page cache,
    which the node's ranks share, not copied into this process's own memory."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and Path(fields[5]) == path.resolve():
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return True
    return False


def test_a_resume_maps_the_checkpoints_files_instead_of_copying_them(tmp_path):
    """The optimizer state (state.pt) and the weights (safetensors) come back as views of the files'
    pages: a resume reads a checkpoint once per node, not once per rank (issue #32)."""
    import torch

    weights = {"trainable": {"w": torch.arange(1 << 16, dtype=torch.float32)}}
    moments = {"optimizer": {"state": {0: {"exp_avg": torch.full((1 << 16,), 2.0)}}}}
    path = checkpoint.save(tmp_path, 1, _info(), weights, moments, {}, keep_last=1)
    tensors, objects, _ = checkpoint.load(path, _info())
    exp_avg = objects["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(exp_avg, moments["optimizer"]["state"][0]["exp_avg"])
    assert torch.equal(tensors["trainable"]["w"], weights["trainable"]["w"])
    assert _mapped_from(exp_avg, path / "state.pt")
    assert _mapped_from(tensors["trainable"]["w"], path / "trainable.safetensors")


def test_the_payload_is_the_tensors_bytes_and_a_first_failed_save_says_nothing_older_exists(tmp_path):
    import torch

    tensors = {"trainable": {"w": torch.zeros(4), "h": torch.zeros(2, 3, dtype=torch.bfloat16)}}
    objects = {"step": 3, "optimizer": {"exp_avg": [torch.zeros(5, dtype=torch.float64)], "lr": 1e-4}}
    assert checkpoint.payload_bytes(tensors, objects) == 4 * 4 + 6 * 2 + 5 * 8
    message = checkpoint._write_failed(1, tmp_path, 0, OSError("boom"), None)
    assert "no earlier checkpoint exists" in message and "None" not in message


def test_a_write_cut_short_with_space_left_names_a_quota_or_a_file_size_limit(tmp_path):
    """The disk has room (the checkpoint needs 0 bytes here) but the file system stopped the write: the
    message says so, with the error's first line, instead of calling the disk full."""
    err = OSError(27, "File too large")
    message = checkpoint._write_failed(3, tmp_path, 0, err, tmp_path / "step_2")
    assert message.startswith("checkpoint step_3 was not saved: the write was cut short ([Errno 27] File too")
    assert "a disk quota or a file-size limit (ulimit -f)" in message
    assert f"the last checkpoint, {tmp_path / 'step_2'}, is intact" in message


@pytest.mark.parametrize(
    "message",
    ["[Errno 28] No space left on device", "unexpected pos 4096", "File too large", "Disk quota exceeded"],
)
def test_a_write_cut_short_is_known_by_its_message_inside_a_wrapping_error(message):
    """Libraries wrap the file system's error without its errno (torch's zip writer, safetensors): the
    message anywhere in the error's chain tells a full disk from another failure."""
    try:
        try:
            raise RuntimeError(message)
        except RuntimeError as inner:
            raise ValueError("the checkpoint's write failed") from inner
    except ValueError as outer:
        assert checkpoint._disk_full(outer)
    assert not checkpoint._disk_full(ValueError("a shape mismatch"))


def test_a_damaged_meta_file_is_named(tmp_path):
    newest = _save(tmp_path, 1)
    (newest / "meta.json").write_text("{")
    with pytest.raises(
        checkpoint.CorruptCheckpoint, match=r"step_1/meta.json cannot be read \(JSONDecodeError"
    ):
        checkpoint.read_meta(newest)


def test_a_file_torch_cannot_load_is_named_with_the_first_line_of_its_error(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("PytorchStreamReader failed reading zip archive\nfurther detail")

    monkeypatch.setattr(checkpoint.torch, "load", fail)
    with pytest.raises(checkpoint.CorruptCheckpoint) as err:
        checkpoint._torch_load(tmp_path / "state.pt")
    assert (
        str(err.value)
        == f"{tmp_path / 'state.pt'} cannot be read: PytorchStreamReader failed reading zip archive"
    )


def test_sizes_in_messages_are_in_mib_below_a_quarter_gib_and_in_gib_from_it():
    assert checkpoint._gib(2**28 - 2**20) == "255.0 MiB"
    assert checkpoint._gib(2**28) == "0.25 GiB"
    assert checkpoint._gib(100) == "0.0 MiB" and checkpoint._gib(3 * 2**30) == "3.00 GiB"


def _two_rank_save(
    run: Path, step: int, monkeypatch, write_extra=None, manifest_fails: bool = False
) -> tuple[list, list[int]]:
    """Two ranks (threads on one process group, tests/helpers/threaded_ranks.py) save step ``step`` into
    ``run``, each with its own random-stream state; what each returned or raised, and which ranks wrote (or,
    ``manifest_fails``, tried to write) a manifest."""
    import torch
    import torch.distributed as dist

    from helios.infra.distributed import DistInfo
    from tests.helpers.threaded_ranks import run_ranks

    manifests: list[int] = []
    write_manifest = checkpoint.write_manifest

    def spied(folder: Path) -> None:
        manifests.append(dist.get_rank())
        if manifest_fails:
            raise OSError(122, "Disk quota exceeded")
        write_manifest(folder)

    monkeypatch.setattr(checkpoint, "write_manifest", spied)

    def rank_main(rank: int):
        info = DistInfo(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"))
        weights = {"trainable": {"w": torch.full((4,), float(step))}}
        try:
            return checkpoint.save(
                run, step, info, weights, {"step": step}, {"rank": rank}, 3, write_extra=write_extra
            )
        except checkpoint.CheckpointWriteError as err:
            return err

    return run_ranks(2, rank_main), manifests


def test_two_ranks_save_one_checkpoint_each_rank_its_own_state_the_main_rank_the_rest(tmp_path, monkeypatch):
    """A collective save: every rank writes its own random-stream state, the main rank the weights, the
    objects and (once, after every rank's write succeeded) the manifest and the marker; each rank reads its
    own state back on the same world size."""
    import torch

    from helios.infra.distributed import DistInfo

    saved, manifests = _two_rank_save(tmp_path, 5, monkeypatch)
    assert saved[0] == saved[1] == tmp_path / "checkpoints" / "step_5" and manifests == [0]
    checkpoint.verify(saved[0])
    assert checkpoint.read_meta(saved[0])["world_size"] == 2
    for rank in (0, 1):
        info = DistInfo(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"))
        tensors, objects, rank_state = checkpoint.load(saved[0], info)
        assert rank_state == {"rank": rank} and objects == {"step": 5}
        assert torch.equal(tensors["trainable"]["w"], torch.full((4,), 5.0))


def test_a_save_that_fails_on_one_rank_fails_on_every_rank_and_leaves_the_disk_as_it_was(
    tmp_path, monkeypatch
):
    """Rank 1's write fails (its engine partition): both ranks raise the same error, no manifest is
    written, nothing of step 2 is left, and step 1 is untouched."""
    _two_rank_save(tmp_path, 1, monkeypatch)
    before = _tree(tmp_path)

    def rank1_fails(tmp: Path) -> None:
        import torch.distributed as dist

        (tmp / f"part_{dist.get_rank()}.pt").write_bytes(b"\0" * 10)
        if dist.get_rank() == 1:
            raise OSError(28, "No space left on device")

    raised, manifests = _two_rank_save(tmp_path, 2, monkeypatch, write_extra=rank1_fails)
    assert all(isinstance(err, checkpoint.CheckpointWriteError) for err in raised) and manifests == []
    assert str(raised[0]) == str(raised[1]) and "step_2 was not saved" in str(raised[0])
    assert _tree(tmp_path) == before
    # the main rank's manifest fails after every rank wrote its files: the other rank learns it too
    raised, manifests = _two_rank_save(tmp_path, 2, monkeypatch, manifest_fails=True)
    assert all(isinstance(err, checkpoint.CheckpointWriteError) for err in raised) and manifests == [0]
    assert str(raised[0]) == str(raised[1]) and "Disk quota exceeded" in str(raised[1])
    assert _tree(tmp_path) == before
    # the free space (checked on the main rank) cannot hold it: refused on both before anything is written
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 8, 8))
    raised, manifests = _two_rank_save(tmp_path, 2, monkeypatch)
    assert all(isinstance(err, checkpoint.CheckpointWriteError) for err in raised) and manifests == []
    assert str(raised[0]) == str(raised[1]) and "the disk is full" in str(raised[1])
    assert _tree(tmp_path) == before


def test_the_saved_config_is_read_from_the_checkpoint_or_from_an_older_ones_state(tmp_path):
    """``config.yaml`` in the checkpoint; a checkpoint written before it existed keeps the config in its
    ``state.pt`` objects."""
    import torch

    weights = {"trainable": {"w": torch.zeros(4)}}
    new = checkpoint.save(tmp_path, 1, _info(), weights, {"step": 1}, {}, keep_last=3, config="seed: 3\n")
    assert checkpoint.saved_config(new) == "seed: 3\n"
    old = checkpoint.save(tmp_path, 2, _info(), weights, {"step": 2, "config": "seed: 4\n"}, {}, keep_last=3)
    assert not (old / checkpoint.CONFIG).exists() and checkpoint.saved_config(old) == "seed: 4\n"
