"""Step time of DP prompt tuning vs non-private prompt tuning, with naive Opacus hooks for reference.

All three run on the same model and the same fixed batch, interleaved round by round in one process so that load
on the (shared) machine hits them alike. Timed: one optimizer step as the trainers take it
(`trainer.training_step` + `optimizer.step` + `zero_grad`). The DP step includes per-example gradients, clipping and
noise; "opacus_naive" wraps the PEFT model in Opacus's GradSampleModule (hooks computing per-sample gradients, which
are WRONG for a PEFT prompt, see tests/test_privacy.py) and runs PEFT's own full-sequence forward.

    python benchmarks/dp_overhead.py                      # 4 layers, d=256, batch 8, 20 virtual tokens
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

from peft import get_peft_model
from transformers import AutoModelForCausalLM

from peft_post import POSTConfig
from peft_post.io import atomic_write_json
from peft_post.losses import verbalizer_loss
from peft_post.modeling import prompt_parameter
from peft_post.testing import build_tokenizer, tiny_config
from peft_post.tuning import DPConfig, DPPromptTrainer, PromptTrainer, PromptTrainingConfig

WORDS = ["the", "movie", "film", "plot", "acting", "was", "a", "story", "and", "it", "very", "truly", "cast",
         "ending", "script", "great", "terrible", "good", "bad", "boring", "moving", "dull", "fun"]


def rows(n: int, words: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words))), "label": i % 2}
            for i in range(n)]


def build_model(tokenizer, layers: int, hidden: int, prompt_len: int, seed: int = 0):
    config = tiny_config("llama", len(tokenizer), num_layers=layers, hidden_size=hidden, pad_token_id=tokenizer.pad_token_id)
    config.num_attention_heads = max(hidden // 64, 1)
    config.num_key_value_heads = config.num_attention_heads
    config.intermediate_size = 4 * hidden
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config)
    post = POSTConfig(num_virtual_tokens=prompt_len, template="{text} It was", label_words=[["bad"], ["good"]],
                      max_length=256)
    return get_peft_model(base, post)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--words", type=int, default=30, help="max words per example (min is half)")
    parser.add_argument("--prompt-len", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 because on a shared 2-core box 2 threads ran ~20x slower (OpenMP contention)")
    parser.add_argument("--no-opacus", action="store_true", help="skip the naive Opacus reference")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "dp_overhead.json"))
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")

    tmp = tempfile.mkdtemp()
    tokenizer = build_tokenizer(os.path.join(tmp, "tok"))
    data = rows(4 * a.batch, a.words)
    from datasets import Dataset

    dataset = Dataset.from_list(data)
    targs = dict(output_dir=tmp, max_steps=10, per_device_train_batch_size=a.batch, disable_tqdm=True, save_strategy="no")

    base_model = build_model(tokenizer, a.layers, a.hidden, a.prompt_len)
    dp_model = build_model(tokenizer, a.layers, a.hidden, a.prompt_len)
    plain = PromptTrainer(base_model, PromptTrainingConfig(**targs), train_dataset=dataset, processing_class=tokenizer)
    dp = DPPromptTrainer(dp_model, PromptTrainingConfig(**targs), DPConfig(noise_multiplier=1.0, target_delta=1e-5),
                         train_dataset=dataset, processing_class=tokenizer)
    batch = plain.data_collator(data[: a.batch])
    seq_len = int(batch["input_ids"].shape[1])
    for t in (plain, dp):
        t.create_optimizer()
        t.model.train()

    def step(trainer):
        def run():
            trainer.training_step(trainer.model, dict(batch))
            trainer.optimizer.step()
            trainer.model.zero_grad(set_to_none=True)
        return run

    modes = {"non_private": step(plain), "dp": step(dp)}
    if not a.no_opacus:
        from opacus import GradSampleModule

        naive_model = build_model(tokenizer, a.layers, a.hidden, a.prompt_len)
        for m in naive_model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        naive_model.train()
        wrapped = GradSampleModule(naive_model)
        optimizer = torch.optim.Adam([prompt_parameter(naive_model)], lr=3e-2)
        v = plain.verbalizer
        rows_idx = torch.arange(a.batch)

        def naive():
            out = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = out.logits[rows_idx, batch["label_positions"] + a.prompt_len]
            verbalizer_loss(logits, batch["labels"], v.index, v.weight).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            prompt_parameter(naive_model).grad_sample = None

        modes["opacus_naive"] = naive

    times = {k: [] for k in modes}
    names = list(modes)
    for r in range(a.warmup + a.repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate so no mode always runs first
        for name in order:
            start = time.perf_counter()
            modes[name]()
            elapsed = time.perf_counter() - start
            if r >= a.warmup:
                times[name].append(elapsed)

    med = {k: statistics.median(v) for k, v in times.items()}
    per_round = [d / b for d, b in zip(times["dp"], times["non_private"])]
    result = {
        "command": "python " + " ".join([os.path.relpath(__file__, os.getcwd())] + sys.argv[1:]),
        "settings": {"layers": a.layers, "hidden": a.hidden, "batch": a.batch, "seq_len": seq_len,
                     "prompt_len": a.prompt_len, "repeats": a.repeats, "warmup": a.warmup, "threads": a.threads,
                     "model": "config-built Llama (random weights)", "optimizer": "AdamW"},
        "median_step_s": med,
        "ratio_dp_over_non_private": med["dp"] / med["non_private"],
        "median_per_round_ratio_dp_over_non_private": statistics.median(per_round),
        "step_times_s": times,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpu_count": os.cpu_count(), "loadavg": os.getloadavg()},
    }
    if "opacus_naive" in med:
        result["ratio_opacus_naive_over_non_private"] = med["opacus_naive"] / med["non_private"]
    print(f"model: {a.layers} layers, d={a.hidden}; batch {a.batch} x {seq_len} tokens + {a.prompt_len} virtual tokens")
    for k, v in med.items():
        print(f"  {k:>13}: median step {v * 1000:8.1f} ms")
    print(f"DP / non-private step time: {result['ratio_dp_over_non_private']:.3f} "
          f"(median per-round ratio {result['median_per_round_ratio_dp_over_non_private']:.3f})")
    if "opacus_naive" in med:
        print(f"naive Opacus (wrong gradients) / non-private: {result['ratio_opacus_naive_over_non_private']:.3f}")
    atomic_write_json(a.out, result)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
