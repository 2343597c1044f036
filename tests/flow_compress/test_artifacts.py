"""Artifact files: digests, the manifest, and writes that are atomic."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from flow_compress import artifacts
from flow_compress.artifacts import (
    MANIFEST_NAME,
    atomic_write_bytes,
    atomic_write_text,
    read_manifest,
    sha256_file,
    verify_manifest,
    write_manifest,
)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "model.onnx").write_bytes(os.urandom(3 * (1 << 20) + 17))  # > one read chunk
    (tmp_path / "report.md").write_text("# report\n", encoding="utf-8")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "top1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    (tmp_path / "empty.txt").write_bytes(b"")
    return tmp_path


def test_sha256_file_matches_hashlib(folder: Path) -> None:
    data = (folder / "model.onnx").read_bytes()
    assert sha256_file(folder / "model.onnx") == hashlib.sha256(data).hexdigest()
    assert sha256_file(folder / "empty.txt") == hashlib.sha256(b"").hexdigest()


def test_manifest_lists_sizes_and_digests(folder: Path) -> None:
    names = ["model.onnx", "report.md", "empty.txt", "report.md"]
    manifest = write_manifest(folder, names)
    on_disk = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert on_disk == manifest.model_dump(mode="json")
    assert manifest == read_manifest(folder)
    assert [e.name for e in manifest.files] == ["model.onnx", "report.md", "empty.txt"]
    for entry in manifest.files:
        path = folder / entry.name
        assert entry.size == path.stat().st_size
        assert entry.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest.entry("report.md") == manifest.files[1] and manifest.entry("x") is None
    assert verify_manifest(folder) == []


def test_verify_manifest_finds_changed_and_missing_files(folder: Path) -> None:
    write_manifest(folder, ["model.onnx", "report.md", "empty.txt"])
    (folder / "report.md").write_text("# edited\n", encoding="utf-8")  # same size, new bytes
    (folder / "empty.txt").unlink()
    assert verify_manifest(folder) == ["report.md", "empty.txt"]


@pytest.mark.parametrize(
    "name",
    [
        "../outside.txt",
        "/etc/passwd",
        "plots/../report.md",
        "plots/top1.png",
        "",
        MANIFEST_NAME,
        "a\\b",
    ],
)
def test_manifest_rejects_names_outside_the_folder(folder: Path, name: str) -> None:
    # Plain file names only: the service serves an artifact by the name in the URL.
    with pytest.raises(ValueError):
        write_manifest(folder, ["report.md", name])
    assert not (folder / MANIFEST_NAME).exists()


def test_manifest_of_a_missing_file_writes_nothing(folder: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model\.ts"):
        write_manifest(folder, ["report.md", "model.ts"])
    with pytest.raises(FileNotFoundError):
        write_manifest(folder, ["plots"])  # a folder is not an artifact
    assert not (folder / MANIFEST_NAME).exists()


def test_manifest_write_is_atomic(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = write_manifest(folder, ["report.md"])
    before = (folder / MANIFEST_NAME).read_bytes()

    def crash(src: object, dst: object) -> None:
        raise OSError("disk vanished")

    # The manifest is complete in its temp file before the rename; a failing rename must
    # leave the previous manifest intact and no temp file behind.
    monkeypatch.setattr(artifacts.os, "replace", crash)
    with pytest.raises(OSError, match="disk vanished"):
        write_manifest(folder, ["report.md", "model.onnx"])
    monkeypatch.undo()
    assert (folder / MANIFEST_NAME).read_bytes() == before
    assert read_manifest(folder) == first
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_replaces_whole_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.json"
    atomic_write_text(target, "x" * 10_000)
    atomic_write_text(target, '{"a": 1}\n')
    assert target.read_text(encoding="utf-8") == '{"a": 1}\n'
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_atomic_write_failure_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "model.ts"
    target.write_bytes(b"old")

    def crash(fd: int) -> None:
        raise OSError("fsync failed")

    monkeypatch.setattr(artifacts.os, "fsync", crash)
    with pytest.raises(OSError, match="fsync failed"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.ts"]
