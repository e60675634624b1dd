"""Ticket procedures: masks found by pruning, evaluated against controls and perturbed.

One ticket cell (one width, all seeds vmapped) runs, on top of the dense networks of
:func:`ntk_tickets.experiments.run_dense` (SCIENCE.md, "Ticket procedures"):

1. **Search** for one mask per round r = 1 … L (``tickets.rounds``), each keeping a fraction
   (1 − p)^r of the prunable weights (:mod:`ntk_tickets.masks`):

   * ``imp``: iterative magnitude pruning with rewinding. The dense run (round 0) records
     θ_k at ``rewind_step`` k; round r prunes the smallest |θ_T| of round r − 1's trained
     weights and trains the survivors again from θ_k ⊙ m_r for the T − k steps left
     (Frankle & Carbin 2019; Frankle et al. 2020, arXiv 1912.05671); a list of rewind
     steps repeats everything per k (:func:`run_tickets`);
   * ``oneshot``: every round's mask from the dense run's |θ_T| at once;
   * ``magnitude_init``, ``snip``, ``grasp``, ``synflow``, ``ntk_saliency``: scores at θ0
     (:mod:`ntk_tickets.criteria`); SynFlow prunes iteratively with data-free scores,
     ``tickets.synflow_iterations`` steps toward each round's density.

   ``imp`` and ``oneshot`` are driven by the ``search_path``'s training: ``exact``,
   ``linear`` (tangent-space tickets), or ``both``. Mask names in the records are the
   method (``imp``), with ``_linear`` appended for the linear search (``imp_linear``).
2. **Evaluate** every round's mask by training θ_k ⊙ m on every path of
   ``tickets.eval_paths``; with both search paths and both eval paths this is the 2×2
   evaluation, and ``mask_overlap`` records the Jaccard overlap of the two masks per round.
3. **Controls** of the first mask family, at every round: ``random`` (same per-layer
   density, random wiring), ``shuffle`` (the mask permuted within each unit), ``reinit``
   (the same mask on fresh weights ξ from the initializer). Fair controls separate *which*
   weights from *how large* the signal is: under the NTK parameterization a layer keeping
   a fraction ρ of its weights has ρ times the pre-activation variance and kernel share.
   ``random_rescaled`` trains the random mask as its own NTK-parameterized network
   (forward multiplier 1/√ρ per layer, :func:`rescaled_start`), ``random_init_rescaled``
   only starts it from weights × 1/√ρ; ``tickets.rescaled`` trains the ticket, ``shuffle``
   and ``reinit`` that way too (``<name>_rescaled``).
4. **Perturbation** of the last round's ticket: the complement gets ε·ξ for each ε of
   ``tickets.perturb_eps`` (frozen, or trained with ``perturb_trainable``); mask
   experiment ``perturb`` (mask: the ticket's family), column ``eps``. ε = 0 with a frozen
   complement is the isolated ticket.

Every round's mask of every search family and of the ``random`` and ``shuffle`` controls is
kept with the cell's results (:func:`ntk_tickets.results.load_masks` reads one back).

Every training run goes through the cell's compiled programs: masks, starts and rewind
steps are array arguments, so each path compiles once per width however many rounds,
masks and ε there are (DESIGN.md §3).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntk_tickets import criteria, masks
from ntk_tickets.config import StudyConfig, TicketsConfig, rewind_steps
from ntk_tickets.data import Dataset
from ntk_tickets.errors import UserInputError
from ntk_tickets.experiments import (
    DenseCell,
    divergence_by_seed,
    trajectory_rows,
)
from ntk_tickets.masks import PruningSpec
from ntk_tickets.optimizers import LOSSES
from ntk_tickets.stability import Connectivity
from ntk_tickets.ticket_methods import TICKET_METHODS
from ntk_tickets.training import Trajectory, map_seeds

PyTree = Any

# Roles of the per-seed mask key (fold_in data), so every draw is independent.
_REINIT, _PERTURB, _SALIENCY, _CONTROLS = range(4)


def pruning_spec(t: TicketsConfig) -> PruningSpec:
    """The :class:`~ntk_tickets.masks.PruningSpec` of a tickets section."""
    output = None if t.output_prune_fraction < 0 else t.output_prune_fraction
    return PruningSpec(t.prune_fraction, t.scope, t.prune_biases, output)


def search_paths(t: TicketsConfig) -> tuple[str, ...]:
    """The paths whose training drives the search, in the order of the mask families."""
    return ("exact", "linear") if t.search_path == "both" else (t.search_path,)


def family_name(method: str, search_path: str) -> str:
    """The records' mask name of a search: ``imp`` (exact) or ``imp_linear`` (linear)."""
    return method if search_path == "exact" else f"{method}_linear"


def _seed_slice(tree: PyTree, i: int) -> PyTree:
    return jax.tree_util.tree_map(lambda a: np.asarray(a[i]), tree)


def _stack(trees: list[PyTree]) -> PyTree:
    return jax.tree_util.tree_map(lambda *a: np.stack(a), *trees)


def _per_seed(fn, n_seeds: int, *trees: PyTree) -> PyTree:
    """``fn(i, *tree_i)`` for every seed i of stacked trees, stacked again."""
    return _stack([fn(i, *(_seed_slice(t, i) for t in trees)) for i in range(n_seeds)])


def _magnitude_round_masks(scores: PyTree, spec: PruningSpec, rounds: int) -> list[PyTree]:
    """Masks of rounds 1 … L from one set of scores (one-shot pruning to each level), every
    seed at once (leading seed axis)."""
    return [masks.prune_to_level(scores, masks.ones_like(scores), spec, r, seeds=True)
            for r in range(1, rounds + 1)]


def _synflow_masks(apply_fn, params0: PyTree, input_shape, spec: PruningSpec, rounds: int,
                   iterations: int) -> list[PyTree]:
    """SynFlow masks of rounds 1 … L: ``iterations`` prune-and-rescore steps to each level
    (Tanaka et al. 2020, arXiv 2006.05467, Algorithm 1), every seed at once (leading seed
    axis)."""
    score_fn = jax.jit(functools.partial(criteria.synflow_scores, apply_fn,
                                         input_shape=input_shape))

    def prune(r):
        mask = masks.ones_like(params0)
        for j in range(1, iterations + 1):
            scores = map_seeds(score_fn, masks.apply_mask(params0, mask))
            mask = masks.prune_to_level(scores, mask, spec, r * j / iterations, seeds=True)
        return mask

    return [prune(r) for r in range(1, rounds + 1)]


def _at_init_scores(method: str, cell: DenseCell, cfg: StudyConfig) -> PyTree:
    """Scores at θ0 of a one-pass criterion, every seed at once (leading seed axis)."""
    setup = cell.setup
    keys = jax.vmap(lambda k: jax.random.fold_in(k, _SALIENCY))(setup.mask_keys)

    def score(params, key, x, y, x_probe):
        return criteria.at_init_scores(
            method, setup.model.apply_fn, params, x=x, y=y, key=key, x_probe=x_probe,
            loss_fn=LOSSES[cfg.train.loss], input_shape=setup.model.input_shape,
            n_samples=cfg.tickets.saliency_samples)

    score, data = jax.jit(score), setup.data
    return map_seeds(lambda p, k: score(p, k, data["x_train"], data["y_train"],
                                        data["x_probe"]), setup.params0, keys)


def _absolute(params: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda a: np.abs(np.asarray(a)), params)


def find_masks(cfg: StudyConfig, cell: DenseCell,
               search_path: str) -> tuple[list[PyTree], dict[int, Trajectory]]:
    """The masks of rounds 1 … L for one search, and the runs the search already trained.

    Returns:
      ``(masks, trained)``: ``masks[r - 1]`` is round r's mask (bool, stacked over seeds);
      ``trained`` maps a round to its trajectory on ``search_path`` when the search trained
      it (``imp``), so the evaluation does not train it again.
    """
    t, setup = cfg.tickets, cell.setup
    spec = pruning_spec(t)
    dense = cell.trajectories[search_path]
    search = TICKET_METHODS[t.method].search
    if search == "rescored":
        return _synflow_masks(setup.model.apply_fn, setup.params0, setup.model.input_shape,
                              spec, t.rounds, t.synflow_iterations), {}
    if search == "at_init":
        scores = _at_init_scores(t.method, cell, cfg)
        return _magnitude_round_masks(scores, spec, t.rounds), {}
    if search == "oneshot":
        return _magnitude_round_masks(_absolute(dense.params), spec, t.rounds), {}
    program, theta_k = cell.programs[search_path], cell.rewind_point(search_path,
                                                                    t.rewind_step)
    mask, trained, found, traj = masks.ones_like(setup.params0), {}, [], dense
    for r in range(1, t.rounds + 1):
        mask = masks.prune_to_level(_absolute(traj.params), mask, spec, r, seeds=True)
        traj = program(masks.apply_mask(theta_k, mask), setup.data, setup.batches, mask,
                       t.rewind_step, start_step=t.rewind_step)
        found.append(mask)
        trained[r] = traj
    return found, trained


def _control_masks(mask: PyTree, t: TicketsConfig, keys: jax.Array,
                   round_: int) -> dict[str, PyTree]:
    """The ``random`` and ``shuffle`` controls of a (stacked) mask, seeded per seed/round;
    ``random`` also when only its rescaled variants are asked for (they share its mask)."""
    makers = {"random": masks.random_control, "shuffle": masks.shuffle_control}
    names = [c for c in t.controls if c in makers]
    if "random" not in names and set(t.controls) & set(_RANDOM_RESCALED):
        names.append("random")
    out = {}
    for j, name in enumerate(names):
        def draw(i, m, j=j, name=name):
            seed = [*np.asarray(keys[i]).tolist(), _CONTROLS, round_, j]
            return makers[name](m, t.prune_biases, np.random.default_rng(seed))
        out[name] = _per_seed(draw, keys.shape[0], mask)
    return out


#: p in c^p, the factor by which a forward multiplier c scales a parameter's update when the
#: network is trained in the multiplied parameters θ = c·θ': the optimizer sees ∇_θ' = c·∇_θ
#: and its step in θ' reaches θ through c. Plain and momentum steps are linear in the
#: gradient (p = 2); Adam's and Lion's do not grow with it (p = 1; Adam up to its ε).
#: Weight decay is scaled along: the reparameterized network's decay of θ' is not modelled.
RESCALED_STEP_POWER = {"sgd": 2, "momentum": 2, "adam": 1, "lion": 1}
#: The random control's variants: trained as its own NTK-parameterized network, or only
#: started from rescaled weights (:func:`rescaled_start`).
_RANDOM_RESCALED = {"random_rescaled": True, "random_init_rescaled": False}


def rescaled_start(theta: PyTree, mask: PyTree, cfg: StudyConfig, *,
                   steps: bool = True) -> tuple[PyTree, PyTree]:
    """``(start, update_mask)`` that train θ ⊙ m as its own NTK-parameterized network.

    Every masked layer gets the forward multiplier c = 1/√density
    (:func:`ntk_tickets.masks.ntk_rescaling`), which keeps both the pre-activation variance
    at init and the layer's share of the tangent kernel. Training f((c ⊙ θ') ⊙ m) in θ' is
    training θ = c ⊙ θ' from c ⊙ θ ⊙ m with each update multiplied by c^p
    (:data:`RESCALED_STEP_POWER`), which the training program's update mask carries, so
    the same compiled program serves it. With ``steps=False`` only the start is rescaled
    (the forward signal at init, not the kernel's scale).

    Args:
      theta: parameters with a leading seed axis (θ_k of the dense run, or fresh weights).
      mask: the masks, stacked over seeds like ``theta``.
      cfg: the study config (``tickets.prune_biases``, ``train.optimizer``).
      steps: also scale the updates.

    Returns:
      The start θ ⊙ m ⊙ c and the update mask m·c^p (m with ``steps=False``).
    """
    if cfg.train.optimizer not in RESCALED_STEP_POWER:
        raise UserInputError(f"the rescaled controls know the optimizers "
                             f"{sorted(RESCALED_STEP_POWER)}, not {cfg.train.optimizer!r}")
    scale = _per_seed(lambda i, m: masks.ntk_rescaling(m, cfg.tickets.prune_biases),
                      jax.tree_util.tree_leaves(mask)[0].shape[0], mask)
    start = jax.tree_util.tree_map(lambda t, c: t * c, masks.apply_mask(theta, mask), scale)
    if not steps:
        return start, mask
    power = RESCALED_STEP_POWER[cfg.train.optimizer]
    update = jax.tree_util.tree_map(lambda m, c: m * c ** power, mask, scale)
    return start, update


def _rescaled_variants(control: str, t: TicketsConfig) -> dict[str, bool]:
    """The rescaled variants of a ``random`` or ``shuffle`` control mask to train, each with
    whether its updates are scaled too (:func:`rescaled_start`)."""
    out = {variant: steps for variant, steps in _RANDOM_RESCALED.items()
           if control == "random" and variant in t.controls}
    if t.rescaled:
        out.setdefault(f"{control}_rescaled", True)
    return out


def _fresh_init(cell: DenseCell, role: int) -> PyTree:
    """ξ: new weights from the initializer, one draw per seed and role."""
    keys = jax.vmap(lambda k: jax.random.fold_in(k, role))(cell.setup.mask_keys)
    return jax.vmap(cell.setup.model.init)(keys)


class _Evaluator:
    """Trains (start, mask) pairs on every eval path and turns them into records; with a
    ``connectivity`` (``[stability]``), spawns each training run's second child at the
    rewind step and records the line between them."""

    def __init__(self, cfg: StudyConfig, cell: DenseCell, data: Dataset,
                 connectivity: Connectivity | None = None):
        self.cfg, self.cell, self.data = cfg, cell, data
        self.connectivity = connectivity
        self.rows: list[dict[str, Any]] = []
        self.diverged: dict[str, dict[str, int | None]] = {}

    def __call__(self, name: str, round_: int, start: PyTree, update_mask: PyTree,
                 sparsity: float, *, eps: float = float("nan"), experiment: str = "train",
                 trained: dict[str, Trajectory] | None = None) -> None:
        setup, t = self.cell.setup, self.cfg.tickets
        f_test_exact = None
        for path in sorted(t.eval_paths, key=("exact", "linear").index):
            traj = (trained or {}).get(path)
            if traj is None:
                traj = self.cell.programs[path](start, setup.data, setup.batches,
                                                update_mask, t.rewind_step,
                                                start_step=t.rewind_step)
            rows = trajectory_rows(path, setup, traj, self.data, self.cfg, f_test_exact)
            if self.connectivity is not None and experiment == "train":
                rows += self.connectivity.rows(path, traj, start, update_mask, t.rewind_step)
            for row in rows:
                row.update(mask=name, round=round_, sparsity=sparsity, eps=eps)
                row.setdefault("experiment", experiment)
                self.rows.append(row)
            label = (f"{path}/{name}/round{round_}"
                     + ("" if experiment == "train" else f"/{experiment}/eps{eps:g}"))
            self.diverged[label] = divergence_by_seed(
                setup.seeds, setup.steps, np.asarray(traj.f_train), self.data.y_train,
                self.cfg.train.loss)
            if path == "exact":
                f_test_exact = np.asarray(traj.f_test)


def run_tickets(cfg: StudyConfig, cell: DenseCell, data: Dataset,
                connectivity: Connectivity | None = None) -> tuple[list[dict[str, Any]],
                                                                   dict[str, Any]]:
    """Search, evaluation, controls, overlaps and perturbation of one ticket cell, at every
    rewind step of ``tickets.rewind_step`` (:func:`tickets_at`).

    With several rewind steps every record carries its step in the ``rewind_step`` column,
    and the names of the masks, sparsity reports and divergence labels get ``@<k>``. With a
    ``connectivity`` every ticket and control run is spawned at its rewind step
    (:class:`ntk_tickets.stability.Connectivity`).
    """
    steps = rewind_steps(cfg.tickets)
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {"sparsity_report": {}, "diverged_step": {}, "masks": {}}
    for k in steps:
        cfg_k = dataclasses.replace(cfg, tickets=dataclasses.replace(cfg.tickets,
                                                                     rewind_step=k))
        rows_k, info_k = tickets_at(cfg_k, cell, data, connectivity)
        tag = "" if len(steps) == 1 else f"@{k}"
        for row in rows_k:
            row["rewind_step"] = k
        rows += rows_k
        info["sparsity_report"].update({f"{name}{tag}": report for name, report
                                        in info_k["sparsity_report"].items()})
        info["diverged_step"].update({f"{label}{tag}": v for label, v
                                      in info_k["diverged_step"].items()})
        info["masks"].update({(f"{family}{tag}", r): mask for (family, r), mask
                              in info_k["masks"].items()})
    return rows, info


def tickets_at(cfg: StudyConfig, cell: DenseCell, data: Dataset,
               connectivity: Connectivity | None = None) -> tuple[list[dict[str, Any]],
                                                                  dict[str, Any]]:
    """Search, evaluation, controls, overlaps and perturbation at the one rewind step k of
    ``cfg.tickets`` (an int here): every mask trains from θ_k (:meth:`DenseCell.rewind_point`).

    Returns:
      ``(rows, info)``: the ticket records (masks other than ``dense``) and manifest
      entries: ``sparsity_report`` (per mask family and round, the kept fraction of each
      layer's prunable entries, seed 0) and ``diverged_step`` per ticket run
      (``"<path>/<mask>/round<r>[/perturb/eps<ε>]"`` → per seed); and ``masks``, the
      masks by (family, round), stacked over seeds.
    """
    t, setup = cfg.tickets, cell.setup
    n_seeds = len(setup.seeds)
    theta_k = {path: cell.rewind_point(path, t.rewind_step) for path in search_paths(t)}
    families = {family_name(t.method, path): (path, *find_masks(cfg, cell, path))
                for path in search_paths(t)}
    evaluate = _Evaluator(cfg, cell, data, connectivity)
    kept: dict[tuple[str, int], PyTree] = {}
    report: dict[str, dict[str, dict[str, float]]] = {}
    first = next(iter(families))
    reinit = _fresh_init(cell, _REINIT) if "reinit" in t.controls else None
    for name, (path, found, trained) in families.items():
        report[name] = {}
        for r, mask in enumerate(found, start=1):
            kept[name, r] = mask
            mask0 = _seed_slice(mask, 0)
            sparsity = masks.sparsity(mask0, t.prune_biases)
            report[name][str(r)] = masks.density_report(mask0, setup.model.layer_names,
                                                         t.prune_biases)
            evaluate(name, r, masks.apply_mask(theta_k[path], mask), mask, sparsity,
                     trained={path: trained[r]} if r in trained else None)
            if name == first and t.rescaled:
                evaluate(f"{name}_rescaled", r, *rescaled_start(theta_k[path], mask, cfg),
                         sparsity)
            if name != first:
                overlap = [masks.jaccard(_seed_slice(found[r - 1], i),
                                         _seed_slice(families[first][1][r - 1], i),
                                         t.prune_biases) for i in range(n_seeds)]
                evaluate.rows += [
                    {"seed": int(s), "path": "none", "mask": name, "round": r,
                     "sparsity": sparsity, "step": cfg.train.steps, "split": "none",
                     "metric": "mask_overlap", "value": v}
                    for s, v in zip(setup.seeds, overlap, strict=True)]
                continue
            for control, control_mask in _control_masks(mask, t, setup.mask_keys, r).items():
                kept[control, r] = control_mask
                if control in t.controls:
                    evaluate(control, r, masks.apply_mask(theta_k[path], control_mask),
                             control_mask, sparsity)
                for variant, steps in _rescaled_variants(control, t).items():
                    evaluate(variant, r, *rescaled_start(theta_k[path], control_mask, cfg,
                                                         steps=steps), sparsity)
            if reinit is not None:
                evaluate("reinit", r, masks.apply_mask(reinit, mask), mask, sparsity)
                if t.rescaled:
                    evaluate("reinit_rescaled", r, *rescaled_start(reinit, mask, cfg),
                             sparsity)
    if t.perturb_eps:
        path, found, _ = families[first]
        ticket = found[-1]
        xi = _fresh_init(cell, _PERTURB)
        update = ticket if not t.perturb_trainable else masks.ones_like(setup.params0)
        sparsity = masks.sparsity(_seed_slice(ticket, 0), t.prune_biases)
        for eps in t.perturb_eps:
            start = masks.perturbed_start(theta_k[path], xi, ticket, jnp.asarray(eps))
            evaluate(first, t.rounds, start, update, sparsity, eps=float(eps),
                     experiment="perturb")
    return evaluate.rows, {"sparsity_report": report, "diverged_step": evaluate.diverged,
                           "masks": kept}
