"""``TrainingArguments`` plus every ``--tikmix_*`` flag, for scripts that parse one set of flags.

    parser = HfArgumentParser(TiKMiXTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses()   # --tikmix_solver direct --tikmix_stage_steps 500 ...
    callback = TiKMiXCallback(mixture, validation, config=args.tikmix_config())
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from transformers import TrainingArguments

from .config import TiKMiXConfig, validate_config


@dataclass
class TiKMiXTrainingArguments(TrainingArguments, TiKMiXConfig):
    """``TrainingArguments`` plus every ``--tikmix_*`` flag of :class:`TiKMiXConfig`."""

    def __post_init__(self) -> None:
        TrainingArguments.__post_init__(self)
        validate_config(self)

    def tikmix_config(self) -> TiKMiXConfig:
        """The TiKMiX options alone, for :class:`~tikmix_hf.TiKMiXCallback`."""
        return TiKMiXConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TiKMiXConfig)})


def config_from(args) -> TiKMiXConfig:
    """A :class:`TiKMiXConfig` from a config, a :class:`TiKMiXTrainingArguments` or ``None`` (defaults)."""
    if args is None:
        return TiKMiXConfig()
    if isinstance(args, TiKMiXConfig) and not isinstance(args, TrainingArguments):
        return args
    if isinstance(args, TiKMiXTrainingArguments):
        return args.tikmix_config()
    raise TypeError(f"config must be a TiKMiXConfig or TiKMiXTrainingArguments, got {type(args).__name__}")
