"""Tests of ntk_tickets.data against invariants, hand computations and files written here."""

from __future__ import annotations

import functools
import gzip
import hashlib
import random
from pathlib import Path

import numpy as np
import pytest

from ntk_tickets.config import DataConfig
from ntk_tickets.data import Dataset, load_dataset
from ntk_tickets.errors import UserInputError

GENERATED = ("teacher", "sine", "digits", "mnist1d")
CLASSIFICATION = ("digits", "mnist1d")
IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _cfg(name: str, **kwargs) -> DataConfig:
    return DataConfig(**{"name": name, "n_train": 60, "n_test": 40, **kwargs})


@functools.cache
def _load(cfg: DataConfig, loss: str = "mse") -> Dataset:
    """Cached: the arrays are read-only, so tests can share them."""
    return load_dataset(cfg, loss)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Writes uint8 ``array`` in the MNIST IDX format, gzipped if the name ends in .gz."""
    header = bytes((0, 0, 0x08, array.ndim)) + np.asarray(array.shape, ">u4").tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def _idx_arrays(n_train: int = 30, n_test: int = 20, n_classes: int = 3) -> dict:
    """Tiny 4×5 images with distinct first pixels (to match rows) and balanced labels."""
    rng = np.random.default_rng(7)
    out = {}
    for split, n, start in (("train", n_train, 0), ("test", n_test, n_train)):
        x = rng.integers(0, 256, (n, 4, 5), dtype=np.uint8)
        x[:, 0, 0] = np.arange(start, start + n)
        out[f"x_{split}"] = x
        out[f"y_{split}"] = (np.arange(n) % n_classes).astype(np.uint8)
    return out


def _write_idx_folder(folder: Path, arrays: dict, gz: bool) -> Path:
    folder.mkdir(exist_ok=True)
    for key, base in IDX_NAMES.items():
        _write_idx(folder / (base + (".gz" if gz else "")), arrays[key])
    return folder


def _npz_arrays(n_train: int = 40, n_test: int = 24, n_classes: int = 4) -> dict:
    """Gaussian x (n, 3, 2) whose first entry is a unique row id, balanced int labels."""
    rng = np.random.default_rng(3)
    out = {}
    for split, n, start in (("train", n_train, 0), ("test", n_test, n_train)):
        x = rng.standard_normal((n, 3, 2))
        x[:, 0, 0] = np.arange(start, start + n)
        out[f"x_{split}"] = x
        out[f"y_{split}"] = np.arange(n) % n_classes
    return out


def _write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


# --------------------------------------------------------------------- shapes and encoding


@pytest.mark.parametrize(
    ("name", "loss", "input_shape", "n_classes"),
    [
        ("teacher", "mse", (5,), 0),
        ("sine", "mse", (1,), 0),
        ("digits", "mse", (8, 8, 1), 10),
        ("digits", "xent", (8, 8, 1), 10),
        ("mnist1d", "mse", (40, 1), 10),
        ("mnist1d", "xent", (40, 1), 10),
    ],
)
def test_shapes_and_dtypes(name, loss, input_shape, n_classes):
    ds = _load(_cfg(name, input_dim=5), loss)
    assert ds.name == name
    assert ds.input_shape == input_shape
    assert ds.n_classes == n_classes
    assert ds.n_out == (n_classes or 1)
    assert ds.x_train.shape == (60, *input_shape) and ds.x_test.shape == (40, *input_shape)
    assert ds.x_train.dtype == ds.x_test.dtype == np.float64
    if loss == "xent":
        assert ds.y_train.shape == (60,) and ds.y_test.shape == (40,)
        assert ds.y_train.dtype == ds.y_test.dtype == np.int32
        assert 0 <= min(ds.y_train.min(), ds.y_test.min())
        assert max(ds.y_train.max(), ds.y_test.max()) < n_classes
    else:
        assert ds.y_train.shape == (60, ds.n_out) and ds.y_test.shape == (40, ds.n_out)
        assert ds.y_train.dtype == ds.y_test.dtype == np.float64
    assert len(ds.fingerprint) == 16 and int(ds.fingerprint, 16) >= 0


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_centred_one_hot_matches_labels(name):
    mse, xent = _load(_cfg(name)), _load(_cfg(name), "xent")
    k = mse.n_classes
    for onehot, labels in ((mse.y_train, xent.y_train), (mse.y_test, xent.y_test)):
        np.testing.assert_allclose(onehot.sum(axis=1), 0.0, atol=1e-12)
        expected = np.full(onehot.shape, -1.0 / k)
        expected[np.arange(len(labels)), labels] += 1.0
        np.testing.assert_array_equal(onehot, expected)
    np.testing.assert_array_equal(mse.x_train, xent.x_train)


def test_arrays_are_read_only():
    ds = _load(_cfg("sine"))
    with pytest.raises(ValueError, match="read-only"):
        ds.x_train[0, 0] = 1.0


# --------------------------------------------------------------------- standardization


def _floored_sigma(x_train: np.ndarray, std_floor: float) -> np.ndarray:
    """The rule of the module docstring, step 2: σ̃ = max(σ, c·s), s = RMS of σ; σ̃ := 1 if
    still ≤ 1e-8·(1 + |μ|)."""
    mu, sigma = x_train.mean(axis=0), x_train.std(axis=0)
    floored = np.maximum(sigma, std_floor * np.sqrt(np.mean(sigma**2)))
    return np.where(floored > 1e-8 * (1.0 + np.abs(mu)), floored, 1.0)


@pytest.mark.parametrize("std_floor", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("name", GENERATED)
def test_standardization_uses_training_statistics(name, std_floor):
    raw = _load(_cfg(name, standardize=False))
    std = _load(_cfg(name, standardize=True, std_floor=std_floor))
    np.testing.assert_array_equal(raw.y_train, std.y_train)  # same subsets either way
    mu, sigma = raw.x_train.mean(axis=0), raw.x_train.std(axis=0)
    scale = _floored_sigma(raw.x_train, std_floor)
    floor = std_floor * np.sqrt(np.mean(sigma**2))
    loud = (sigma >= floor) & (sigma > 1e-6)  # at least the typical spread: unit variance
    assert loud.any()
    np.testing.assert_allclose(std.x_train.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(std.x_train.std(axis=0)[loud], 1.0, rtol=1e-10)
    # quieter features keep their relative scale σ / (c·s) < 1, constant ones stay 0
    np.testing.assert_allclose(std.x_train.std(axis=0)[~loud], (sigma / scale)[~loud],
                               rtol=1e-8, atol=1e-12)
    assert np.all(std.x_train.std(axis=0) <= 1.0 + 1e-10)
    np.testing.assert_allclose(std.x_test, (raw.x_test - mu) / scale, rtol=1e-10, atol=1e-12)


def test_std_floor_on_a_hand_built_array():
    from ntk_tickets.data import _standardize

    # columns: σ = 1 (values 0, 2), σ = 0 (constant 5), σ = 3 (values 0, 6); μ = (1, 5, 3)
    x_train = np.array([[0.0, 5.0, 0.0], [2.0, 5.0, 6.0]])
    x_test = np.array([[4.0, 7.0, -3.0]])
    s = np.sqrt(10.0 / 3.0)  # RMS of (1, 0, 3)
    expected = {  # std_floor: (x_train, x_test) by hand
        0.0: ([[-1.0, 0.0, -1.0], [1.0, 0.0, 1.0]], [[3.0, 2.0, -2.0]]),
        0.5: ([[-1.0, 0.0, -1.0], [1.0, 0.0, 1.0]], [[3.0, 2.0 / (0.5 * s), -2.0]]),
        1.0: ([[-1.0 / s, 0.0, -1.0], [1.0 / s, 0.0, 1.0]], [[3.0 / s, 2.0 / s, -2.0]]),
        2.0: ([[-1 / (2 * s), 0, -3 / (2 * s)], [1 / (2 * s), 0, 3 / (2 * s)]],
              [[3 / (2 * s), 2 / (2 * s), -6 / (2 * s)]]),
    }
    for std_floor, (train, test) in expected.items():
        got_train, got_test = _standardize(x_train, x_test, std_floor)
        np.testing.assert_allclose(got_train, train, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(got_test, test, rtol=1e-12, atol=1e-15)
    # all features constant: s = 0, so the floor is 0 and the constant rule centres only
    got_train, got_test = _standardize(np.full((3, 2), 4.0), np.array([[5.0, 1.0]]), 1.0)
    np.testing.assert_array_equal(got_train, 0.0)
    np.testing.assert_array_equal(got_test, [[1.0, -3.0]])


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(len(a), -1)


def test_default_floor_bounds_digits_test_features():
    cfg = _cfg("digits", n_train=256, n_test=256, standardize=True)
    assert cfg.std_floor == 1.0  # the documented default
    assert not _cfg("digits").standardize  # off unless asked for
    raw, std = _load(_cfg("digits", n_train=256, n_test=256, standardize=False)), _load(cfg)
    x_raw = np.concatenate([_flat(raw.x_train), _flat(raw.x_test)])
    sigma = _flat(raw.x_train).std(axis=0)
    s = np.sqrt(np.mean(sigma**2))
    # μ_j lies within feature j's range and σ̃_j ≥ c·s: |z_j| ≤ (max_j − min_j) / (c·s)
    bound = (x_raw.max(axis=0) - x_raw.min(axis=0)) / (cfg.std_floor * s)
    z_test = np.abs(_flat(std.x_test))
    assert np.all(z_test <= bound + 1e-12)
    assert z_test.max() <= bound.max() < 4.0  # 1 / s ≈ 3.7 for pixels in [0, 1]
    norms = np.linalg.norm(_flat(std.x_test), axis=1)
    assert norms.max() / np.median(norms) < 3.0  # measured 1.43


def test_std_floor_zero_is_the_old_plain_standardization():
    raw = _load(_cfg("digits", n_train=256, n_test=256, standardize=False))
    old = _load(_cfg("digits", n_train=256, n_test=256, standardize=True, std_floor=0.0))
    mu, sigma = _flat(raw.x_train).mean(axis=0), _flat(raw.x_train).std(axis=0)
    scale = np.where(sigma > 1e-8 * (1.0 + np.abs(mu)), sigma, 1.0)  # the rule before
    np.testing.assert_allclose(_flat(old.x_train), (_flat(raw.x_train) - mu) / scale,
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_flat(old.x_test), (_flat(raw.x_test) - mu) / scale,
                               rtol=1e-12, atol=1e-12)
    # ... and the blow-up that the floor removes: test pixels at z = 64, norm ratio ≈ 9.8
    norms = np.linalg.norm(_flat(old.x_test), axis=1)
    assert np.abs(old.x_test).max() > 30.0
    assert norms.max() / np.median(norms) > 3.0


@pytest.mark.parametrize("std_floor", [0.0, 1.0])
def test_constant_training_pixel_does_not_blow_up_test(tmp_path, std_floor):
    arrays = _npz_arrays()
    arrays["x_train"][:, 2, 1] = 5.0
    arrays["x_test"][:, 2, 1] = 6.0
    path = _write_npz(tmp_path / "c.npz", **arrays)
    ds = load_dataset(_cfg("npz", path=str(path), n_train=40, n_test=24, standardize=True,
                           std_floor=std_floor))
    # all 40 training rows are drawn: the floor c·s comes from the whole x_train
    s = np.sqrt(np.mean(arrays["x_train"].std(axis=0) ** 2))
    np.testing.assert_allclose(ds.x_train[:, 2, 1], 0.0, atol=1e-12)
    # c = 0: only centred (σ := 1); c = 1: divided by the floor s like any quiet feature
    np.testing.assert_allclose(ds.x_test[:, 2, 1], 1.0 / (std_floor * s or 1.0), rtol=1e-12)


# --------------------------------------------------------------------- subsets


@pytest.mark.parametrize("name", CLASSIFICATION)
@pytest.mark.parametrize(("n_train", "n_test"), [(103, 47), (60, 40)])
def test_class_balance_exact_counts(name, n_train, n_test):
    ds = _load(_cfg(name, n_train=n_train, n_test=n_test), "xent")
    for labels, n in ((ds.y_train, n_train), (ds.y_test, n_test)):
        counts = np.bincount(labels, minlength=10)
        assert counts.sum() == n
        assert set(counts.tolist()) <= {n // 10, n // 10 + 1}
        assert (counts == n // 10 + 1).sum() == n % 10


def test_digits_train_test_disjoint_rows_of_the_pool():
    from sklearn.datasets import load_digits

    # 1740 = 10 × 174, the most that the smallest class (8: 174 images) allows balanced
    ds = _load(_cfg("digits", n_train=1000, n_test=740, standardize=False))
    train = {row.tobytes() for row in ds.x_train.reshape(1000, -1)}
    test = {row.tobytes() for row in ds.x_test.reshape(740, -1)}
    assert len(train) == 1000 and len(test) == 740
    assert not train & test
    assert train | test <= {row.tobytes() for row in load_digits().data / 16.0}


def test_mnist1d_train_test_disjoint():
    ds = _load(_cfg("mnist1d", n_train=103, n_test=47, standardize=False))
    train = {row.tobytes() for row in ds.x_train}
    assert not train & {row.tobytes() for row in ds.x_test}


# --------------------------------------------------------------------- determinism and RNG


@pytest.mark.parametrize("name", GENERATED)
def test_deterministic_and_seed_dependent(name):
    a, b = load_dataset(_cfg(name)), _load(_cfg(name))
    assert a.fingerprint == b.fingerprint
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    other = _load(_cfg(name, seed=1))
    assert other.fingerprint != a.fingerprint
    assert not np.array_equal(other.x_train, a.x_train)


def test_fingerprint_tracks_each_array():
    base = _load(_cfg("sine"))
    noisy = _load(_cfg("sine", noise=0.1))  # only y_train differs
    np.testing.assert_array_equal(base.x_train, noisy.x_train)
    np.testing.assert_array_equal(base.y_test, noisy.y_test)
    assert noisy.fingerprint != base.fingerprint
    assert _load(_cfg("digits")).fingerprint != _load(_cfg("digits"), "xent").fingerprint


@pytest.mark.parametrize("name", [*GENERATED, "npz", "idx"])
def test_global_rng_state_untouched_and_irrelevant(name, tmp_path):
    paths = {
        "npz": lambda: _write_npz(tmp_path / "d.npz", **_npz_arrays()),
        "idx": lambda: _write_idx_folder(tmp_path / "idx", _idx_arrays(), gz=False),
    }
    cfg = _cfg(name, n_train=20, n_test=10, path=str(paths[name]()) if name in paths else "")
    fingerprints = []
    for global_seed in (11, 12):
        np.random.seed(global_seed)  # noqa: NPY002
        random.seed(global_seed)
        numpy_before, python_before = np.random.get_state(), random.getstate()  # noqa: NPY002
        fingerprints.append(load_dataset(cfg).fingerprint)
        numpy_after = np.random.get_state()  # noqa: NPY002
        assert numpy_after[0] == numpy_before[0]
        np.testing.assert_array_equal(numpy_after[1], numpy_before[1])
        assert numpy_after[2:] == numpy_before[2:]
        assert random.getstate() == python_before
    assert fingerprints[0] == fingerprints[1]


# --------------------------------------------------------------------- regression data


def test_teacher_targets_have_order_one_variance_and_train_only_noise():
    clean = _load(_cfg("teacher", n_train=400, n_test=400, noise=0.0))
    noisy = _load(_cfg("teacher", n_train=400, n_test=400, noise=0.5))
    assert 0.3 < np.mean(clean.y_train**2) < 3.0
    np.testing.assert_array_equal(clean.x_train, noisy.x_train)
    np.testing.assert_array_equal(clean.y_test, noisy.y_test)
    assert np.std(noisy.y_train - clean.y_train) == pytest.approx(0.5, rel=0.15)


def test_sine_targets_are_sin_of_inputs():
    ds = _load(_cfg("sine", standardize=False))
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert np.all(np.abs(x) <= np.pi)
        np.testing.assert_allclose(y, np.sin(x), atol=1e-15)


def test_xent_on_regression_is_refused():
    with pytest.raises(UserInputError, match="train.loss"):
        load_dataset(_cfg("teacher"), "xent")


# --------------------------------------------------------------------- label noise


def test_label_noise_changes_the_expected_fraction_of_training_labels_only():
    """round(p·n) labels get a uniform class, so each changes with probability (K−1)/K.

    The number changed is Binomial(m = round(p·n), (K−1)/K); the bound is 4 of its standard
    deviations (digits, K = 10, n = 1000, p = 0.5: m = 500, expected 450 ± 6.7).
    """
    p, n, k = 0.5, 1000, 10
    clean = _load(_cfg("digits", n_train=n, n_test=300), "xent")
    noisy = _load(_cfg("digits", n_train=n, n_test=300, label_noise=p), "xent")
    changed = int(np.sum(noisy.y_train != clean.y_train))
    m, q = round(p * n), (k - 1) / k
    assert changed <= m
    assert abs(changed - m * q) <= 4 * np.sqrt(m * q * (1 - q)), changed
    assert noisy.y_train.min() >= 0 and noisy.y_train.max() < k
    for field in ("x_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(noisy, field), getattr(clean, field))
    onehot = _load(_cfg("digits", n_train=n, n_test=300, label_noise=p))  # mse: same labels
    np.testing.assert_array_equal(onehot.y_train.argmax(axis=1), noisy.y_train)


def test_label_noise_zero_is_the_data_without_it_and_noise_is_deterministic():
    cfg = _cfg("digits")
    plain = _load(cfg)
    # The fingerprint as it was computed before label noise existed (name, K, arrays).
    digest = hashlib.sha256(f"{plain.name}|{plain.n_classes}".encode())
    for a in (plain.x_train, plain.y_train, plain.x_test, plain.y_test):
        digest.update(f"|{a.dtype.str}{a.shape}|".encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    assert plain.fingerprint == digest.hexdigest()[:16]
    zero = load_dataset(_cfg("digits", label_noise=0.0))
    assert zero.fingerprint == plain.fingerprint
    np.testing.assert_array_equal(zero.y_train, plain.y_train)
    noisy, again = (load_dataset(_cfg("digits", label_noise=0.3)) for _ in range(2))
    assert noisy.fingerprint == again.fingerprint != plain.fingerprint
    np.testing.assert_array_equal(noisy.y_train, again.y_train)
    other = load_dataset(_cfg("digits", label_noise=0.3, seed=1))
    assert other.fingerprint != noisy.fingerprint


def test_label_noise_on_regression_targets_is_refused_in_one_line(tmp_path):
    rng = np.random.default_rng(0)
    path = _write_npz(tmp_path / "r.npz", x_train=rng.standard_normal((20, 2)),
                      y_train=rng.standard_normal(20), x_test=rng.standard_normal((5, 2)),
                      y_test=rng.standard_normal(5))
    for cfg in (_cfg("npz", path=str(path), n_train=10, n_test=5, label_noise=0.1),
                _cfg("teacher", label_noise=0.1)):
        with pytest.raises(UserInputError, match="data.label_noise") as info:
            load_dataset(cfg)
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------- npz and idx files


def test_npz_classification_round_trip(tmp_path):
    arrays = _npz_arrays()
    path = _write_npz(tmp_path / "data.npz", **arrays)
    ds = load_dataset(_cfg("npz", path=str(path), n_train=20, n_test=24, standardize=False),
                      "xent")
    assert ds.n_classes == 4 and ds.input_shape == (3, 2)
    for split in ("train", "test"):
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        rows = x[:, 0, 0].astype(int) - (0 if split == "train" else 40)
        assert len(set(rows.tolist())) == len(rows)
        np.testing.assert_array_equal(x, arrays[f"x_{split}"][rows])
        np.testing.assert_array_equal(y, arrays[f"y_{split}"][rows])
    assert sorted(ds.y_test.tolist()) == sorted(arrays["y_test"].tolist())  # all of test


@pytest.mark.parametrize("y_shape", [(), (3,)])
def test_npz_regression_round_trip(tmp_path, y_shape):
    rng = np.random.default_rng(0)
    x_train, x_test = rng.standard_normal((30, 2)), rng.standard_normal((10, 2))
    x_train[:, 0] = np.arange(30)
    y_train, y_test = rng.standard_normal((30, *y_shape)), rng.standard_normal((10, *y_shape))
    path = _write_npz(tmp_path / "r.npz", x_train=x_train, y_train=y_train, x_test=x_test,
                      y_test=y_test)
    ds = load_dataset(_cfg("npz", path=str(path), n_train=12, n_test=10, standardize=False))
    assert ds.n_classes == 0 and ds.n_out == (y_shape or (1,))[0]
    rows = ds.x_train[:, 0].astype(int)
    np.testing.assert_array_equal(ds.x_train, x_train[rows])
    np.testing.assert_array_equal(ds.y_train, y_train[rows].reshape(12, -1))
    with pytest.raises(UserInputError, match="train.loss"):
        load_dataset(_cfg("npz", path=str(path), n_train=12, n_test=10), "xent")


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    arrays = _idx_arrays()
    folder = _write_idx_folder(tmp_path / "mnist", arrays, gz)
    ds = load_dataset(_cfg("idx", path=str(folder), n_train=30, n_test=20, standardize=False),
                      "xent")
    assert ds.n_classes == 3 and ds.input_shape == (4, 5, 1)
    for split, offset in (("train", 0), ("test", 30)):
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        assert 0.0 <= x.min() and x.max() <= 1.0
        rows = np.rint(x[:, 0, 0, 0] * 255).astype(int) - offset
        np.testing.assert_array_equal(np.sort(rows), np.arange(len(rows)))
        np.testing.assert_allclose(x[..., 0], arrays[f"x_{split}"][rows] / 255.0, rtol=1e-15)
        np.testing.assert_array_equal(y, arrays[f"y_{split}"][rows])


# --------------------------------------------------------------------- bad input


def _npz_case(tmp_path, mutate):
    arrays = _npz_arrays()
    mutate(arrays)
    return _write_npz(tmp_path / "bad.npz", **arrays)


NPZ_MUTATIONS = {
    "missing key": (lambda a: a.pop("y_test"), "y_test"),
    "x/y rows": (lambda a: a.update(y_train=a["y_train"][:-1]), "x_train"),
    "feature shapes": (lambda a: a.update(x_test=a["x_test"][:, :2]), "x_test"),
    "negative label": (lambda a: a["y_test"].__setitem__(0, -1), "negative"),
    "2-D int labels": (lambda a: a.update(y_train=a["y_train"][:, None]), "y_train"),
    "int/float mix": (lambda a: a.update(y_test=a["y_test"] * 1.0), "y_test"),
    "NaN inputs": (lambda a: a["x_train"].__setitem__((0, 1, 1), np.nan), "x_train"),
    "1-D inputs": (lambda a: a.update(x_train=a["x_train"][:, 0, 0]), "x_train"),
}


@pytest.mark.parametrize("case", NPZ_MUTATIONS)
def test_bad_npz_contents(tmp_path, case):
    mutate, word = NPZ_MUTATIONS[case]
    path = _npz_case(tmp_path, mutate)
    with pytest.raises(UserInputError, match=word) as info:
        load_dataset(_cfg("npz", path=str(path), n_train=8, n_test=8))
    assert "bad.npz" in str(info.value)


def _with_labels(y_train=None, y_test=None):
    def mutate(arrays):
        for key, values in (("y_train", y_train), ("y_test", y_test)):
            if values is not None:
                arrays[key] = np.asarray(values)
    return mutate


def _train_label(index, label):
    return _with_labels(y_train=[label if i == index else i % 4 for i in range(40)])


LABEL_CASES = {  # mutation, words the message must hold
    "label 1e9": (_train_label(5, 10**9), ("y_train in file", "1000000000", "at most 40")),
    "label 1e6": (_train_label(0, 10**6), ("y_train in file", "1000000", "at most 40")),
    "label n": (_train_label(3, 40), ("y_train in file", "label 40", "K <= 40")),
    "huge int64 label": (_train_label(0, 2**62), ("y_train in file", str(2**62))),
    "test label 1e9": (_with_labels(y_test=[10**9] + [i % 4 for i in range(23)]),
                       ("y_test in file", "1000000000", "0..3")),
    "test-only class": (_with_labels(y_test=[4] + [i % 4 for i in range(23)]),
                        ("y_test in file", "label 4", "0..3")),
    "gap": (_with_labels(y_train=[(0, 1, 3)[i % 3] for i in range(40)]),
            ("y_train in file", "no point of class 2")),
    "gaps": (_with_labels(y_train=[(1, 5)[i % 2] for i in range(40)]),
             ("y_train in file", "no point of class 0", "4 of the 6 classes 0..5")),
}


@pytest.mark.parametrize("case", LABEL_CASES)
def test_bad_class_labels(tmp_path, case):
    import time
    import tracemalloc

    mutate, words = LABEL_CASES[case]
    path = _npz_case(tmp_path, mutate)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(UserInputError) as info:
            load_dataset(_cfg("npz", path=str(path), n_train=8, n_test=8))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert time.perf_counter() - start < 5.0
    assert peak < 20 * 2**20  # nothing is sized by the label value (10⁹ int64 = 7.45 GiB)
    assert "\n" not in message and "bad.npz" in message
    assert "labels must be 0, 1, ..., K-1" in message
    for word in words:
        assert word in message, (word, message)


def test_bad_idx_labels(tmp_path):
    arrays = _idx_arrays()  # 30 training labels
    arrays["y_train"][4] = 200
    folder = _write_idx_folder(tmp_path / "idx", arrays, gz=False)
    with pytest.raises(UserInputError, match=f"{IDX_NAMES['y_train']} in idx folder .*"
                                             "label 200.* at most 30 classes"):
        load_dataset(_cfg("idx", path=str(folder), n_train=10, n_test=10))


def test_bad_npz_files(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    pickled = _write_npz(tmp_path / "pickled.npz", **{**_npz_arrays(),
                                                      "y_train": np.array([{}, 1], object)})
    for path in (garbage, single, pickled, tmp_path / "missing.npz"):
        with pytest.raises(UserInputError, match=path.name):
            load_dataset(_cfg("npz", path=str(path)))
    with pytest.raises(UserInputError, match="data.path"):
        load_dataset(_cfg("npz", path=str(tmp_path)))  # a folder


def _corrupt_idx(folder: Path, arrays: dict, case: str) -> str:
    """Damages one file of a good idx folder; returns the name the error must contain."""
    images = folder / IDX_NAMES["x_train"]
    if case == "missing file":
        (folder / IDX_NAMES["y_test"]).unlink()
        return IDX_NAMES["y_test"]
    if case == "bad magic":
        images.write_bytes(b"\x00\x00\x0d\x03" + images.read_bytes()[4:])
    elif case == "truncated":
        images.write_bytes(images.read_bytes()[:-7])
    elif case == "corrupt gzip":
        images.unlink()
        data = bytearray(gzip.compress(b"\x00" * 4000))
        data[20:40] = b"\xff" * 20
        (folder / (IDX_NAMES["x_train"] + ".gz")).write_bytes(bytes(data))
        return IDX_NAMES["x_train"] + ".gz"
    elif case == "label count":
        _write_idx(folder / IDX_NAMES["y_train"], arrays["y_train"][:-1])
        return IDX_NAMES["y_train"]
    elif case == "image shape":
        _write_idx(folder / IDX_NAMES["x_test"], arrays["x_test"][:, :3])
        return IDX_NAMES["x_test"]
    return IDX_NAMES["x_train"]


@pytest.mark.parametrize(
    "case",
    ["missing file", "bad magic", "truncated", "corrupt gzip", "label count", "image shape"],
)
def test_bad_idx_files(tmp_path, case):
    arrays = _idx_arrays()
    folder = _write_idx_folder(tmp_path / "idx", arrays, gz=False)
    name = _corrupt_idx(folder, arrays, case)
    with pytest.raises(UserInputError, match=name):
        load_dataset(_cfg("idx", path=str(folder), n_train=10, n_test=10))


@pytest.mark.parametrize(
    ("kwargs", "loss", "field"),
    [
        ({"name": "digits", "n_train": 5000}, "mse", "data.n_train"),
        ({"name": "digits", "n_train": 1000, "n_test": 750}, "mse", "class 8"),  # 175 > 174
        ({"name": "idx", "path": "/nonexistent/folder"}, "mse", "data.path"),
        ({"name": "mnist1d", "n_train": 0}, "mse", "data.n_train"),
        ({"name": "nope"}, "mse", "data.name"),
        ({"name": "sine"}, "hinge", "train.loss"),
    ],
)
def test_bad_config(kwargs, loss, field):
    # DataConfig may refuse a bad field itself; either way the message names it
    with pytest.raises(UserInputError, match=field):
        load_dataset(_cfg(**kwargs), loss)


def test_too_few_points_in_files(tmp_path):
    path = _write_npz(tmp_path / "small.npz", **_npz_arrays())
    with pytest.raises(UserInputError, match="data.n_test") as info:
        load_dataset(_cfg("npz", path=str(path), n_train=8, n_test=25))
    assert "small.npz" in str(info.value)
    folder = _write_idx_folder(tmp_path / "idx", _idx_arrays(), gz=True)
    with pytest.raises(UserInputError, match="data.n_train"):
        load_dataset(_cfg("idx", path=str(folder), n_train=31, n_test=5))


def test_digits_pool_is_scikit_learns_load_digits():
    """The digits file is read without importing scikit-learn: the same images and labels."""
    from sklearn.datasets import load_digits

    from ntk_tickets.data import _digits_source
    (x, y), = _digits_source(_cfg("digits"), np.random.default_rng(0)).pools
    reference = load_digits()
    np.testing.assert_array_equal(x, reference.images[..., None] / 16.0)
    np.testing.assert_array_equal(y, reference.target)
