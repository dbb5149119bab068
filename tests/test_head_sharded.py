"""The fused linear head under FSDP2 when lm_head is a unit of its own (tests/fsdp_head_script.py)."""

from __future__ import annotations

import sys

from test_train_distributed import CPU_ENV, free_port
from train_helpers import REPO, run_cli


def test_linear_head_gathers_an_fsdp2_lm_head_and_its_gradient_is_exact(_fresh_seed):
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(free_port()), str(REPO / "tests" / "fsdp_head_script.py"), str(_fresh_seed)]
    result = run_cli(launch, env=CPU_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fsdp head checks passed" in result.stdout
