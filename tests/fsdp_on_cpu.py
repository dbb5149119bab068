"""`fastdpo train` with accelerate's FSDP2 on CPU processes (gloo), for the tests.

Accelerate selects FSDP only on accelerators: on CPU processes it sets up plain multi-process
(DDP) training and ignores the FSDP plugin. FSDP2 itself (torch's fully_shard) runs on CPU with
gloo, so this entry point lets accelerate keep the plugin it was given and then runs the
trainer's own CLI unchanged: everything after the switch (accelerate's fsdp2_prepare_model,
sharded checkpoints, the full state dict for the final save, fastdpo's trainer) is the code a GPU
run executes (with CPU offload, unpinned memory: pinning needs an accelerator). Launch it like `-m fastdpo.train`:

    ACCELERATE_USE_CPU=true accelerate launch --config_file examples/accelerate/fsdp2.yaml \\
        --num_processes 2 tests/fsdp_on_cpu.py [fastdpo train options]
"""

from __future__ import annotations

import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _keep_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        if getattr(fsdp_plugin.cpu_offload, "pin_memory", False):  # pinned memory needs an accelerator
            fsdp_plugin.cpu_offload.pin_memory = False
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # what gather/reduce read


AcceleratorState.__init__ = _keep_fsdp

if __name__ == "__main__":
    from fastdpo.cli import train_main

    sys.exit(train_main(sys.argv[1:]))
