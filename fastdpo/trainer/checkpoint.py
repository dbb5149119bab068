"""Checkpoints that a crash cannot corrupt, and the final save_pretrained model.

    run_dir/checkpoints/step-00000020/   model (safetensors), optimizer, scheduler, RNG per rank
                                         (accelerate's save_state) + trainer_state.json
    run_dir/checkpoints/latest           the name of the newest complete checkpoint

A checkpoint is written into a hidden temporary directory and renamed into place only once every
rank has finished writing; `latest` is then replaced atomically. A crash at any point leaves the
previous `latest` pointing at a complete checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE = "trainer_state.json"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    return path if (path / STATE).is_file() else None


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE).read_text())


def save_checkpoint(accelerator, run_dir: str | Path, state: dict[str, Any], keep: int,
                    rank_state: dict[str, Any] | None = None) -> Path:
    """Save the prepared model / optimizer / scheduler and `state` as checkpoint step-<state['step']>;
    `rank_state`: this process's own part (each rank writes its own file, as its RNG state)."""
    root = checkpoint_root(run_dir)
    final = root / f"step-{state['step']:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if rank_state is not None:
        tmp.mkdir(parents=True, exist_ok=True)
        write_json_atomic(tmp / rank_state_name(accelerator.process_index), rank_state)
    if accelerator.is_main_process:
        write_json_atomic(tmp / STATE, state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same step saved again (e.g. Ctrl-C right after a save): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(root / LATEST, final.name)
        _prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def remove_partial_checkpoints(run_dir: str | Path) -> None:
    """Delete checkpoints that a crash left half-written (never `latest` or what it names)."""
    for tmp in checkpoint_root(run_dir).glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(accelerator, checkpoint: Path) -> dict[str, Any]:
    """Restore everything save_checkpoint saved; returns the trainer state."""
    accelerator.load_state(str(checkpoint))
    return read_state(checkpoint)


def rank_state_name(rank: int) -> str:
    return f"trainer_rank_{rank}.json"


def read_rank_state(checkpoint: Path, rank: int) -> dict[str, Any] | None:
    """The `rank_state` that process `rank` saved, or None (a checkpoint from before they existed)."""
    path = checkpoint / rank_state_name(rank)
    return json.loads(path.read_text()) if path.is_file() else None


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2))


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_final_model(accelerator, model, tokenizer, out_dir: str | Path) -> Path:
    """save_pretrained (safetensors) + tokenizer, loadable by AutoModelForCausalLM.from_pretrained.

    A LoRA policy is merged into its base first, so the result needs neither peft nor the base."""
    from .model import is_peft

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    unwrapped = accelerator.unwrap_model(model)
    if is_peft(unwrapped) and accelerator.distributed_type.name in SHARDED:
        unwrapped, state_dict = _merged_copy(unwrapped, accelerator.get_state_dict(model), accelerator)
    elif is_peft(unwrapped):
        unwrapped = unwrapped.merge_and_unload()
        state_dict = unwrapped.state_dict() if accelerator.is_main_process else None
    else:
        state_dict = _without_tied_copies(unwrapped, accelerator.get_state_dict(model))  # gathers shards
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    accelerator.wait_for_everyone()
    return out_dir


def _without_tied_copies(model, state_dict):
    """Gathered shards come back as separate tensors even where two names share one parameter (tied
    input and output embeddings), which save_pretrained would then store twice: keep the first name."""
    if state_dict is None:
        return None
    first = {name for name, _ in model.named_parameters()}
    for name, _ in model.named_parameters(remove_duplicate=False):
        if name not in first:
            state_dict.pop(name, None)
    return state_dict


SHARDED = ("FSDP", "DEEPSPEED")  # engines whose ranks hold pieces of the weights


def _merged_copy(peft_model, state_dict, accelerator):
    """A sharded LoRA policy merged into its base: its gathered weights (`state_dict`, whole on the
    main process only) loaded into a fresh CPU copy of the model, there merged. The sharded
    parameters themselves cannot be merged in place (each rank holds a slice of each)."""
    if not accelerator.is_main_process:
        return peft_model, None
    from peft import get_peft_model

    base = peft_model.get_base_model()
    # The model's own constructor, not from_config: under ZeRO-3, from_config partitions the new model
    # across the ranks as it builds it, a collective that the other ranks are not part of.
    copy = type(base)(base.config).to(next(iter(state_dict.values())).dtype)
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        copy = get_peft_model(copy, peft_model.peft_config[peft_model.active_adapter])
    copy.load_state_dict(state_dict)
    merged = copy.merge_and_unload()
    return merged, merged.state_dict()


# Write failures a user fixes outside the program, and how to recognise them when a library
# (torch.save, safetensors) reports them as a RuntimeError carrying only the OS's message.
STORAGE_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied"}


def storage_error(error: BaseException, run_dir: str | Path) -> str | None:
    """One line naming the path and the cause when `error` (or an error it came from) is a full
    disk, a read-only file system or a refused permission; None for any other error."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in STORAGE_ERRORS:
            return _storage_message(seen.errno, seen.filename or run_dir)
        text = str(seen).lower()
        for code in STORAGE_ERRORS:
            if os.strerror(code).lower() in text:
                return _storage_message(code, run_dir)
        seen = seen.__cause__ or seen.__context__
    return None


def _storage_message(code: int, path: Any) -> str:
    verb = "access" if code in (errno.EACCES, errno.EPERM) else "write"
    return f"cannot {verb} {path}: {STORAGE_ERRORS[code]}"
