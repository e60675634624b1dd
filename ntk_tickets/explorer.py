"""An interactive explorer of the tangent-space picture on a 1-D regression.

Sliders set the width, depth, learning rate, training steps, parameterization and output
scale α of an MLP trained by full-batch gradient descent on a few points of sin(x) (or a
function of your own). Each move redraws, as functions of x:

* the exact network f(θ_T, x), trained;
* its linearization around θ0, trained the same way;
* the infinite-width NTK prediction, mean ± 2σ over initializations (none under µP, whose
  limit is not a kernel);

and beside them the relative weight change ‖θ_t − θ0‖/‖θ0‖ and the function gap (RMS of
exact − linear over the test inputs) along training. Wide networks in the NTK
parameterization, or large α, are *lazy*: the three curves agree and the weights barely
move. Narrow networks, µP and small α are *rich*: the exact network leaves its tangent
space.

Every number is the one ``ntk-tickets run`` records for :func:`study_config` of the same
settings (``tests/test_explorer.py`` checks it): the explorer builds that study's cell with
:func:`ntk_tickets.experiments.setup_cell` and trains it with its programs. The learning
rate enters those programs as an argument (per-parameter rate factors), and the steps choose
a recorded step of one run to :data:`STEP_CHOICES`'s largest, so a move of those sliders
reuses the compiled programs; a new width, depth, parameterization or α compiles once and is
kept. Views are cached too, so going back is instant.

Usage in Jupyter (``uv run --extra explore ...``)::

    from ntk_tickets import explore
    explore()                      # sliders, or a static figure when ipywidgets is missing
    explore(target=np.tanh)        # another function of x in [-π, π]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntk_tickets import experiments, metrics
from ntk_tickets.config import DataConfig, ModelConfig, StudyConfig, TrainConfig
from ntk_tickets.data import Dataset, load_dataset

WIDTH_CHOICES = (16, 64, 256, 1024, 4096)
DEPTH_CHOICES = (1, 2, 3)
STEP_CHOICES = (0, 1, 3, 10, 32, 100, 316, 1000)  # log_spaced_steps(1000, 7)
OUTPUT_SCALE_CHOICES = (0.1, 0.3, 1.0, 3.0, 10.0)
PARAMETERIZATIONS = ("ntk", "standard", "mup")


@dataclasses.dataclass(frozen=True)
class ExplorerSettings:
    """One position of the sliders.

    Attributes:
      width: hidden units per layer (one of :data:`WIDTH_CHOICES` in the widget).
      depth: hidden layers.
      learning_rate: η of full-batch gradient descent (the trained function α·f trains at
        η/α², :mod:`ntk_tickets.regimes`).
      steps: training steps shown, one of :data:`STEP_CHOICES`.
      parameterization: ``ntk``, ``standard`` or ``mup``.
      output_scale: α.
      center: whether the trained function is α·(f(θ) − f(θ0)) (``model.center``): without
        it a large α also makes the random initial function α times larger, which the
        network must then undo.
    """

    width: int = 256
    depth: int = 1
    learning_rate: float = 0.25
    steps: int = 316
    parameterization: str = "ntk"
    output_scale: float = 1.0
    center: bool = False


def study_config(settings: ExplorerSettings, *, n_train: int = 8, n_test: int = 200,
                 seed: int = 0) -> StudyConfig:
    """The study ``ntk-tickets run`` would run for ``settings``: sine data, one width, one
    seed, exact and linear paths and (except under µP) the NTK, trained to the largest of
    :data:`STEP_CHOICES` with every choice recorded."""
    mup = settings.parameterization == "mup"
    return StudyConfig(
        name="explorer",
        paths=("exact", "linear") if mup else ("exact", "linear", "ntk"),
        metrics=("loss", "weight_change", "function_gap") if mup
        else ("loss", "weight_change", "function_gap", "variance", "expected_loss"),
        data=DataConfig(name="sine", n_train=n_train, n_test=n_test, seed=seed,
                        standardize=True),
        model=ModelConfig(arch="mlp", depth=settings.depth, widths=(settings.width,), b_std=1.0,
                          parameterization=settings.parameterization,
                          output_scale=settings.output_scale, center=settings.center),
        train=TrainConfig(optimizer="sgd", learning_rate=settings.learning_rate,
                          steps=max(STEP_CHOICES), seeds=(seed,), loss="mse",
                          log_points=7),
    )


@dataclasses.dataclass(frozen=True)
class View:
    """What one redraw shows (test inputs sorted; one seed).

    Attributes:
      settings: the sliders' position.
      x_train, y_train: (n,) the training points.
      x, target: (m,) the test inputs and the target function there.
      exact, linear: (m,) the trained exact and linearized networks at ``settings.steps``.
      ntk_mean, ntk_std: (m,) the infinite-width NTK prediction and its standard deviation
        over initializations, or None under µP.
      steps: (r,) the recorded steps.
      weight_change: (r,) ‖θ_t − θ0‖/‖θ0‖ of the exact network.
      function_gap: (r,) RMS of exact − linear on the test inputs.
      test_loss: ``{path: value}`` at ``settings.steps`` (``expected_loss`` for ``ntk``).
    """

    settings: ExplorerSettings
    x_train: np.ndarray
    y_train: np.ndarray
    x: np.ndarray
    target: np.ndarray
    exact: np.ndarray
    linear: np.ndarray
    ntk_mean: np.ndarray | None
    ntk_std: np.ndarray | None
    steps: np.ndarray
    weight_change: np.ndarray
    function_gap: np.ndarray
    test_loss: dict[str, float]


def _with_target(data: Dataset, raw: Dataset,
                 target: Callable[[np.ndarray], np.ndarray]) -> Dataset:
    """``data`` with ``y = target(x)`` on both splits, x the inputs of ``raw`` (the same
    draws before standardization, in [−π, π])."""
    def y(x):
        return np.asarray(target(x[:, 0]), np.float64).reshape(-1, 1)
    return dataclasses.replace(data, y_train=y(raw.x_train), y_test=y(raw.x_test),
                               fingerprint=f"{data.fingerprint}-target")


class Explorer:
    """The explorer's computation, with its caches; :meth:`widget` is the interactive UI.

    Args:
      target: the function of x ∈ [−π, π] to learn (vectorized over a (n,) array), or
        None for sin(x) as drawn by ``DataConfig(name="sine")``.
      n_train: training points.
      n_test: test inputs (the curves' x).
      seed: data and initialization seed.
    """

    def __init__(self, target: Callable[[np.ndarray], np.ndarray] | None = None, *,
                 n_train: int = 8, n_test: int = 200, seed: int = 0):
        self.options = {"n_train": n_train, "n_test": n_test, "seed": seed}
        data_cfg = study_config(ExplorerSettings(), **self.options).data
        data = load_dataset(data_cfg)  # inputs standardized with the training statistics
        self.raw = load_dataset(dataclasses.replace(data_cfg, standardize=False))
        self.data = data if target is None else _with_target(data, self.raw, target)
        self._cells: dict[tuple, tuple] = {}
        self._runs: dict[tuple, tuple] = {}
        self._views: dict[ExplorerSettings, View] = {}

    def _cell(self, cfg: StudyConfig) -> tuple:
        """(setup, programs, base rate factors) of ``cfg``'s cell (its shapes and compiled
        programs), kept; the learning rate multiplies the base factors at each run."""
        m = cfg.model
        key = (m.widths[0], m.depth, m.parameterization, m.output_scale, m.center)
        if key not in self._cells:
            setup = experiments.setup_cell(cfg, self.data, m.widths[0])
            unit = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                      learning_rate=1.0))
            programs = experiments.training_programs(unit, setup.model, setup.steps)
            one_seed = jax.tree_util.tree_map(lambda a: a[0], setup.params0)
            base = {path: (program.lr_factors if program.lr_factors is not None else
                           jax.tree_util.tree_map(lambda _: jnp.asarray(1.0), one_seed))
                    for path, program in programs.items()}
            self._cells[key] = (setup, programs, base)
        return self._cells[key]

    def _run(self, settings: ExplorerSettings) -> tuple:
        """(cfg, setup, {path: PathOutputs}) of one training run to the last step choice."""
        run_key = dataclasses.replace(settings, steps=0)
        if run_key not in self._runs:
            cfg = study_config(settings, **self.options)
            setup, programs, base = self._cell(cfg)
            trajectories = {}
            for path, program in programs.items():
                program.lr_factors = jax.tree_util.tree_map(
                    lambda f: f * settings.learning_rate, base[path])
                trajectories[path] = program(setup.params0, setup.data, setup.batches)
            f_exact = np.asarray(trajectories["exact"].f_test)
            outputs = {path: experiments.outputs_of(
                path, self.data, cfg, traj.f_train, traj.f_test, f_exact, traj,
                setup.model.layer_names) for path, traj in trajectories.items()}
            outputs.update(experiments.closed_form_outputs(cfg, setup, self.data, f_exact))
            self._runs[run_key] = (cfg, setup, outputs)
        return self._runs[run_key]

    def view(self, settings: ExplorerSettings) -> View:
        """The curves and numbers of one position of the sliders (cached)."""
        if settings.steps not in STEP_CHOICES:
            raise ValueError(f"steps {settings.steps} is not one of {STEP_CHOICES}")
        if settings not in self._views:
            self._views[settings] = self._compute(settings)
        return self._views[settings]

    def _compute(self, settings: ExplorerSettings) -> View:
        cfg, setup, outputs = self._run(settings)
        steps = setup.steps
        r = int(np.flatnonzero(steps == settings.steps)[0])
        order = np.argsort(self.raw.x_test[:, 0])
        exact = metrics.path_values(outputs["exact"], ["weight_change", "function_gap"])
        linear = metrics.path_values(outputs["linear"], ["function_gap"])
        losses = {path: metrics.path_values(out, ["loss", "expected_loss"])
                  for path, out in outputs.items()}
        ntk = outputs.get("ntk")
        return View(
            settings=settings,
            x_train=self.raw.x_train[:, 0], y_train=self.data.y_train[:, 0],
            x=self.raw.x_test[order, 0], target=self.data.y_test[order, 0],
            exact=outputs["exact"].f_test[0, r, order, 0],
            linear=outputs["linear"].f_test[0, r, order, 0],
            ntk_mean=None if ntk is None else ntk.f_test[0, r, order, 0],
            ntk_std=None if ntk is None else np.sqrt(np.maximum(ntk.test_variance[0, r, order], 0)),
            steps=steps, weight_change=exact["none", "weight_change"][0],
            function_gap=linear["test", "function_gap"][0],
            test_loss={path: float(v.get(("test", "expected_loss"), v["test", "loss"])[0, r])
                       for path, v in losses.items()})

    def figure(self, settings: ExplorerSettings) -> Any:
        """The explorer's figure for ``settings`` (a matplotlib Figure)."""
        return view_figure(self.view(settings))

    def redraw(self, **values: Any) -> Any:
        """The widget's callback: the figure for the sliders' ``values`` (the fields of
        :class:`ExplorerSettings`)."""
        return self.figure(ExplorerSettings(**values))

    def widget(self, settings: ExplorerSettings = ExplorerSettings()) -> Any:
        """The interactive explorer: sliders and the figure, redrawn on every move.

        Without ipywidgets, a static figure of ``settings`` and a note saying how to get the
        sliders.
        """
        try:
            import ipywidgets as widgets
        except ImportError:
            print("ipywidgets is not installed, so this is a static figure; for sliders run "
                  "Jupyter with the explore extra: uv run --extra explore jupyter lab")
            return self.figure(settings)
        return _interactive(self, settings, widgets)


def view_figure(view: View) -> Any:
    """Two panels: the three functions of x, and weight change and function gap vs step."""
    from matplotlib.figure import Figure

    s = view.settings
    fig = Figure(figsize=(10.0, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(1.6, 1.0))
    left.plot(view.x, view.target, color="0.6", lw=1, ls=":", label="target")
    if view.ntk_mean is not None:
        left.fill_between(view.x, view.ntk_mean - 2 * view.ntk_std,
                          view.ntk_mean + 2 * view.ntk_std, color="tab:green", alpha=0.2,
                          label="NTK mean ± 2σ")
        left.plot(view.x, view.ntk_mean, color="tab:green", lw=1.5)
    left.plot(view.x, view.linear, color="tab:orange", lw=1.5, ls="--", label="linearized")
    left.plot(view.x, view.exact, color="tab:blue", lw=1.5, label="exact")
    left.scatter(view.x_train, view.y_train, color="k", s=18, zorder=3, label="train")
    left.set(xlabel="x", ylabel="f(x)", title=f"{s.parameterization}, width {s.width}, depth "
             f"{s.depth}, η {s.learning_rate:g}, α {s.output_scale:g}"
             f"{' centred' if s.center else ''}, step {s.steps}")
    left.legend(fontsize=8, loc="upper left")
    steps = np.maximum(view.steps, 0.5)  # step 0 on a log axis
    right.plot(steps, view.weight_change, color="tab:blue", marker="o", ms=3,
               label="weight change ‖θ−θ0‖/‖θ0‖")
    right.plot(steps, view.function_gap, color="tab:red", marker="o", ms=3,
               label="function gap RMS(exact − linear)")
    right.axvline(max(s.steps, 0.5), color="0.5", lw=0.8)
    right.set(xscale="log", yscale="symlog", xlabel="step", title="how far training moved")
    right.set_yscale("symlog", linthresh=1e-3)
    right.legend(fontsize=8)
    return fig


def _interactive(explorer: Explorer, settings: ExplorerSettings, widgets: Any) -> Any:
    """The sliders and an output area that shows the figure for their values."""
    controls = {
        "width": widgets.SelectionSlider(options=WIDTH_CHOICES, value=settings.width,
                                         description="width"),
        "depth": widgets.SelectionSlider(options=DEPTH_CHOICES, value=settings.depth,
                                         description="depth"),
        "learning_rate": widgets.FloatLogSlider(value=settings.learning_rate, base=10,
                                                min=-2, max=0.5, step=0.125,
                                                description="learning rate"),
        "steps": widgets.SelectionSlider(options=STEP_CHOICES, value=settings.steps,
                                         description="steps"),
        "parameterization": widgets.ToggleButtons(options=PARAMETERIZATIONS,
                                                  value=settings.parameterization,
                                                  description="param."),
        "output_scale": widgets.SelectionSlider(options=OUTPUT_SCALE_CHOICES,
                                                value=settings.output_scale,
                                                description="α"),
        "center": widgets.Checkbox(value=settings.center, description="centre f(θ0)"),
    }
    out = widgets.Output()

    def redraw(**values: Any) -> Any:
        fig = explorer.redraw(**values)
        with out:
            out.clear_output(wait=True)
            from IPython.display import display
            display(fig)
        return fig

    widgets.interactive_output(redraw, controls)
    return widgets.VBox([widgets.HBox(list(controls.values())[:3]),
                         widgets.HBox(list(controls.values())[3:]), out])


def explore(target: Callable[[np.ndarray], np.ndarray] | None = None,
            settings: ExplorerSettings = ExplorerSettings(), **options: Any) -> Any:
    """The interactive explorer in a Jupyter cell (see the module docstring).

    Args:
      target: function of x ∈ [−π, π] to learn, or None for sin(x).
      settings: the sliders' first position.
      **options: ``n_train``, ``n_test``, ``seed`` (:class:`Explorer`).
    """
    return Explorer(target, **options).widget(settings)
