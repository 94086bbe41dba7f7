"""Dataset loaders on tiny generated files (never the network)."""

from __future__ import annotations

import gzip
import hashlib
import struct

import numpy as np
import pytest
import torch

from tensorcurv.experiments import curves_synthetic, dataset_files
from tensorcurv.experiments import data as data


def write_idx(path, arr: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape)
    payload = header + arr.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(payload)


def make_idx_dataset(folder, n_train=30, n_test=10, compress=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for stem, arr in arrays.items():
        write_idx(folder / (stem + (".gz" if compress else "")), arr, compress)
    return arrays


def test_names_lists_every_dataset():
    assert data.names() == [
        "digits",
        "mnist1d",
        "mnist",
        "fashion_mnist",
        "cifar10",
        "curves",
        "faces",
        "mnist_all",
        "curves_synthetic",
    ]


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
    torch.testing.assert_close(
        X[:, varying].std(0, unbiased=False), torch.ones(int(varying.sum()), dtype=torch.float64)
    )


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
    monkeypatch.setitem(dataset_files.MIRRORS, "mnist", [mirror.as_uri() + "/"])
    monkeypatch.setitem(dataset_files.MD5, "mnist", md5)
    s = data.load("mnist", data_dir=tmp_path / "d", val_fraction=0.25)
    assert s.sizes() == {"train": 6, "val": 2, "test": 4}
    assert (tmp_path / "d" / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()


def test_download_with_wrong_checksum_fails_and_leaves_no_file(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    make_idx_dataset(mirror, n_train=8, n_test=4)
    monkeypatch.setitem(dataset_files.MIRRORS, "mnist", [mirror.as_uri() + "/"])
    monkeypatch.setitem(dataset_files.MD5, "mnist", {f.name: "0" * 32 for f in mirror.iterdir()})
    with pytest.raises(ValueError, match="checksum mismatch"):
        data.load("mnist", data_dir=tmp_path / "d")
    assert not any((tmp_path / "d" / "mnist").iterdir())


def test_unreachable_mirror_gives_the_missing_file_error(tmp_path, monkeypatch):
    monkeypatch.setitem(dataset_files.MIRRORS, "mnist", [(tmp_path / "nowhere").as_uri() + "/"])
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
        dataset_files.read_cifar_batch(tmp_path / "bad.bin")


def test_curves_mat_file_gives_autoencoding_targets(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    (tmp_path / "curves").mkdir()
    savemat(tmp_path / "curves" / "digs3pts_1.mat", {"bdata": rng.random((20, 784)), "bdatatest": rng.random((5, 784))})
    s = data.load("curves", data_dir=tmp_path, val_fraction=0.25, normalize="none", dtype=torch.float64)
    assert s.num_classes is None and s.input_shape == (1, 28, 28)
    assert s.sizes() == {"train": 15, "val": 5, "test": 5}
    torch.testing.assert_close(s.train[1], s.train[0].flatten(1), rtol=0, atol=0)


def test_faces_mat_file_columns_are_samples_first_25_40_train_last_10_40_test(tmp_path):
    from scipy.io import savemat

    a = np.tile(np.arange(16, dtype=np.float64), (625, 1))  # 16 faces, one per column, face j is all j
    (tmp_path / "faces").mkdir()
    savemat(tmp_path / "faces" / "newfaces_rot_single.mat", {"newfaces_single": a})
    s = data.load("faces", data_dir=tmp_path, val_fraction=0.0, normalize="none", dtype=torch.float64)
    assert s.input_shape == (1, 25, 25) and s.sizes() == {"train": 10, "val": 0, "test": 4}
    assert sorted(int(x[0, 0, 0]) for x in s.train[0]) == list(range(10))  # columns 0..9 (25/40 of 16)
    assert sorted(int(x[0, 0, 0]) for x in s.test[0]) == [12, 13, 14, 15]  # the last 10/40; 10, 11 unused


def test_faces_split_of_the_published_file_is_103500_train_41400_test():
    assert data.faces_split(165_600) == (103_500, 41_400)


def write_mnist_all(path, n_train=3, n_test=2, seed=0):
    """A file with the layout of Roweis' mnist_all.mat: train0..train9 / test0..test9, uint8 rows of 784."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    arrays = {
        f"{split}{d}": rng.integers(0, 256, (n + d % 2, 784), dtype=np.uint8)
        for split, n in (("train", n_train), ("test", n_test))
        for d in range(10)
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, arrays)
    return arrays


def test_mnist_all_mat_file_labels_come_from_the_variable_names(tmp_path):
    arrays = write_mnist_all(tmp_path / "mnist_all" / "mnist_all.mat")
    s = data.load("mnist_all", data_dir=tmp_path, val_fraction=0.0, normalize="none", dtype=torch.float64)
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    assert s.sizes() == {"train": 35, "val": 0, "test": 25}  # 10 digits × 3 (+1 for odd digits)
    for x, y in zip(s.test[0], s.test[1]):
        rows = arrays[f"test{int(y)}"].astype(np.float64)
        assert (rows == x.reshape(-1).numpy()).all(1).any()  # the image is one of its digit's rows


def test_mnist_all_images_are_row_major_28_by_28(tmp_path):
    from scipy.io import savemat

    arrays = {f"{split}{d}": np.zeros((1, 784), dtype=np.uint8) for split in ("train", "test") for d in range(10)}
    arrays["train3"][0, 5 * 28 + 7] = 255  # row 5, column 7 of the image
    (tmp_path / "mnist_all").mkdir()
    savemat(tmp_path / "mnist_all" / "mnist_all.mat", arrays)
    s = data.load("mnist_all", data_dir=tmp_path, val_fraction=0.0, normalize="none")
    x = s.train[0][s.train[1] == 3][0, 0]
    assert float(x[5, 7]) == 255.0 and float(x.sum()) == 255.0


def test_a_mat_file_without_the_expected_variable_names_what_it_holds(tmp_path):
    from scipy.io import savemat

    (tmp_path / "curves").mkdir()
    savemat(tmp_path / "curves" / "digs3pts_1.mat", {"data": np.zeros((2, 784))})
    with pytest.raises(ValueError, match=r"no variable 'bdata' \(found \['data'\]\)"):
        data.load("curves", data_dir=tmp_path)


def test_missing_mat_file_names_expected_file_and_where_it_is_published(tmp_path):
    with pytest.raises(FileNotFoundError, match="newfaces_rot_single.mat") as e:
        data.load("faces", data_dir=tmp_path)
    assert data.MAT_FILES_PAGE + "newfaces_rot_single.mat" in str(e.value)


# ---------------------------------------------------------------------- curves_synthetic
def test_synthetic_curves_are_images_in_zero_one_with_antialiased_strokes():
    x = curves_synthetic.make_curves_synthetic(50, seed=3)
    assert x.shape == (50, 28, 28) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    assert (x.reshape(50, -1).max(1) == 1.0).all()  # every image has a stroke
    assert ((x > 0) & (x < 1)).any(axis=(1, 2)).all()  # with partially covered (anti-aliased) edge pixels


def test_synthetic_curves_are_deterministic_in_the_seed():
    a, b, c = (
        curves_synthetic.make_curves_synthetic(20, seed=1),
        curves_synthetic.make_curves_synthetic(20, seed=1),
        curves_synthetic.make_curves_synthetic(20, seed=2),
    )
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_synthetic_curves_do_not_depend_on_the_chunk_size():
    assert np.array_equal(
        curves_synthetic.make_curves_synthetic(30, seed=0, chunk=7), curves_synthetic.make_curves_synthetic(30, seed=0)
    )


def test_the_spline_passes_through_its_three_points_at_their_chord_length_knots():
    pts = np.array([[[3.0, 4.0], [10.0, 20.0], [25.0, 7.0]], [[5.0, 5.0], [6.0, 5.0], [20.0, 22.0]]])
    h0 = np.linalg.norm(pts[:, 1] - pts[:, 0], axis=1)
    h1 = np.linalg.norm(pts[:, 2] - pts[:, 1], axis=1)
    for b in range(2):
        t = np.array([0.0, h0[b] / (h0[b] + h1[b]), 1.0])
        np.testing.assert_allclose(
            curves_synthetic.natural_spline_through_3_points(pts[b : b + 1], t)[0], pts[b], atol=1e-6
        )


def test_the_spline_is_straight_through_collinear_points():
    pts = np.array([[[2.0, 2.0], [10.0, 10.0], [20.0, 20.0]]])
    c = curves_synthetic.natural_spline_through_3_points(pts, np.linspace(0, 1, 11))[0]
    np.testing.assert_allclose(c[:, 0], c[:, 1], atol=1e-9)


def test_a_horizontal_stroke_has_the_box_filter_profile():
    # control points on the row y = 10: a pixel at distance d from it gets clip(1.25 − d, 0, 1); the
    # curve samples are 16/319 px apart, so d is off by at most √(1 + 0.025²) − 1 < 4e-4 at d = 1
    x = curves_synthetic.draw_curves(np.array([[[4.0, 10.0], [12.0, 10.0], [20.0, 10.0]]]), side=28, line_width=1.5)[0]
    np.testing.assert_allclose(x[7:14, 12], [0.0, 0.0, 0.25, 1.0, 0.25, 0.0, 0.0], atol=4e-4)
    assert float(x[10, 2]) == 0.0 and float(x[10, 3]) == pytest.approx(0.25, abs=4e-4)  # 1 px before the end


def test_curves_synthetic_is_generated_once_then_read_from_its_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CURVES_SYNTHETIC_SIZES", (40, 20))
    first = data.load("curves_synthetic", data_dir=tmp_path, val_fraction=0.25, normalize="none", dtype=torch.float64)
    assert first.sizes() == {"train": 30, "val": 10, "test": 20} and first.num_classes is None
    assert first.input_shape == (1, 28, 28)
    torch.testing.assert_close(first.train[1], first.train[0].flatten(1), rtol=0, atol=0)
    assert len(list((tmp_path / "curves_synthetic").glob("*_40x20.npz"))) == 1

    def no_generation(*a, **k):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(data, "make_curves_synthetic", no_generation)
    again = data.load("curves_synthetic", data_dir=tmp_path, val_fraction=0.25, normalize="none", dtype=torch.float64)
    assert torch.equal(first.test[0], again.test[0])


def test_curves_synthetic_cache_holds_the_generator_output(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CURVES_SYNTHETIC_SIZES", (6, 4))
    data.load("curves_synthetic", data_dir=tmp_path, normalize="none")
    (cache,) = (tmp_path / "curves_synthetic").glob("*.npz")
    expected = curves_synthetic.make_curves_synthetic(10, curves_synthetic.CURVES_SYNTHETIC_SEED)
    with np.load(cache) as f:
        assert np.array_equal(f["train"], expected[:6]) and np.array_equal(f["test"], expected[6:])


def test_mnist1d_is_generated_locally_without_touching_numpy_global_rng():
    pytest.importorskip("mnist1d")
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    s = data.load("mnist1d", limit=50)
    assert np.array_equal(np.random.get_state()[1], before)
    assert s.input_shape == (40,) and s.num_classes == 10 and s.sizes() == {"train": 50, "val": 50, "test": 50}


def test_mnist1d_has_its_standard_sizes():
    pytest.importorskip("mnist1d")
    s = data.load("mnist1d", val_fraction=0.0)
    assert s.sizes() == {"train": 4000, "val": 0, "test": 1000}
