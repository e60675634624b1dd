"""The results store: one folder per study, written atomically, resumable after a crash.

Layout of a results folder ``DIR``::

    DIR/
      manifest.json              {"format_version", "config", "config_hash", "environment",
                                  "data_fingerprint", "cells": {cell_id: {"status",
                                  "compile_s", "run_s", "rows", "finished", ...info}},
                                  "created", "updated"}
      records.parquet            the tidy long table (RECORD_COLUMNS): all finished cells,
                                 concatenated in sorted cell-id order
      cells/<cell_id>.parquet    the records of one finished cell (status done or diverged)
      .lock                      held with flock by the one process that writes DIR

The cell files are the source of truth: ``records.parquet`` and the manifest's cell list are
derived from them. Every file is replaced atomically (temporary file in the same folder,
fsync, ``os.replace``), and :meth:`ResultsStore.write_cell` writes the cell file first, then
``records.parquet``, then ``manifest.json``. Opening a store reconciles whatever a crash left
between those steps: a cell file missing from the manifest is entered as done (timings
null), a finished cell whose file is gone is dropped (so it is recomputed), and
``records.parquet`` is rebuilt when its row count differs from the cells' total.

Example::

    with ResultsStore("results/s", config_to_dict(cfg), config_hash(cfg),
                      data.fingerprint, x64=cfg.train.x64) as store:
        for cell_id in ("width=64,seed=0", "width=256,seed=0"):
            if cell_id in store.done_cells():
                continue                        # finished by an earlier run: never recomputed
            store.write_cell(cell_id, records_frame(rows), "done", compile_s=1.2, run_s=3.4)
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
import shutil
import subprocess
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from ntk_tickets.errors import UserInputError

if TYPE_CHECKING:
    import pandas as pd

RECORD_COLUMNS: tuple[str, ...] = (
    "width", "seed", "path", "mask", "sparsity", "round", "step", "split", "metric", "value",
    "eps",
)
# Column kinds: "int" → int64, "float" → float64, "str" → pandas' string dtype.
_KINDS = {
    "width": "int", "seed": "int", "path": "str", "mask": "str", "sparsity": "float",
    "round": "int", "step": "int", "split": "str", "metric": "str", "value": "float",
    "eps": "float",
}
_DTYPES = {"int": "int64", "float": "float64", "str": str}
REQUIRED_COLUMNS: tuple[str, ...] = ("width", "seed", "path", "step", "metric", "value")
RECORD_DEFAULTS: Mapping[str, Any] = {
    "mask": "dense", "sparsity": 0.0, "round": 0, "split": "none", "eps": math.nan,
}

STATUSES = ("done", "diverged", "failed")
FINISHED = ("done", "diverged")  # cells with records, never recomputed

MANIFEST = "manifest.json"
RECORDS = "records.parquet"
CELLS = "cells"
LOCK = ".lock"
FORMAT_VERSION = 1
_TMP_SUFFIX = ".tmp"
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


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading a bad parquet file raises."""
    import pyarrow

    return OSError, ValueError, pyarrow.ArrowException


def _run_hint(folder: Path) -> str:
    return f"run `ntk-tickets run CONFIG --out {folder}` first"


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
    """The parsed manifest; UserInputError naming ``file`` when missing or corrupted."""
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError as e:
        raise UserInputError(f"{str(file)!r} does not exist: {_run_hint(file.parent)}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserInputError(f"{str(file)!r} is corrupted or not an ntk-tickets manifest "
                             f"({e})") from e
    if not (isinstance(manifest, dict) and isinstance(manifest.get("config_hash"), str)
            and isinstance(manifest.get("cells"), dict)):
        raise UserInputError(f"{str(file)!r} is corrupted or not an ntk-tickets manifest "
                             "(no config_hash or cells)")
    return manifest


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
        return _conform(pd.read_parquet(file), allow_extra=True)
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


def _check_cell_id(cell_id: str) -> None:
    if not (isinstance(cell_id, str) and _CELL_ID.fullmatch(cell_id)):
        raise ValueError(f"cell id {cell_id!r} must be 1-200 characters of letters, digits "
                         "and _.,=+@- not starting with '.' or '-'")


class ResultsStore:
    """The one writer of a results folder (layout in the module docstring).

    Opening creates the folder (and its parents), takes its lock, checks that an existing
    manifest describes the same study, and reconciles what a crash may have left. Use it as
    a context manager, or call :meth:`close`, to release the lock.

    Args:
      path: the results folder ``DIR``.
      config: the resolved config as plain values (``config_to_dict(cfg)``).
      config_hash: its hash (``config_hash(cfg)``).
      data_fingerprint: ``Dataset.fingerprint`` (None when unknown; then not compared).
      x64: whether this run computes in float64.
      force: discard the results already in ``DIR`` (``cells/``, ``records.parquet`` and
        ``manifest.json``; nothing else) and start fresh.

    Raises:
      UserInputError: when ``DIR`` cannot be created or written, another run holds its lock,
        or it holds results of another config, other data or another precision (without
        ``force``), or a corrupted manifest or cell file.
    """

    def __init__(self, path: str | os.PathLike, config: Mapping[str, Any], config_hash: str,
                 data_fingerprint: str | None, x64: bool, *, force: bool = False):
        self.path = Path(path)
        self._frames: dict[str, pd.DataFrame] = {}
        _make_dir(self.path)
        self._lock: IO[bytes] | None = _acquire_lock(self.path)
        try:
            self._manifest = self._open(dict(config), config_hash, data_fingerprint,
                                        bool(x64), force)
            self._reconcile()
            # Written only once everything on disk has been checked: a refused open
            # (another study, a corrupted file) leaves the folder exactly as it was.
            self._write_manifest(self._manifest)
        except BaseException:
            self.close()
            raise

    # -- opening

    def _open(self, config: dict[str, Any], config_hash: str, data_fingerprint: str | None,
              x64: bool, force: bool) -> dict[str, Any]:
        """The manifest to continue: the existing one (same study) or a fresh one."""
        env = environment_info(x64)
        old = None if force else self._existing_manifest()
        if old is None:
            self._discard()
            manifest = {
                "format_version": FORMAT_VERSION, "config": config, "config_hash": config_hash,
                "environment": env, "data_fingerprint": data_fingerprint, "cells": {},
                "created": _now(), "updated": None,
            }
        else:
            self._check_same_study(old, config_hash, data_fingerprint, x64)
            manifest = {**old, "config": config, "environment": env}
        return manifest

    def _existing_manifest(self) -> dict[str, Any] | None:
        """The manifest in DIR; None for a folder with no ntk-tickets results."""
        file = self.path / MANIFEST
        if file.exists():
            try:
                return _read_manifest_file(file)
            except UserInputError as e:
                raise UserInputError(f"{e}: choose another --out DIR or pass --force to start "
                                     "over") from e
        if self._cell_files() or (self.path / RECORDS).exists():
            raise UserInputError(
                f"{str(self.path)!r} holds ntk-tickets results but no {MANIFEST}: choose "
                "another --out DIR or pass --force to discard them")
        return None

    def _check_same_study(self, old: Mapping[str, Any], config_hash: str,
                          data_fingerprint: str | None, x64: bool) -> None:
        old_x64 = (old.get("environment") or {}).get("x64")
        old_fingerprint = old.get("data_fingerprint")
        if old["config_hash"] != config_hash:
            what = f"another config (hash {old['config_hash']}, this one {config_hash})"
        elif old_fingerprint and data_fingerprint and old_fingerprint != data_fingerprint:
            what = f"other data (fingerprint {old_fingerprint}, this data {data_fingerprint})"
        elif old_x64 is not None and old_x64 != x64:
            what = f"x64 = {old_x64} (this run has x64 = {x64})"
        else:
            return
        raise UserInputError(f"{str(self.path)!r} holds results of {what}: choose another "
                             "--out DIR or pass --force to discard them")

    def _discard(self) -> None:
        """Deletes the manifest first, so that a crash midway leaves no claim on the rest."""
        for name in (MANIFEST, RECORDS):
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / CELLS, ignore_errors=True)

    def _cell_files(self) -> dict[str, Path]:
        folder = self.path / CELLS
        if not folder.is_dir():
            return {}
        return {p.stem: p for p in sorted(folder.glob("*.parquet"))
                if _CELL_ID.fullmatch(p.stem)}

    def _reconcile(self) -> None:
        """Makes the manifest (in memory) and records.parquet agree with the cell files."""
        (self.path / CELLS).mkdir(exist_ok=True)
        for folder in (self.path, self.path / CELLS):
            for tmp in folder.glob(f".*{_TMP_SUFFIX}"):  # left by a crash mid-write
                tmp.unlink(missing_ok=True)
        files = self._cell_files()
        rows = {cid: self._cell_rows(p) for cid, p in files.items()}
        cells = self._manifest["cells"]
        for cid in files:
            if cells.get(cid, {}).get("status") not in FINISHED:
                cells[cid] = {"status": "done", "compile_s": None, "run_s": None,
                              "rows": rows[cid], "finished": None, "reconciled": True}
        for cid in [c for c, entry in cells.items() if entry.get("status") in FINISHED]:
            if cid not in files:
                del cells[cid]
        if self._records_rows() != (sum(rows.values()) if files else None):
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

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest["updated"] = _now()
        _atomic_write_bytes(self.path / MANIFEST, _json_bytes(manifest))

    def _write_records(self) -> None:
        """Rewrites records.parquet from the finished cells (removes it when there are none)."""
        import pandas as pd

        ids = sorted(self._cell_files())
        if not ids:
            (self.path / RECORDS).unlink(missing_ok=True)
            return
        for cid in ids:
            if cid not in self._frames:
                file = self.path / CELLS / f"{cid}.parquet"
                try:
                    self._frames[cid] = _conform(pd.read_parquet(file))
                except _read_errors() as e:
                    raise UserInputError(f"cell file {str(file)!r} is corrupted ({e}): delete "
                                         "it and run again to recompute that cell") from e
        frame = _concat_records([self._frames[cid] for cid in ids])
        _atomic_write_bytes(self.path / RECORDS, _parquet_bytes(frame))

    def write_cell(self, cell_id: str, frame: pd.DataFrame | Sequence[Mapping[str, Any]] | None,
                   status: str, compile_s: float | None = None, run_s: float | None = None,
                   **info: Any) -> None:
        """Records one finished cell: its records, then records.parquet, then the manifest.

        Each of the three files is replaced atomically, in that order, so a crash at any
        point is reconciled on the next open. Writing a cell again replaces it.

        Args:
          cell_id: a file-name-safe id such as ``"width=64,seed=0,mask=imp"`` (letters,
            digits, ``_.,=+@-``).
          frame: the cell's records, a DataFrame with RECORD_COLUMNS or rows for
            :func:`records_frame`. Ignored (may be None) for status ``"failed"``: a failed
            cell keeps no records and is run again next time.
          status: ``"done"``, ``"diverged"`` (records up to the divergence are kept; the cell
            is not run again) or ``"failed"``.
          compile_s: seconds spent compiling.
          run_s: seconds spent running.
          **info: JSON-able extras for the manifest entry (e.g. ``diverged_step``,
            ``sparsity_report``); NumPy/JAX values are converted.

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
            entry = _jsonable({"status": status, "compile_s": compile_s, "run_s": run_s, **info})
        except TypeError as e:
            raise ValueError(f"cell {cell_id!r}: {e}") from e
        records = _as_records(frame) if status in FINISHED else None
        cell_file = self.path / CELLS / f"{cell_id}.parquet"
        try:
            if records is None:
                cell_file.unlink(missing_ok=True)
                self._frames.pop(cell_id, None)
            else:
                _atomic_write_bytes(cell_file, _parquet_bytes(records))
                self._frames[cell_id] = records
            self._write_records()
            entry.update(rows=0 if records is None else len(records), finished=_now())
            self._manifest["cells"][cell_id] = entry
            self._write_manifest(self._manifest)
        except OSError as e:
            raise UserInputError(f"cannot write {e.filename or self.path} ({e.strerror or e}): "
                                 f"check the free space and permissions of {self.path}") from e

    # -- reading and closing

    def done_cells(self) -> set[str]:
        """Ids of the cells finished as done or diverged: never to be computed again."""
        return {cid for cid, e in self._manifest["cells"].items() if e.get("status") in FINISHED}

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


def open_store(path: str | os.PathLike, config: Mapping[str, Any], config_hash: str,
               data_fingerprint: str | None, x64: bool, *, force: bool = False) -> ResultsStore:
    """Opens ``path`` for writing; same as :class:`ResultsStore` (see there)."""
    return ResultsStore(path, config, config_hash, data_fingerprint, x64, force=force)
