"""The standard dataset files: their mirrors and MD5, the checked download, and the IDX / CIFAR-10 readers.

``download(dataset, filename, dest_dir)`` tries the mirrors of ``MIRRORS[dataset]`` in order and keeps the
file only when its MD5 is ``MD5[dataset][filename]``. ``read_idx`` reads the IDX format of MNIST /
Fashion-MNIST (``.gz`` or not); ``read_cifar_batch`` one binary CIFAR-10 batch.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

#: Standard files, their MD5 and mirrors (tried in order). Tests point the mirrors at file:// URLs.
MIRRORS: dict[str, list[str]] = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"],
    "fashion_mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
}
MD5: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "cifar10": {"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"},
}


def md5sum(path: str | os.PathLike) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(dataset: str, filename: str, dest_dir: Path, timeout: float = 30.0) -> Path:
    """Fetch ``filename`` of ``dataset`` from its mirrors into ``dest_dir`` and verify its MD5.

    Raises ``ConnectionError`` when no mirror answers and ``ValueError`` on a checksum mismatch
    (the bad file is removed).
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    target, expected = dest_dir / filename, MD5[dataset][filename]
    errors = []
    for base in MIRRORS[dataset]:
        tmp = target.with_suffix(target.suffix + ".part")
        try:
            with urllib.request.urlopen(base + filename, timeout=timeout) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except (urllib.error.URLError, OSError) as e:
            errors.append(f"{base}: {e}")
            tmp.unlink(missing_ok=True)
            continue
        got = md5sum(tmp)
        if got != expected:
            tmp.unlink(missing_ok=True)
            raise ValueError(f"checksum mismatch for {filename} from {base}: md5 {got}, expected {expected}")
        tmp.replace(target)
        return target
    raise ConnectionError(f"could not download {filename}: " + "; ".join(errors))


_IDX_DTYPES: dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (``.gz`` or not): magic ``0 0 <dtype> <ndim>``, big-endian int32 dims, data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {tuple(dims)}, file holds {data.size} values")
    return data.reshape(tuple(dims))


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 binary batch: records of ``<1 x label><3072 x pixel>`` -> ``(N, 3, 32, 32)``, ``(N,)``."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 3073:
        raise ValueError(f"{path}: size {raw.size} is not a multiple of the 3073-byte CIFAR-10 record")
    rec = raw.reshape(-1, 3073)
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)
