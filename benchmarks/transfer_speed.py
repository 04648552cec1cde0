"""Time per POST transfer step: cached frozen logits (one prompted forward + backward of the target) against the
uncached path (the reference code's four forwards per step), same models, same batches, interleaved in one process.

Models are config-built Llamas sharing the test tokenizer: a target with `--target-layers` and a source with
`--source-layers` (default 16 vs 4, hidden 256). Peak memory of each mode is measured in a fresh subprocess
(ru_maxrss is a process-wide high-water mark, so the two modes cannot share one process for it).

    python benchmarks/transfer_speed.py            # writes benchmarks/results/transfer_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from peft import get_peft_model
from peft_post import POSTConfig, TransferConfig, TransferTrainer
from peft_post.io import atomic_write_json
from peft_post.modeling import prompt_parameter
from peft_post.losses import transfer_loss
from peft_post.testing import build_tokenizer, tiny_config, tiny_sentiment_rows

RESULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "transfer_speed.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000,
                   help="model vocabulary (Llama-2's 32000); the test tokenizer uses only its first ids")
    p.add_argument("--source-layers", type=int, default=4)
    p.add_argument("--target-layers", type=int, default=16)
    p.add_argument("--virtual-tokens", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--pieces", type=int, default=8, help="tiny reviews joined into one public text (~6 words each)")
    p.add_argument("--public-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20, help="timed steps per mode (after warm-up)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 because 2 threads on 2 cores shared with other jobs spin-wait (10x slower)")
    p.add_argument("--memory-steps", type=int, default=5)
    p.add_argument("--memory-only", choices=("cached", "uncached", "reference"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=RESULT)
    return p.parse_args(argv)


def public_texts(n: int, pieces: int, seed: int = 0) -> list[str]:
    rows = [r["text"] for r in tiny_sentiment_rows(n * pieces, seed)]
    return [" ".join(rows[i * pieces:(i + 1) * pieces]) for i in range(n)]


def _model(tok, vocab: int, layers: int, hidden: int, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config("llama", max(vocab, len(tok)), num_layers=layers, hidden_size=hidden,
                         pad_token_id=tok.pad_token_id)
    return AutoModelForCausalLM.from_config(config).eval()


def build(args, workdir: str):
    from datasets import Dataset

    tok = build_tokenizer(os.path.join(workdir, "tok"))
    source = _model(tok, args.vocab, args.source_layers, args.hidden, seed=0)
    target = _model(tok, args.vocab, args.target_layers, args.hidden, seed=1)
    task = dict(num_virtual_tokens=args.virtual_tokens, label_words=[["bad", "awful"], ["good", "great"]],
                max_length=256)
    source = get_peft_model(source, POSTConfig(**task))
    target = get_peft_model(target, POSTConfig(**task))
    data = Dataset.from_dict({"text": public_texts(args.public_size, args.pieces)})
    config = TransferConfig(output_dir=os.path.join(workdir, "out"), alpha=0.5, max_steps=1,
                            per_device_train_batch_size=args.batch_size, disable_tqdm=True, use_cpu=True)
    trainer = TransferTrainer(target, source, config, public_dataset=data, processing_class=tok)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this benchmark steps around
    batches = [trainer.data_collator([trainer.train_dataset[(i * args.batch_size + j) % args.public_size]
                                      for j in range(args.batch_size)])
               for i in range(max(1, args.public_size // args.batch_size))]
    return trainer, batches


def reference_loss(trainer, batch):
    """The loss as sprintml/POST utils/transfer.py computes it: four PEFT forwards of full-sequence logits, autograd
    left on, then the label row gathered (our uncached path instead runs the frozen three under no_grad and applies
    the LM head at the label slot only)."""
    target, source = trainer.model, trainer.source_model
    x = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    rows, pos = torch.arange(len(batch["input_ids"])), batch["label_positions"]
    n = trainer.task_config.num_virtual_tokens
    a_t = target(**x).logits[rows, pos + n]
    with target.disable_adapter():
        b_t = target(**x).logits[rows, pos]
    a_s = source(**x).logits[rows, pos + n]
    with source.disable_adapter():
        b_s = source(**x).logits[rows, pos]
    return transfer_loss(a_t, b_t, a_s, b_s, alpha=trainer.args.alpha, temperature=trainer.args.temperature)


MODES = ("cached", "uncached", "reference")


def step(trainer, batch, mode: str) -> float:
    start = time.perf_counter()
    if mode == "reference":
        trainer.model.eval()
        reference_loss(trainer, batch).backward()
    else:
        trainer.args.cache_source_outputs = mode == "cached"
        trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_run(args) -> None:
    """Peak RSS of the training steps alone: reset the high-water mark after loading (and caching), then step."""
    torch.set_num_threads(args.threads)
    cached = args.memory_only == "cached"
    mode = args.memory_only
    with tempfile.TemporaryDirectory() as workdir:
        trainer, batches = build(args, workdir)
        if cached:
            trainer.build_cache()
        setup_peak = _status_kb("VmHWM") / 1024
        before = _status_kb("VmRSS") / 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        for i in range(args.memory_steps):
            step(trainer, batches[i % len(batches)], mode)
        print(json.dumps({"setup_peak_rss_mb": setup_peak, "rss_before_steps_mb": before,
                          "steps_peak_rss_mb": _status_kb("VmHWM") / 1024,
                          "steps_peak_increase_mb": _status_kb("VmHWM") / 1024 - before,
                          "cache_mb": (trainer.cache.nbytes / 2**20) if cached else 0.0}))


def main(argv=None):
    args = parse_args(argv)
    if args.memory_only:
        return memory_run(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        trainer, batches = build(args, workdir)
        start = time.perf_counter()
        trainer.build_cache()
        cache_seconds = time.perf_counter() - start
        seq_len = int(batches[0]["attention_mask"].sum(-1).float().mean())
        for i in range(args.warmup):
            for mode in MODES:
                step(trainer, batches[i % len(batches)], mode)
        times = {mode: [] for mode in MODES}
        for i in range(args.repeats):
            batch = batches[i % len(batches)]
            order = MODES[i % 3:] + MODES[: i % 3]  # rotate who goes first
            for mode in order:
                times[mode].append(step(trainer, batch, mode))
        # The three paths compute one loss: a sanity check of what is being timed.
        with torch.no_grad():
            trainer.model.eval()
            losses = {"reference": reference_loss(trainer, batches[0]).item()}
            for mode in ("cached", "uncached"):
                trainer.args.cache_source_outputs = mode == "cached"
                losses[mode] = trainer.compute_loss(trainer.model, batches[0]).item()
        cache_mb = trainer.cache.nbytes / 2**20
        prompt_shape = tuple(prompt_parameter(trainer.model).shape)
        vocab = trainer.model.get_base_model().config.vocab_size

    medians = {mode: statistics.median(t) for mode, t in times.items()}
    paired = {base: statistics.median([b / c for c, b in zip(times["cached"], times[base])])
              for base in ("uncached", "reference")}
    memory = {}
    passed = argv if argv is not None else sys.argv[1:]
    for mode in MODES:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-only", mode] + list(passed)
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        memory[mode] = json.loads(out)

    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/transfer_speed.py"] + list(passed)),
        "modes": {
            "cached": "TransferTrainer step with the frozen logits cached: one prompted forward + backward of the target",
            "uncached": "TransferTrainer step with cache_source_outputs=False: + 3 no-grad label-slot forwards",
            "reference": "the sprintml/POST utils/transfer.py way: 4 PEFT forwards with full-sequence logits",
        },
        "setup": {
            "models": f"config-built Llama, hidden {args.hidden}, vocab {vocab}; source {args.source_layers} layers, "
                      f"target {args.target_layers} layers",
            "prompt": list(prompt_shape), "batch_size": args.batch_size, "mean_tokens_per_example": seq_len,
            "torch_threads": args.threads, "torch": torch.__version__, "device": "cpu",
        },
        "step_seconds_median": medians,
        "speedup_vs_uncached": medians["uncached"] / medians["cached"],
        "speedup_vs_reference": medians["reference"] / medians["cached"],
        "speedup_median_of_paired_ratios": paired,
        "repeats": args.repeats,
        "step_seconds": times,
        "cache_build_seconds": cache_seconds,
        "cache_mb": cache_mb,
        "loss_on_one_batch": losses,
        "memory": memory,
    }
    atomic_write_json(args.out, result)
    for mode in MODES:
        print(f"{mode:9s} step: {medians[mode] * 1000:8.1f} ms (median of {args.repeats})")
    print(f"cached speedup: {result['speedup_vs_uncached']:.2f}x vs uncached, {result['speedup_vs_reference']:.2f}x vs "
          f"reference (median paired ratios {paired['uncached']:.2f}x, {paired['reference']:.2f}x)")
    print(f"cache: built once in {cache_seconds:.2f} s, {cache_mb:.2f} MB")
    for mode, m in memory.items():
        print(f"{mode:9s} steps peak RSS {m['steps_peak_rss_mb']:.0f} MB (+{m['steps_peak_increase_mb']:.0f} MB over "
              f"{m['rss_before_steps_mb']:.0f} MB before the steps; setup peak {m['setup_peak_rss_mb']:.0f} MB)")
    print(f"loss on one batch: {losses}; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
