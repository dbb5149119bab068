"""`fastdpo train` with accelerate's FSDP2 or DeepSpeed on CPU processes (gloo), for the tests.

Accelerate selects FSDP and DeepSpeed only on accelerators. On CPU processes it sets up plain
multi-process (DDP) training and ignores the FSDP plugin, and with DeepSpeed it initialises the
process group but then counts one process. Both engines run on CPUs: FSDP2 (torch's fully_shard)
over gloo, and DeepSpeed through its CPU accelerator over gloo.

Importing this module applies two switches:
- accelerate keeps the FSDP plugin it was given, with unpinned CPU-offload memory (pinning needs
  an accelerator);
- under a DeepSpeed launch, accelerate picks the gloo backend (it finds none without a GPU).

Running it runs the trainer's own CLI. Everything after the switch is the code a GPU run executes:
accelerate's FSDP2 preparation or DeepSpeed engine, sharded checkpoints, the gathered final save,
and fastdpo's trainer. Launch it where `-m fastdpo.train` would go:

    ACCELERATE_USE_CPU=true accelerate launch --config_file examples/accelerate/fsdp2.yaml \\
        --num_processes 2 tests/sharded_on_cpu.py [fastdpo train options]
    accelerate launch --config_file examples/accelerate/zero3.yaml --num_processes 2 \\
        tests/sharded_on_cpu.py [fastdpo train options]     # (DeepSpeed: ACCELERATE_USE_CPU unset)
"""

from __future__ import annotations

import os
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__
_prepare_backend = PartialState._prepare_backend


def _keep_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        if getattr(fsdp_plugin.cpu_offload, "pin_memory", False):
            fsdp_plugin.cpu_offload.pin_memory = False
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # what gather/reduce read


def _gloo_for_deepspeed(self, cpu=False, sagemaker_dp=False, backend=None):
    found, kind = _prepare_backend(self, cpu, sagemaker_dp, backend)
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    if found is None and launched and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "gloo", DistributedType.MULTI_CPU  # accelerate then hands the group to DeepSpeed
    return found, kind


AcceleratorState.__init__ = _keep_fsdp
PartialState._prepare_backend = _gloo_for_deepspeed

if __name__ == "__main__":
    import torch.distributed

    from fastdpo.cli import train_main

    code = train_main(sys.argv[1:])
    if code == 0 and torch.distributed.is_initialized():  # fastdpo.trainer.distributed.finish closes it
        print("fastdpo train returned with its process group still open", file=sys.stderr)
        code = 3
    sys.exit(code)
