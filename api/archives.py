"""Safe extraction of dataset archives (zip or tar) into an ImageFolder.

Archives come from users, so nothing in them is trusted: members are checked one by one and
copied by hand (never ``extractall``). Refused with ``invalid_archive``: absolute paths, drive
letters, ``..`` components, backslashes, NUL bytes, links and special files, more than
``max_files`` members, more than ``max_bytes`` unpacked (counted while copying, not taken from
the headers), and anything the zip/tar readers reject (CRC errors, truncation).
"""

from __future__ import annotations

import lzma
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from api.errors import ApiError

# torchvision's ImageFolder extensions (not imported: torchvision would pull in torch).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_DRIVE = re.compile(r"^[A-Za-z]:")
_IGNORED = ("__MACOSX",)
_CHUNK = 1 << 20


def _refuse(message: str) -> ApiError:
    return ApiError("invalid_archive", message, field="dataset")


def safe_member_path(name: str) -> PurePosixPath:
    """The relative path a member may be written to, or ``invalid_archive``."""
    if not name or "\x00" in name or "\\" in name:
        raise _refuse(f"archive member {name!r} has an invalid name")
    if name.startswith("/") or _DRIVE.match(name):
        raise _refuse(f"archive member {name!r} has an absolute path")
    path = PurePosixPath(name)
    if any(part == ".." for part in path.parts):
        raise _refuse(f"archive member {name!r} leaves the extraction folder")
    return path


class _Budget:
    def __init__(self, max_bytes: int, max_files: int) -> None:
        self.max_bytes, self.max_files = max_bytes, max_files
        self.bytes = self.files = 0

    def count_file(self) -> None:
        self.files += 1
        if self.files > self.max_files:
            raise _refuse(f"the archive holds more than {self.max_files} files")

    def copy(self, src: IO[bytes], dst: Path) -> None:
        with dst.open("xb") as out:
            while chunk := src.read(_CHUNK):
                self.bytes += len(chunk)
                if self.bytes > self.max_bytes:
                    raise _refuse(f"the archive unpacks to more than {self.max_bytes} bytes")
                out.write(chunk)


def _target(dest: Path, rel: PurePosixPath) -> Path:
    target = dest.joinpath(*rel.parts)
    # Belt and braces: the name checks already exclude escapes; links are never created.
    if not target.resolve().is_relative_to(dest.resolve()):
        raise _refuse(f"archive member {rel} leaves the extraction folder")
    return target


def _zip_members(zf: zipfile.ZipFile) -> Iterator[tuple[zipfile.ZipInfo, PurePosixPath]]:
    for info in zf.infolist():
        rel = safe_member_path(info.filename)
        # Unix file type bits, when present (zips made elsewhere carry none, or only
        # permission bits): anything but a regular file or a folder is refused.
        file_type = stat.S_IFMT(info.external_attr >> 16)
        if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise _refuse(f"archive member {info.filename!r} is a link or special file")
        yield info, rel


def _extract_zip(archive: Path, dest: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = list(_zip_members(zf))  # validate every name before writing anything
        for info, _ in members:
            if not info.is_dir():
                budget.count_file()
        for info, rel in members:
            target = _target(dest, rel)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src:
                budget.copy(src, target)


def _extract_tar(archive: Path, dest: Path, budget: _Budget) -> None:
    with tarfile.open(archive, mode="r:*") as tf:
        members = []
        for member in tf:  # streams the index; stops early on a bad member
            rel = safe_member_path(member.name)
            if not (member.isfile() or member.isdir()):
                raise _refuse(f"archive member {member.name!r} is a link or special file")
            if member.isfile():
                budget.count_file()
            members.append((member, rel))
        for member, rel in members:
            target = _target(dest, rel)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(member)
            if src is None:
                raise _refuse(f"archive member {member.name!r} cannot be read")
            with src:
                budget.copy(src, target)


def extract_archive(archive: Path, dest: Path, *, max_bytes: int, max_files: int) -> None:
    """Extract a zip or tar (optionally gz/bz2/xz) into the new folder ``dest``.

    On refusal ``dest`` is removed and ``ApiError('invalid_archive')`` raised.
    """
    dest.mkdir(parents=True)
    budget = _Budget(max_bytes, max_files)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, dest, budget)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, dest, budget)
        else:
            raise _refuse("the dataset is neither a zip nor a tar archive")
    except ApiError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    except (
        zipfile.BadZipFile,
        tarfile.TarError,
        zlib.error,
        lzma.LZMAError,
        EOFError,
        OSError,
        ValueError,
    ) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise _refuse(f"the archive is corrupt: {type(exc).__name__}: {exc}") from exc


def _visible(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if not p.name.startswith(".") and p.name not in _IGNORED
    )


def _class_dirs(folder: Path) -> list[Path]:
    """Subfolders that hold at least one image (ImageFolder ignores the rest)."""
    return [
        d
        for d in _visible(folder)
        if d.is_dir()
        and any(f.suffix.lower() in IMAGE_EXTENSIONS for f in d.rglob("*") if f.is_file())
    ]


def imagefolder_root(extracted: Path) -> tuple[Path, int]:
    """Find the ImageFolder in an extracted archive; return its root and class count.

    Accepted layouts (as ``flow_compress.data`` reads them): ``root/<class>/<image>``, or
    ``root/train/<class>/...`` with optional ``val/`` or ``test/``. A single wrapping folder
    (zipping a folder rather than its contents) is looked through.
    """
    root = extracted
    while True:
        entries = _visible(root)
        if len(entries) == 1 and entries[0].is_dir() and entries[0].name != "train":
            root = entries[0]
            continue
        break
    top = root / "train" if (root / "train").is_dir() else root
    classes = _class_dirs(top)
    if len(classes) < 2:
        raise ApiError(
            "invalid_dataset",
            "the archive is not an ImageFolder: expected at least two class folders of images "
            "(class/image.png, or train/class/image.png with optional val/ or test/)",
            field="dataset",
        )
    for split in ("val", "test"):
        if top is not root and (root / split).is_dir():
            names = {d.name for d in _class_dirs(root / split)}
            if names != {d.name for d in classes}:
                raise ApiError(
                    "invalid_dataset",
                    f"{split}/ classes differ from train/ classes",
                    field="dataset",
                )
    return root, len(classes)
