"""The former name of fastdpo.eager, kept importable: "reference" now means the reference model only."""

from .eager import eager_dpo_loss as reference_dpo_loss
from .eager import eager_sequence_logps as reference_sequence_logps

__all__ = ["reference_dpo_loss", "reference_sequence_logps"]
