"""Whole DPO training steps (forward, loss, backward, AdamW step) on one GPU: real tokens per second.

The loss is a small part of a step; padding and prompts computed twice are not. This benchmark runs
the same pairs through every implementation and reports real (non-padding) tokens per second,
peak memory and the share of the step spent in the LM head + loss:

    trl                        TRL's DPOTrainer, default (full fp32 logits)
    trl-liger                  TRL with use_liger_kernel=True (skipped when liger-kernel is missing)
    trl-fastdpo-LAYOUT         fastdpo.integrations.trl.FastDPOTrainer, LAYOUT = padded | packed | shared
    fastdpo-IMPL-LAYOUT        fastdpo's trainer step (head, layout, loss, reference copy, AdamW),
                               IMPL = fused | fused_linear
    fastdpo-fused-packed-nocheck   the default row with fastdpo.value_checks(False). fastdpo's own
                               batches are range-checked from bounds read on the host, so the
                               two rows should agree: the check costs the trainer no wait
    trl-fastdpo-packed-nocheck the TRL row with value checks off: TRL's batches are made on the
                               device, so the head reads their ranges back (a host sync), and the
                               difference is that sync's share of a step
    fastdpo-fused-LAYOUT-flex  LAYOUT = packed | shared, with flex attention instead of --attn (GPU
                               only: torch's flex attention has no backward on the CPU). Under sdpa,
                               transformers hands a packed row's block-diagonal mask (and fastdpo the
                               shared one) to sdpa as a dense [N, N] mask over the whole row; flex's
                               BlockMask lets its kernel skip the blocks the mask removes

Models: random-weight models built from the Qwen2.5-0.5B and Llama-3.2-1B configs (no download),
bf16 autocast over fp32 weights, gradient checkpointing off and on. `--tiny` runs a 2-layer model
on the CPU: a smoke test for the test suite, never a result.

Pair lengths: UltraFeedback-like. This machine cannot download the dataset, so
ULTRAFEEDBACK_QUANTILES are anchored on the one published figure found: the prefix-sharing paper
(arXiv 2410.20305; its repository github.com/frankxwang/dpo-prefix-sharing, README "Speedups")
gives UltraFeedback (HuggingFaceH4/ultrafeedback_binarized) a median overall length of 409 tokens
and a median prompt-to-completion length ratio of 0.42. Read as prompt + one answer, that is a
prompt of about 120 and an answer of about 285 tokens at the median, the medians used below. The
other quantiles (the spread and the long tails) are an ESTIMATE. Replace them with quantiles
measured with the model's tokenizer before quoting a number as "on UltraFeedback".

    python benchmarks/bench_train.py                       # both models, checkpointing off and on
    python benchmarks/bench_train.py --models qwen0.5b --impls trl,fastdpo-fused-packed
    python benchmarks/bench_train.py --tiny --device cpu   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# token-length quantiles (q, tokens) of prompt and of each answer: medians from the prefix-sharing
# paper's UltraFeedback row, the rest an estimate (see the docstring)
ULTRAFEEDBACK_QUANTILES = {
    "prompt": [(0.0, 8), (0.25, 55), (0.5, 120), (0.75, 230), (0.95, 560), (1.0, 1000)],
    "answer": [(0.0, 4), (0.25, 170), (0.5, 285), (0.75, 420), (0.95, 720), (1.0, 1000)],
}
MODELS = {  # name -> (transformers config class, config fields)
    "qwen0.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                     num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                     rope_theta=1000000.0, tie_word_embeddings=True)),
    "llama1b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                                    rope_theta=500000.0, tie_word_embeddings=True)),
    "tiny": ("LlamaConfig", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)),
}
LAYOUTS = ("padded", "packed", "shared")
IMPLS = ["trl", "trl-liger"] + [f"trl-fastdpo-{k}" for k in LAYOUTS] + \
    [f"fastdpo-{i}-{k}" for i in ("fused", "fused_linear") for k in LAYOUTS] + \
    ["fastdpo-fused-packed-nocheck", "trl-fastdpo-packed-nocheck"] + \
    ["fastdpo-fused-packed-flex", "fastdpo-fused-shared-flex"]  # value checks off: their syncs' share; flex
PAD, EOS = 0, 1


@dataclass
class Row:
    model: str
    impl: str
    checkpointing: bool
    real_tokens_per_s: float | None = None
    step_ms: float | None = None
    peak_gb: float | None = None
    loss_share: float | None = None
    first_loss: float | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)


def sample_length(rng: random.Random, quantiles) -> int:
    """Inverse-CDF sample, linear between the quantile points."""
    u = rng.random()
    for (q0, v0), (q1, v1) in zip(quantiles, quantiles[1:]):
        if u <= q1:
            return max(1, round(v0 + (v1 - v0) * (u - q0) / (q1 - q0)))
    return quantiles[-1][1]


def make_pairs(n: int, vocab: int, seed: int, scale: float = 1.0, max_length: int = 1024):
    """n (prompt, chosen, rejected) id lists, answers ending in EOS, each row cut to max_length."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        p = max(1, round(sample_length(rng, ULTRAFEEDBACK_QUANTILES["prompt"]) * scale))
        p = min(p, max_length // 2)
        answers = []
        for _ in range(2):
            a = max(1, round(sample_length(rng, ULTRAFEEDBACK_QUANTILES["answer"]) * scale))
            answers.append([rng.randrange(2, vocab) for _ in range(min(a, max_length - p) - 1)] + [EOS])
        pairs.append(([rng.randrange(2, vocab) for _ in range(p)], *answers))
    return pairs


def model_type(name: str) -> str:
    import transformers

    return getattr(transformers, MODELS[name][0]).model_type


def build_model(name: str, attn: str, checkpointing: bool, device):
    import transformers

    cls_name, fields = MODELS[name]
    config = getattr(transformers, cls_name)(**fields, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS)
    torch.manual_seed(0)
    with torch.device(device):  # random init where the model runs: a 0.5B model takes seconds on the host, per row
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


class HeadTimer:
    """Time spent in fastdpo's head: lm_head and log-prob statistics from the scored hidden states,
    forward, and their backward until the gradient reaches those hidden states (CUDA events around
    fastdpo.head.row_stats and on autograd hooks). TRL's own head is not timed."""

    def __init__(self, device):
        self.device, self.ms, self.pending = device, 0.0, []

    def __enter__(self):
        import fastdpo.head as head

        self.head, self.saved = head, {"row_stats": head.row_stats}
        for name, fn in self.saved.items():
            setattr(head, name, self._wrap(fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.head, name, fn)

    def _event(self):
        if self.device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _wrap(self, fn):
        def timed(first, *args, **kwargs):
            start = self._event()
            out = fn(first, *args, **kwargs)
            self.pending.append((start, self._event()))
            if torch.is_grad_enabled() and out.logps.requires_grad and first.requires_grad:
                marks = {}

                def backward_starts(grad):  # the gradient reaches the row sums: the head's backward begins
                    marks["start"] = self._event()

                def backward_ends(grad):  # ... and the head's input: it is done
                    self.pending.append((marks.get("start"), self._event()))

                out.logps.register_hook(backward_starts)
                first.register_hook(backward_ends)
            return out
        return timed

    def collect(self) -> float:
        """Milliseconds of head work since the last call (synchronizes)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        total = 0.0
        for start, end in self.pending:
            if start is None:
                continue
            total += start.elapsed_time(end) if self.device.type == "cuda" else (end - start) * 1e3
        self.pending = []
        return total


def fastdpo_steps(model, pairs, P: int, impl: str, layout: str, device, steps: int, autocast: bool):
    """fastdpo's trainer step on consecutive groups of P pairs: yields (real tokens, first loss)."""
    from fastdpo.layouts import PairTokens, build
    from fastdpo.trainer.config import TrainConfig
    from fastdpo.trainer.loss import LossFn, attach_head, head_options, sequence_logps

    cfg = TrainConfig(loss_impl=impl, loss_type="sigmoid")  # TRL's default loss
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    for m in (model, ref):
        attach_head(m, head_options(cfg))
    loss_fn = LossFn(cfg, autocast)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6,
                                  fused=device.type == "cuda" or None)
    model.train()
    for s in range(steps):
        group = pairs[s * P:(s + 1) * P]
        batch = build(layout, [PairTokens(*g) for g in group], range(P), PAD).to(device)
        loss, _ = loss_fn(model, batch, sequence_logps(ref, batch, autocast))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        yield batch.real_tokens, loss


def trl_steps(model, pairs, P: int, impl: str, device, steps: int, out_dir: Path):
    """TRL's DPOTrainer (or FastDPOTrainer) over exactly these pairs, in order, one epoch."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    vocab = model.config.vocab_size
    words = {"<pad>": PAD, "</s>": EOS, **{f"w{i}": i for i in range(2, vocab)}}
    core = Tokenizer(models.WordLevel(words, unk_token="</s>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>")

    def text(ids):
        return " ".join(f"w{i}" for i in ids if i != EOS)

    data = Dataset.from_list([{"prompt": text(p), "chosen": " " + text(c), "rejected": " " + text(r)}
                              for p, c, r in pairs[:steps * P]])
    args = DPOConfig(output_dir=str(out_dir), per_device_train_batch_size=P, max_steps=steps, learning_rate=1e-6,
                     report_to="none", logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
                     bf16=device.type == "cuda", use_cpu=device.type == "cpu", max_length=None,
                     use_liger_kernel=impl == "trl-liger", dataloader_drop_last=True,
                     gradient_checkpointing=model.is_gradient_checkpointing)
    ref = copy.deepcopy(model).eval()
    common = dict(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tok)
    if impl.startswith("trl-fastdpo-"):
        from fastdpo.integrations.trl import FastDPOTrainer

        layout = impl.removeprefix("trl-fastdpo-").removesuffix("-nocheck")
        trainer = FastDPOTrainer(**common, share_prompt=layout == "shared", padding_free=layout != "padded")
    else:
        trainer = DPOTrainer(**common)
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    trainer.add_callback(Clock())
    original = trainer.compute_loss
    seen = []

    def counting(model_, inputs, *a, **k):
        seen.append(int(inputs["attention_mask"].sum()))
        return original(model_, inputs, *a, **k)

    trainer.compute_loss = counting
    start = time.perf_counter()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return start, marks, seen, losses[0] if losses else None


def run_row(row: Row, pairs, P: int, steps: int, warmup: int, device, attn: str, out_dir: Path) -> None:
    from fastdpo import value_checks

    torch.manual_seed(0)
    model = build_model(row.model, "flex_attention" if row.impl.endswith("-flex") else attn, row.checkpointing, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    autocast = device.type == "cuda"
    with HeadTimer(device) as timer:
        if row.impl.startswith("trl"):
            with value_checks(not row.impl.endswith("-nocheck")):
                start, marks, seen, row.first_loss = trl_steps(model, pairs, P, row.impl, device, warmup + steps,
                                                               out_dir)
            times = [b - a for a, b in zip([start] + marks, marks)][warmup:]
            tokens = seen[warmup:warmup + len(times)]
            head_ms = timer.collect() * len(times) / max(1, len(seen))
        else:
            _, impl, layout, *variant = row.impl.split("-")
            times, tokens, head_ms = [], [], 0.0
            it = fastdpo_steps(model, pairs, P, impl, layout, device, warmup + steps, autocast)
            with value_checks("nocheck" not in variant):  # off: no host sync for the label check
                for s in range(warmup + steps):
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    t = time.perf_counter()
                    real, loss = next(it)
                    if s == 0:
                        row.first_loss = float(loss)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    ms = timer.collect()
                    if s >= warmup:
                        times.append(time.perf_counter() - t)
                        tokens.append(real)
                        head_ms += ms
    row.step_ms = 1e3 * sum(times) / len(times)
    row.real_tokens_per_s = sum(tokens) / sum(times)
    row.loss_share = head_ms / (1e3 * sum(times)) if head_ms else None
    if device.type == "cuda":
        row.peak_gb = torch.cuda.max_memory_allocated(device) / 2**30


def unavailable(impl: str, device: torch.device) -> str | None:
    """Why `impl` cannot run here, or None."""
    why = common.liger_unavailable(device) if impl == "trl-liger" else None
    if impl.endswith("-flex") and device.type == "cpu":
        why = "torch's flex attention has no backward on the CPU"
    return None if why is None else f"skipped: {why}"


def table(rows: list[Row]) -> str:
    lines = ["| model | ckpt | impl | real tok/s | step ms | peak GB | head+loss share | first loss |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | {'on' if r.checkpointing else 'off'} | {r.impl} | {r.error} | | | | |")
            continue
        share = f"{100 * r.loss_share:.0f}%" if r.loss_share is not None else ""
        peak = f"{r.peak_gb:.2f}" if r.peak_gb is not None else ""
        lines.append(f"| {r.model} | {'on' if r.checkpointing else 'off'} | {r.impl} | {r.real_tokens_per_s:.0f} | "
                     f"{r.step_ms:.1f} | {peak} | {share} | {r.first_loss:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="qwen0.5b,llama1b")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--checkpointing", default="off,on")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model and short pairs (CPU smoke test)")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    models = ["tiny"] if args.tiny else args.models.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for name in models:
        vocab = MODELS[name][1]["vocab_size"]
        pairs = make_pairs(args.pairs * (args.warmup + args.steps), vocab, seed=0, scale=0.05 if args.tiny else 1.0)
        for ckpt in [c == "on" for c in args.checkpointing.split(",")]:
            for impl in args.impls.split(","):
                row = Row(name, impl, ckpt, error=unavailable(impl, device))
                try:
                    if row.error is None:
                        # trl-liger's layer kernels replace transformers' own module-wide: undone after each row
                        with common.modeling_patches_undone(model_type(name)):
                            run_row(row, pairs, args.pairs, args.steps, args.warmup, device, args.attn,
                                    out / "trl_runs")
                except ImportError as e:
                    row.error = f"skipped: {e.name or e} not installed"
                except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
                    row.error = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                rows.append(row)
                print(f"{name} ckpt={ckpt} {impl}: {row.error or f'{row.real_tokens_per_s:.0f} real tok/s'}",
                      flush=True)
                write(rows, out, device, args)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print(table(rows))
    return rows


def write(rows: list[Row], out: Path, device, args) -> None:
    """JSON and Markdown after every row, so a run cut by a time limit keeps what it measured."""
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "args": vars(args),
            "quantiles": ULTRAFEEDBACK_QUANTILES}
    (out / "bench_train.json").write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in rows]}, indent=1))
    (out / "bench_train.md").write_text(f"{meta['device']}, torch {meta['torch']}, {meta['date']}\n\n{table(rows)}\n")


if __name__ == "__main__":
    main()
