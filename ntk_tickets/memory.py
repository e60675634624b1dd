"""A memory guard: estimate what one cell needs and refuse it before anything is allocated.

:func:`cell_bytes` adds up, from shapes alone (``jax.eval_shape``, nothing allocated), the
largest arrays a cell holds at once:

* **parameters and optimizer state** of every vmapped seed: θ, θ0, the gradient, the update
  and θ at the rewind step of the path being trained, the optimizer's state (from the
  optimizer's own ``init``, by shape: none for SGD, one slot for momentum, two for Adam) and
  the update mask of ticket studies, and θ_T and θ_k of the other trained path;
* **activations** of one training step: every hidden unit of every example of the batch,
  about four times (forward values, tangents of the linear path, and their gradients);
* **recorded outputs**: the outputs on train and test inputs at every recorded step, per
  path, and the probe NTK at every recorded step;
* **closed forms**: the train × (train + test) kernels of the ``ntk`` and ``nngp`` paths,
  the full (n·k) × ((n + m)·k) empirical NTK of the ``entk`` path, and their
  eigendecomposition.

With a Ray cluster the check reads the memory of the machine that runs ``ntk-tickets``, not
of the nodes: give remote cells a machine at least that large.

:func:`check_memory` compares the largest cell with the memory of the device the cells run
on (a GPU's memory limit, or the host's available memory for the CPU) and raises a one-line
:class:`~ntk_tickets.errors.UserInputError` naming the estimate and what to lower. The
estimate is deliberately rough (within a factor of about two); it exists to turn a
guaranteed out-of-memory crash into a clear message, not to pack memory tightly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ntk_tickets.errors import UserInputError

if TYPE_CHECKING:
    from ntk_tickets.config import StudyConfig
    from ntk_tickets.data import Dataset

#: Refuse a cell whose estimate exceeds this fraction of the device's memory.
HEADROOM = 0.8


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def cell_bytes(cfg: StudyConfig, data: Dataset, width: int, n_seeds: int,
               itemsize: int) -> dict[str, int]:
    """The estimated peak bytes of one cell, by part (see the module docstring).

    Returns:
      ``{"parameters", "activations", "outputs", "closed_forms"}`` in bytes.
    """
    import jax

    from ntk_tickets.architectures import ARCHITECTURES
    from ntk_tickets.experiments import has_closed_forms
    from ntk_tickets.models import build_model, parameter_count
    from ntk_tickets.optimizers import make_optimizer

    model = build_model(cfg.model, width, data.input_shape, data.n_out)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    n_params = parameter_count(shapes)
    n_state = parameter_count(jax.eval_shape(make_optimizer(cfg.train).init, shapes))
    trained = [p for p in ("exact", "linear") if p in cfg.paths]
    copies = 5 + 2 * max(len(trained) - 1, 0) + (cfg.tickets is not None)
    batch = cfg.train.batch_size or data.x_train.shape[0]
    convolutional = ARCHITECTURES[cfg.model.arch].input_shape is not None
    units = width * cfg.model.depth * (math.prod(data.input_shape[:-1]) if convolutional else 1)
    n_train, n_points = data.x_train.shape[0], data.x_train.shape[0] + data.x_test.shape[0]
    recorded = cfg.train.log_points + 2
    closed = ([p for p in ("entk", "ntk", "nngp") if p in cfg.paths]
              if has_closed_forms(cfg) else [])
    # entk: the full (n·k) × ((n + m)·k) empirical NTK; ntk/nngp: traced n × (n + m) kernels
    outputs = data.n_out**2 if "entk" in closed else 1
    kernel = 3 * n_train * n_points * outputs if closed else 0
    return {
        "parameters": (copies * n_params + n_state) * n_seeds * itemsize,
        "activations": 4 * batch * units * n_seeds * itemsize,
        "outputs": (recorded * n_seeds * itemsize
                    * (n_points * data.n_out * (len(trained) + len(closed))
                       + cfg.probe_size**2)),
        "closed_forms": kernel * itemsize,
    }


def device_memory() -> tuple[int | None, str]:
    """(bytes the first JAX device can use, its name): a GPU's or TPU's memory limit, or
    the host's available memory for the CPU; None when it cannot be read."""
    import jax

    device = jax.devices()[0]
    stats = getattr(device, "memory_stats", lambda: None)() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), str(device)
    return _host_available(), "this machine (cpu)"


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(cfg: StudyConfig, data: Dataset, cells: Sequence[Any], x64: bool,
                 available: int | None = None) -> None:
    """Refuses the study if its largest cell would not fit in the device's memory.

    Args:
      cfg: the study config.
      data: its dataset.
      cells: the cells to compute (:class:`ntk_tickets.study.Cell`).
      x64: whether the cells compute in float64.
      available: bytes available; None: :func:`device_memory`.

    Raises:
      UserInputError: naming the cell, its estimated size by part, the memory available
        and what to lower.
    """
    if not cells:
        return
    where = "this machine"
    if available is None:
        available, where = device_memory()
    if available is None:
        return
    itemsize = 8 if x64 else 4
    sizes = {cell: cell_bytes(cell.config(cfg), data, cell.width, len(cell.seeds), itemsize)
             for cell in cells}
    cell, parts = max(sizes.items(), key=lambda item: sum(item[1].values()))
    total = sum(parts.values())
    if total <= HEADROOM * available:
        return
    detail = ", ".join(f"{name} {_gib(n)}" for name, n in parts.items() if n)
    raise UserInputError(
        f"width {cell.width} with {len(cell.seeds)} seed(s) needs about {_gib(total)} "
        f"({detail}) but {where} has {_gib(available)} available: lower model.widths, "
        "or run fewer train.seeds, a smaller data.n_train or train.batch_size at a time")
