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
from ntk_tickets.data import Dataset, load_dataset
from ntk_tickets.errors import UserInputError
from ntk_tickets.linear import linearize
from ntk_tickets.models import Model, build_model, layer_params, parameter_count

__version__ = "0.1.0"

__all__ = [
    "NT_VERSION",
    "DataConfig",
    "Dataset",
    "Model",
    "ModelConfig",
    "StudyConfig",
    "TicketsConfig",
    "TrainConfig",
    "UserInputError",
    "apply_overrides",
    "build_model",
    "check_ntk_implementation",
    "config_from_dict",
    "config_hash",
    "config_to_dict",
    "layer_params",
    "linearize",
    "load_config",
    "load_dataset",
    "nt",
    "parameter_count",
    "parse_override",
    "stax",
    "with_overrides",
]
