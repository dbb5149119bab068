"""Entry points with other libraries' calling conventions, computed by fastdpo.

- ``fastdpo.compat.liger``: Liger-Kernel's ``LigerFusedLinearDPOLoss`` and ``liger_fused_linear_dpo``.
"""
