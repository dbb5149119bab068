"""Compile fastdpo's kernels for sm_90 (no GPU needed) and print, per case, whether the bf16
rows are streamed with 128-bit accesses. Run in a subprocess without TRITON_INTERPRET, since
the interpreter replaces the jitted functions that the compiler needs."""

import json
import re
import subprocess
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastdpo.kernels import token_logps as K

SM90 = GPUTarget("cuda", 90, 32)
# Arguments the JIT marks 16-divisible at run time for the usual shapes (V = 128256, ...).
ALIGNED = {"z_ptr", "dz_ptr", "labels_ptr", "logp_ptr", "lse_ptr", "zsum_ptr", "ent_ptr", "top1_ptr", "max_ptr", "lss_ptr", "g_ptr",
           "stride_zb", "stride_zt", "stride_db", "stride_dt", "V"}


def compile_sm90(kernel, pointer_types, consts, backward, rows):
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointer_types:
            sig[name] = pointer_types[name]
        elif name in ("inv_temp", "inv_temp_lo", "softcap", "softcap_lo"):
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if name in ("stride_zb", "stride_db") else "i32"
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED if n in kernel.arg_names}
    # The launch settings the launchers use at a large vocabulary (V = 128256), `rows` rows a program.
    block_v, num_warps, rows = K._launch_config(128256, None, None, rows, backward)
    consts = consts | {"BLOCK_V": block_v, "ROWS": rows}
    return triton.compile(ASTSource(kernel, sig, consts, attrs), target=SM90, options={"num_warps": num_warps})


def vectorized(ptx, op):
    return bool(re.search(rf"{op}\.global\.(v4\.b32|v2\.b64)", ptx))  # 128-bit accesses


def local_memory(cubin: bytes) -> int:
    """Bytes of per-thread local memory (register spills, stack) the kernel uses, from cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True,
                               check=True).stdout
    found = re.search(r"STACK:(\d+).*?LOCAL:(\d+)", usage)
    return int(found.group(1)) + int(found.group(2))


def forward(dtype, features, rows=1):
    """features: False (none), True (all) or "slab" (all, on a vocabulary slab)."""
    acc = "fp64" if dtype == "fp64" else "fp32"
    on = bool(features)
    consts = dict(stride_zv=1, HAS_SOFTCAP=on, SAVE_LSE=on, SUM_SCORES=on, TOKEN_METRICS=on, LOG_SUM_SQ=on,
                  SLAB=features == "slab", ACC_DTYPE=tl.float64 if acc == "fp64" else tl.float32)
    ptrs = dict(z_ptr=f"*{dtype}", labels_ptr="*i32", logp_ptr=f"*{acc}", lse_ptr=f"*{acc}", zsum_ptr=f"*{acc}",
                ent_ptr=f"*{acc}", top1_ptr=f"*{acc}", max_ptr=f"*{acc}", lss_ptr=f"*{acc}")
    asm = compile_sm90(K.token_logps_fwd_kernel, ptrs, consts, backward=False, rows=rows).asm
    return {"vector_loads": vectorized(asm["ptx"], "ld"), "local_bytes": local_memory(asm["cubin"])}


def backward(dtype, softcap, rows=1):
    acc = "fp64" if dtype == "fp64" else "fp32"
    consts = dict(stride_zv=1, stride_dv=1, HAS_SOFTCAP=softcap,
                  ACC_DTYPE=tl.float64 if acc == "fp64" else tl.float32)
    ptrs = dict(z_ptr=f"*{dtype}", dz_ptr=f"*{dtype}", labels_ptr="*i32", lse_ptr=f"*{acc}", g_ptr=f"*{acc}")
    asm = compile_sm90(K.token_logps_bwd_kernel, ptrs, consts, backward=True, rows=rows).asm
    ptx = asm["ptx"]
    return {"vector_loads": vectorized(ptx, "ld"), "vector_stores": vectorized(ptx, "st"),
            "local_bytes": local_memory(asm["cubin"])}


CASES = {f"fwd-{d}-{f}": (forward, d, f) for d in ("bf16", "fp32", "fp64") for f in (False, True, "slab")}
CASES |= {f"bwd-{d}-{f}": (backward, d, f) for d in ("bf16", "fp64") for f in (False, True)}
# Several token rows a program (a [ROWS, BLOCK_V] tile): the short-vocabulary setting.
CASES |= {f"fwd-bf16-{f}-rows4": (forward, "bf16", f, 4) for f in (False, True, "slab")}
CASES |= {f"bwd-bf16-{f}-rows4": (backward, "bf16", f, 4) for f in (False, True)}

if __name__ == "__main__":
    results = {}
    for name, (fn, *args) in CASES.items():
        try:
            results[name] = fn(*args)
        except Exception as exc:  # reported per case by the test
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[-3000:]}
    print(json.dumps(results))
