"""fastdpo.trainer: a thin DPO trainer around fastdpo's fused losses.

    from fastdpo.trainer import DPOTrainer, TrainConfig
    summary = DPOTrainer(TrainConfig(max_steps=100)).train()

The same options are the flags of `fastdpo train` (field `foo_bar` is `--foo-bar`).
"""

from .config import ConfigError, TrainConfig
from .data import DataError
from .loop import DPOTrainer


def train(cfg: TrainConfig | None = None, **options) -> dict:
    """Run one training: `train(max_steps=50)` or `train(TrainConfig(...))`; returns the summary."""
    import dataclasses

    cfg = dataclasses.replace(cfg or TrainConfig(), **options)
    return DPOTrainer(cfg).train()


__all__ = ["TrainConfig", "DPOTrainer", "ConfigError", "DataError", "train"]
