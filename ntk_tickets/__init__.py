"""ntk_tickets: lottery tickets, tangent-space linearization and infinite-width kernels.

One ``neural_tangents.stax`` architecture drives paired experiments: the exact network, its
linearization around ``theta0``, the closed-form empirical-NTK and infinite-width
predictions, and subnetwork masks, all at increasing width. This module re-exports the
public API; notebooks and the CLI use only these names.
"""

from ntk_tickets._nt import NT_VERSION, check_ntk_implementation, nt, stax
from ntk_tickets.config import (
    DataConfig,
    ModelConfig,
    StudyConfig,
    TicketsConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_hash,
    config_to_dict,
    load_config,
    parse_override,
    with_overrides,
)
from ntk_tickets.criteria import (
    AT_INIT_CRITERIA,
    at_init_scores,
    grasp_scores,
    magnitude_scores,
    ntk_saliency_scores,
    snip_scores,
    synflow_scores,
)
from ntk_tickets.data import Dataset, load_dataset
from ntk_tickets.errors import UserInputError
from ntk_tickets.executors import EXECUTORS, CellOutput, compute_cell, execute_cells
from ntk_tickets.experiments import (
    CellResult,
    CellSetup,
    DenseCell,
    run_dense,
    run_paired_width,
    setup_cell,
)
from ntk_tickets.kernels import (
    empirical_ntk,
    empirical_ntk_predictions,
    infinite_width_predictions,
    ntk_change,
    ntk_init_error,
    probe_ntk,
)
from ntk_tickets.linear import linearize
from ntk_tickets.masks import (
    PruningSpec,
    apply_mask,
    density_report,
    jaccard,
    ones_like,
    perturbed_start,
    prune_to_level,
    random_control,
    shuffle_control,
    sparsity,
)
from ntk_tickets.models import Model, build_model, layer_params, parameter_count
from ntk_tickets.results import (
    RECORD_COLUMNS,
    ResultsStore,
    environment_info,
    load_manifest,
    load_records,
    records_frame,
    save_output,
)
from ntk_tickets.scaling import (
    SCALING_METRICS,
    final_values,
    fit_power_law,
    format_scaling_table,
    scaling_table,
)
from ntk_tickets.study import (
    preset_names,
    resolve_config,
    run_study,
    ticket_table,
    width_table,
)
from ntk_tickets.tickets import find_masks, run_ticket_width, run_tickets
from ntk_tickets.training import (
    TrainingProgram,
    Trajectory,
    batch_order,
    log_spaced_steps,
    make_optimizer,
    make_train_fn,
)

__version__ = "0.1.0"

# The figures need matplotlib and pandas (about a second to import): loaded on first use.
_PLOTTING = ("loss_curves", "mask_overlap", "metric_vs_width", "perturbation_curves",
             "save_figures", "study_figures", "ticket_accuracy")


def __getattr__(name: str):
    if name in _PLOTTING:
        from ntk_tickets import plotting

        return getattr(plotting, name)
    raise AttributeError(f"module 'ntk_tickets' has no attribute {name!r}")


__all__ = [
    "apply_mask",
    "apply_overrides",
    "AT_INIT_CRITERIA",
    "at_init_scores",
    "batch_order",
    "build_model",
    "CellOutput",
    "CellResult",
    "CellSetup",
    "check_ntk_implementation",
    "compute_cell",
    "config_from_dict",
    "config_hash",
    "config_to_dict",
    "DataConfig",
    "Dataset",
    "DenseCell",
    "density_report",
    "empirical_ntk",
    "empirical_ntk_predictions",
    "environment_info",
    "execute_cells",
    "EXECUTORS",
    "final_values",
    "find_masks",
    "fit_power_law",
    "format_scaling_table",
    "grasp_scores",
    "infinite_width_predictions",
    "jaccard",
    "layer_params",
    "linearize",
    "load_config",
    "load_dataset",
    "load_manifest",
    "load_records",
    "log_spaced_steps",
    "loss_curves",
    "magnitude_scores",
    "make_optimizer",
    "make_train_fn",
    "mask_overlap",
    "metric_vs_width",
    "Model",
    "ModelConfig",
    "nt",
    "NT_VERSION",
    "ntk_change",
    "ntk_init_error",
    "ntk_saliency_scores",
    "ones_like",
    "parameter_count",
    "parse_override",
    "perturbation_curves",
    "perturbed_start",
    "preset_names",
    "prune_to_level",
    "probe_ntk",
    "PruningSpec",
    "random_control",
    "RECORD_COLUMNS",
    "records_frame",
    "resolve_config",
    "ResultsStore",
    "run_dense",
    "run_paired_width",
    "run_study",
    "run_ticket_width",
    "run_tickets",
    "save_figures",
    "save_output",
    "SCALING_METRICS",
    "scaling_table",
    "setup_cell",
    "shuffle_control",
    "snip_scores",
    "sparsity",
    "stax",
    "study_figures",
    "StudyConfig",
    "synflow_scores",
    "ticket_accuracy",
    "ticket_table",
    "TicketsConfig",
    "TrainConfig",
    "TrainingProgram",
    "Trajectory",
    "UserInputError",
    "width_table",
    "with_overrides",
]
