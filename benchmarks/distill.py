"""Stage-1 benchmark: distil SmolLM2-135M-Instruct (the embedded default teacher, 30 layers) into 4- and 8-layer
students on public text only, and measure what a provider pays and gets.

For each student and each step budget: held-out teacher–student KL (T=1) and next-token accuracy, and zero-shot
accuracy on a fixed Rotten Tomatoes test subset with the default template (the number that matters for POST).
Also: step time with a live teacher vs the teacher-hidden-state cache vs a top-k cache (interleaved, median), the
top-k cache's KL error, one-time cache cost and size, and peak RSS. The best student is saved with
`save_pretrained` under the peft_post cache (never in the repository).

    python benchmarks/distill.py                       # the full run (~40 CPU minutes on 2 cores)
    python benchmarks/distill.py --budgets 4 8 --students 4:0,1,28,29 --eval-examples 64 --blocks 256   # smoke
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from peft_post import POSTConfig, evaluate_prompt
from peft_post.assets import cache_dir, default_model_path, load_distillation_text, load_rotten_tomatoes
from peft_post.distill import (DistillationConfig, DistillationTrainer, TeacherCache, evaluate_distillation,
                               make_student, prepare_distillation_dataset,
                               with_task_template)
from peft_post.distill.cache import apply_head, hidden_and_logits, pad_right
from peft_post.io import atomic_write_json
from peft_post.losses import distillation_kl_loss, distillation_loss, topk_distillation_kl_loss

TEMPLATE = "Review: {text}\nSentiment:"
RESULTS = os.path.join(os.path.dirname(__file__), "results", "distill.json")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_student(spec: str) -> tuple[str, list[int]]:
    name, layers = spec.split(":")
    keep = []
    for part in layers.split(","):
        if "-" in part[1:]:
            a, b = part.split("-")
            keep += list(range(int(a), int(b) + 1))
        else:
            keep.append(int(part))
    return name, keep


def public_corpus(fraction_templated: float, seed: int):
    """Public distillation text; a fixed fraction wrapped in the task template *without* labels, so the student
    copies what the teacher would say at the label slot. No private (Rotten Tomatoes) text is used."""
    return with_task_template(load_distillation_text(), TEMPLATE, fraction_templated, seed)


class BudgetCallback(TrainerCallback):
    """Evaluates the student when training reaches each step budget (eval time is excluded from train time)."""

    def __init__(self, budgets, evaluate, max_train_s):
        self.budgets, self.evaluate, self.max_train_s = sorted(budgets), evaluate, max_train_s
        self.results, self.train_s, self._t0 = [], 0.0, None

    def on_step_begin(self, args, state, control, **kw):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.train_s += time.perf_counter() - self._t0
        over_time = self.train_s > self.max_train_s
        if state.global_step in self.budgets or over_time:
            self.results.append({"steps": state.global_step, "train_s": round(self.train_s, 1),
                                 "stopped_by_time_cap": over_time and state.global_step not in self.budgets,
                                 **self.evaluate()})
            if state.global_step >= self.budgets[-1] or over_time:
                control.should_training_stop = True


def step_timings(student, teacher, train, cache, topk_cache, args, reps):
    """Seconds per forward+backward of the distillation loss: live teacher vs hidden cache vs top-k cache,
    interleaved in one process (same batches), median over reps."""
    times = {"live": [], "hidden_cache": [], "topk_cache": []}
    student.train()
    for rep in range(reps):
        rows = list(range(rep * args.batch_size, (rep + 1) * args.batch_size))
        ids, mask = pad_right([train[i]["input_ids"] for i in rows], 0)
        labels = ids.masked_fill(mask == 0, -100)
        index = torch.tensor(rows)
        for mode in times:
            t0 = time.perf_counter()
            s_hidden, s_logits = hidden_and_logits(student, ids, mask)
            topk = t_logits = None
            with torch.no_grad():
                if mode == "live":
                    t_hidden, t_logits = hidden_and_logits(teacher, ids, mask)
                elif mode == "hidden_cache":
                    t_hidden = cache.batch(index, ids.shape[1])["hidden"]
                    t_logits = apply_head(teacher, t_hidden)
                else:
                    c = topk_cache.batch(torch.arange(rep * args.batch_size, (rep + 1) * args.batch_size), ids.shape[1])
                    t_hidden, topk = c["hidden"], (c["topk_values"], c["topk_indices"])
            loss, _ = distillation_loss(s_logits, t_logits, labels, mask.bool(), causal=True, student_hidden=s_hidden,
                                        teacher_hidden=t_hidden, teacher_topk=topk)
            loss.backward()
            student.zero_grad(set_to_none=True)
            times[mode].append(time.perf_counter() - t0)
    student.eval()
    med = {k: statistics.median(v[1:] if len(v) > 2 else v) for k, v in times.items()}  # first rep warms up
    return {"s_per_step_median": med, "hidden_cache_speedup": med["live"] / med["hidden_cache"],
            "topk_cache_speedup": med["live"] / med["topk_cache"], "reps": reps}


@torch.no_grad()
def topk_exactness(student, teacher, data, cache, ks, block_rows):
    """Relative error of the top-k KL against the exact KL (T=2) on held-out blocks."""
    rows = data["input_ids"][:block_rows]
    ids, mask = pad_right(rows, 0)
    _, s_logits = hidden_and_logits(student, ids, mask)
    t_logits = apply_head(teacher, cache.batch(torch.arange(len(rows)), ids.shape[1])["hidden"])
    exact = distillation_kl_loss(s_logits, t_logits, 2.0, mask.bool()).item()
    out = {"exact_kl_T2": exact}
    for k in ks:
        values, indices = t_logits.float().topk(k, dim=-1)
        approx = topk_distillation_kl_loss(s_logits, values, indices, 2.0, mask.bool()).item()
        p = torch.softmax(t_logits.float() / 2.0, -1)
        mass = p.gather(-1, indices).sum(-1)[mask.bool()].mean().item()
        out[f"k{k}"] = {"kl": approx, "relative_error": abs(approx - exact) / exact, "teacher_mass_kept_T2": mass,
                        "bytes_per_token_fp32_idx32": k * 8}
    out["hidden_bytes_per_token_fp32"] = teacher.config.hidden_size * 4
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--students", nargs="+", default=["4L:0,1,28,29", "8L:0-3,26-29"])
    ap.add_argument("--budgets", nargs="+", type=int, default=[100, 250], help="optimizer steps to evaluate at")
    ap.add_argument("--max-train-minutes", type=float, default=11.0, help="hard cap per student")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=4000, help="training blocks (the cached corpus)")
    ap.add_argument("--heldout-blocks", type=int, default=64)
    ap.add_argument("--eval-examples", type=int, default=500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--templated-fraction", type=float, default=0.5)
    ap.add_argument("--timing-reps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    result = {"command": "python " + " ".join(sys.argv), "args": vars(args), "torch_threads": args.threads,
              "machine": f"{os.cpu_count()} CPU cores (shared), no GPU", "students": {}}

    def save():
        atomic_write_json(args.output, result)

    t0 = time.perf_counter()
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    result["teacher"] = {"path": os.path.basename(path), "layers": teacher.config.num_hidden_layers,
                         "load_s": round(time.perf_counter() - t0, 1)}
    log(f"teacher loaded: {result['teacher']}")

    corpus = public_corpus(args.templated_fraction, args.seed)
    blocks = prepare_distillation_dataset(corpus, tok, args.block_size)
    heldout = blocks.select(range(args.heldout_blocks))
    train = blocks.select(range(args.heldout_blocks, min(len(blocks), args.heldout_blocks + args.blocks)))
    result["corpus"] = {"texts": len(corpus), "blocks_total": len(blocks), "train_blocks": len(train),
                        "train_tokens": sum(map(len, train["input_ids"])), "heldout_blocks": len(heldout),
                        "sources": "load_distillation_text() (tweets, amazon, nyt, sms, trec); no Rotten Tomatoes"}
    rt = load_rotten_tomatoes(seed=0)["test"].shuffle(seed=0).select(range(args.eval_examples))
    task = POSTConfig(template=TEMPLATE, label_words=[["negative"], ["positive"]])

    def zero_shot(model):
        return evaluate_prompt(model, tok, rt, task, batch_size=32, disable_progress=True)["accuracy"]

    t = time.perf_counter()
    result["teacher"]["zero_shot_accuracy"] = zero_shot(teacher)
    result["teacher"]["zero_shot_eval_s"] = round(time.perf_counter() - t, 1)
    log(f"teacher zero-shot {result['teacher']['zero_shot_accuracy']:.3f}")
    save()

    t = time.perf_counter()
    cache = TeacherCache.build(teacher, train, batch_size=args.batch_size, pad_token_id=0, disable_progress=True)
    build_s = time.perf_counter() - t
    heldout_cache = TeacherCache.build(teacher, heldout, batch_size=args.batch_size, pad_token_id=0,
                                       disable_progress=True)
    result["cache"] = {"kind": "hidden", "build_s": round(build_s, 1), "rows": len(cache),
                       "bytes": cache.nbytes, "s_per_block_teacher_forward": build_s / len(cache),
                       "peak_rss_gb_after": peak_rss_gb()}
    log(f"teacher cache: {result['cache']}")
    save()

    best = None
    for spec in args.students:
        name, keep = parse_student(spec)
        student = make_student(teacher, keep)
        entry = {"keep_layers": keep, "parameters": sum(p.numel() for p in student.parameters())}
        log(f"{name}: {keep}")
        # Timing first, on the untrained student (cost does not depend on the weights).
        rows = args.timing_reps * args.batch_size
        topk_cache = TeacherCache.build(teacher, train.select(range(rows)), kind="topk", top_k=64,
                                        batch_size=args.batch_size, pad_token_id=0, disable_progress=True)
        entry["timing"] = step_timings(student, teacher, train, cache, topk_cache, args, args.timing_reps)
        entry["topk_exactness_untrained"] = topk_exactness(student, teacher, heldout, heldout_cache, (16, 64, 256), 32)
        log(f"{name} timing {entry['timing']['s_per_step_median']}")

        def evaluate(student=student):
            metrics = evaluate_distillation(student, teacher, heldout, tok, teacher_cache=heldout_cache,
                                            batch_size=args.batch_size)
            metrics["zero_shot_accuracy"] = zero_shot(student)
            metrics["peak_rss_gb"] = peak_rss_gb()
            log(f"{name} eval {metrics}")
            return metrics

        entry["before"] = evaluate()
        save()
        config = DistillationConfig(
            output_dir=os.path.join(cache_dir(), "runs", f"distill-{name}"), per_device_train_batch_size=args.batch_size,
            max_steps=max(args.budgets), learning_rate=args.lr, lr_scheduler_type="constant_with_warmup",
            warmup_steps=10, freeze_embeddings=True, logging_steps=25, save_strategy="no", report_to=[],
            disable_tqdm=True, use_cpu=True, seed=args.seed, block_size=args.block_size, dataloader_num_workers=0,
        )
        callback = BudgetCallback(args.budgets, evaluate, args.max_train_minutes * 60)
        trainer = DistillationTrainer(student, teacher, config, train_dataset=train, processing_class=tok,
                                      teacher_cache=cache, callbacks=[callback])
        trainer.train()
        entry["budgets"] = [{**r, "tokens_seen": r["steps"] * args.batch_size * args.block_size,
                             "s_per_step": r["train_s"] / max(r["steps"], 1)} for r in callback.results]
        entry["train_log"] = [h for h in trainer.state.log_history if "loss" in h]
        entry["embeddings_frozen"] = True
        result["students"][name] = entry
        save()
        final = entry["budgets"][-1]
        if best is None or final["zero_shot_accuracy"] > best[1]:
            best = (name, final["zero_shot_accuracy"])
            out = os.path.join(cache_dir(), "students", f"smollm2-135m-instruct-{name}-distilled")
            student.save_pretrained(out)
            tok.save_pretrained(out)
            result["best_student"] = {"name": name, "zero_shot_accuracy": final["zero_shot_accuracy"],
                                      "path": out.replace(os.path.expanduser("~"), "~")}
            save()
        del trainer, student
    result["total_s"] = round(time.perf_counter() - t0, 1)
    result["peak_rss_gb"] = peak_rss_gb()
    save()
    log(f"done in {result['total_s']} s; results in {args.output}")


if __name__ == "__main__":
    main()
