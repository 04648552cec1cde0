"""fp32 against bf16: each stage's step, interleaved in one process, and the same prompts scored in both precisions.

Steps (`--steps`): the pipeline's own trainers and arguments (`PipelineConfig.distill_args`, `tune_args`, `dp_config`,
`transfer_args`), built twice, once per precision: frozen models loaded in the compute dtype, trainable tensors in
fp32, `TrainingArguments.bf16` set for bf16. One step of each kind (distillation, non-DP tuning, DP tuning, transfer,
and an evaluation forward of the target) is timed per precision per round, interleaved round after round so that
whatever else the machine does weighs on both alike; the result is the median fp32 time over the median bf16 time
(`*_speedup`: above 1, bf16 is faster). The transfer's cache of frozen logits is built once per precision and timed.

Accuracy (`--run-dir`): the prompts of a finished run (zero-shot, the student's p_s, POST) are scored on the run's
private test examples in fp32 and in bf16; per method, both accuracies, the share of examples whose prediction
changed, and a 95% interval for the paired difference (bf16 - fp32), from the discordant pairs.

    python benchmarks/precision.py --rounds 3 --threads 1 --run-dir runs/quick   # benchmarks/results/precision.json
    python benchmarks/precision.py --device cuda --model random:smollm2-135m --out $OUT/gpu_precision.json

``--model random:smollm2-135m`` times a randomly initialised model of SmolLM2-135M's shape (no weights needed: the
GPU machine has no asset cache); step times do not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time

import torch

from peft_post.io import atomic_write_json
from peft_post.profiling import synchronize, training_stepper

RESULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "precision.json")
DTYPES = ("float32", "bfloat16")
STEPS = ("distill", "tune", "dp_tune", "transfer", "evaluate_forward")
# SmolLM2-135M's architecture (its config.json), for `--model random:smollm2-135m`.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                    tie_word_embeddings=True, rms_norm_eps=1e-5)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct",
                   help="the target: an embedded name, a folder, or random:smollm2-135m (random weights)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3, help="timed steps of each kind and precision (after a warm-up)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--num-public-examples", type=int, default=64, help="public examples the transfer cache holds")
    p.add_argument("--student-layers", help="the student's layers (default: the rotten_tomatoes preset's)")
    p.add_argument("--no-steps", dest="steps", action="store_false", help="skip the step timings")
    p.add_argument("--run-dir", help="a finished run whose prompts are scored in both precisions")
    p.add_argument("--max-test-examples", type=int, help="cap on the run's test examples scored (default: the run's)")
    p.add_argument("--out", default=RESULT)
    return p.parse_args(argv)


def _random_model_folder(work: str) -> str:
    """A SmolLM2-135M-shaped Llama with random weights, saved with the test suite's small word-level tokenizer (step
    times depend on the shapes, not on the weights or the words)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_post.testing import build_tokenizer

    path = os.path.join(work, "random-smollm2-135m")
    tokenizer = build_tokenizer(path)
    torch.manual_seed(0)
    # The real vocabulary size, for the LM head's real cost; the small test tokenizer's ids all lie below it.
    config = LlamaConfig(**SMOLLM2_135M, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def build_steps(cfg, target_path: str, tokenizer, work: str, dtype: str, datasets: dict) -> dict:
    """The five timed steps in one precision, built as the pipeline builds them."""
    from peft import get_peft_model

    from peft_post.distill import DistillationTrainer, make_student, with_task_template
    from peft_post.tasks import TaskTemplate, VerbalizerCollator
    from peft_post.modeling import label_logits, quiet_checkpointing_deprecation
    from peft_post.pipeline import load_model, new_prompted_model
    from peft_post.transfer import TransferTrainer
    from peft_post.tuning import DPPromptTrainer, PromptTrainer

    cfg = cfg.with_overrides({"dtype": dtype})
    precision = cfg.precision()
    teacher = load_model(target_path, False, precision, "frozen")
    out = lambda name: os.path.join(work, f"{dtype}-{name}")  # noqa: E731

    student = make_student(teacher, cfg.keep_layers())  # DistillationTrainer casts it to fp32 master weights
    text = with_task_template(datasets["distill"], cfg.template, cfg.distill_templated_fraction, cfg.seed,
                              cfg.text_column)
    distill = DistillationTrainer(student, teacher, cfg.distill_args(out("distill")), train_dataset=text,
                                  processing_class=tokenizer)

    def prompted_student():
        frozen = make_student(teacher, cfg.keep_layers())  # frozen in the compute dtype, as the tune stage loads it
        torch.manual_seed(cfg.seed)
        with quiet_checkpointing_deprecation():
            return get_peft_model(frozen, cfg.post_config(target_path))

    tune = PromptTrainer(prompted_student(), cfg.tune_args(out("tune")), train_dataset=datasets["train"],
                         processing_class=tokenizer)
    dp_tune = DPPromptTrainer(prompted_student(), cfg.tune_args(out("dp")), dp_config=cfg.dp_config(),
                              train_dataset=datasets["train"], processing_class=tokenizer)
    target = new_prompted_model(target_path, cfg.post_config(target_path), False, cfg.seed, precision, "target")
    # Its own source (the transfer freezes the source's prompt; the step's cost does not depend on what p_s learned).
    transfer = TransferTrainer(target, prompted_student(), cfg.transfer_args(out("transfer")),
                               public_dataset=datasets["public"], public_eval_dataset=datasets["public"],
                               processing_class=tokenizer)
    synchronize()
    start = time.perf_counter()
    transfer.build_cache()
    synchronize()
    cache_s = time.perf_counter() - start

    collator = VerbalizerCollator(TaskTemplate.from_config(cfg.post_config(), tokenizer), cfg.text_column, None)
    rows = [{cfg.text_column: t} for t in datasets["test"][cfg.text_column][: cfg.eval_batch_size]]
    eval_batch = {k: v.to(precision.device) for k, v in collator(rows).items() if k != "labels"}
    zero_shot = load_model(target_path, False, precision, "target")

    def evaluate_forward() -> float:
        synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            label_logits(zero_shot, eval_batch["input_ids"], eval_batch["attention_mask"],
                         eval_batch["label_positions"])
        synchronize()
        return time.perf_counter() - start

    steps = {"distill": training_stepper(distill, cfg.distill_max_steps),
             "tune": training_stepper(tune, cfg.tune_max_steps),
             "dp_tune": training_stepper(dp_tune, dp_tune.planned_steps),
             "transfer": training_stepper(transfer, cfg.transfer_max_steps),
             "evaluate_forward": evaluate_forward}
    return {"steps": steps, "transfer_cache_build_s": cache_s, "precision": precision.record()}


def paired_difference(a: list, b: list) -> dict:
    """Accuracy of predictions `a` and `b` (bools, same examples), the paired difference b - a with an exact 95%
    interval, and McNemar's exact two-sided p-value (see `difference_from_counts`)."""
    n = len(a)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    return {"accuracy_a": sum(a) / n, "accuracy_b": sum(b) / n,
            **difference_from_counts(only_a, only_b, n)}


def difference_from_counts(only_a: int, only_b: int, n: int) -> dict:
    """`paired_difference`'s statistics from its counts: examples right only under a, only under b, and all."""
    from scipy.stats import beta

    diff = (only_b - only_a) / n
    discordant = only_a + only_b
    # Given the d discordant pairs, only_b ~ Binomial(d, π) and b - a = d/n · (2π - 1): a Clopper-Pearson interval on
    # π is an exact interval on the difference (a Wald interval is meaningless with a handful of discordant pairs).
    low = beta.ppf(0.025, only_b, only_a + 1) if only_b else 0.0
    high = beta.ppf(0.975, only_b + 1, only_a) if only_a else 1.0
    lo, hi = (discordant / n * (2 * p - 1) for p in (low, high)) if discordant else (0.0, 0.0)
    # Exact McNemar: under "no difference" each discordant pair goes either way with probability 1/2.
    tail = sum(math.comb(discordant, k) for k in range(min(only_a, only_b) + 1)) / 2 ** discordant
    return {"difference": diff, "difference_95ci": [float(lo), float(hi)], "discordant": discordant,
            "right_only_a": only_a, "right_only_b": only_b, "mcnemar_exact_p": min(1.0, 2 * tail),
            "num_examples": n}


def score_run(run_dir: str, max_test_examples, device: str) -> dict:
    """Each method's prompt of a finished run scored in fp32 and bf16 on the run's test examples (paired)."""
    from peft_post.evaluation import score_dataset
    from peft_post.pipeline import (STAGE_FOLDERS, PipelineConfig, load_model, load_prompted_model, load_tokenizer,
                                    private_examples, student_folder)
    from peft_post.assets import resolve_model

    cfg = PipelineConfig.from_run_dir(run_dir)
    if max_test_examples:
        cfg = cfg.with_overrides({"max_test_examples": max_test_examples})
    target = resolve_model(cfg.target_model)
    student = resolve_model(cfg.student_model) if cfg.student_model else student_folder(cfg, target)
    test = private_examples(cfg, "test")
    tokenizer = load_tokenizer(target)
    task = cfg.post_config()
    loaders = {
        "zero_shot": lambda p: load_model(target, cfg.masked, p, "target"),
        "student_prompt": lambda p: load_prompted_model(student, os.path.join(run_dir, STAGE_FOLDERS["tune"]),
                                                        cfg.masked, p),
        "post": lambda p: load_prompted_model(target, os.path.join(run_dir, STAGE_FOLDERS["transfer"]), cfg.masked,
                                              p, "target"),
    }
    from peft_post.precision import Precision

    results, seconds = {}, {}
    for method, load in loaders.items():
        correct = {}
        for dtype in DTYPES:
            model = load(Precision(device=device, dtype=dtype))
            start = time.perf_counter()
            scores, labels = score_dataset(model, tokenizer, test, task, text_column=cfg.text_column,
                                           label_column=cfg.label_column, batch_size=cfg.eval_batch_size,
                                           desc=f"{method} {dtype}")
            seconds[f"{method}_{dtype}"] = time.perf_counter() - start
            correct[dtype] = (scores.argmax(-1) == labels).tolist()
            del model
        results[method] = paired_difference(correct["float32"], correct["bfloat16"])
        print(method, json.dumps(results[method]))
    return {"run_config": {"preset": cfg.preset, "target_model": cfg.target_model, "private_dataset":
                           cfg.private_dataset, "dp": cfg.dp, "max_test_examples": cfg.max_test_examples},
            "methods": results, "scoring_seconds": seconds,
            "evaluation_speedup": {m: seconds[f"{m}_float32"] / seconds[f"{m}_bfloat16"] for m in loaders}}


def measure_steps(args, work: str) -> dict:
    from peft_post.assets import load_text_dataset, resolve_model
    from peft_post.pipeline import PipelineConfig, load_tokenizer, private_examples, public_splits, random_subset

    target_path = (_random_model_folder(work) if args.model == "random:smollm2-135m" else resolve_model(args.model))
    # The Rotten Tomatoes preset's data and student, as when the committed figures were made (then the default).
    cfg = PipelineConfig(preset="rotten_tomatoes", run_dir=work,
                         target_model=args.model if not args.model.startswith("random:") else target_path,
                         device=args.device, save_steps=10_000,
                         **({"student_layers": args.student_layers} if args.student_layers else {}))
    tokenizer = load_tokenizer(target_path)
    public_train, _ = public_splits(cfg)
    datasets = {"distill": random_subset(load_text_dataset(cfg.distill_dataset, split=cfg.distill_split), 256, 0),
                "train": private_examples(cfg, "train"), "test": private_examples(cfg, "test"),
                "public": random_subset(public_train, args.num_public_examples, 0)}
    built = {dtype: build_steps(cfg, target_path, tokenizer, work, dtype, datasets) for dtype in DTYPES}
    times = {dtype: {name: [] for name in STEPS} for dtype in DTYPES}
    for dtype in DTYPES:
        for name in STEPS:
            print(f"warm-up: {name} in {dtype}", flush=True)
            built[dtype]["steps"][name]()
    for _ in range(args.rounds):
        for name in STEPS:
            for dtype in DTYPES:
                times[dtype][name].append(built[dtype]["steps"][name]())
        print({name: [round(times[d][name][-1], 3) for d in DTYPES] for name in STEPS})
    median = {dtype: {name: statistics.median(v) for name, v in times[dtype].items()} for dtype in DTYPES}
    return {
        "model": args.model, "step_seconds": times, "median_step_s": median,
        "speedup": {f"{name}_speedup": median["float32"][name] / median["bfloat16"][name] for name in STEPS},
        "transfer_cache_build_s": {d: built[d]["transfer_cache_build_s"] for d in DTYPES},
        "transfer_cache_build_speedup": built["float32"]["transfer_cache_build_s"] /
        built["bfloat16"]["transfer_cache_build_s"],
        "precision": {d: built[d]["precision"] for d in DTYPES},
        "budget": {"distill_batch_size": cfg.distill_batch_size, "distill_block_size": cfg.distill_block_size,
                   "tune_batch_size": cfg.tune_batch_size, "transfer_batch_size": cfg.transfer_batch_size,
                   "eval_batch_size": cfg.eval_batch_size, "num_virtual_tokens": cfg.num_virtual_tokens,
                   "student_layers": cfg.student_layers, "num_public_examples": args.num_public_examples},
    }


def main(argv=None):
    from peft_post.precision import cpu_name, measure_matmul_speedup

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="post-precision-")  # trainers' output folders; nothing is kept
    try:
        result = {
            "command": "python benchmarks/precision.py " + shlex.join(sys.argv[1:] if argv is None else argv),
            "machine": {"cpu": cpu_name(),
                        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                        "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                        "torch": torch.__version__},
            "device": args.device, "threads": args.threads, "rounds": args.rounds,
        }
        if args.device == "cpu":
            result["matmul_probe"] = measure_matmul_speedup()
        if args.steps:
            result["steps"] = measure_steps(args, work)
            print(json.dumps(result["steps"]["speedup"], indent=1))
        if args.run_dir:
            result["accuracy"] = score_run(args.run_dir, args.max_test_examples, args.device)
        atomic_write_json(args.out, result)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
