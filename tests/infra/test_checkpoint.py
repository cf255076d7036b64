"""Checkpoint files against their manifest: sizes and SHA-256 checksums."""

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
