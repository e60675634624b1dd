"""The results store: one folder per study, written atomically, resumable after a crash.

Layout of a results folder ``DIR`` (results format :data:`FORMAT_VERSION`)::

    DIR/
      manifest.json              {"format_version", "config" (the latest run's),
                                  "identity", "identity_hash" (the config without widths,
                                  seeds and name: what every cell shares), "x64",
                                  "environment" (at creation), "data_fingerprint",
                                  "cells": {cell_id: {"status", "width", "seeds",
                                  "compile_s", "run_s", "rows", "finished", "environment",
                                  ...info}}, "created", "updated"}
      records.parquet            the tidy long table (RECORD_COLUMNS): all finished cells,
                                 concatenated in sorted cell-id order
      cells/<cell_id>.parquet    the records of one finished cell (status done or diverged)
      arrays/<cell_id>.npz       arrays kept with a cell: ticket masks (:func:`load_masks`)
      .lock                      held with flock by the one process that writes DIR

A cell is one width and the seeds vmapped in it, so a study grows: adding widths or seeds
computes only the new cells, and a config that differs in anything else is refused, naming
the differing fields. Each cell records the environment it ran under (versions, git SHA,
device, host).

The manifest is the proof of ownership: a cell is entered (status ``pending``) before its
files are written, and the store deletes only files that the manifest names, or its own
temporary files (``.<name>.<8 hex>.tmp``). A folder that is not empty and holds no manifest
is refused unless ``force``, and even then nothing in it is deleted; a manifest the store
cannot read as its own, or a ``records.parquet`` that no manifest accounts for, is refused
even with ``force``. Every file is replaced
atomically (temporary file in the same folder, fsync, ``os.replace``). Opening a store
reconciles whatever a crash left: a pending cell whose records file is complete is entered
as done, one without is dropped (so it is recomputed), and ``records.parquet`` is rebuilt
when its row count differs from the cells' total.

Example::

    with ResultsStore("results/s", config_to_dict(cfg), data.fingerprint,
                      x64=cfg.train.x64) as store:
        for cell_id in ("w00064_s0-1", "w00256_s0-1"):
            if cell_id in store.done_cells():
                continue                        # finished by an earlier run: never recomputed
            store.write_cell(cell_id, records_frame(rows), "done", compile_s=1.2, run_s=3.4,
                             width=64, seeds=[0, 1])
    records = load_records("results/s")         # a pandas DataFrame

pandas and pyarrow are imported inside the functions that need them, so that
``import ntk_tickets`` stays fast.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import io
import json
import math
import operator
import os
import platform
import re
import secrets
import socket
import subprocess
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from ntk_tickets.config import FACTOR_COLUMNS, factor_defaults
from ntk_tickets.errors import UserInputError

if TYPE_CHECKING:
    import pandas as pd

RECORD_COLUMNS: tuple[str, ...] = (
    "width", "seed", "path", "mask", "sparsity", "round", "step", "split", "metric", "value",
    "eps", "experiment", "parameterization", "output_scale", "embedding", "added", "mu",
    "rewind_step", "spawn_step", "subspace", "dim",
)
# Column kinds: "int" → int64, "float" → float64, "str" → pandas' string dtype.
_KINDS = {
    "width": "int", "seed": "int", "path": "str", "mask": "str", "sparsity": "float",
    "round": "int", "step": "int", "split": "str", "metric": "str", "value": "float",
    "eps": "float", "experiment": "str", "parameterization": "str", "output_scale": "float",
    "embedding": "str", "added": "int", "mu": "float", "rewind_step": "int",
    "spawn_step": "int", "subspace": "str", "dim": "int",
}
_DTYPES = {"int": "int64", "float": "float64", "str": str}
REQUIRED_COLUMNS: tuple[str, ...] = ("width", "seed", "path", "step", "metric", "value")
RECORD_DEFAULTS: Mapping[str, Any] = {
    "mask": "dense", "sparsity": 0.0, "round": 0, "split": "none", "eps": math.nan,
    "experiment": "train", "parameterization": "ntk", "output_scale": 1.0,
    "embedding": "none", "added": 0, "mu": math.nan, "rewind_step": 0, "spawn_step": -1,
    "subspace": "none", "dim": 0,
}

STATUSES = ("done", "diverged", "failed")
FINISHED = ("done", "diverged")  # cells with records, never recomputed

MANIFEST = "manifest.json"
RECORDS = "records.parquet"
CELLS = "cells"
ARRAYS = "arrays"
LOCK = ".lock"
#: What ``ntk-tickets plot`` and ``summarize`` write next to a study (never deleted).
DERIVED = ("figures", "summary.csv", "escape.csv")
#: The results format; 2 added the ``experiment`` column, study identities, per-cell
#: environments and saved masks; 3 the factor columns ``parameterization`` and
#: ``output_scale``; 4 the escape-test columns ``embedding``, ``added`` and ``mu``; 5 the
#: columns ``rewind_step``, ``spawn_step`` (stability), ``subspace`` and ``dim`` (README,
#: "Results format"). Format 2, 3 and 4 folders are read and grown.
FORMAT_VERSION = 5
#: Older formats that are upgraded on reading (:func:`_upgrade_manifest`).
READABLE_FORMATS = (2, 3, 4, FORMAT_VERSION)
_TMP_SUFFIX = ".tmp"
_TMP_NAME = re.compile(r"\.(.+)\.[0-9a-f]{8}\.tmp")
_CELL_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.,=+@-]{0,199}")
_RESERVED_INFO = ("status", "compile_s", "run_s", "rows", "finished")
_DISTRIBUTIONS = {
    "jax": "jax", "jaxlib": "jaxlib", "neural-tangents": "neural-tangents", "optax": "optax",
    "numpy": "numpy", "ntk_tickets": "ntk-tickets",
}


# ----------------------------------------------------------------------------- records


def records_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Builds the tidy records table from one dict per measured value.

    Args:
      rows: dicts with the required keys ``width, seed, path, step, metric, value`` and
        optionally ``mask`` (default ``"dense"``), ``sparsity`` (0.0), ``round`` (0),
        ``split`` (``"none"``) and ``eps`` (NaN: not a perturbation record). Numbers may be
        Python, NumPy or 0-d JAX scalars; ``None`` is NaN in float columns.

    Returns:
      A DataFrame with exactly :data:`RECORD_COLUMNS`, in that order, as int64 (width, seed,
      round, step), float64 (sparsity, value, eps) and string (path, mask, split, metric).

    Raises:
      ValueError: for a row with an unknown key or without a required key, or a value of the
        wrong kind (a float step, a non-string path).
    """
    import pandas as pd

    columns: dict[str, list[Any]] = {name: [] for name in RECORD_COLUMNS}
    for i, row in enumerate(rows):
        unknown = sorted(set(row) - set(RECORD_COLUMNS))
        if unknown:
            raise ValueError(f"record {i} has unknown column(s) {unknown}; "
                             f"allowed: {', '.join(RECORD_COLUMNS)}")
        missing = [name for name in REQUIRED_COLUMNS if name not in row]
        if missing:
            raise ValueError(f"record {i} lacks required column(s) {missing}: {dict(row)}")
        for name in RECORD_COLUMNS:
            columns[name].append(row[name] if name in row else RECORD_DEFAULTS[name])
    data = {name: _convert_column(name, values) for name, values in columns.items()}
    return pd.DataFrame(data).astype(_record_dtypes())


def _convert_column(name: str, values: list[Any]) -> np.ndarray | list[str]:
    """One column's values, checked and converted to its kind (see ``_KINDS``)."""
    kind = _KINDS[name]
    convert = {"int": operator.index, "float": _to_float, "str": _to_str}[kind]
    out = []
    for i, v in enumerate(values):
        try:
            out.append(convert(v))
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"record {i}: column {name!r} must be {kind}, got {v!r}") from e
    if kind == "str":
        return out
    return np.asarray(out, dtype=_DTYPES[kind])


def _to_float(v: Any) -> float:
    return math.nan if v is None else float(v)


def _to_str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {type(v).__name__}")
    return v


def _record_dtypes() -> dict[str, Any]:
    return {name: _DTYPES[_KINDS[name]] for name in RECORD_COLUMNS}


def _conform(frame: pd.DataFrame, *, allow_extra: bool = False) -> pd.DataFrame:
    """``frame`` with RECORD_COLUMNS first, in order, and their dtypes enforced.

    Raises:
      ValueError: for a missing column, an extra one (unless ``allow_extra``), a value that
        does not cast, or a missing string.
    """
    missing = [name for name in RECORD_COLUMNS if name not in frame.columns]
    if missing:
        raise ValueError(f"records lack column(s) {missing}")
    extra = [name for name in frame.columns if name not in RECORD_COLUMNS]
    if extra and not allow_extra:
        raise ValueError(f"records have unknown column(s) {extra}; "
                         f"allowed: {', '.join(RECORD_COLUMNS)}")
    strings = [name for name in RECORD_COLUMNS if _KINDS[name] == "str"]
    blank = [name for name in strings if frame[name].isna().any()]
    if blank:
        raise ValueError(f"records have missing values in string column(s) {blank}")
    frame = frame[list(RECORD_COLUMNS) + extra].astype(_record_dtypes())
    return frame.reset_index(drop=True)


def _as_records(frame: Any) -> pd.DataFrame:
    """A conformed records DataFrame from a DataFrame or a list of row dicts."""
    import pandas as pd

    if isinstance(frame, pd.DataFrame):
        return _conform(frame)
    return records_frame(frame)


def _concat_records(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The concatenation of conformed record frames (an empty table for none)."""
    import pandas as pd

    nonempty = [f for f in frames if len(f)]
    if not nonempty:
        return records_frame([])
    return _conform(pd.concat(nonempty, ignore_index=True))


# ----------------------------------------------------------------------------- files


def _atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replaces ``path`` with ``data`` atomically: readers see the old or the new file.

    Writes a temporary file ``.<name>.<random>.tmp`` in the same folder, fsyncs it, renames
    it over ``path`` with ``os.replace`` and fsyncs the folder. The file gets the usual
    permissions (0o666 less the umask). The temporary file is removed on failure.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def save_output(path: str | os.PathLike, data: bytes) -> Path:
    """Writes a derived output of a results folder (``summary.csv``, ``figures/*.png``)
    atomically, creating its parent folder.

    Raises:
      UserInputError: naming the file when it cannot be written (read-only folder, a file
        in the way); nothing is left half-written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(path, data)
    except OSError as e:
        raise UserInputError(f"cannot write {str(path)!r} ({e.strerror or e}): make the "
                             "folder writable or copy the results folder elsewhere") from e
    return path


def _fsync_dir(path: Path) -> None:
    """Makes a rename in ``path`` durable, where the file system allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    return buffer.getvalue()


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(_jsonable(value), indent=2, allow_nan=False) + "\n").encode()


def _jsonable(value: Any) -> Any:
    """``value`` as strict JSON values: NumPy/JAX scalars and arrays become Python numbers
    and lists, non-finite floats the strings ``"nan"``, ``"inf"``, ``"-inf"``.

    Raises:
      TypeError: for a value with no JSON form.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # NumPy and JAX scalars and arrays
        return _jsonable(value.tolist())
    raise TypeError(f"{type(value).__name__} value {value!r} cannot be stored as JSON")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _parquet_rows(path: Path) -> int:
    """The row count from a parquet file's footer (raises for a missing or corrupted file)."""
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def _has_all_columns(path: Path) -> bool:
    """Whether a records file has every record column (format 4), from its footer."""
    import pyarrow.parquet as pq

    try:
        names = set(pq.read_schema(path).names)
    except _read_errors():
        return False
    return set(RECORD_COLUMNS) <= names


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading a bad parquet file raises."""
    import pyarrow

    return OSError, ValueError, pyarrow.ArrowException


def _run_hint(folder: Path) -> str:
    return f"run `ntk-tickets run CONFIG --out {folder}` first"


def intact(folder: Path, cells: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether the records files of ``cells`` (manifest entries) and ``records.parquet``
    hold exactly the rows the manifest counts (footers only: cheap, and read-only)."""
    try:
        rows = [_parquet_rows(folder / CELLS / f"{cid}.parquet") for cid in cells]
        total = _parquet_rows(folder / RECORDS) if cells else 0
    except _read_errors():
        return False
    counted = [e.get("rows") for e in cells.values()]
    return rows == counted and total == sum(rows)


def _results_dir(path: str | os.PathLike) -> Path:
    """``path`` as an existing results folder, or a UserInputError that says what to do."""
    folder = Path(path)
    if not folder.exists():
        raise UserInputError(f"results folder {str(folder)!r} does not exist: "
                             f"{_run_hint(folder)}")
    if not folder.is_dir():
        raise UserInputError(f"{str(folder)!r} is a file, not a results folder: pass the "
                             f"folder that holds {MANIFEST} and {RECORDS}")
    return folder


def _read_manifest_file(file: Path) -> dict[str, Any]:
    """The parsed manifest; UserInputError naming ``file`` when missing, corrupted, of
    another results format, or with a field of the wrong type (a hand edit)."""
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError as e:
        raise UserInputError(f"{str(file)!r} does not exist: {_run_hint(file.parent)}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserInputError(f"{str(file)!r} is corrupted or not an ntk-tickets manifest "
                             f"({e})") from e
    problem = _manifest_problem(manifest)
    if problem:
        raise UserInputError(f"{str(file)!r} is corrupted or not an ntk-tickets manifest "
                             f"({problem})")
    return _upgrade_manifest(manifest)


def format_factors(config: Mapping[str, Any]) -> dict[str, Any]:
    """The factor values of a study written before factors were cell fields (format 2): its
    config's single values, or the defaults of keys it predates."""
    from ntk_tickets.config import FACTOR_FIELDS

    out = {}
    for field, (column, default) in zip(FACTOR_FIELDS, factor_defaults().items(),
                                        strict=True):
        section, key = field.split(".")
        value = config.get(section, {}).get(key, default)
        out[column] = float(value) if isinstance(default, float) else value
    return out


def _upgrade_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """An older manifest in the current format: every cell entry of format 2 gets the factor
    values its cell ran under (the config's, :func:`format_factors`). Records files are
    upgraded as they are read (:func:`_with_missing_columns`), and ``records.parquet`` is
    rewritten when a store opens the folder; ``upgraded_from`` keeps the old format."""
    if manifest["format_version"] == FORMAT_VERSION:
        return manifest
    if manifest["format_version"] == 2:  # format 3 entries hold their factor values
        factors = format_factors(manifest["config"])
        for entry in manifest["cells"].values():
            for column, value in factors.items():
                entry.setdefault(column, value)
    return {**manifest, "format_version": FORMAT_VERSION,
            "upgraded_from": manifest["format_version"]}


def _with_missing_columns(frame: pd.DataFrame, factors: Mapping[str, Any],
                          config: Mapping[str, Any]) -> pd.DataFrame:
    """``frame`` (an older format's records) with the columns it lacks: factor columns
    (format 2) set to ``factors``, ``rewind_step`` (format 4) to the ``config``'s rewind step
    on ticket rows (0 on dense ones), the others to their defaults
    (:data:`RECORD_DEFAULTS`)."""
    missing = {c: factors.get(c, RECORD_DEFAULTS.get(c)) for c in RECORD_COLUMNS
               if c not in frame.columns}
    if "rewind_step" in missing and "mask" in frame.columns:
        k = (config.get("tickets") or {}).get("rewind_step", 0)
        missing["rewind_step"] = (frame["mask"] != "dense").to_numpy() * int(k)
    return frame.assign(**missing) if missing else frame


def _manifest_problem(manifest: Any) -> str | None:
    """What is wrong with a parsed manifest, or None."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    version = manifest.get("format_version")
    if version not in READABLE_FORMATS:
        return (f"results format {version!r}, this ntk-tickets reads formats "
                f"{', '.join(map(str, READABLE_FORMATS))}; see the README's results format "
                "section")
    expected = {"config": dict, "identity": dict, "identity_hash": str, "x64": bool,
                "cells": dict}
    for key, kind in expected.items():
        if not isinstance(manifest.get(key), kind):
            return f"{key!r} must be a JSON {kind.__name__}, got {manifest.get(key)!r:.60}"
    for cid, entry in manifest["cells"].items():
        if not (isinstance(entry, dict) and entry.get("status") in (*STATUSES, "pending")):
            return (f"cell {cid!r} must be an object with a status in "
                    f"{(*STATUSES, 'pending')}, got {entry!r:.60}")
        if not _CELL_ID.fullmatch(cid):
            return f"cell id {cid!r} is not one the store writes"
    return None


def load_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Reads ``DIR/manifest.json`` (layout in the module docstring).

    Raises:
      UserInputError: naming the folder or file when it is missing, unreadable or not an
        ntk-tickets manifest.
    """
    return _read_manifest_file(_results_dir(path) / MANIFEST)


def load_records(path: str | os.PathLike) -> pd.DataFrame:
    """Reads ``DIR/records.parquet``: all finished cells, RECORD_COLUMNS first, dtypes exact.

    Readers need no lock: every file is replaced atomically, so a study still running can be
    read (it shows the cells finished so far).

    Raises:
      UserInputError: naming the folder or file when it is missing, unreadable, or lacks
        the record columns.
    """
    import pandas as pd

    folder = _results_dir(path)
    file = folder / RECORDS
    if not file.exists():
        why = ("no cell of this study has finished yet" if (folder / MANIFEST).exists()
               else _run_hint(folder))
        raise UserInputError(f"{str(file)!r} does not exist: {why}")
    try:
        frame = pd.read_parquet(file)
        if not set(RECORD_COLUMNS) <= set(frame.columns):  # formats 2-4
            config = load_manifest(folder)["config"]
            factors = ({} if set(FACTOR_COLUMNS) <= set(frame.columns)  # formats 3, 4
                       else format_factors(config))
            frame = _with_missing_columns(frame, factors, config)
        return _conform(frame, allow_extra=True)
    except _read_errors() as e:
        raise UserInputError(
            f"{str(file)!r} is corrupted or not an ntk-tickets records file ({e}); rerun "
            f"`ntk-tickets run` with the same config and --out to rebuild it") from e


# ----------------------------------------------------------------------------- environment


def environment_info(x64: bool) -> dict[str, Any]:
    """Versions, precision, device and git state for the manifest; never raises.

    Returns:
      ``{"python", "jax", "jaxlib", "neural-tangents", "optax", "numpy", "ntk_tickets"}``
      versions (None when not installed), ``"x64"``, ``"device"`` (``str`` of the first JAX
      device, None if JAX cannot start), and ``"git_sha"`` / ``"git_dirty"`` of the
      repository holding this package (None when it is not a git checkout or git is absent).
    """
    env: dict[str, Any] = {"python": platform.python_version()}
    env.update({key: _dist_version(dist) for key, dist in _DISTRIBUTIONS.items()})
    env["x64"] = bool(x64)
    env["device"] = _device()
    env["host"] = socket.gethostname()
    env["git_sha"], env["git_dirty"] = _git_state(Path(__file__).resolve().parent.parent)
    return env


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device() -> str | None:
    try:
        import jax

        return str(jax.devices()[0])
    except Exception:  # a manifest field must never stop a study
        return None


def _git_state(root: Path) -> tuple[str | None, bool | None]:
    """(HEAD's SHA, whether tracked files differ from it) of the checkout at ``root``.

    Only a checkout whose top level is ``root`` counts, so an installed copy inside some
    other repository reports None. ``--no-optional-locks`` keeps ``git status`` from
    taking the index lock that a concurrent commit needs.
    """
    if not (root / ".git").exists():
        return None, None
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "--no-optional-locks", *args], cwd=root,
                                  capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None
    return (sha, dirty) if re.fullmatch(r"[0-9a-f]{40,64}", sha) else (None, None)


# ----------------------------------------------------------------------------- the store


def _make_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise UserInputError(f"results folder {str(folder)!r} is a file, not a folder: "
                             "choose another --out DIR") from e
    except OSError as e:
        raise UserInputError(f"cannot create results folder {str(folder)!r} "
                             f"({e.strerror or e}): choose another --out DIR") from e


def _acquire_lock(folder: Path) -> IO[bytes]:
    """Opens ``folder/.lock`` and takes an exclusive flock on it without waiting.

    The kernel drops the lock when the process ends, however it ends, so a lock file left
    by a killed run blocks nothing. The file holds the owner's pid, for the message.
    """
    try:
        lock = open(folder / LOCK, "a+b")  # held until close()
    except OSError as e:
        raise UserInputError(f"cannot write in results folder {str(folder)!r} "
                             f"({e.strerror or e}): choose another --out DIR") from e
    try:
        import fcntl
    except ImportError:  # no flock on this platform: no protection against a second writer
        return lock
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        lock.seek(0)
        pid = lock.read().decode(errors="replace").strip() or "unknown"
        lock.close()
        raise UserInputError(f"another ntk-tickets run is writing {str(folder)!r} (pid {pid}); "
                             "wait for it or use another --out") from e
    except OSError as e:
        warnings.warn(f"cannot lock {folder / LOCK} ({e.strerror}); make sure no other run "
                      f"writes to {folder}", stacklevel=3)
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n".encode())
    lock.flush()
    return lock


def _check_is_study_or_empty(folder: Path) -> None:
    """Refuses a non-empty folder without a manifest: its files are not ours. The lock,
    empty ``cells/`` and ``arrays/`` folders and the derived outputs of ``plot`` and
    ``summarize`` (:data:`DERIVED`, as in a checkout whose committed figures outlive their
    records) do not count."""
    if (folder / MANIFEST).exists():
        return
    others = sorted(p.name for p in folder.iterdir() if p.name not in (LOCK, *DERIVED)
                    and not (p.name in (CELLS, ARRAYS) and p.is_dir() and not any(p.iterdir())))
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise UserInputError(
            f"{str(folder)!r} is not empty ({shown}) and holds no ntk-tickets study: "
            "choose an empty or new --out DIR, or pass --force to write the study next "
            "to these files (they are never deleted)")


def _check_cell_id(cell_id: str) -> None:
    if not (isinstance(cell_id, str) and _CELL_ID.fullmatch(cell_id)):
        raise ValueError(f"cell id {cell_id!r} must be 1-200 characters of letters, digits "
                         "and _.,=+@- not starting with '.' or '-'")


class ResultsStore:
    """The one writer of a results folder (layout in the module docstring).

    Opening creates the folder (and its parents), takes its lock, checks that an existing
    manifest describes the same study (the same :func:`~ntk_tickets.config.study_identity`:
    widths, seeds and the name may differ), and reconciles what a crash may have left. Use
    it as a context manager, or call :meth:`close`, to release the lock.

    **Only files the store wrote are ever deleted.** The manifest proves which: a cell is
    entered in it (status ``pending``) before its files are written, so a file that the
    manifest does not name (a note, another program's output) is never touched, not even
    with ``force``.

    Args:
      path: the results folder ``DIR``.
      config: the resolved config as plain values (``config_to_dict(cfg)``).
      data_fingerprint: ``Dataset.fingerprint`` (None when unknown; then not compared).
      x64: whether this run computes in float64.
      force: discard the results already in ``DIR`` (the files its manifest names) and
        start fresh; also lets a study start in a non-empty folder that holds no study.

    Raises:
      UserInputError: when ``DIR`` cannot be created or written, another run holds its lock,
        it is a non-empty folder that holds no study (without ``force``), it holds results
        of another study, other data or another precision (without ``force``), or a
        corrupted manifest or cell file.
    """

    def __init__(self, path: str | os.PathLike, config: Mapping[str, Any],
                 data_fingerprint: str | None, x64: bool, *, force: bool = False):
        self.path = Path(path)
        self._frames: dict[str, pd.DataFrame] = {}
        _make_dir(self.path)
        if not force:
            _check_is_study_or_empty(self.path)
        self._lock: IO[bytes] | None = _acquire_lock(self.path)
        try:
            self._manifest = self._open(dict(config), data_fingerprint, bool(x64), force)
            self._reconcile()
            # Written only once everything on disk has been checked: a refused open
            # (another study, a corrupted file) leaves the folder exactly as it was.
            self._write_manifest()
        except BaseException:
            self.close()
            raise

    # -- opening

    def _open(self, config: dict[str, Any], data_fingerprint: str | None, x64: bool,
              force: bool) -> dict[str, Any]:
        """The manifest to continue: the existing one (same study) or a fresh one."""
        from ntk_tickets.config import identity_hash, study_identity

        old = self._existing_manifest()
        if old is not None and not force:
            self._check_same_study(old, config, data_fingerprint, x64)
            return {**old, "config": config}
        fresh = {
            "format_version": FORMAT_VERSION, "config": config,
            "identity": study_identity(config), "identity_hash": identity_hash(config),
            "x64": x64, "environment": environment_info(x64),
            "data_fingerprint": data_fingerprint, "cells": {}, "created": _now(),
            "updated": None,
        }
        if old is not None:
            self._discard(old)
        return fresh

    def _existing_manifest(self) -> dict[str, Any] | None:
        """The manifest in DIR; None when there is none.

        A manifest that is not one this ntk-tickets wrote (unreadable, edited by hand, of
        another results format), or a ``records.parquet`` that no manifest accounts for, is
        refused even with ``force``: nothing would prove which files are ours to replace.
        """
        file = self.path / MANIFEST
        if file.exists():
            try:
                return _read_manifest_file(file)
            except UserInputError as e:
                raise UserInputError(f"{e}: move it away (or delete the folder) or choose "
                                     "another --out DIR; --force never deletes files it "
                                     "cannot prove it wrote") from e
        if (self.path / RECORDS).exists():
            raise UserInputError(
                f"{str(self.path / RECORDS)!r} exists but no {MANIFEST} accounts for it: move "
                "it away or choose another --out DIR")
        return None

    def _check_same_study(self, old: Mapping[str, Any], config: Mapping[str, Any],
                          data_fingerprint: str | None, x64: bool) -> None:
        from ntk_tickets.config import CELL_FIELDS, identity_differences, study_identity

        old_fingerprint = old.get("data_fingerprint")
        fields = identity_differences(old["identity"], study_identity(config))
        if fields:
            what = (f"another study: {', '.join(fields)} differ"
                    f"{'s' if len(fields) == 1 else ''} (only {', '.join(CELL_FIELDS[1:])} "
                    "and name may change in one folder)")
        elif old_fingerprint and data_fingerprint and old_fingerprint != data_fingerprint:
            what = f"other data (fingerprint {old_fingerprint}, this data {data_fingerprint})"
        elif old.get("x64") is not None and old["x64"] != x64:
            what = f"x64 = {old['x64']} (this run has x64 = {x64})"
        else:
            return
        raise UserInputError(f"{str(self.path)!r} holds results of {what}: choose another "
                             "--out DIR or pass --force to discard them")

    def _owned_files(self, cell_id: str) -> list[Path]:
        """The files the store writes for one cell."""
        return [self.path / CELLS / f"{cell_id}.parquet",
                self.path / ARRAYS / f"{cell_id}.npz"]

    def _discard(self, old: Mapping[str, Any]) -> None:
        """Deletes the files ``old`` (a manifest) names, the manifest last: a crash midway
        leaves a manifest whose missing cells the next open drops."""
        for cid in old["cells"]:
            for file in self._owned_files(cid):
                file.unlink(missing_ok=True)
        for name in (RECORDS, MANIFEST):
            (self.path / name).unlink(missing_ok=True)

    def _remove_temporaries(self) -> None:
        """Deletes the temporary files a crash left mid-write, only those with the names
        the store gives its own (``.<our file>.<8 hex>.tmp``)."""
        ours = {self.path: {MANIFEST, RECORDS}}
        for cid in self._manifest["cells"]:
            for file in self._owned_files(cid):
                ours.setdefault(file.parent, set()).add(file.name)
        for folder, names in ours.items():
            if not folder.is_dir():
                continue
            for tmp in folder.glob(f".*{_TMP_SUFFIX}"):
                match = _TMP_NAME.fullmatch(tmp.name)
                if match and match.group(1) in names:
                    tmp.unlink(missing_ok=True)

    def _reconcile(self) -> None:
        """Makes the manifest (in memory) and records.parquet agree with the cell files.

        A ``pending`` cell (claimed, then the run stopped) whose records file was written
        gets the status it was being written with; one without is dropped along with its
        partial files. A finished cell whose records file is gone is dropped (so it is
        recomputed).
        """
        self._remove_temporaries()
        cells = self._manifest["cells"]
        for cid, entry in list(cells.items()):
            file = self._owned_files(cid)[0]
            if entry["status"] == "pending" and file.exists():
                entry.update(status=entry.pop("intended", "done"), rows=self._cell_rows(file),
                             reconciled=True)
            elif entry["status"] in (*FINISHED, "pending") and not file.exists():
                for owned in self._owned_files(cid):
                    owned.unlink(missing_ok=True)
                del cells[cid]
        rows = [self._cell_rows(self._owned_files(c)[0]) for c in sorted(self.done_cells())]
        if (self._records_rows() != (sum(rows) if rows else None)
                or (rows and not _has_all_columns(self.path / RECORDS))):
            self._write_records()

    def _cell_rows(self, file: Path) -> int:
        try:
            return _parquet_rows(file)
        except _read_errors() as e:
            raise UserInputError(f"cell file {str(file)!r} is corrupted ({e}): delete it and "
                                 "run again to recompute that cell") from e

    def _records_rows(self) -> int | None:
        try:
            return _parquet_rows(self.path / RECORDS)
        except _read_errors():
            return None

    # -- writing

    def _write_manifest(self) -> None:
        self._manifest["updated"] = _now()
        _atomic_write_bytes(self.path / MANIFEST, _json_bytes(self._manifest))

    def save_manifest(self) -> None:
        """Writes the manifest as it stands, e.g. after an interrupt that stopped
        :meth:`write_cell` between its files: the next open reconciles the rest (a stale
        ``records.parquet`` is rebuilt, a claimed cell without its file is dropped)."""
        if self._lock is not None:
            self._write_manifest()

    def _write_records(self) -> None:
        """Rewrites records.parquet from the finished cells (removes it when there are none)."""
        import pandas as pd

        ids = sorted(self.done_cells())
        if not ids:
            (self.path / RECORDS).unlink(missing_ok=True)
            return
        for cid in ids:
            if cid not in self._frames:
                file = self._owned_files(cid)[0]
                entry = self._manifest["cells"][cid]
                factors = {c: entry.get(c, v) for c, v in factor_defaults().items()}
                try:
                    self._frames[cid] = _conform(_with_missing_columns(
                        pd.read_parquet(file), factors, self._manifest["config"]))
                except _read_errors() as e:
                    raise UserInputError(f"cell file {str(file)!r} is corrupted ({e}): delete "
                                         "it and run again to recompute that cell") from e
        frame = _concat_records([self._frames[cid] for cid in ids])
        _atomic_write_bytes(self.path / RECORDS, _parquet_bytes(frame))

    def write_cell(self, cell_id: str, frame: pd.DataFrame | Sequence[Mapping[str, Any]] | None,
                   status: str, compile_s: float | None = None, run_s: float | None = None,
                   *, arrays: Mapping[str, np.ndarray] | None = None, **info: Any) -> None:
        """Records one finished cell: the manifest entry (pending), its arrays and records,
        then records.parquet, then the manifest entry (finished).

        Each file is replaced atomically, in that order, so a crash at any point is
        reconciled on the next open. Writing a cell again replaces it. The cell's entry
        records the environment it ran under (versions, git SHA, device, host), so a
        resumed study keeps what each earlier cell ran under.

        Args:
          cell_id: a file-name-safe id such as ``"w00064_s0-1"`` (letters, digits,
            ``_.,=+@-``).
          frame: the cell's records, a DataFrame with RECORD_COLUMNS or rows for
            :func:`records_frame`. Ignored (may be None) for status ``"failed"``: a failed
            cell keeps no records and is run again next time.
          status: ``"done"``, ``"diverged"`` (records up to the divergence are kept; the cell
            is not run again) or ``"failed"``.
          compile_s: seconds spent compiling.
          run_s: seconds spent running.
          arrays: named arrays to keep with the cell (``DIR/arrays/<cell_id>.npz``), e.g.
            ticket masks (:func:`save_masks` keys).
          **info: JSON-able extras for the manifest entry (e.g. ``diverged_step``,
            ``width``, ``seeds``); NumPy/JAX values are converted.

        Raises:
          ValueError: for a bad cell id, status, record table or info value.
          UserInputError: when a file in DIR cannot be written (disk full, permissions).
        """
        if self._lock is None:
            raise RuntimeError(f"the results store {self.path} is closed")
        _check_cell_id(cell_id)
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        clash = sorted(set(info) & set(_RESERVED_INFO))
        if clash:
            raise ValueError(f"info keys {clash} are reserved")
        try:
            entry = _jsonable({"status": status, "compile_s": compile_s, "run_s": run_s,
                               **info})
        except TypeError as e:
            raise ValueError(f"cell {cell_id!r}: {e}") from e
        records = _as_records(frame) if status in FINISHED else None
        cells = self._manifest["cells"]
        owned = self._owned_files(cell_id)
        if cell_id not in cells and any(f.exists() for f in owned):
            raise UserInputError(f"{str(owned[0])!r} or {str(owned[1])!r} exists but the "
                                 f"manifest of {str(self.path)!r} does not name it: move it "
                                 "away, it was not written by this study")
        entry.update(rows=0 if records is None else len(records), finished=_now(),
                     environment=environment_info(self._manifest["x64"]))
        try:
            # The claim holds the whole entry, so a crash before the last manifest write
            # is reconciled to exactly this entry (status from "intended").
            cells[cell_id] = {**entry, "status": "pending", "intended": status}
            self._write_manifest()
            self._write_cell_files(cell_id, records, arrays)
            cells[cell_id] = entry
            self._write_records()
            self._write_manifest()
        except OSError as e:
            raise UserInputError(f"cannot write {e.filename or self.path} ({e.strerror or e}): "
                                 f"check the free space and permissions of {self.path}") from e

    def _write_cell_files(self, cell_id: str, records: pd.DataFrame | None,
                          arrays: Mapping[str, np.ndarray] | None) -> None:
        """The cell's records and arrays files (both removed for a failed cell; the arrays
        file removed when a rewrite has none, so no stale masks stay behind)."""
        cell_file, array_file = self._owned_files(cell_id)
        if records is None:
            cell_file.unlink(missing_ok=True)
            self._frames.pop(cell_id, None)
        if not arrays or records is None:
            array_file.unlink(missing_ok=True)
        if records is None:
            return
        if arrays:
            array_file.parent.mkdir(exist_ok=True)
            _atomic_write_bytes(array_file, _npz_bytes(arrays))
        cell_file.parent.mkdir(exist_ok=True)
        _atomic_write_bytes(cell_file, _parquet_bytes(records))
        self._frames[cell_id] = records

    # -- reading and closing

    def done_cells(self) -> set[str]:
        """Ids of the cells finished as done or diverged: never to be computed again."""
        return {cid for cid, e in self._manifest["cells"].items() if e["status"] in FINISHED}

    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest as last written."""
        return json.loads(json.dumps(self._manifest))

    def close(self) -> None:
        """Releases the lock; the store cannot write after this. Closing twice is fine."""
        if self._lock is not None:
            self._lock.close()  # closing the descriptor drops the flock
            self._lock = None

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self._lock is not None else "closed"
        return f"ResultsStore({str(self.path)!r}, {len(self.done_cells())} done, {state})"


def open_store(path: str | os.PathLike, config: Mapping[str, Any],
               data_fingerprint: str | None, x64: bool, *, force: bool = False) -> ResultsStore:
    """Opens ``path`` for writing; same as :class:`ResultsStore` (see there)."""
    return ResultsStore(path, config, data_fingerprint, x64, force=force)


# ----------------------------------------------------------------------------- masks


def _structure(tree: Any, leaves: list[np.ndarray]) -> Any:
    """A JSON description of a stax PyTree (nested lists and tuples of arrays); appends the
    arrays to ``leaves`` and puts their index in their place."""
    if isinstance(tree, list | tuple):
        return {"list" if isinstance(tree, list) else "tuple":
                [_structure(t, leaves) for t in tree]}
    leaves.append(np.asarray(tree))
    return len(leaves) - 1


def _rebuild(structure: Any, leaves: Sequence[np.ndarray]) -> Any:
    if isinstance(structure, int):
        return leaves[structure]
    ((kind, items),) = structure.items()
    built = [_rebuild(s, leaves) for s in items]
    return built if kind == "list" else tuple(built)


def mask_arrays(masks: Mapping[tuple[str, int], Any], seeds: Sequence[int]) -> dict[str,
                                                                                  np.ndarray]:
    """The named arrays that keep a cell's masks in ``DIR/arrays/<cell>.npz``.

    Args:
      masks: ``{(family, round): mask}``, each mask a PyTree of 0/1 arrays stacked over
        ``seeds`` (leading axis).
      seeds: the cell's seeds.

    Returns:
      ``{"mask/<family>/<round>/<seed>/<leaf>": bool array, "mask_structure": bytes}``.
    """
    out: dict[str, np.ndarray] = {}
    structure = None
    for (family, round_), stacked in masks.items():
        leaves: list[np.ndarray] = []
        structure = _structure(stacked, leaves)
        for i, seed in enumerate(seeds):
            for j, leaf in enumerate(leaves):
                out[f"mask/{family}/{round_}/{int(seed)}/{j}"] = leaf[i].astype(bool)
    if structure is not None:
        out["mask_structure"] = np.frombuffer(json.dumps(structure).encode(), np.uint8)
    return out


def load_masks(path: str | os.PathLike, width: int, family: str, round_: int,
               seed: int, *, rewind_step: int | None = None, **factors: Any) -> Any:
    """A ticket mask of a results folder, as the PyTree of 0/1 arrays it was trained with.

    Args:
      path: the results folder of a ticket study.
      width: the cell's width.
      family: the mask family (``imp``, ``imp_linear``, ``random``, ``shuffle``, …; the
        ``mask`` column of the records).
      round_: the pruning round (1 … ``tickets.rounds``).
      seed: the seed.
      rewind_step: the rewind step k of a study that sweeps several (their masks are kept
        as ``<family>@<k>``); not needed when the study has one.
      **factors: factor values (``parameterization="mup"``, ``output_scale=10.0``) that pick
        the cell when the study varies them.

    Returns:
      A PyTree shaped like the network's parameters (``build_model(...).init``), with
      bool arrays: True where the weight is kept.

    Raises:
      UserInputError: naming what is missing (the folder, the cell, the family, round or
        seed) and what is there.
    """
    folder = _results_dir(path)
    manifest = load_manifest(folder)
    cells = [cid for cid, e in manifest["cells"].items()
             if e["status"] in FINISHED and e.get("width") == width
             and seed in e.get("seeds", ()) and all(e.get(c) == v for c, v in factors.items())]
    if not cells:
        widths = sorted({e.get("width") for e in manifest["cells"].values()})
        raise UserInputError(f"{str(folder)!r} has no finished cell of width {width} with "
                             f"seed {seed}{''.join(f', {c} {v!r}' for c, v in factors.items())}"
                             f" (widths: {widths})")
    if len(cells) > 1:
        choices = sorted({tuple((c, manifest["cells"][cid][c]) for c in FACTOR_COLUMNS)
                          for cid in cells})
        raise UserInputError(f"{str(folder)!r} holds width {width}, seed {seed} under several "
                             f"factor values {choices}: pass them, e.g. "
                             f"load_masks(..., {', '.join(f'{c}={v!r}' for c, v in choices[0])})")
    file = folder / ARRAYS / f"{cells[0]}.npz"
    if not file.exists():
        raise UserInputError(f"{str(folder)!r} keeps no masks for width {width}: it is not "
                             "a ticket study (or was written by an older ntk-tickets)")
    with np.load(file) as archive:
        swept = any("@" in k.split("/")[1] for k in archive.files if k.startswith("mask/"))
        if swept and rewind_step is None:
            steps = sorted({int(k.split("/")[1].rsplit("@", 1)[1]) for k in archive.files
                            if k.startswith("mask/")})
            raise UserInputError(f"{str(folder)!r} sweeps the rewind step over {steps}: pass "
                                 f"rewind_step=, e.g. load_masks(..., rewind_step={steps[0]})")
        if swept:
            family = f"{family}@{rewind_step}"
        prefix = f"mask/{family}/{round_}/{seed}/"
        names = sorted((k for k in archive.files if k.startswith(prefix)),
                       key=lambda k: int(k.rsplit("/", 1)[1]))
        if not names:
            kept = sorted({tuple(k.split("/")[1:3]) for k in archive.files
                           if k.startswith("mask/")})
            raise UserInputError(f"no mask {family!r} round {round_} seed {seed} in {str(file)!r}; "
                                 f"it has (family, round): {kept}")
        structure = json.loads(archive["mask_structure"].tobytes().decode())
        return _rebuild(structure, [archive[k] for k in names])
