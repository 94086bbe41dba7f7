"""Dataset loaders on tiny generated files (never the network)."""
from __future__ import annotations

import gzip
import hashlib
import struct

import numpy as np
import pytest
import torch

from tensorcurv.experiments import data as data


def write_idx(path, arr: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape)
    payload = header + arr.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(payload)


def make_idx_dataset(folder, n_train=30, n_test=10, compress=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
    for stem, arr in arrays.items():
        write_idx(folder / (stem + (".gz" if compress else "")), arr, compress)
    return arrays


def test_names_lists_every_dataset():
    assert data.names() == ["digits", "mnist1d", "mnist", "fashion_mnist", "cifar10", "curves", "faces"]


def test_digits_splits_have_requested_sizes_and_image_shape():
    s = data.load("digits", val_fraction=0.1, test_fraction=0.2, seed=0)
    assert s.input_shape == (1, 8, 8) and s.num_classes == 10
    assert s.sizes() == {"train": 1294, "val": 144, "test": 359}  # 1797: 359 test, 10% of 1438 val
    assert s.train[0].shape == (1294, 1, 8, 8) and s.train[1].dtype == torch.int64


def test_splits_are_disjoint_and_cover_the_dataset():
    s = data.load("digits", normalize="none", seed=3)
    rows = torch.cat([s.train[0], s.val[0], s.test[0]]).flatten(1)
    from sklearn.datasets import load_digits

    ref = torch.as_tensor(load_digits().data, dtype=torch.float32)
    key = lambda M: sorted(map(tuple, M.tolist()))  # noqa: E731
    assert key(rows) == key(ref)


def test_same_seed_same_split_and_other_seed_other_split():
    a, b, c = (data.load("digits", seed=k) for k in (0, 0, 1))
    assert torch.equal(a.train[0], b.train[0])
    assert not torch.equal(a.train[0], c.train[0])


def test_standard_normalization_uses_training_statistics():
    s = data.load("digits", normalize="standard", dtype=torch.float64)
    X = s.train[0].flatten(1)
    varying = X.std(0) > 0
    torch.testing.assert_close(X.mean(0), torch.zeros(64, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(X[:, varying].std(0, unbiased=False),
                               torch.ones(int(varying.sum()), dtype=torch.float64))


def test_unit_normalization_maps_training_set_to_zero_one():
    X = data.load("digits", normalize="unit").train[0]
    assert float(X.min()) == 0.0 and float(X.max()) == 1.0


def test_bad_normalization_and_unknown_dataset_raise_naming_choices():
    with pytest.raises(ValueError, match="standard"):
        data.load("digits", normalize="zscore")
    with pytest.raises(ValueError, match="valid datasets: digits, mnist1d"):
        data.load("digitz")


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_files_load_with_official_test_split(tmp_path, compress):
    arrays = make_idx_dataset(tmp_path / "mnist", compress=compress)
    s = data.load("mnist", data_dir=tmp_path, val_fraction=0.2, normalize="none", download=False)
    assert s.input_shape == (1, 28, 28) and s.sizes() == {"train": 24, "val": 6, "test": 10}
    got = sorted(map(tuple, s.test[0].flatten(1).to(torch.uint8).tolist()))
    assert got == sorted(map(tuple, arrays["t10k-images-idx3-ubyte"].reshape(10, -1).tolist()))


def test_fashion_mnist_reads_its_own_folder(tmp_path):
    make_idx_dataset(tmp_path / "fashion_mnist", n_train=12, n_test=4)
    s = data.load("fashion_mnist", data_dir=tmp_path, val_fraction=0.25, download=False)
    assert s.sizes() == {"train": 9, "val": 3, "test": 4}


def test_missing_files_without_download_name_files_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.load("mnist", data_dir=tmp_path, download=False)
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz" in msg and str((tmp_path / "mnist").resolve()) in msg


def test_download_verifies_md5_from_a_mirror(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    make_idx_dataset(mirror, n_train=8, n_test=4)
    md5 = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in mirror.iterdir()}
    monkeypatch.setitem(data.MIRRORS, "mnist", [mirror.as_uri() + "/"])
    monkeypatch.setitem(data.MD5, "mnist", md5)
    s = data.load("mnist", data_dir=tmp_path / "d", val_fraction=0.25)
    assert s.sizes() == {"train": 6, "val": 2, "test": 4}
    assert (tmp_path / "d" / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()


def test_download_with_wrong_checksum_fails_and_leaves_no_file(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    make_idx_dataset(mirror, n_train=8, n_test=4)
    monkeypatch.setitem(data.MIRRORS, "mnist", [mirror.as_uri() + "/"])
    monkeypatch.setitem(data.MD5, "mnist", {f.name: "0" * 32 for f in mirror.iterdir()})
    with pytest.raises(ValueError, match="checksum mismatch"):
        data.load("mnist", data_dir=tmp_path / "d")
    assert not any((tmp_path / "d" / "mnist").iterdir())


def test_unreachable_mirror_gives_the_missing_file_error(tmp_path, monkeypatch):
    monkeypatch.setitem(data.MIRRORS, "mnist", [(tmp_path / "nowhere").as_uri() + "/"])
    with pytest.raises(FileNotFoundError, match="no network"):
        data.load("mnist", data_dir=tmp_path)


def test_cifar10_binary_batches(tmp_path):
    rng = np.random.default_rng(0)
    bdir = tmp_path / "cifar10" / "cifar-10-batches-bin"
    bdir.mkdir(parents=True)
    images, labels = {}, {}
    for f, n in [(f"data_batch_{i}.bin", 3) for i in range(1, 6)] + [("test_batch.bin", 4)]:
        img = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        lab = rng.integers(0, 10, n, dtype=np.uint8)
        rec = np.concatenate([lab[:, None], img.reshape(n, -1)], axis=1)
        rec.tofile(bdir / f)
        images[f], labels[f] = img, lab
    s = data.load("cifar10", data_dir=tmp_path, val_fraction=0.2, normalize="none", download=False)
    assert s.input_shape == (3, 32, 32) and s.sizes() == {"train": 12, "val": 3, "test": 4}
    order = torch.as_tensor(images["test_batch.bin"].reshape(4, -1), dtype=torch.float32)
    # each test image keeps its label through the shuffle
    for x, y in zip(s.test[0].flatten(1), s.test[1]):
        i = int(torch.nonzero((order == x).all(1))[0])
        assert int(y) == int(labels["test_batch.bin"][i])


def test_cifar_record_size_is_checked(tmp_path):
    (tmp_path / "bad.bin").write_bytes(b"\0" * 3000)
    with pytest.raises(ValueError, match="3073"):
        data.read_cifar_batch(tmp_path / "bad.bin")


def test_curves_mat_file_gives_autoencoding_targets(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    (tmp_path / "curves").mkdir()
    savemat(tmp_path / "curves" / "digs3pts_1.mat", {"bdata": rng.random((20, 784)), "bdatatest": rng.random((5, 784))})
    s = data.load("curves", data_dir=tmp_path, val_fraction=0.25, normalize="none", dtype=torch.float64)
    assert s.num_classes is None and s.input_shape == (1, 28, 28)
    assert s.sizes() == {"train": 15, "val": 5, "test": 5}
    torch.testing.assert_close(s.train[1], s.train[0].flatten(1), rtol=0, atol=0)


def test_faces_mat_file_columns_are_samples_last_quarter_is_test(tmp_path):
    from scipy.io import savemat

    a = np.arange(625 * 8, dtype=np.float64).reshape(625, 8)  # 8 faces, one per column
    (tmp_path / "faces").mkdir()
    savemat(tmp_path / "faces" / "newfaces_rot_single.mat", {"newfaces_single": a})
    s = data.load("faces", data_dir=tmp_path, val_fraction=0.0, normalize="none", dtype=torch.float64)
    assert s.input_shape == (1, 25, 25) and s.sizes() == {"train": 6, "val": 0, "test": 2}
    test_cols = sorted(int(x[0, 0, 0]) for x in s.test[0])
    assert test_cols == [6, 7]  # first entries of columns 6 and 7


def test_missing_mat_file_names_expected_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="newfaces_rot_single.mat"):
        data.load("faces", data_dir=tmp_path)


def test_mnist1d_is_generated_locally_without_touching_numpy_global_rng():
    pytest.importorskip("mnist1d")
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    s = data.load("mnist1d", limit=50)
    assert np.array_equal(np.random.get_state()[1], before)
    assert s.input_shape == (40,) and s.num_classes == 10 and s.sizes() == {"train": 50, "val": 50, "test": 50}
