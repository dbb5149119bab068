"""Three optimizer steps of `FastDPOTrainer` on a tiny random Llama, for tests/test_trl_distributed.py.

Run it as one process (`python tests/trl_train_script.py OUT ...`) or under `accelerate launch`
(DDP, or FSDP2 / DeepSpeed with `--sharded-on-cpu`, which imports tests/sharded_on_cpu.py before
transformers builds its Accelerator, so that accelerate keeps them on CPU processes). `--batch` is the
per-process batch: 2 processes at half the batch of 1 see the same global batches.

Each case MODE-REF[-packed] (`--cases logits-model,linear-precompute-packed`: fastdpo_mode, TRL's
reference (REFS), and with "-packed" fastdpo's padding-free batches) trains fresh models into
OUT/CASE/: `log.json` (rank 0: TRL's log history, the loss and metrics of every step, which
fastdpo head path ran, and `trainer.evaluate()` on the same pairs after training), `final/`
(`save_model`: one safetensors file, gathered from the shards under FSDP; the adapter alone with
LoRA) and `params-rank{r}.json` from every rank (a digest of the parameters the rank holds after
each optimizer step: its shards under FSDP). All cases run in one launch: start-up is most of the
time.

`--check-refusal` then builds a trainer that cannot work on several processes (precompute from an
in-memory dataset) and writes the error it raised to OUT/refusal.txt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

WORDS = [f"w{i}" for i in range(16)]
PAIRS = 12  # 3 steps of a global batch of 4 pairs
MODES = ("logits", "linear")
# TRL's reference: a `ref_model` run at every step, or its log-probs precomputed once; "none...": no
# `ref_model`, the policy given as a folder, so TRL loads the reference from it (under FSDP, for the
# precompute too, freed afterwards) or precomputes with the policy itself before training; "lora":
# a LoRA adapter trained on the policy from its folder, the reference being the adapter disabled.
REFS = ("model", "precompute", "none", "none_precompute", "lora")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--data", type=Path, required=True,
                   help="the pairs as JSON lines (write_pairs), one file for all ranks: datasets names its cache "
                        "after the file's path and time, and TRL's precompute cache must be the same for all ranks")
    p.add_argument("--init", type=Path, help="the policy saved by save_policy (for the REFs none... and lora)")
    p.add_argument("--batch", type=int, required=True, help="pairs per process and step")
    p.add_argument("--cases", default=",".join(f"{m}-{r}" for m in MODES for r in REFS[:2]),
                   help="comma-separated MODE-REF[-packed], MODE in %s, REF in %s" % (MODES, REFS))
    p.add_argument("--sharded-on-cpu", action="store_true",
                   help="let accelerate keep FSDP or DeepSpeed on CPU processes (tests/sharded_on_cpu.py)")
    p.add_argument("--check-refusal", action="store_true")
    opts = p.parse_args(argv)
    opts.cases = opts.cases.split(",")
    for case in opts.cases:
        mode, ref, *layout = case.split("-")
        if mode not in MODES or ref not in REFS or layout not in ([], ["packed"]):
            p.error(f"unknown case {case}")
        if ref.startswith(("none", "lora")) and opts.init is None:
            p.error(f"case {case} needs --init")
    return opts


def write_pairs(path: Path) -> Path:
    """Prompts and answers of different lengths (so padding differs per row), one JSON object a line."""
    import torch

    g = torch.Generator().manual_seed(0)

    def sentence(n: int) -> str:
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))

    rows = [{"prompt": sentence(1 + i % 3), "chosen": " " + sentence(1 + i % 4),
             "rejected": " " + sentence(2 + (3 * i) % 4)} for i in range(PAIRS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def tiny_models(vocab: int):
    """(policy, reference): different random weights, so the reference log-ratios are not zero."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=2, bos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(cfg)
    torch.manual_seed(1)
    return policy, LlamaForCausalLM(cfg)


def save_policy(path: Path) -> Path:
    """The policy of tiny_models as a folder, for the cases where TRL loads the models itself (written once,
    before the launch: under torch.distributed, save_pretrained writes on rank 0 only)."""
    tiny_models(len(tokenizer()))[0].save_pretrained(path)
    return path


def digest(model) -> str:
    """sha256 of the parameters this process holds (bit-exact: any difference between ranks shows)."""
    import torch

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        local = p.to_local() if hasattr(p, "to_local") else p
        h.update(name.encode())
        h.update(local.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def count_head_paths() -> Counter:
    """Count the calls of fastdpo's two head paths ("logits" and "linear"): proof of the mode that ran."""
    import fastdpo.head as head

    calls: Counter = Counter()
    for mode, name in (("logits", "_from_logits"), ("linear", "_from_linear")):
        def counted(*args, _inner=getattr(head, name), _mode=mode, **kwargs):
            calls[_mode] += 1
            return _inner(*args, **kwargs)
        setattr(head, name, counted)
    return calls


def dpo_args(out: Path, batch: int, precompute: bool):
    from trl import DPOConfig

    return DPOConfig(output_dir=str(out), per_device_train_batch_size=batch, max_steps=3,
                     # SGD, not AdamW: the update is the gradient, so a gradient summed instead of averaged
                     # over processes (or not synchronised at all) changes the weights; AdamW is nearly
                     # blind to the gradient's scale.
                     optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
                     max_grad_norm=1e6,  # logged, never clips
                     per_device_eval_batch_size=batch, logging_steps=1, report_to="none", use_cpu=True, seed=0,
                     save_strategy="no", bf16=False, disable_tqdm=True, beta=0.1,
                     precompute_ref_log_probs=precompute)


def train_case(opts, case: str, calls: Counter) -> None:
    from datasets import load_dataset
    from transformers import TrainerCallback

    from fastdpo.integrations.trl import FastDPOTrainer

    mode, ref, *layout = case.split("-")
    out = opts.out / case
    # A cache of its own per case: TRL keys precomputed log-probs by data and model, not by fastdpo_mode.
    train = load_dataset("json", data_files=str(opts.data), split="train", cache_dir=str(out / "hf-cache"))
    tok = tokenizer()
    policy, ref_model = tiny_models(len(tok))
    peft_config = None
    if ref.startswith(("none", "lora")):  # the same weights, from the folder save_policy wrote
        policy, ref_model = str(opts.init), None
    if ref == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    digests: list[str] = []

    class Digest(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            digests.append(digest(model))

    calls.clear()
    args = dpo_args(out, opts.batch, precompute=ref.endswith("precompute"))
    trainer = FastDPOTrainer(model=policy, ref_model=ref_model, args=args, train_dataset=train, processing_class=tok,
                             peft_config=peft_config, callbacks=[Digest()], fastdpo_mode=mode,
                             padding_free=layout == ["packed"])
    trainer.train()
    train_calls = dict(calls)
    evaluation = evaluate(trainer, train, ref)
    if trainer.is_fsdp_enabled:  # one gathered file that transformers loads (the config saves shards)
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(out / "final"))
    accelerator = trainer.accelerator
    (out / f"params-rank{accelerator.process_index}.json").write_text(json.dumps(digests))
    if accelerator.is_main_process:
        (out / "log.json").write_text(json.dumps({
            "processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
            "fsdp": trainer.is_fsdp_enabled, "head_calls": train_calls, "layout": trainer.fastdpo_layout,
            "eval": evaluation,
            # the policy as training left it: DTensor shards under FSDP2, whole tensors otherwise
            "sharded": sorted({type(p).__name__ for p in trainer.model.parameters()}),
            "ref_sharded": None if trainer.ref_model is None else
            sorted({type(p).__name__ for p in trainer.ref_model.parameters()}),
            "log_history": trainer.state.log_history}))
    accelerator.wait_for_everyone()


def evaluate(trainer, dataset, ref: str) -> dict | None:
    """`trainer.evaluate` on the training pairs after training: TRL's metrics, gathered over the processes
    (`per_device_eval_batch_size` is the training batch, so every rank scores its share of the pairs).
    None where TRL cannot evaluate a new dataset after training: a precomputed reference with neither a
    `ref_model` nor an adapter (TRL raises; it has no reference left to score the pairs with)."""
    if ref == "none_precompute":
        return None
    return {k: v for k, v in trainer.evaluate(eval_dataset=dataset).items()
            if "runtime" not in k and "per_second" not in k}


def load_like_transformers_5_17() -> None:
    """Models TRL loads from a folder come with zeros on every rank but 0 under FSDP's CPU-RAM-efficient
    loading, as transformers up to 5.17 gives them (the weights are to come from rank 0 when the model
    is prepared; 5.24 loads them everywhere): the FSDP2 cases then check that the reference TRL loads
    and shards itself still gets rank 0's weights (fastdpo/integrations/fsdp_reference.py)."""
    import torch
    from transformers.modeling_utils import is_fsdp_enabled, is_local_dist_rank_0
    from trl.trainer import dpo_trainer

    load = dpo_trainer.create_model_from_path

    def create_model_from_path(*args, **kwargs):
        model = load(*args, **kwargs)
        if is_fsdp_enabled() and not is_local_dist_rank_0():
            with torch.no_grad():
                for tensor in model.state_dict().values():  # (not the non-persistent buffers, as there)
                    tensor.zero_()
        return model

    dpo_trainer.create_model_from_path = create_model_from_path


def check_refusal(opts) -> None:
    from datasets import Dataset

    from fastdpo.integrations.trl import FastDPOTrainer

    rows = [json.loads(line) for line in opts.data.read_text().splitlines()]
    tok = tokenizer()
    policy, ref_model = tiny_models(len(tok))
    try:
        FastDPOTrainer(model=policy, ref_model=ref_model, args=dpo_args(opts.out / "refused", opts.batch, True),
                       train_dataset=Dataset.from_list(rows), processing_class=tok)
        message = "no error"
    except ValueError as err:
        message = str(err)
    (opts.out / "refusal.txt").write_text(message)


def main(argv: list[str]) -> None:
    opts = parse(argv)
    if opts.sharded_on_cpu:  # before transformers creates its Accelerator
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import sharded_on_cpu  # noqa: F401

    calls = count_head_paths()
    if opts.sharded_on_cpu:
        load_like_transformers_5_17()
    for case in opts.cases:
        train_case(opts, case, calls)
    if opts.check_refusal:
        check_refusal(opts)
    import torch.distributed

    if torch.distributed.is_initialized():  # a clean end: no gloo thread left for the exit to tear down
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
