"""Datasets as in-memory tensors with an explicit train / validation / test split.

    splits = tensorcurv.experiments.data.load("digits", val_fraction=0.1, test_fraction=0.2, normalize="standard")
    X, y = splits.train          # X: (N, *input_shape), y: (N,) int64 labels (or X-like targets)

Datasets (``names()``):

* ``digits``: scikit-learn ``load_digits`` (1,797 images ``(1, 8, 8)``, 10 classes; embedded, no file).
* ``mnist1d``: MNIST-1D (Greydanus 2020) at its standard sizes, generated locally by the
  ``mnist1d`` package's ``make_dataset`` with its default arguments (5,000 signals of length 40,
  seed 42, split 4,000 train / 1,000 test: the arguments of the frozen ``mnist1d_data.pkl``;
  nothing is downloaded). Optional extra: ``pip install tensorcurv[mnist1d]``.
* ``mnist`` / ``fashion_mnist``: IDX files (``.gz`` or uncompressed) in ``<data_dir>/<name>/``:
  ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``; images ``(1, 28, 28)``.
* ``cifar10``: the binary version, ``<data_dir>/cifar10/cifar-10-batches-bin/`` with
  ``data_batch_1.bin`` … ``data_batch_5.bin`` and ``test_batch.bin`` (records of 1 label byte +
  3,072 pixel bytes, channel-major); images ``(3, 32, 32)``.
* ``curves`` / ``faces`` / ``mnist_all``: the deep-autoencoder benchmarks of Hinton & Salakhutdinov
  (2006) as used by Martens (2010), Martens & Grosse (2015) and the KPSVD / two-level K-FAC thesis
  code, from the ``.mat`` files of Martens' HF code (never downloaded; :data:`MAT_FILES_PAGE`):
  ``<data_dir>/curves/digs3pts_1.mat`` with keys ``bdata`` (20,000 × 784 train) and ``bdatatest``
  (10,000 × 784 test), images ``(1, 28, 28)`` in [0, 1]; ``<data_dir>/faces/newfaces_rot_single.mat``
  with key ``newfaces_single`` (625 × 165,600, one 25 × 25 face per *column*; the first 25/40 are the
  training set and the last 10/40 the test set, as in both codes, :func:`faces_split`), images
  ``(1, 25, 25)``; ``<data_dir>/mnist_all/mnist_all.mat`` with keys ``train0`` … ``train9`` and
  ``test0`` … ``test9`` (uint8, one image per row; labels from the key), images ``(1, 28, 28)`` in
  0 … 255 with labels. For curves and faces the targets are the inputs (``num_classes=None``),
  flattened to ``(N, d)`` like the autoencoders' outputs.
* ``curves_synthetic``: a *regenerated* CURVES-like set, not the original file: 20,000 train /
  10,000 test images ``(1, 28, 28)`` in [0, 1] of a spline through 3 random points
  (:func:`make_curves_synthetic`; what follows the published construction and what is guessed is
  in ``docs/guide/data.md``). Generated once (about 30 s on one CPU core) from the fixed seed
  :data:`CURVES_SYNTHETIC_SEED` and cached in ``<data_dir>/curves_synthetic/`` as ``.npz``;
  autoencoding targets.

Missing MNIST / Fashion-MNIST / CIFAR-10 files are downloaded from the standard mirrors when
``download=True`` and the network is reachable; every download is checked against the published
MD5 of the standard file. Without network the error names the files and the directory to put them in.

Splits: datasets with an official test set (every one but digits)
keep it as ``test`` and ignore ``test_fraction``; ``digits`` holds out ``test_fraction`` of all
samples. ``val_fraction`` is the fraction of the remaining training pool held out for validation.
Both splits are a seeded permutation (``seed``). ``limit`` keeps only the first ``limit`` samples of
each split (after shuffling), for quick runs.

Normalization uses training-set statistics only: ``standard`` — per feature (every element of
``input_shape``) ``(x − mean) / std`` (std floored at 1e-8, constant features become 0);
``unit`` — ``(x − min) / (max − min)`` with the training set's global min/max, so values are in
[0, 1] (the choice for sigmoid autoencoders); ``none`` — raw values as float. Autoencoding
targets (curves, faces, curves_synthetic) are normalized like the inputs.
"""

from __future__ import annotations

import functools
import os
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tensorcurv.core.options import Option
from tensorcurv.experiments.curves_synthetic import CURVES_SYNTHETIC_SEED, make_curves_synthetic
from tensorcurv.experiments.dataset_files import MIRRORS, download, read_cifar_batch, read_idx


class Normalization(Option):
    """Input normalization: ``standard`` (zero mean, unit variance per feature), ``unit`` ([0, 1]) or ``none``."""

    STANDARD = "standard"
    UNIT = "unit"
    NONE = "none"


@dataclass
class DataSplits:
    """Train / validation / test tensors of one dataset."""

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    num_classes: int | None
    input_shape: tuple[int, ...]
    name: str

    def sizes(self) -> dict[str, int]:
        return {k: int(getattr(self, k)[0].shape[0]) for k in ("train", "val", "test")}


@dataclass
class _Raw:
    """Unnormalized arrays; ``x_test is None`` when the dataset has no official test split."""

    x: np.ndarray
    y: np.ndarray | None  # None: autoencoding (targets = inputs)
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    num_classes: int | None


def _missing_error(name: str, folder: Path, files: list[str], why: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"dataset {name!r}: missing {', '.join(files)} in {folder.resolve()} ({why}). "
        f"Put the standard files there (e.g. from {MIRRORS.get(name, ['the dataset page'])[0]}), "
        f"or allow download=True with network access."
    )


# ---------------------------------------------------------------------- loaders
def _digits(data_dir: Path, download: bool) -> _Raw:
    from sklearn.datasets import load_digits

    d = load_digits()
    return _Raw(d.images.reshape(-1, 1, 8, 8), d.target.astype(np.int64), None, None, 10)


def _mnist1d(data_dir: Path, download: bool) -> _Raw:
    try:
        from mnist1d.data import make_dataset
    except ImportError:
        raise ImportError("dataset 'mnist1d' needs the mnist1d package: pip install 'tensorcurv[mnist1d]'") from None
    state = np.random.get_state()  # make_dataset reseeds numpy's global generator
    try:
        d = make_dataset()
    finally:
        np.random.set_state(state)
    return _Raw(d["x"], d["y"].astype(np.int64), d["x_test"], d["y_test"].astype(np.int64), 10)


def _idx_dataset(name: str) -> Callable[[Path, bool], _Raw]:
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]

    def load(data_dir: Path, download_ok: bool) -> _Raw:
        folder = data_dir / name
        paths = {}
        for stem in stems:
            for cand in (folder / f"{stem}.gz", folder / stem):
                if cand.exists():
                    paths[stem] = cand
                    break
        missing = [f"{s}.gz" for s in stems if s not in paths]
        if missing and not download_ok:
            raise _missing_error(name, folder, missing, "download=False")
        for fn in missing:
            try:
                paths[fn[:-3]] = download(name, fn, folder)
            except ConnectionError as e:
                raise _missing_error(name, folder, missing, f"no network: {e}") from None
        x, y, xt, yt = (read_idx(paths[s]) for s in stems)
        return _Raw(x[:, None], y.astype(np.int64), xt[:, None], yt.astype(np.int64), 10)

    return load


def _cifar10(data_dir: Path, download_ok: bool) -> _Raw:
    folder = data_dir / "cifar10"
    bdir = folder / "cifar-10-batches-bin"
    files = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    missing = [f for f in files if not (bdir / f).exists()]
    if missing:
        archive = folder / "cifar-10-binary.tar.gz"
        if not archive.exists():
            if not download_ok:
                raise _missing_error("cifar10", bdir, missing, "download=False")
            try:
                download("cifar10", archive.name, folder)
            except ConnectionError as e:
                raise _missing_error("cifar10", bdir, missing, f"no network: {e}") from None
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and Path(m.name).name in files]
            for m in members:  # extract only the expected regular files, flattened into bdir
                bdir.mkdir(parents=True, exist_ok=True)
                src_file = tar.extractfile(m)
                assert src_file is not None  # m.isfile()
                with src_file as src, open(bdir / Path(m.name).name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    xs, ys = zip(*(read_cifar_batch(bdir / f) for f in files[:5]))
    xt, yt = read_cifar_batch(bdir / files[5])
    return _Raw(np.concatenate(xs), np.concatenate(ys), xt, yt, 10)


#: where the .mat files of Martens' Hessian-free code are published (named in the missing-file error;
#: no checksum is published for them, so they are not downloaded automatically)
MAT_FILES_PAGE = "https://www.cs.toronto.edu/~jmartens/"


def _loadmat(path: Path, name: str) -> dict:
    if not path.exists():
        raise FileNotFoundError(
            f"dataset {name!r}: missing {path.name} in {path.parent.resolve()}. It is the .mat file of "
            f"Martens' Hessian-free code (Hinton & Salakhutdinov's data), published at "
            f"{MAT_FILES_PAGE}{path.name}; put it there (it is not downloaded automatically)."
        )
    from scipy.io import loadmat

    return loadmat(path)


def _mat_key(m: dict, key: str, path: str) -> np.ndarray:
    if key not in m:
        found = sorted(k for k in m if not k.startswith("__"))
        raise ValueError(f"{path}: no variable {key!r} (found {found})")
    return np.asarray(m[key])


def _curves(data_dir: Path, download_ok: bool) -> _Raw:
    m = _loadmat(data_dir / "curves" / "digs3pts_1.mat", "curves")
    x = _mat_key(m, "bdata", "digs3pts_1.mat").astype(np.float64)
    xt = _mat_key(m, "bdatatest", "digs3pts_1.mat").astype(np.float64)
    side = int(round(np.sqrt(x.shape[1])))
    return _Raw(x.reshape(-1, 1, side, side), None, xt.reshape(-1, 1, side, side), None, None)


def faces_split(n: int) -> tuple[int, int]:
    """``(n_train, n_test)`` of FACES as in Martens' HF code and the thesis code: the first 25/40 of the
    columns train, the last 10/40 test, the 5/40 between are unused (165,600 → 103,500 and 41,400)."""
    return (n * 25) // 40, (n * 10) // 40


def _faces(data_dir: Path, download_ok: bool) -> _Raw:
    m = _loadmat(data_dir / "faces" / "newfaces_rot_single.mat", "faces")
    a = _mat_key(m, "newfaces_single", "newfaces_rot_single.mat").astype(np.float64).T  # (samples, 625)
    ntrain, ntest = faces_split(a.shape[0])
    side = int(round(np.sqrt(a.shape[1])))
    a = a.reshape(-1, 1, side, side)
    return _Raw(a[:ntrain], None, a[a.shape[0] - ntest :], None, None)


def _mnist_all(data_dir: Path, download_ok: bool) -> _Raw:
    """``mnist_all.mat`` (Roweis; used by Hinton's and Martens' code): ``train0`` … ``train9`` and
    ``test0`` … ``test9``, uint8 matrices with one 784-pixel image per row (row-major 28 × 28, the
    pixel order of the IDX files); the digit is in the variable's name."""
    m = _loadmat(data_dir / "mnist_all" / "mnist_all.mat", "mnist_all")
    parts = {}
    for split in ("train", "test"):
        xs = [_mat_key(m, f"{split}{d}", "mnist_all.mat").reshape(-1, 784) for d in range(10)]
        ys = [np.full(len(x), d, dtype=np.int64) for d, x in enumerate(xs)]
        parts[split] = (np.concatenate(xs).reshape(-1, 1, 28, 28), np.concatenate(ys))
    return _Raw(*parts["train"], *parts["test"], 10)


# ---------------------------------------------------------------------- synthetic CURVES
#: published sizes of CURVES (Hinton & Salakhutdinov 2006): 20,000 training and 10,000 test images
CURVES_SYNTHETIC_SIZES = (20_000, 10_000)
#: bumped whenever the construction changes, so that a stale cache is never read
CURVES_SYNTHETIC_VERSION = 1


def _curves_synthetic(data_dir: Path, download_ok: bool) -> _Raw:
    n_train, n_test = CURVES_SYNTHETIC_SIZES
    folder = data_dir / "curves_synthetic"
    cache = folder / (
        f"curves_synthetic_v{CURVES_SYNTHETIC_VERSION}_seed{CURVES_SYNTHETIC_SEED}_{n_train}x{n_test}.npz"
    )
    if cache.exists():
        with np.load(cache) as f:
            x, xt = f["train"], f["test"]
    else:
        images = make_curves_synthetic(n_train + n_test, CURVES_SYNTHETIC_SEED)
        x, xt = images[:n_train], images[n_train:]
        folder.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".part.npz")
        np.savez_compressed(tmp, train=x, test=xt)
        tmp.replace(cache)
    return _Raw(x[:, None].astype(np.float64), None, xt[:, None].astype(np.float64), None, None)


def _memoized(loader: Callable[[Path, bool], _Raw]) -> Callable[[Path, bool], _Raw]:
    """A generated dataset is built (or read from its cache file) once per process: mnist1d's generator
    takes seconds, and a study loads the same data for every run. The arrays are shared read-only;
    every split is a copy."""

    @functools.lru_cache(maxsize=2)
    def cached(data_dir: Path, download: bool) -> _Raw:
        raw = loader(data_dir, download)
        for a in (raw.x, raw.y, raw.x_test, raw.y_test):
            if a is not None:
                a.flags.writeable = False
        return raw

    return cached


_LOADERS: dict[str, Callable[[Path, bool], _Raw]] = {
    "digits": _digits,
    "mnist1d": _memoized(_mnist1d),
    "mnist": _idx_dataset("mnist"),
    "fashion_mnist": _idx_dataset("fashion_mnist"),
    "cifar10": _cifar10,
    "curves": _curves,
    "faces": _faces,
    "mnist_all": _mnist_all,
    "curves_synthetic": _memoized(_curves_synthetic),
}


def names() -> list[str]:
    """Dataset names accepted by :func:`load`."""
    return list(_LOADERS)


# ---------------------------------------------------------------------- split & normalize
def _fraction(key: str, value: float) -> None:
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{key}={value!r} must be in [0, 1)")


_Parts = dict[str, tuple[np.ndarray, np.ndarray | None]]


def _split(raw: _Raw, rng: np.random.Generator, val_fraction: float, test_fraction: float, limit: int | None) -> _Parts:
    """Shuffled ``train`` / ``val`` / ``test`` arrays of ``raw`` (the official test set when there is one,
    else ``test_fraction`` of the samples), each cut to ``limit`` samples."""
    x, y = raw.x, raw.y
    perm = rng.permutation(len(x))
    x, y = x[perm], (y[perm] if y is not None else None)
    if raw.x_test is None:
        n_test = int(round(test_fraction * len(x)))
        xt, yt = x[:n_test], (y[:n_test] if y is not None else None)
        x, y = x[n_test:], (y[n_test:] if y is not None else None)
    else:
        tperm = rng.permutation(len(raw.x_test))
        xt, yt = raw.x_test[tperm], (raw.y_test[tperm] if raw.y_test is not None else None)
    n_val = int(round(val_fraction * len(x)))
    parts = {
        "train": (x[n_val:], None if y is None else y[n_val:]),
        "val": (x[:n_val], None if y is None else y[:n_val]),
        "test": (xt, yt),
    }
    if limit is not None:
        parts = {k: (a[:limit], None if b is None else b[:limit]) for k, (a, b) in parts.items()}
    return parts


def _normalizer(xtr: np.ndarray, normalize: str) -> Callable[[np.ndarray], np.ndarray]:
    """The map of :class:`Normalization` ``normalize`` with the statistics of the training inputs ``xtr``."""
    if normalize == "standard":
        mu, sd = xtr.mean(0), xtr.std(0)
        sd = np.where(sd > 1e-8, sd, np.inf)  # constant features map to 0
        return lambda a: (a - mu) / sd
    if normalize == "unit":
        lo, hi = xtr.min(), xtr.max()
        scale = (hi - lo) if hi > lo else 1.0
        return lambda a: (a - lo) / scale
    return lambda a: a


def load(
    name: str = "digits",
    *,
    data_dir: str | os.PathLike = "data",
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    normalize: str = "standard",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    download: bool = True,
    limit: int | None = None,
) -> DataSplits:
    """Load ``name`` and return its seeded, normalized train / val / test splits (see module doc)."""
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(names())}")
    Normalization.parse(normalize, "normalize")
    _fraction("val_fraction", val_fraction)
    _fraction("test_fraction", test_fraction)
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit!r} must be >= 1 (or None for all samples)")
    raw = _LOADERS[name](Path(data_dir), download)
    parts = _split(raw, np.random.default_rng(seed), val_fraction, test_fraction, limit)

    xtr = parts["train"][0].astype(np.float64)
    if len(xtr) == 0:
        raise ValueError(f"dataset {name!r}: the training split is empty (val_fraction={val_fraction})")
    norm = _normalizer(xtr, normalize)

    out = {}
    for k, (a, b) in parts.items():
        X = torch.as_tensor(norm(a.astype(np.float64)), dtype=dtype)
        Y = X.flatten(1).clone() if b is None else torch.as_tensor(np.asarray(b), dtype=torch.int64)
        out[k] = (X, Y)
    return DataSplits(out["train"], out["val"], out["test"], raw.num_classes, tuple(raw.x.shape[1:]), name)
