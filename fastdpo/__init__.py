"""fastdpo: fused Triton kernels for DPO and its relatives.

    from fastdpo import fused_dpo_loss
    loss = fused_dpo_loss(policy_logits, labels, ref_logps, beta=0.1)
"""

from .dpo import FusedDPOLoss, fused_dpo_loss
from .linear import FusedLinearDPOLoss, fused_linear_dpo_loss, linear_sequence_logps
from .logps import sequence_logps
from .losses import LOSSES, REFERENCE_FREE, LossConfig
from .metrics import PreferenceRows
from .validation import set_value_checks, value_checks

__version__ = "0.1.0"

__all__ = ["fused_dpo_loss", "FusedDPOLoss", "sequence_logps", "LOSSES", "REFERENCE_FREE", "LossConfig"]
__all__ += ["fused_linear_dpo_loss", "FusedLinearDPOLoss", "linear_sequence_logps"]
__all__ += ["set_value_checks", "value_checks", "PreferenceRows"]
