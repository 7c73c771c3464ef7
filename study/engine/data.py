"""Fashion-MNIST as in-memory tensors, from the original IDX files, checksums verified.

    python -m study data        # find, verify and unpack the files; print where they came from

Where the files come from, first match wins: `$STUDY_DATA_DIR`, `data/`, Debian's
`dataset-fashion-mnist` package, torchvision's download. Each file is checked against the published
MD5 of its *unpacked* IDX content: Debian re-compresses the `.gz` files, so their own MD5s differ
from Zalando's, but the content is the same bytes.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "data"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

# MD5 of the unpacked IDX files as published with Fashion-MNIST (the same bytes the published
# .gz checksums 8d4fb7e6..., 25c81989..., bef4ecab..., bb300cfd... decompress to).
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}


class DataError(RuntimeError):
    """The dataset cannot be found or fails its checksum."""


@dataclass(frozen=True)
class Dataset:
    """Images as float32 in [0, 1], flattened: x [N, 784]; labels int64: y [N]."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str

    def subset(self, n: int | None) -> Dataset:
        """The first `n` training images (the same subset for every seed)."""
        if n is None:
            return self
        if n > len(self.train_y):
            raise DataError(f"data.train_subset={n} exceeds the {len(self.train_y)} training images")
        return Dataset(self.train_x[:n], self.train_y[:n], self.test_x, self.test_y, self.source)

    def to(self, device: str) -> Dataset:
        return Dataset(*(t.to(device) for t in (self.train_x, self.train_y, self.test_x,
                                                 self.test_y)), source=self.source)


def candidates() -> list[Path]:
    env = os.environ.get("STUDY_DATA_DIR")
    dirs = [Path(env)] if env else []
    return dirs + [CACHE, CACHE / "FashionMNIST" / "raw", DEBIAN_DIR]


def _holds(folder: Path, names: list[str]) -> bool:
    return all((folder / n).is_file() or (folder / f"{n}.gz").is_file() for n in names)


def locate(names: list[str] | None = None, download_to: Path | None = CACHE) -> Path:
    """The first candidate folder holding every file (as .gz or unpacked); else download."""
    names = names or list(FASHION_MNIST_MD5)
    for folder in candidates():
        if _holds(folder, names):
            return folder
    if download_to is None:
        raise DataError(_missing_message())
    print(f"Fashion-MNIST not found locally; downloading it into {download_to}", file=sys.stderr)
    # torchvision prints a line per mirror tried; offline that is a screenful before one error.
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            # torchvision only here: importing it costs seconds in every worker that trains.
            from torchvision.datasets import FashionMNIST
            FashionMNIST(str(download_to), train=True, download=True)
            FashionMNIST(str(download_to), train=False, download=True)
        except Exception as err:  # torchvision raises plain RuntimeError/URLError offline
            raise DataError(_missing_message(err)) from err
    return download_to / "FashionMNIST" / "raw"


def _missing_message(download_error: Exception | None = None) -> str:
    """One line: where we looked, why the download failed, and the next step on this machine."""
    looked = ", ".join(str(p) for p in candidates())
    failed = (f"; the download failed ({' '.join(str(download_error).split())[:200]})"
              if download_error else "")
    if shutil.which("apt-get"):
        fix = ("install Debian's package (`sudo apt-get install dataset-fashion-mnist`, or "
               "`make data` as root), or put the four IDX files in data/ or in $STUDY_DATA_DIR")
    else:
        fix = ("apt-get is not available here: copy the four files "
               f"({', '.join(f'{n}.gz' for n in FASHION_MNIST_MD5)}) into data/ or into a "
               "folder named by $STUDY_DATA_DIR")
    return f"Fashion-MNIST not found (looked in {looked}){failed}; {fix}"


def _read(folder: Path, name: str) -> bytes:
    plain, packed = folder / name, folder / f"{name}.gz"
    if plain.is_file():
        return plain.read_bytes()
    try:
        return gzip.decompress(packed.read_bytes())
    except (OSError, EOFError) as err:
        raise DataError(f"{packed}: cannot be decompressed ({err}); the file is corrupt or "
                        "partial: delete it and fetch it again") from None


def stage(source: Path, cache: Path = CACHE, checksums: dict[str, str] = FASHION_MNIST_MD5) -> Path:
    """Verify each file from `source` and keep an unpacked copy where torchvision reads it."""
    raw = cache / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, expected in checksums.items():
        target = raw / name
        if target.is_file() and _md5(target.read_bytes()) == expected:
            continue
        content = _read(source, name)
        if (actual := _md5(content)) != expected:
            raise DataError(f"{source / name}(.gz): MD5 of the unpacked content is {actual}, "
                            f"expected {expected}; the file is corrupt or partial: delete it and "
                            "fetch it again (see README, 'Data')")
        _write_atomically(target, content)
    return cache


def _write_atomically(target: Path, content: bytes) -> None:
    """A killed run never leaves a half-written file, and workers staging the same file at once
    (Ray tasks on one node) each write their own temporary file: the last rename wins, and every
    rename puts the same verified bytes in place."""
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f"{target.name}.",
                                     suffix=".part", delete=False) as tmp:
        tmp.write(content)
    os.replace(tmp.name, target)


def _md5(content: bytes) -> str:
    return hashlib.md5(content, usedforsecurity=False).hexdigest()


def _split(cache: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if train else "t10k"
    raw = cache / "FashionMNIST" / "raw"
    images = _idx(raw / f"{prefix}-images-idx3-ubyte")
    # ToTensor's scaling to [0, 1], done once for the whole split instead of per sample.
    labels = _idx(raw / f"{prefix}-labels-idx1-ubyte").long()
    return images.reshape(len(images), -1).float().div_(255), labels


def _idx(path: Path) -> torch.Tensor:
    """An unsigned-byte IDX file (what torchvision's reader gives for Fashion-MNIST): magic
    0 0 0x08 ndim, then ndim big-endian uint32 sizes, then the bytes."""
    content = path.read_bytes()
    if content[:3] != b"\x00\x00\x08":
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {content[:4].hex()})")
    ndim = content[3]
    shape = np.frombuffer(content, dtype=">u4", count=ndim, offset=4).astype(int)
    array = np.frombuffer(content, dtype=np.uint8, offset=4 + 4 * ndim)
    return torch.from_numpy(array.reshape(tuple(shape)).copy())


def load(source: Path | None = None, cache: Path | None = None,
         checksums: dict[str, str] = FASHION_MNIST_MD5) -> Dataset:
    """The whole dataset as tensors, after locating and verifying the files (`cache`: data/)."""
    cache = cache or CACHE  # read at call time, so a test's or tool's CACHE is the one used
    source = source or locate(list(checksums), download_to=cache)
    stage(source, cache, checksums)
    train_x, train_y = _split(cache, train=True)
    test_x, test_y = _split(cache, train=False)
    return Dataset(train_x, train_y, test_x, test_y, source=str(source))
