"""Throughput of each trainer on 1 process against 2 processes (DDP over gloo on this CPU), from one script.

Three launches per round, interleaved round by round so that load on the (shared) machine hits them alike:

- ``1x1``: one process, one thread (the per-core baseline);
- ``1x2``: one process, two threads (the same cores as 2x1);
- ``2x1``: ``accelerate launch --multi_gpu --num_processes 2``, one thread each (each process takes half of every
  global batch).

Every launch trains the same config-built models (llama, ``--layers`` x ``--hidden``, the test tokenizer) on the same
global batch for ``--steps`` optimizer steps, stage by stage: distillation, prompt tuning, DP prompt tuning, and the
transfer (its cache built before the clock starts: on 2 processes it is built once, by the main one). Timed: the
Trainer's own ``train_runtime`` (the steps, not the start-up or the model loading). Reported: the median of the
rounds per launch kind, examples per second, and the ratios 2x1 / 1x2 (several processes instead of threads, on the
same cores) and 2x1 / 1x1 (a second core added as a process).

    python benchmarks/scaling.py --rounds 3 --out benchmarks/results/scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = ("distill", "tune", "dp_tune", "transfer")
LAUNCHES = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1)}  # processes, threads per process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------------ the worker
def _models(workdir: str):
    """The tokenizer and the seeded config-built target (saved once by the driver), loaded afresh."""
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(os.path.join(workdir, "tokenizer"))
    target = tf.AutoModelForCausalLM.from_pretrained(os.path.join(workdir, "target")).eval()
    return tokenizer, target


def _post_config():
    from peft_post import POSTConfig

    return POSTConfig(num_virtual_tokens=20, template="{text} It was", label_words=[["bad"], ["good"]], max_length=128)


def _common(out: str, batch: int, steps: int, world: int) -> dict:
    return dict(output_dir=out, max_steps=steps, per_device_train_batch_size=batch // world, seed=0, use_cpu=True,
                report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=steps, dataloader_drop_last=True)


def run_worker(workdir: str, out: str, batch: int, steps: int) -> None:
    import torch
    from datasets import Dataset
    from peft import get_peft_model

    from peft_post import (DistillationConfig, DistillationTrainer, DPConfig, DPPromptTrainer, PromptTrainer,
                           PromptTrainingConfig, TransferConfig, TransferTrainer, make_student)
    from peft_post.distill import prepare_distillation_dataset
    from peft_post.testing import tiny_sentiment_rows

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    tokenizer, target = _models(workdir)
    private = Dataset.from_list(tiny_sentiment_rows(max(batch * steps, 256), seed=1))
    public = Dataset.from_list(tiny_sentiment_rows(max(batch * steps, 256), seed=2))
    timings = {}

    def timed(name, trainer):
        trainer.train()
        timings[name] = float(trainer.state.log_history[-1]["train_runtime"])

    # Distillation: the target is the teacher, a 2-layer student of it is trained on 64-token blocks.
    student = make_student(target, [0, -1])
    blocks = prepare_distillation_dataset(Dataset.from_dict({"text": list(public["text"]) * 4}), tokenizer, 64)
    timed("distill", DistillationTrainer(student, target, DistillationConfig(
        block_size=64, learning_rate=1e-4, **_common(os.path.join(out, "distill"), batch, steps, world)),
        train_dataset=blocks, processing_class=tokenizer))
    student = student.eval()

    def prompted(model):
        torch.manual_seed(0)
        return get_peft_model(model, _post_config())

    timed("tune", PromptTrainer(prompted(target), PromptTrainingConfig(
        learning_rate=3e-2, **_common(os.path.join(out, "tune"), batch, steps, world)), train_dataset=private,
        processing_class=tokenizer))
    _, fresh = _models(workdir)
    timed("dp_tune", DPPromptTrainer(prompted(fresh), PromptTrainingConfig(
        learning_rate=3e-2, max_grad_norm=0.0, **_common(os.path.join(out, "dp"), batch, steps, world)),
        DPConfig(noise_multiplier=1.0), train_dataset=private, processing_class=tokenizer))
    source = prompted(student)
    _, fresh = _models(workdir)
    transfer = TransferTrainer(prompted(fresh), source, TransferConfig(
        alpha=0.5, learning_rate=1e-2, **_common(os.path.join(out, "transfer"), batch, steps, world)),
        public_dataset=public, processing_class=tokenizer)
    transfer.build_cache()  # before the clock: the timed steps read it
    timed("transfer", transfer)
    if rank == 0:
        with open(os.path.join(out, "timings.json"), "w", encoding="utf-8") as f:
            json.dump({"world_size": world, "train_runtime_s": timings}, f)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------------------ the driver
def _launch(kind: str, workdir: str, out: str, args) -> dict:
    processes, threads = LAUNCHES[kind]
    worker = [os.path.abspath(__file__), "--worker", workdir, out, "--batch", str(args.batch), "--steps",
              str(args.steps)]
    if processes == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(_free_port()), *worker]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} launch failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    with open(os.path.join(out, "timings.json"), encoding="utf-8") as f:
        result = json.load(f)
    result["launch_wall_s"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("WORKDIR", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="Optimizer steps per stage.")
    parser.add_argument("--batch", type=int, default=16, help="Global batch (split among the processes).")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "scaling.json"))
    args = parser.parse_args()
    if args.worker:
        run_worker(*args.worker, args.batch, args.steps)
        return

    import torch
    import transformers as tf

    from peft_post.io import atomic_write_json
    from peft_post.testing import build_tokenizer, tiny_config

    runs: dict = {kind: [] for kind in LAUNCHES}
    with tempfile.TemporaryDirectory() as workdir:
        tokenizer = build_tokenizer(os.path.join(workdir, "tokenizer"))
        config = tiny_config("llama", len(tokenizer), num_layers=args.layers, hidden_size=args.hidden,
                             pad_token_id=tokenizer.pad_token_id)
        config.num_attention_heads = config.num_key_value_heads = max(args.hidden // 64, 1)
        config.intermediate_size = 4 * args.hidden
        torch.manual_seed(0)
        tf.AutoModelForCausalLM.from_config(config).save_pretrained(os.path.join(workdir, "target"))
        for round_ in range(args.rounds):
            for kind in LAUNCHES:
                out = os.path.join(workdir, f"{kind}-{round_}")
                os.makedirs(out)
                result = _launch(kind, workdir, out, args)
                runs[kind].append(result)
                print(f"round {round_} {kind}: " + ", ".join(f"{s} {t:.2f} s" for s, t in
                                                           result["train_runtime_s"].items()), flush=True)
    rows = []
    for stage in STAGES:
        medians = {kind: statistics.median(r["train_runtime_s"][stage] for r in runs[kind]) for kind in LAUNCHES}
        examples = args.steps * args.batch
        rows.append({
            "stage": stage,
            "median_train_runtime_s": medians,
            "runs_s": {kind: [r["train_runtime_s"][stage] for r in runs[kind]] for kind in LAUNCHES},
            "examples_per_s": {kind: examples / t for kind, t in medians.items()},
            "speedup_2x1_vs_1x2": medians["1x2"] / medians["2x1"],
            "speedup_2x1_vs_1x1": medians["1x1"] / medians["2x1"],
        })
        print(f"{stage:>9}: 1x1 {medians['1x1']:.2f} s, 1x2 {medians['1x2']:.2f} s, 2x1 {medians['2x1']:.2f} s; "
              f"2 processes vs 2 threads x{rows[-1]['speedup_2x1_vs_1x2']:.2f}, vs 1 thread "
              f"x{rows[-1]['speedup_2x1_vs_1x1']:.2f}")
    command = (f"python benchmarks/scaling.py --rounds {args.rounds} --steps {args.steps} --batch {args.batch} "
               f"--layers {args.layers} --hidden {args.hidden} --out "
               + shlex.quote(os.path.relpath(os.path.abspath(args.out), os.path.dirname(HERE))))
    atomic_write_json(args.out, {
        "command": command,
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU; gloo",
        "torch": torch.__version__,
        "config": {"rounds": args.rounds, "steps": args.steps, "global_batch": args.batch, "layers": args.layers,
                   "hidden": args.hidden, "launches": {k: {"processes": p, "threads_per_process": t}
                                                       for k, (p, t) in LAUNCHES.items()}},
        "timed": "Trainer train_runtime of --steps optimizer steps (no start-up, no model loading, no cache build)",
        "launch_wall_s": {kind: [round(r["launch_wall_s"], 1) for r in runs[kind]] for kind in LAUNCHES},
        "rows": rows,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
