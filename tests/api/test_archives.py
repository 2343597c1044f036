"""Dataset archives: good ImageFolders unpack; hostile archives are refused, writing nothing
outside the extraction folder."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from api.archives import extract_archive, imagefolder_root
from api.errors import ApiError

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32  # the name is what ImageFolder's scan looks at


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def make_tar(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info in members:
            payload = data.get(info.name)
            if payload is not None:
                info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def extract(archive: Path, dest: Path, **caps: int) -> Path:
    extract_archive(
        archive,
        dest,
        max_bytes=caps.get("max_bytes", 1 << 20),
        max_files=caps.get("max_files", 100),
    )
    return dest


def refused(archive: Path, dest: Path, **caps: int) -> ApiError:
    with pytest.raises(ApiError) as err:
        extract(archive, dest, **caps)
    assert err.value.code == "invalid_archive" and err.value.status == 422
    assert not dest.exists()
    return err.value


def test_zip_of_a_wrapped_imagefolder_is_found(tmp_path: Path) -> None:
    archive = make_zip(
        tmp_path / "ds.zip",
        {f"flowers/{c}/{i}.png": PNG for c in ("daisy", "rose", "tulip") for i in range(2)}
        | {"__MACOSX/._x": b"", "flowers/rose/notes.txt": b"ignored"},
    )
    root, classes = imagefolder_root(extract(archive, tmp_path / "out"))
    assert root == tmp_path / "out" / "flowers" and classes == 3


def test_tar_with_train_and_val_splits(tmp_path: Path) -> None:
    names = [f"{s}/{c}/0.jpg" for s in ("train", "val") for c in ("a", "b")]
    members = [tarfile.TarInfo(n) for n in names]
    archive = make_tar(tmp_path / "ds.tar.gz", members, dict.fromkeys(names, PNG))
    root, classes = imagefolder_root(extract(archive, tmp_path / "out"))
    assert root == tmp_path / "out" and classes == 2


@pytest.mark.parametrize("name", ["../evil.txt", "ok/../../evil.txt", "/etc/evil", "C:/evil"])
def test_zip_paths_that_escape_are_refused(tmp_path: Path, name: str) -> None:
    archive = make_zip(tmp_path / "bad.zip", {"a/1.png": PNG, name: b"pwned"})
    refused(archive, tmp_path / "box" / "out")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "box" / "evil.txt").exists()


def test_tar_links_and_devices_are_refused(tmp_path: Path) -> None:
    for kind in (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE):
        link = tarfile.TarInfo("a/link.png")
        link.type = kind
        link.linkname = "/etc/passwd"
        archive = make_tar(tmp_path / f"{kind!r}.tgz", [link], {})
        refused(archive, tmp_path / "out")


def test_zip_symlink_member_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("a/link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    refused(archive, tmp_path / "out")


def test_size_and_file_count_caps(tmp_path: Path) -> None:
    bomb = make_zip(tmp_path / "bomb.zip", {"a/big.png": b"\0" * (4 << 20)})
    assert bomb.stat().st_size < 64 << 10  # small on the wire, large unpacked
    assert "more than" in refused(bomb, tmp_path / "o1", max_bytes=1 << 20).message
    many = make_zip(tmp_path / "many.zip", {f"a/{i}.png": PNG for i in range(11)})
    assert "10 files" in refused(many, tmp_path / "o2", max_files=10).message


def test_not_an_archive_and_corrupt_archives(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"definitely not an archive" * 10)
    refused(junk, tmp_path / "o1")
    good = make_zip(tmp_path / "ds.zip", {f"{c}/0.png": PNG * 100 for c in "ab"})
    data = bytearray(good.read_bytes())
    data[60:80] = b"\xff" * 20  # inside the first member's compressed bytes
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(bytes(data))
    refused(corrupt, tmp_path / "o2")


def test_folder_without_two_image_classes_is_not_an_imagefolder(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "one.zip", {"only/0.png": PNG, "readme.txt": b"x"})
    with pytest.raises(ApiError) as err:
        imagefolder_root(extract(archive, tmp_path / "out"))
    assert err.value.code == "invalid_dataset"
