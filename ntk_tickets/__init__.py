"""ntk_tickets: lottery tickets, tangent-space linearization and infinite-width kernels.

One ``neural_tangents.stax`` architecture drives paired experiments: the exact network, its
linearization around ``theta0``, the closed-form empirical-NTK and infinite-width
predictions, and subnetwork masks, all at increasing width. This module re-exports what a
notebook user needs; every name is imported on first use (PEP 562), so ``import
ntk_tickets`` is cheap. Internals stay importable from their modules
(``ntk_tickets.training``, ``ntk_tickets.masks``, …).
"""

import importlib

__version__ = "0.1.0"

#: Public name → the module that defines it.
_EXPORTS = {
    # configs
    "StudyConfig": "config", "DataConfig": "config", "ModelConfig": "config",
    "TrainConfig": "config", "TicketsConfig": "config", "load_config": "config",
    "with_overrides": "config", "config_from_dict": "config", "config_to_dict": "config",
    "config_hash": "config", "parse_override": "config", "cell_factors": "config",
    "with_factors": "config", "EscapeConfig": "config", "StabilityConfig": "config",
    "SubspaceConfig": "config",
    # registries: one entry per metric, ticket method, architecture, optimizer, dataset
    "METRICS": "metrics", "Metric": "metrics", "TICKET_METHODS": "ticket_methods",
    "ARCHITECTURES": "architectures", "OPTIMIZERS": "optimizers", "LOSSES": "optimizers",
    "DATASETS": "data",
    # data, models, neural-tangents
    "Dataset": "data", "load_dataset": "data", "Model": "models", "build_model": "models",
    "layer_params": "models", "parameter_count": "models", "nt": "_nt", "stax": "_nt",
    "linearize": "linear", "lr_factors": "regimes", "scaled_function": "regimes",
    # training, kernels and masks
    "TrainingProgram": "training", "setup_cell": "experiments",
    "run_paired_width": "experiments", "run_width": "cells", "empirical_ntk": "kernels",
    "probe_ntk": "kernels",
    "empirical_ntk_predictions": "kernels", "infinite_width_predictions": "kernels",
    "apply_mask": "masks", "jaccard": "masks", "sparsity": "masks",
    # studies and their results
    "run_study": "study", "resolve_config": "preset_files", "preset_names": "preset_files",
    "width_table": "study", "ticket_table": "study", "load_records": "results",
    "load_manifest": "results", "load_masks": "results", "records_frame": "results",
    "final_step": "select", "seed_stats": "select", "score_metric": "select",
    "varying_factors": "select", "factor_groups": "select",
    "scaling_table": "scaling", "format_scaling_table": "scaling",
    "fit_power_law": "scaling",
    # figures
    "loss_curves": "plotting", "metric_vs_width": "plotting", "ticket_accuracy": "plotting",
    "mask_overlap": "plotting", "perturbation_curves": "plotting",
    "study_figures": "plotting", "save_figures": "plotting",
    "factor_vs_width": "regime_figures", "output_scale_curves": "regime_figures",
    "infinite_width_comparison": "regime_figures", "double_descent": "regime_figures",
    # where tickets and tangent spaces meet: rewinding, stability, subspaces
    "loss_barrier": "stability", "instability": "stability",
    "rewind_sweep": "connectivity_figures", "stability_vs_time": "connectivity_figures",
    "subspace_accuracy": "connectivity_figures", "subspace_table": "connectivity_figures",
    "stability_table": "connectivity_figures",
    # the interactive explorer of the tangent-space picture
    "explore": "explorer", "Explorer": "explorer", "ExplorerSettings": "explorer",
    # escape dimensions: Hessians, neuron embeddings, census tables and figures
    "hessian_eigenvalues": "hessian", "lanczos_eigenvalues": "hessian",
    "smallest_eigenvalue": "hessian", "split_neuron": "hessian",
    "add_inactive_neuron": "hessian", "run_escape_width": "escape",
    "split_matrix": "escape", "distinct_units": "escape", "wilson_interval": "escape",
    "lottery_prediction": "escape", "lottery_table": "escape", "escape_table": "escape",
    "escape_summary": "escape", "success_vs_width": "escape_figures",
    "escape_fractions": "escape_figures", "split_spectrum": "escape_figures",
    "split_spectra": "escape_figures", "escape_study_figures": "escape_figures",
    "UserInputError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"ntk_tickets.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ntk_tickets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
