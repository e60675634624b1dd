"""Where the cells of a study run: here, in a spawn-based process pool, or as Ray tasks.

A cell (one width; seeds are vmapped inside it) is a pure function of the config, the width
and the float64 flag: :func:`compute_cell`. The executors only decide where it runs and hand
back :class:`CellOutput` values as cells finish, in completion order. The results store stays
in the calling process (its one writer), so every executor writes the same files.

* ``serial``: one cell after another in this process (the default; the dataset is loaded once).
* ``process``: a ``concurrent.futures`` process pool started with ``spawn``, because JAX is
  not fork-safe (a forked child inherits XLA's threads in an unknown state). Each worker
  imports JAX and loads the dataset once. On a CPU every XLA process uses all cores, so more
  workers mostly overlap one cell's compilation with another's run; on a multi-GPU machine
  give each worker its own device (``CUDA_VISIBLE_DEVICES``) or use Ray.
* ``ray``: each cell is a Ray task (``num_cpus=1``, ``num_gpus`` as asked) on an existing
  cluster (``ray_address``, e.g. ``"auto"`` or ``"ray://head:10001"``) or on a local one
  started here with ``workers`` CPUs. Every node needs the same ntk_tickets installed. A
  local cluster listens on 127.0.0.1 only and runs the cells with this Python; an address
  that does not accept connections fails within seconds.

Every executor computes the same numbers: a cell's records do not depend on where it ran.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import math
import multiprocessing
import os
import socket
import urllib.parse
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from ntk_tickets.config import DataConfig, StudyConfig, cell_factors
from ntk_tickets.data import Dataset, load_dataset
from ntk_tickets.errors import UserInputError

EXECUTORS = ("serial", "process", "ray")


@dataclasses.dataclass(frozen=True)
class CellOutput:
    """One finished cell, ready for :meth:`ntk_tickets.results.ResultsStore.write_cell`.

    Attributes:
      width: the cell's width.
      records: its tidy records (a DataFrame with the record columns).
      status: ``"done"`` or ``"diverged"``.
      compile_s: seconds spent compiling its training programs.
      run_s: seconds spent running them (and the host work between them).
      info: cell facts for the manifest (parameter count, divergence steps, …).
      arrays: named arrays kept with the cell (ticket masks); empty for paired studies.
    """

    width: int
    records: Any
    status: str
    compile_s: float
    run_s: float
    info: dict[str, Any]
    arrays: dict[str, Any] = dataclasses.field(default_factory=dict)


@functools.lru_cache(maxsize=4)
def _cached_dataset(data: DataConfig, loss: str, x64: bool) -> Dataset:
    import jax

    with jax.enable_x64(x64):
        return load_dataset(data, loss)


def compute_cell(cfg: StudyConfig, width: int, x64: bool,
                 data: Dataset | None = None) -> CellOutput:
    """Runs the cell of one width: the paired study, the ticket study if ``cfg.tickets``, or
    the escape study if ``cfg.escape``.

    Args:
      cfg: the cell's config (one value of each factor field, ``Cell.config``); its factor
        values are stamped on every record.
      width: hidden units (MLPs) or channels (CNNs).
      x64: compute in float64.
      data: the dataset, if already loaded (else loaded here, once per process).

    Returns:
      The cell's :class:`CellOutput`.
    """
    import jax

    from ntk_tickets.cells import run_width
    from ntk_tickets.escape import run_escape_width
    from ntk_tickets.results import records_frame

    data = data if data is not None else _cached_dataset(cfg.data, cfg.train.loss, x64)
    run_cell = run_escape_width if cfg.escape is not None else run_width
    with jax.enable_x64(x64):
        result = run_cell(cfg, data, width)
    (factors,) = cell_factors(cfg)
    for row in result.rows:
        row.update(factors)
    return CellOutput(width, records_frame(result.rows), result.status, result.compile_s,
                      result.run_s, result.info, result.arrays)


def _serial(cfg: StudyConfig, widths: Sequence[int], x64: bool,
            data: Dataset | None) -> Iterator[CellOutput]:
    for width in widths:
        yield compute_cell(cfg, width, x64, data)


def _worker_init() -> None:
    """Lets several processes share one GPU instead of each taking most of its memory."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _compute_cell_args(args: tuple[StudyConfig, int, bool]) -> CellOutput:
    return compute_cell(*args)


def _process_pool(cfg: StudyConfig, widths: Sequence[int], x64: bool, workers: int,
                  cell_fn=_compute_cell_args) -> Iterator[CellOutput]:
    """``cell_fn((cfg, width, x64))`` in a spawn-based pool, yielding results as they finish.

    A worker that dies (killed, out of memory, a crash inside XLA) raises ``RuntimeError``
    instead of leaving the run waiting forever; the cells finished before are kept. An error
    inside a cell is raised once the cells already running have finished.
    """
    context = multiprocessing.get_context("spawn")
    # Leaving the `with` (done, an error, Ctrl-C) cancels the cells not started yet.
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                initializer=_worker_init) as pool:
        futures = {pool.submit(cell_fn, (cfg, w, x64)): w for w in widths}
        try:
            for future in concurrent.futures.as_completed(futures):
                try:
                    yield future.result()
                except BrokenProcessPool as e:
                    raise RuntimeError(
                        f"a worker process died while computing width {futures[future]} "
                        "(out of memory?); finished cells are saved: run again to resume, "
                        "with fewer --workers") from e
        finally:
            for future in futures:
                future.cancel()


# Seconds to wait for a TCP connection to a Ray cluster before calling it unreachable.
RAY_CONNECT_TIMEOUT_S = 5.0


def _ray_target(address: str | None) -> str | None:
    """The cluster ``ray.init(address)`` joins: ``RAY_ADDRESS`` overrides None and ``"auto"``.

    None (also for ``"local"``) means a new local cluster.
    """
    from_env = os.environ.get("RAY_ADDRESS") or None
    target = from_env if from_env and address in (None, "auto") else address
    return None if target == "local" else target


def _dialed_address(target: str) -> tuple[str, int]:
    """The host and port Ray connects to first for ``target``.

    ``ray://host:port`` (any ``scheme://``) is a Ray Client server (port 10001 by default).
    Anything else goes through Ray's own resolution: ``"auto"`` finds a cluster started on
    this machine, and ``localhost``/``127.0.0.1`` become the machine's outward address,
    which is what Ray dials.

    Raises:
      ConnectionError: for ``"auto"`` when no cluster runs here.
      ValueError: for a malformed address.
    """
    if "://" in target:
        parts = urllib.parse.urlsplit(target)
        if not parts.hostname:
            raise ValueError(f"no host in {target!r}")
        return parts.hostname, parts.port or 10001
    from ray._private.services import canonicalize_bootstrap_address

    host, _, port = canonicalize_bootstrap_address(target).rpartition(":")
    return host.strip("[]"), int(port)


def _check_reachable(target: str, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Fails at once for a cluster that does not accept TCP connections.

    ``ray.init`` would retry such an address for a quarter of an hour (20 attempts of
    about 40 s each, in Ray 2.60), so the address is tried here first, with one short
    TCP connection.

    Raises:
      OSError: when the connection is refused or times out (ConnectionError for
        ``"auto"`` without a cluster).
      ValueError: for a malformed address.
    """
    host, port = _dialed_address(target)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise OSError(f"{host}:{port}: {e}") from e


@contextlib.contextmanager
def _local_ray_settings() -> Iterator[None]:
    """Makes a local cluster started inside the block private to this machine and Python.

    * Ray's servers (GCS, raylet, workers) listen on 127.0.0.1 only when the node's IP is
      127.0.0.1, but on Linux Ray replaces a requested 127.0.0.1 by the machine's outward
      address, and so listens on every interface, unless multi-node clusters are turned
      off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``).
    * Under ``uv run``, Ray's uv hook would copy the working directory and build a second
      virtualenv for the workers; ``RAY_ENABLE_UV_RUN_RUNTIME_ENV=0`` keeps this Python.

    Ray reads both once, when imported, so they are turned off in the environment (for the
    processes Ray starts) and in the imported constants (for this one; those this Ray
    version has), and restored after the block.
    """
    from ray._private import ray_constants

    settings = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "ENABLE_RAY_CLUSTER",
                "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "RAY_ENABLE_UV_RUN_RUNTIME_ENV"}
    saved_env = {name: os.environ.get(name) for name in settings}
    saved_constants = {const: getattr(ray_constants, const) for const in settings.values()
                       if hasattr(ray_constants, const)}
    try:
        for name in settings:
            os.environ[name] = "0"
        for const in saved_constants:
            setattr(ray_constants, const, False)
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for const, value in saved_constants.items():
            setattr(ray_constants, const, value)


def _ray_init(target: str | None, workers: int) -> None:
    """``ray.init`` for ``target`` (None: a new local cluster with ``workers`` CPUs)."""
    import ray

    with warnings.catch_warnings():
        # Ray starts its daemons with fork + exec, which Python flags once JAX's threads
        # exist; exec replaces the child at once, so nothing can deadlock.
        warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
        # "local": never join a cluster that `ray start` left recorded on this machine.
        ray.init(address=target or "local", num_cpus=None if target else workers,
                 include_dashboard=False, logging_level="WARNING")


@contextlib.contextmanager
def ray_cluster(address: str | None = None, workers: int = 1) -> Iterator[None]:
    """Ray, ready for tasks, for the duration of the ``with`` block.

    Joins the cluster at ``address`` (or ``RAY_ADDRESS``), or starts a local one with
    ``workers`` CPUs, and shuts down what it started; if Ray is already initialized, uses it
    as it is. A local cluster listens on 127.0.0.1 only and runs its tasks with this Python
    (see :func:`_local_ray_settings`).

    Raises:
      UserInputError: when the cluster cannot be reached (within seconds: an address that
        refuses or drops TCP connections is not retried).
    """
    import ray

    if ray.is_initialized():
        yield
        return
    target = _ray_target(address)
    with _local_ray_settings() if target is None else contextlib.nullcontext():
        try:
            if target is not None:
                _check_reachable(target)
            _ray_init(target, workers)
        except (OSError, ValueError, RuntimeError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if target is None:
                raise UserInputError(f"cannot start a local Ray cluster ({reason})") from e
            raise UserInputError(
                f"cannot reach the Ray cluster at {target!r} (--ray-address or RAY_ADDRESS) "
                f"({reason}); start one with `ray start --head`, or leave both unset for a "
                "local cluster") from e
        try:
            yield
        finally:
            ray.shutdown()


def _worker_env() -> dict[str, str]:
    """Environment variables for Ray's workers, as :func:`_worker_init` sets them."""
    return {"XLA_PYTHON_CLIENT_PREALLOCATE":
            os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "false")}


def _ray_tasks(cfg: StudyConfig, widths: Sequence[int], x64: bool, workers: int,
               address: str | None, gpus_per_cell: float) -> Iterator[CellOutput]:
    import ray

    with ray_cluster(address, workers):
        task = ray.remote(num_cpus=1, num_gpus=gpus_per_cell,
                          runtime_env={"env_vars": _worker_env()})(compute_cell)
        pending = [task.remote(cfg, w, x64) for w in widths]
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                try:
                    yield ray.get(ready[0])
                except ray.exceptions.RayTaskError as e:
                    if isinstance(e.cause, UserInputError):
                        raise e.cause from None
                    raise
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)


def check_executor_options(executor: str = "serial", workers: int | None = None,
                           ray_address: str | None = None,
                           gpus_per_cell: float = 0.0) -> None:
    """Refuses executor options that cannot work, before any work or file is touched.

    Raises:
      UserInputError: for an unknown executor, ``workers < 1``, Ray options without
        ``executor="ray"``, or a negative or non-finite ``gpus_per_cell``.
    """
    if executor not in EXECUTORS:
        raise UserInputError(f"--executor {executor!r} is not one of {', '.join(EXECUTORS)}")
    if workers is not None and workers < 1:
        raise UserInputError(f"--workers {workers} must be at least 1")
    if executor != "ray" and (ray_address or gpus_per_cell):
        raise UserInputError("--ray-address and --gpus-per-cell need --executor ray")
    if not math.isfinite(gpus_per_cell) or gpus_per_cell < 0:
        raise UserInputError(f"--gpus-per-cell {gpus_per_cell} must be a finite number, "
                             "0 or more")


def default_workers(n_cells: int) -> int:
    """One worker per cell, at most the CPU count."""
    return max(1, min(n_cells, os.cpu_count() or 1))


def execute_cells(cfg: StudyConfig, widths: Sequence[int], x64: bool, *,
                  executor: str = "serial", data: Dataset | None = None,
                  workers: int | None = None, ray_address: str | None = None,
                  gpus_per_cell: float = 0.0) -> Iterator[CellOutput]:
    """Computes the cells of ``widths`` on ``executor``, yielding each as it finishes.

    Args:
      cfg: the study config.
      widths: the widths still to compute.
      x64: compute in float64.
      executor: ``"serial"``, ``"process"`` or ``"ray"`` (see the module docstring).
      data: the loaded dataset (serial only; other executors load it in each worker).
      workers: parallel workers (process pool size; CPUs of a local Ray cluster); default
        the number of cells, at most the CPU count.
      ray_address: an existing Ray cluster; None starts a local one.
      gpus_per_cell: GPUs each Ray task asks for (0 on CPU machines).

    Yields:
      :class:`CellOutput` values in completion order (width order for ``serial``).

    Raises:
      UserInputError: at once for options that :func:`check_executor_options` refuses; for
        an unreachable Ray cluster when iteration starts.
    """
    check_executor_options(executor, workers, ray_address, gpus_per_cell)
    if not widths:
        return iter(())
    workers = workers or default_workers(len(widths))
    if executor == "serial":
        return _serial(cfg, widths, x64, data)
    if executor == "process":
        return _process_pool(cfg, widths, x64, workers)
    return _ray_tasks(cfg, widths, x64, workers, ray_address, gpus_per_cell)
