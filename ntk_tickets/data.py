"""Offline, seeded datasets with one shared pipeline: subset, standardize, encode targets.

Every dataset is made or read locally (no downloads) and drawn from ``np.random.default_rng``
generators seeded by ``cfg.seed``; no dataset changes global RNG state (``np.random``,
``random``). Inputs keep their natural shape (MLPs flatten, CNNs need the channel axis):

- ``teacher``: x ~ N(0, I) of shape (n, input_dim); y = f(x), shape (n, 1), from a random MLP
  f with ``teacher_depth`` hidden layers of ``teacher_width`` units, activation
  ``teacher_activation`` (tanh, erf, softplus, relu) and N(0, 1/fan_in) weights (or, with
  ``teacher_weights = "orthonormal"``, orthonormal incoming weight vectors and unit readout
  weights), drawn from the seed alone (so it does not depend on n) and scaled so that
  E[f(x)²] ≈ 1. Regression.
- ``sine``: x ~ U[-π, π] of shape (n, 1); y = sin(x), shape (n, 1). Regression.
- ``digits``: scikit-learn's bundled 8×8 digits as (n, 8, 8, 1), pixels scaled to [0, 1],
  10 classes; train and test are disjoint draws from the 1797 images.
- ``mnist1d``: the mnist1d generator (``make_dataset``, never its download path) run for just
  enough samples, as (n, 40, 1), 10 classes; disjoint train and test from one generated pool.
- ``npz``: the file ``cfg.path`` with arrays ``x_train, y_train, x_test, y_test``. x keeps
  the stored shape (n, ...) (a (n, H, W) image array gets no channel axis: add it in the file
  for CNNs). Integer y of shape (n,) are class labels 0, 1, ..., K−1: every class must occur
  in y_train (so K ≤ the number of points of y_train) and y_test may only hold those classes;
  float y are regression targets ((n,) becomes (n, 1)). The same holds for ``idx`` labels.
- ``idx``: the four MNIST-format files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each
  raw or ``.gz``) in the folder ``cfg.path``, as (n, H, W, 1) with pixels scaled to [0, 1].

Shared pipeline (:func:`load_dataset`):

1. Subsets of ``n_train`` / ``n_test`` points, drawn with the seed: class-balanced for
   classification (per-class counts differ by at most one; which classes get the extra point
   is drawn too), plain random for regression. Where train and test come from one pool they
   are disjoint. Asking for more points than exist (in total or in one class) is an error.
2. With ``cfg.standardize``: x ← (x − μ) / σ̃ per input feature j, μ_j and σ_j from the
   training subset only, for train and test alike, with the σ floor c = ``cfg.std_floor``:
   σ̃_j = max(σ_j, c·s), where s = √(mean_j σ_j²) is the root-mean-square of the features'
   standard deviations over the training subset (constant features included). A feature is
   scaled to unit variance only if it varies at least c times as much as the typical
   feature; a quieter one is divided by c·s, like the whole input, and stays quiet. Every
   test z-score is then bounded: |z_j| ≤ (max − min of feature j over train and test)/(c·s),
   because μ_j lies in that range and σ̃_j ≥ c·s. Whatever c, a feature still at σ̃_j ≤
   1e-8·(1 + |μ_j|) (constant on the training subset, with c·s as small) is only centred
   (σ̃_j := 1). c = 0 is the rule before ``std_floor`` existed: plain per-feature
   standardization with only that exception.

   Why the floor (default c = 1 when standardizing): plain standardization divides a nearly
   constant feature by its tiny σ_j, so a test point that is unusual there gets a huge
   z-score. Measured on digits (n_train = n_test = 256, seed 0; MLP of depth 2 and width 512, NTK
   parameterization, full-batch SGD lr 1, 1000 steps, MSE; accuracy and the exact − linear
   test function gap averaged over training seeds 0 and 1)::

       rule                  max |test z|  test ‖x‖ max / median  exact test acc  function_gap
       c = 0 (old)                  64.1       64.7 / 6.60 = 9.8           0.615         0.078
       c = 0.5                       6.8       11.0 / 6.52 = 1.7           0.625         0.068
       c = 1                         3.4        8.9 / 6.27 = 1.4           0.643         0.062
       standardize = false  (x ∈ [0, 1])       4.8 / 3.92 = 1.2           0.785         0.050

   The floor removes the blow-up (and narrows the exact − linear gap) but does not recover
   the raw pixels' accuracy: on digits standardization itself generalizes worse (c = 1
   reaches train accuracy 0.95 against 0.89 raw; centring alone, c = 1.55 ≥ max σ_j / s,
   gives 0.69; raw pixels × 1.6, at the standardized input norm, still give 0.785). So
   ``standardize`` is off by default: every built-in dataset already comes on one bounded
   scale (pixels in [0, 1], mnist1d's signals, N(0, I) teacher inputs, sine on [−π, π]), and
   the floor protects a user who turns standardization on for their own files.
3. Label noise (``cfg.label_noise`` = p, classification only): exactly round(p·n_train)
   training labels, chosen at random, are replaced by classes drawn uniformly from 0..K−1
   (a draw may equal the old label, so about p·(K−1)/K of the labels change), from a
   generator of its own seeded by ``cfg.seed``: p = 0 leaves the data bit for bit as without
   it, and the test labels are never touched. Noisy labels make the interpolation threshold
   of the linearized model visible as a peak of the test loss against width (double descent;
   Belkin et al. 2019, Adlam & Pennington 2020, arXiv 2008.06786).
4. Targets: classification with loss ``"mse"`` gives centred one-hot rows onehot − 1/K
   (float64, (n, K), each row sums to 0); with loss ``"xent"`` int32 labels (n,). Regression
   gives float64 (n, d); loss ``"xent"`` on regression data is an error.

Example::

    ds = load_dataset(DataConfig(name="digits", n_train=200, n_test=100), loss="xent")
    ds.x_train.shape, ds.y_train.dtype, ds.n_out    # (200, 8, 8, 1), int32, 10
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import importlib.util
import itertools
import math
import random
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from ntk_tickets.config import DataConfig
from ntk_tickets.errors import UserInputError
from ntk_tickets.optimizers import LOSSES
from ntk_tickets.registry import Registry

# independent generators per role, all from cfg.seed
_DATA_STREAM, _SPLIT_STREAM, _LABEL_NOISE_STREAM = 0, 1, 2
_CONSTANT_TOL = 1e-8  # relative: σ ≤ _CONSTANT_TOL·(1 + |μ|) counts as a constant feature
_TEACHER_REFERENCE_POINTS = 4096  # inputs on which the teacher's output scale is measured
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

_Pool = tuple[np.ndarray, np.ndarray]  # (x, y) with equal first dimension


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test arrays of one dataset, ready for training (arrays are read-only).

    Attributes:
      name: the dataset name (``DataConfig.name``).
      x_train: float64, (n_train, *input_shape).
      y_train: float64 (n_train, n_out) targets for loss ``"mse"``; int32 (n_train,) class
        labels for loss ``"xent"``.
      x_test: float64, (n_test, *input_shape).
      y_test: as ``y_train``, with n_test rows.
      n_classes: number of classes K; 0 for regression.
      fingerprint: 16 hex digits of SHA-256 over the name, K, the label noise (when
        > 0) and the dtypes, shapes and bytes of the four arrays.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    fingerprint: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input, without the batch axis."""
        return self.x_train.shape[1:]

    @property
    def n_out(self) -> int:
        """Network outputs: K for classification, the target dimension d for regression."""
        return self.n_classes or self.y_train.shape[1]


@dataclasses.dataclass(frozen=True)
class _Source:
    """Raw data before subsetting.

    Attributes:
      description: how error messages name the data, e.g. ``"file 'a.npz'"``.
      n_classes: K, or 0 for regression (then y is float (n, d)).
      pools: ``((x, y),)`` when train and test are drawn from one pool, else
        ``((x_train, y_train), (x_test, y_test))``. y holds int labels in [0, K) when K > 0.
    """

    description: str
    n_classes: int
    pools: tuple[_Pool, ...]


def load_dataset(cfg: DataConfig, loss: str = "mse") -> Dataset:
    """Loads, subsets, standardizes and encodes the dataset that ``cfg`` describes.

    Args:
      cfg: the ``[data]`` section of a study config.
      loss: ``"mse"`` (float targets; centred one-hot for classification) or ``"xent"``
        (int32 labels; classification only).

    Returns:
      A :class:`Dataset`; the same ``cfg`` and ``loss`` always give the same arrays and
      fingerprint.

    Raises:
      UserInputError: for a bad loss, a missing or malformed file (class labels that are
        not 0, 1, ..., K−1 with every class in the training array included), more points
        asked for than the data holds, or label noise on regression targets; the message
        names the field, or the file and array.
    """
    LOSSES[loss]  # refuses an unknown loss, naming train.loss
    source = DATASETS[cfg.name].load(cfg, np.random.default_rng([cfg.seed, _DATA_STREAM]))
    if loss == "xent" and source.n_classes == 0:
        raise UserInputError(
            f"train.loss = 'xent' needs class labels, but data.name = {cfg.name!r} is "
            "regression: use train.loss = 'mse'"
        )
    if cfg.label_noise and source.n_classes == 0:
        raise UserInputError(
            f"data.label_noise = {cfg.label_noise} replaces class labels, but "
            f"{source.description} holds regression targets: set data.label_noise = 0"
        )
    (x_train, y_train), (x_test, y_test) = _subsets(
        source, cfg.n_train, cfg.n_test, np.random.default_rng([cfg.seed, _SPLIT_STREAM])
    )
    if cfg.label_noise:
        y_train = _noisy_labels(y_train, source.n_classes, cfg.label_noise,
                                np.random.default_rng([cfg.seed, _LABEL_NOISE_STREAM]))
    if cfg.standardize:
        x_train, x_test = _standardize(x_train, x_test, cfg.std_floor)
    arrays = (
        x_train,
        _encode_targets(y_train, source.n_classes, loss),
        x_test,
        _encode_targets(y_test, source.n_classes, loss),
    )
    for a in arrays:
        a.setflags(write=False)
    return Dataset(cfg.name, *arrays, source.n_classes,
                   _fingerprint(cfg.name, source.n_classes, cfg.label_noise, arrays))


# ----------------------------------------------------------------------------- pipeline


def _subsets(source: _Source, n_train: int, n_test: int,
             rng: np.random.Generator) -> tuple[_Pool, _Pool]:
    """Draws the train and test subsets (balanced by class when K > 0) from the pools."""
    if len(source.pools) == 1:
        (pool,) = source.pools
        draws = [(pool, (n_train, n_test), ("data.n_train", "data.n_test"))]
    else:
        draws = [(pool, (n,), (field,)) for pool, n, field in
                 zip(source.pools, (n_train, n_test), ("data.n_train", "data.n_test"),
                     strict=True)]
    subsets = []
    for (x, y), sizes, fields in draws:
        labels = y if source.n_classes else np.zeros(len(y), dtype=int)
        for index in _draw_indices(labels, max(source.n_classes, 1), sizes, rng,
                                   fields, source.description):
            subsets.append((x[index], y[index]))
    return subsets[0], subsets[1]


def _draw_indices(labels: np.ndarray, n_classes: int, sizes: Sequence[int],
                  rng: np.random.Generator, fields: Sequence[str],
                  description: str) -> list[np.ndarray]:
    """Disjoint random index sets of the given sizes into one pool, balanced over classes.

    Args:
      labels: int (n_pool,), values in [0, n_classes).
      n_classes: K (1 for regression: everything is one class).
      sizes: the number of indices of each set.
      rng: the generator that picks classes' extra points and the indices.
      fields: the config fields that set ``sizes``, for error messages.
      description: how error messages name the pool.

    Returns:
      One shuffled int array per size; set s holds ``sizes[s] // K`` or one more points of
      each class.
    """
    asked = " + ".join(fields)
    if sum(sizes) > len(labels):
        raise UserInputError(
            f"{asked} = {sum(sizes)} points asked for, but {description} has only "
            f"{len(labels)}: lower {' or '.join(fields)}"
        )
    quotas = np.stack([_class_quotas(n, n_classes, rng) for n in sizes])  # (sets, K)
    members = [rng.permutation(np.flatnonzero(labels == k)) for k in range(n_classes)]
    for k, need in enumerate(quotas.sum(axis=0)):
        if need > len(members[k]):
            raise UserInputError(
                f"{asked} = {sum(sizes)} points balanced over {n_classes} classes need "
                f"{need} of class {k}, but {description} has only {len(members[k])}: "
                f"lower {' or '.join(fields)}"
            )
    bounds = np.concatenate([np.zeros((1, n_classes), int), np.cumsum(quotas, axis=0)])
    return [
        rng.permutation(np.concatenate(
            [members[k][bounds[s, k]:bounds[s + 1, k]] for k in range(n_classes)]))
        for s in range(len(sizes))
    ]


def _class_quotas(n: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Per-class counts (K,) summing to n: n // K each, plus one for n % K random classes."""
    quotas = np.full(n_classes, n // n_classes)
    quotas[rng.choice(n_classes, size=n % n_classes, replace=False)] += 1
    return quotas


def _standardize(x_train: np.ndarray, x_test: np.ndarray,
                 std_floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (x − μ) / max(σ, std_floor·s), μ and σ over the training rows.

    s is the root-mean-square of the features' σ (all features, constant ones included);
    a feature whose σ is still ≤ 1e-8·(1 + |μ|) after the floor is only centred (σ := 1).

    Example (one column per feature; hand-computed in the tests)::

        x_train columns: (0, 2) σ = 1;  (0, 0) σ = 0;  (0, 6) σ = 3    →  s = √(10/3)
        std_floor = 1: divisors (√(10/3), √(10/3), 3); std_floor = 0: (1, 1, 3)
    """
    mu, sigma = x_train.mean(axis=0), x_train.std(axis=0)
    rms = np.sqrt(np.mean(sigma**2))
    sigma = np.maximum(sigma, std_floor * rms)
    sigma = np.where(sigma > _CONSTANT_TOL * (1.0 + np.abs(mu)), sigma, 1.0)
    return (x_train - mu) / sigma, (x_test - mu) / sigma


def _noisy_labels(labels: np.ndarray, n_classes: int, fraction: float,
                  rng: np.random.Generator) -> np.ndarray:
    """A copy of ``labels`` (n,) with round(fraction·n) of them, chosen without replacement,
    set to classes drawn uniformly from 0..n_classes−1 (possibly the old label)."""
    noisy = labels.copy()
    chosen = rng.choice(len(labels), size=round(fraction * len(labels)), replace=False)
    noisy[chosen] = rng.integers(0, n_classes, size=len(chosen))
    return noisy


def _encode_targets(y: np.ndarray, n_classes: int, loss: str) -> np.ndarray:
    """Regression: float64 (n, d). Classes: int32 (n,) for xent, onehot − 1/K (n, K) for mse."""
    if n_classes == 0:
        return y.astype(np.float64)
    if loss == "xent":
        return y.astype(np.int32)
    return np.eye(n_classes)[y] - 1.0 / n_classes


def _fingerprint(name: str, n_classes: int, label_noise: float,
                 arrays: Sequence[np.ndarray]) -> str:
    """16 hex digits of SHA-256 over the name, K, the label noise (only when > 0, so that
    fingerprints without it stay as they were) and each array's dtype, shape and bytes."""
    noise = f"|label_noise={label_noise!r}" if label_noise else ""
    digest = hashlib.sha256(f"{name}|{n_classes}{noise}".encode())
    for a in arrays:
        digest.update(f"|{a.dtype.str}{a.shape}|".encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- sources


def _regression_source(description: str, cfg: DataConfig, rng: np.random.Generator,
                       sample_x: Callable[[int], np.ndarray],
                       f: Callable[[np.ndarray], np.ndarray]) -> _Source:
    """n_train + n_test inputs x = sample_x(n), targets f(x) (n, d), noise on train only."""
    x = sample_x(cfg.n_train + cfg.n_test)
    y = f(x)
    y[:cfg.n_train] += cfg.noise * rng.standard_normal(y[:cfg.n_train].shape)
    return _Source(description, 0, ((x[:cfg.n_train], y[:cfg.n_train]),
                                    (x[cfg.n_train:], y[cfg.n_train:])))


#: Teacher activations (``data.teacher_activation``), as NumPy functions.
TEACHER_ACTIVATIONS: Registry = Registry("data.teacher_activation")
TEACHER_ACTIVATIONS.register("tanh", np.tanh)
TEACHER_ACTIVATIONS.register("relu", lambda z: np.maximum(z, 0.0))
TEACHER_ACTIVATIONS.register("softplus", lambda z: np.logaddexp(0.0, z))


@TEACHER_ACTIVATIONS.register("erf")
def _erf(z: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return erf(z)


def _teacher_weights(cfg: DataConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """The teacher's weight matrices (fan_in, fan_out), input layer first.

    ``gaussian``: N(0, 1/fan_in) entries. ``orthonormal``: each hidden layer's incoming
    weight vectors are orthonormal (a Haar-random orthogonal matrix's first columns; this needs
    the layer no wider than its input) and the readout weights are 1, so the targets are
    Σ_i φ(w_i·h) (Safran & Shamir 2018).
    """
    fan = [cfg.input_dim] + [cfg.teacher_width] * cfg.teacher_depth + [1]
    if cfg.teacher_weights == "gaussian":
        return [rng.standard_normal((a, b)) / np.sqrt(a) for a, b in itertools.pairwise(fan)]
    hidden = []
    for a, b in itertools.pairwise(fan[:-1]):
        q, r = np.linalg.qr(rng.standard_normal((a, a)))
        hidden.append((q * np.sign(np.diag(r)))[:, :b])  # Haar: fix QR's sign convention
    return [*hidden, np.ones((fan[-2], 1))]


def _teacher_source(cfg: DataConfig, rng: np.random.Generator) -> _Source:
    """Gaussian inputs (n, input_dim), targets (n, 1) from a random teacher MLP."""
    weights = _teacher_weights(cfg, rng)
    phi = TEACHER_ACTIVATIONS[cfg.teacher_activation]

    def teacher(x: np.ndarray) -> np.ndarray:
        for w in weights[:-1]:
            x = phi(x @ w)
        return x @ weights[-1]

    def sample_x(n: int) -> np.ndarray:
        return rng.standard_normal((n, cfg.input_dim))

    rms = np.sqrt(np.mean(teacher(sample_x(_TEACHER_REFERENCE_POINTS)) ** 2))
    return _regression_source("the teacher data", cfg, rng, sample_x,
                              lambda x: teacher(x) / rms)


def _sine_source(cfg: DataConfig, rng: np.random.Generator) -> _Source:
    """x ~ U[-π, π] (n, 1), y = sin(x) (n, 1)."""
    return _regression_source("the sine data", cfg, rng,
                              lambda n: rng.uniform(-np.pi, np.pi, (n, 1)), np.sin)


def _digits_source(cfg: DataConfig, rng: np.random.Generator) -> _Source:
    """scikit-learn's 1797 digits as one pool: images (n, 8, 8, 1) in [0, 1], labels (n,).

    Read from the file scikit-learn ships, as its ``load_digits`` does, without importing
    scikit-learn (0.5–2.5 s, the largest part of a small job's start).
    """
    sklearn = importlib.util.find_spec("sklearn")
    if sklearn is None or not sklearn.submodule_search_locations:
        raise UserInputError("data.name = 'digits' reads scikit-learn's digits file, and "
                             "scikit-learn is not installed: install the project's "
                             "dependencies (uv sync)")
    path = Path(sklearn.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    table = np.loadtxt(path, delimiter=",")
    x = table[:, :-1].reshape(-1, 8, 8, 1) / 16.0
    return _Source("the digits data", 10, ((x, table[:, -1].astype(int)),))


def _mnist1d_source(cfg: DataConfig, rng: np.random.Generator) -> _Source:
    """A freshly generated mnist1d pool (n, 40, 1), just large enough for balanced subsets.

    mnist1d's generator seeds and draws from the global RNGs; their states are restored.
    """
    from mnist1d.data import get_dataset_args, make_dataset
    from mnist1d.utils import ObjectView

    n_classes = 10
    per_class = math.ceil(cfg.n_train / n_classes) + math.ceil(cfg.n_test / n_classes)
    args = get_dataset_args(as_dict=True) | {
        "num_samples": n_classes * per_class, "train_split": 1.0, "seed": cfg.seed}
    with _global_rng_preserved():
        generated = make_dataset(ObjectView(args))
    return _Source("the mnist1d data", n_classes,
                   ((generated["x"][..., None], generated["y"]),))


@contextlib.contextmanager
def _global_rng_preserved() -> Iterator[None]:
    """Restores the states of ``np.random`` and ``random`` on exit, whatever ran inside."""
    numpy_state, python_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        yield
    finally:
        np.random.set_state(numpy_state)  # noqa: NPY002
        random.setstate(python_state)


def _npz_source(cfg: DataConfig, rng: np.random.Generator) -> _Source:
    """The arrays x_train, y_train, x_test, y_test of the .npz file ``cfg.path``."""
    path = _existing_path(cfg, want_folder=False)
    name = f"file {str(path)!r}"
    if not zipfile.is_zipfile(path):
        raise UserInputError(
            f"{name} (data.path) is not an .npz archive: save the arrays with "
            f"np.savez(path, {', '.join(f'{k}=...' for k in _NPZ_KEYS)})"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in _NPZ_KEYS if k not in archive.files]
            arrays = {k: archive[k] for k in _NPZ_KEYS if k in archive.files}
            files = archive.files
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise UserInputError(
            f"{name} (data.path) cannot be read as an .npz archive of numeric arrays "
            f"(no pickled objects): {e}"
        ) from e
    if missing:
        raise UserInputError(
            f"{name} (data.path) lacks the arrays {missing}; it has {files} and needs "
            f"{list(_NPZ_KEYS)}"
        )
    for key, a in arrays.items():
        if not (a.dtype == bool or np.issubdtype(a.dtype, np.integer)
                or np.issubdtype(a.dtype, np.floating)):
            raise UserInputError(f"{key} in {name} must hold real numbers, got dtype {a.dtype}")
        if not np.all(np.isfinite(a)):
            raise UserInputError(f"{key} in {name} contains NaN or infinite values")
    return _checked_source(name, arrays, {k: k for k in _NPZ_KEYS})


def _idx_source(cfg: DataConfig, rng: np.random.Generator) -> _Source:
    """The four MNIST-format files in the folder ``cfg.path``: images (n, H, W, 1) in [0, 1]."""
    folder = _existing_path(cfg, want_folder=True)
    paths = {key: _idx_file(folder, base) for key, base in _IDX_FILES.items()}
    arrays = {key: _read_idx(path, ndim=3 if key.startswith("x") else 1)
              for key, path in paths.items()}
    for key in ("x_train", "x_test"):
        arrays[key] = arrays[key][..., None] / 255.0
    return _checked_source(f"idx folder {str(folder)!r}", arrays,
                           {key: path.name for key, path in paths.items()})


def _existing_path(cfg: DataConfig, want_folder: bool) -> Path:
    """``cfg.path`` as a Path, after checking it is an existing folder (or file)."""
    path = Path(cfg.path)
    what = "folder" if want_folder else "file"
    if not cfg.path or not path.exists():
        raise UserInputError(
            f"data.path = {cfg.path!r} does not exist: set it to the {cfg.name} {what}"
        )
    if path.is_dir() != want_folder:
        raise UserInputError(
            f"data.path = {cfg.path!r} is not a {what}: data.name = {cfg.name!r} needs a {what}"
        )
    return path


def _idx_file(folder: Path, base: str) -> Path:
    """``folder/base``, or else ``folder/base.gz``."""
    for path in (folder / base, folder / f"{base}.gz"):
        if path.is_file():
            return path
    raise UserInputError(
        f"{base} (or {base}.gz) not found in data.path = {str(folder)!r}; the folder must hold "
        f"{', '.join(_IDX_FILES.values())} (each raw or .gz)"
    )


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parses an IDX file of unsigned bytes with ``ndim`` dimensions (raw or gzip).

    Layout: magic (0, 0, 0x08 = uint8, ndim), ndim big-endian uint32 sizes, then the bytes.
    """
    name = f"file {str(path)!r}"
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise UserInputError(f"{name} cannot be read (corrupt gzip?): {e}") from e
    header_bytes = 4 + 4 * ndim
    if len(raw) < header_bytes or raw[:4] != bytes((0, 0, 0x08, ndim)):
        raise UserInputError(
            f"{name} is not an MNIST-format IDX file of {ndim}-D unsigned bytes: its header "
            f"(magic number {raw[:4].hex() or 'missing'}) should start with 000008{ndim:02x}"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    if len(raw) - header_bytes != math.prod(shape):
        raise UserInputError(
            f"{name} is truncated or corrupt: its header promises shape {shape} "
            f"({math.prod(shape)} bytes) but it holds {len(raw) - header_bytes} data bytes"
        )
    return np.frombuffer(raw, np.uint8, offset=header_bytes).reshape(shape)


def _checked_source(description: str, arrays: dict[str, np.ndarray],
                    names: dict[str, str]) -> _Source:
    """A two-pool source from x_train, y_train, x_test, y_test, after checking their shapes.

    x must be (n, features...) with equal feature shapes in train and test. Integer y must be
    class labels (n,) 0, 1, ..., K−1, each class present in y_train (see
    :func:`_count_classes`); float y are targets (n,) or (n, d).

    Args:
      description: how error messages name the data as a whole (a file or folder).
      arrays: the four arrays, keyed ``x_train``, ``y_train``, ``x_test``, ``y_test``.
      names: how error messages name each array (its key in the file, or its file name).
    """
    def pair(a: str, b: str) -> str:
        return f"{names[a]} and {names[b]} in {description}"

    x_train, y_train, x_test, y_test = (arrays[k] for k in _NPZ_KEYS)
    for x, y in (("x_train", "y_train"), ("x_test", "y_test")):
        if arrays[x].ndim < 2 or len(arrays[x]) == 0 or len(arrays[x]) != len(arrays[y]):
            raise UserInputError(
                f"{pair(x, y)} must have shapes (n, features...) and (n, ...) with the same "
                f"n > 0, got {arrays[x].shape} and {arrays[y].shape}"
            )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise UserInputError(
            f"{pair('x_train', 'x_test')} must have the same shape per point, got "
            f"{x_train.shape[1:]} and {x_test.shape[1:]}"
        )
    if all(np.issubdtype(y.dtype, np.integer) for y in (y_train, y_test)):
        n_classes = _count_classes(y_train, y_test, names, description)
    elif (all(np.issubdtype(y.dtype, np.floating) for y in (y_train, y_test))
          and max(y_train.ndim, y_test.ndim) <= 2):
        n_classes = 0
        y_train, y_test = (y.reshape(len(y), -1).astype(np.float64) for y in (y_train, y_test))
        if y_train.shape[1] != y_test.shape[1]:
            raise UserInputError(
                f"{pair('y_train', 'y_test')} must have the same target dimension, got "
                f"{y_train.shape[1]} and {y_test.shape[1]}"
            )
    else:
        raise UserInputError(
            f"{pair('y_train', 'y_test')} must both be integer class labels (n,) or both "
            f"float regression targets (n,) or (n, d), got dtypes {y_train.dtype}, "
            f"{y_test.dtype} and shapes {y_train.shape}, {y_test.shape}"
        )
    return _Source(description, n_classes, ((np.asarray(x_train, np.float64), y_train),
                                            (np.asarray(x_test, np.float64), y_test)))


def _count_classes(y_train: np.ndarray, y_test: np.ndarray, names: dict[str, str],
                   description: str) -> int:
    """K, after checking that the labels are 1-D and run 0, 1, ..., K−1 with every class in
    y_train, and that y_test holds only classes of y_train.

    Every class needs a training point, so K ≤ n = len(y_train); a label ≥ n is refused before
    anything is sized by it (a stray label of 10⁹ would otherwise allocate arrays of 10⁹
    entries for the class quotas and one-hot targets).
    """
    def where(key: str) -> str:
        return f"{names[key]} in {description}"

    rule = f"labels must be 0, 1, ..., K-1 with every class present in {names['y_train']}"
    for key, y in (("y_train", y_train), ("y_test", y_test)):
        if y.ndim != 1:
            raise UserInputError(
                f"{where(key)} holds integer class labels, so it must have shape (n,), got "
                f"{y.shape} (store float targets for regression)"
            )
        if y.min() < 0:
            raise UserInputError(
                f"{where(key)} has the negative label {y.min()}: {rule}; renumber the classes"
            )
    n = len(y_train)
    top = int(y_train.max())
    if top >= n:
        raise UserInputError(
            f"{where('y_train')} has the label {top}, but its {n} points can hold at most {n} "
            f"classes: {rule}, so K <= {n}; renumber the classes to 0, 1, ..., K-1"
        )
    counts = np.bincount(y_train.astype(np.intp), minlength=top + 1)  # top < n: ≤ n entries
    missing = np.flatnonzero(counts == 0)
    if len(missing):
        raise UserInputError(
            f"{where('y_train')} has no point of class {missing[0]} ({len(missing)} of the "
            f"{top + 1} classes 0..{top} missing): {rule}; renumber the classes to close the gaps"
        )
    if y_test.max() > top:
        raise UserInputError(
            f"{where('y_test')} has the label {y_test.max()}, which no point of "
            f"{names['y_train']} has (its classes are 0..{top}): {rule}; drop those test "
            "points or add training points of that class"
        )
    return top + 1


@dataclasses.dataclass(frozen=True)
class DataSource:
    """One ``data.name``.

    Attributes:
      load: ``(cfg, rng) -> _Source``, the raw data before subsetting.
      task: ``"regression"``, ``"classification"``, or ``"file"`` (decided by the file's
        labels: integer labels classify, float targets regress).
      needs_path: whether ``data.path`` names the file or folder to read.
    """

    load: Callable[[DataConfig, np.random.Generator], _Source]
    task: str
    needs_path: bool = False


#: :class:`DataSource` entries, by ``data.name``.
DATASETS: Registry = Registry("data.name")
DATASETS.register("teacher", DataSource(_teacher_source, "regression"))
DATASETS.register("sine", DataSource(_sine_source, "regression"))
DATASETS.register("digits", DataSource(_digits_source, "classification"))
DATASETS.register("mnist1d", DataSource(_mnist1d_source, "classification"))
DATASETS.register("npz", DataSource(_npz_source, "file", needs_path=True))
DATASETS.register("idx", DataSource(_idx_source, "file", needs_path=True))
