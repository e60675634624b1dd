"""Ticket benchmark: one compiled program per width against one compile per round and mask.

Run: ``.uv/bin/uv run --frozen python benchmarks/bench_tickets.py`` (about 2 minutes on
2 CPU cores; ``--quick`` uses widths 32 and 128 only).

The study is IMP with 5 rounds and the random, re-init and shuffle controls, 4 seeds
(vmapped) and 3 widths, on digits (exact path, full batch): per width, 1 dense run plus
5 rounds × 4 masks = 21 training runs. It is timed twice, side by side:

* **ours**: masks, starts and the rewind step are array arguments of one compiled program
  per width (``TrainingProgram`` caches the executable);
* **naive**: the same runs, but the program is compiled again for every round and mask, as
  happens when masks are Python constants of a jitted function. This is a lower bound on the
  naive pattern's cost: closing over a mask also lets XLA constant-fold through it.

Both produce identical records (checked), so the difference is compile time only.

A second table counts compiles in a study with every section at once (a rewind sweep over
3 steps, ``[stability]`` children at 3 spawn steps, ``[subspace]`` with 2 kinds × 3
dimensions; digits, minibatches): per width and program, how many runs it trained and how
many times it was compiled (1 each: starts, masks, rewind points, minibatch orders,
subspaces and their dimensions are arguments).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ntk_tickets import StudyConfig, load_dataset, records_frame, with_overrides
from ntk_tickets import experiments as experiments_module
from ntk_tickets import subspace as subspace_module
from ntk_tickets.cells import run_width
from ntk_tickets.training import TrainingProgram, make_train_fn


class RecompilingProgram(TrainingProgram):
    """The naive pattern: a new jitted program, traced and compiled, for every call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        build = {k: v for k, v in kwargs.items() if k != "lr_factors"}
        self._rebuild = lambda: make_train_fn(*args, **build)

    def __call__(self, *args, **kwargs):
        self._train = self._rebuild()
        self._compiled.clear()
        return super().__call__(*args, **kwargs)


def study_config(widths: list[int]) -> StudyConfig:
    return with_overrides(StudyConfig(), [
        "data.name='digits'", "data.n_train=256", "data.n_test=256", f"model.widths={widths}",
        "train.loss='xent'", "train.learning_rate=1.0", "train.steps=100",
        "train.seeds=[0,1,2,3]", "train.log_points=4", "paths=['exact']",
        "metrics=['loss','accuracy']", "tickets.rounds=5", "tickets.prune_fraction=0.5",
        "tickets.eval_paths=['exact']", "tickets.controls=['random','reinit','shuffle']"])


def run(cfg: StudyConfig, data, width: int, naive: bool):
    """(wall seconds, compile seconds, records) of one ticket cell."""
    program_class = RecompilingProgram if naive else TrainingProgram
    experiments_module.TrainingProgram = program_class  # what training_programs() builds
    try:
        start = time.perf_counter()
        result = run_width(cfg, data, width)
        return time.perf_counter() - start, result.compile_s, records_frame(result.rows)
    finally:
        experiments_module.TrainingProgram = TrainingProgram


class CountingProgram(TrainingProgram):
    """A TrainingProgram that counts its calls and remembers every instance."""

    instances: list[CountingProgram] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0
        CountingProgram.instances.append(self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return super().__call__(*args, **kwargs)


def compile_counts(widths: list[int]) -> None:
    """Prints the runs and compiles of every program of a study with every section."""
    cfg = with_overrides(StudyConfig(), [
        "data.name='digits'", "data.n_train=128", "data.n_test=128", "train.loss='xent'",
        "train.learning_rate=0.5", "train.steps=60", "train.batch_size=16",
        "train.seeds=[0,1]", "train.log_points=4", "paths=['exact','linear']",
        "metrics=['loss','accuracy','ntk_velocity']", "probe_size=8", "tickets.rounds=2",
        "tickets.prune_fraction=0.5", "tickets.rewind_step=[0, 5, 20]",
        "tickets.controls=['random_rescaled']", "stability.spawn_steps=[0, 5, 20]",
        "subspace.kinds=['gaussian','axis_random']", "subspace.dims=[8, 32, 128]"])
    data = load_dataset(cfg.data, cfg.train.loss)
    print("\nevery section at once: rewind steps [0, 5, 20], spawn steps [0, 5, 20], "
          "subspaces gaussian and axis_random at d = 8, 32, 128")
    print(f"{'width':>6} {'program':>26} {'runs':>6} {'compiles':>9}")
    for module in (experiments_module, subspace_module):
        module.TrainingProgram = CountingProgram
    try:
        for width in widths:
            CountingProgram.instances.clear()
            run_width(cfg, data, width)
            names = [*cfg.paths, *(f"subspace gaussian, {p}" for p in cfg.paths)]
            for name, program in zip(names, CountingProgram.instances, strict=True):
                print(f"{width:>6} {name:>26} {program.calls:>6} "
                      f"{len(program._compiled):>9}")
    finally:
        for module in (experiments_module, subspace_module):
            module.TrainingProgram = TrainingProgram


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="widths 32 and 128 only")
    args = parser.parse_args()
    widths = [32, 128] if args.quick else [32, 128, 512]
    cfg = study_config(widths)
    data = load_dataset(cfg.data, cfg.train.loss)
    print("IMP, 5 rounds x (ticket + random + reinit + shuffle), 4 seeds, digits, exact path")
    print(f"{'width':>6} {'ours s':>8} {'compile':>8} {'naive s':>8} {'compile':>8} "
          f"{'naive/ours':>10}")
    for naive in (False, True):  # warm-up: imports, dataset transfer, first traces
        run(study_config([8]), data, 8, naive)
    totals = np.zeros(2)
    for width in widths:
        ours_s, ours_c, ours_rows = run(cfg, data, width, naive=False)
        naive_s, naive_c, naive_rows = run(cfg, data, width, naive=True)
        np.testing.assert_allclose(ours_rows["value"], naive_rows["value"], rtol=1e-5,
                                   atol=1e-6)
        totals += (ours_s, naive_s)
        print(f"{width:>6} {ours_s:>8.1f} {ours_c:>8.1f} {naive_s:>8.1f} {naive_c:>8.1f} "
              f"{naive_s / ours_s:>10.2f}")
    print(f"{'all':>6} {totals[0]:>8.1f} {'':>8} {totals[1]:>8.1f} {'':>8} "
          f"{totals[1] / totals[0]:>10.2f}")
    compile_counts(widths[:2])


if __name__ == "__main__":
    main()
