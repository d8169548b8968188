"""Typed configuration for every stage, loaded from YAML plus dotted overrides.

One tree, one file: `run`, `data`, `model`, `train`, `tune`, `registry`, `serve`. The YAML mirrors the tree and
`train.lr=3e-4` on the command line overrides a leaf. Unknown keys and wrong types raise `ConfigError`, whose
message names the key; the CLI turns it into exit code 2 before anything reaches a cluster.
"""

from raylm.config.data import DataSection, HFDatasetSection, ModelSection, RunSection, TokenizerSection
from raylm.config.load import load_config
from raylm.config.serve import AutoscalingSection, GateSection, RegistrySection, ServeSection
from raylm.config.train import (
    BUDGETED_FIELDS,
    DEFAULT_MAX_STEPS,
    AshaSection,
    GridSection,
    SchedulerSection,
    TrainSection,
    TuneSection,
)
from raylm.config.tree import Config, validate_config
from raylm.errors import ConfigError

__all__ = [
    "BUDGETED_FIELDS",
    "DEFAULT_MAX_STEPS",
    "AshaSection",
    "AutoscalingSection",
    "Config",
    "ConfigError",
    "DataSection",
    "GateSection",
    "GridSection",
    "HFDatasetSection",
    "ModelSection",
    "RegistrySection",
    "RunSection",
    "SchedulerSection",
    "ServeSection",
    "TokenizerSection",
    "TrainSection",
    "TuneSection",
    "load_config",
    "validate_config",
]
