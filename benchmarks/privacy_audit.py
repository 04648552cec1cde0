"""Empirical DP audit (`peft_post.dp_audit`): does a distinguishing attack catch a broken DP-SGD, and does the honest
mechanism stay under its claimed ε?

Setting: a 2-layer slice of the embedded SmolLM2-135M-Instruct (layers 0 and 29, made with `make_student`, no
distillation: the audit is about the mechanism, not utility), 10 virtual tokens, N = 16 short Rotten Tomatoes
training sentences plus one canary (an out-of-distribution string labelled against the model's guess, `choose_canary`),
replace-one neighbour D' (the canary replaced by a 17th sentence), expected batch 12 (q = 12/17, so a run draws the
canary at least once in 4 steps with probability 99.3%), 4 DP-SGD steps with plain SGD (the optimizer is
post-processing; a linear one keeps the canary's signal linear in the release), T runs on each of D and D' per case.
Cases, all through the public API:

- honest: secret OS-entropy noise, σ calibrated by the trainer for the claimed ε (replace-one, δ = 1e-3);
- replay: the same, with `DPConfig.insecure_noise_seed` (a fresh one per run, published), attacked by replaying;
- no_clipping: C' = 1.1 × the largest per-example gradient norm at the initial prompt (no example is clipped) and
  σ' = σ·C / C' = 0.1, so the noise std σC is the honest one; the honest C is set so that σ' = 0.1 (the trainer's PLD
  accountant takes time and memory ~1/σ'², so C' = 1e4 cannot be accounted: σ' = 2.5e-5 asked for 5.8 TiB);
- no_noise: σ = 0.

For every release the attacker computes the canary's loss and margin, the prompt's displacement along the canary's
gradient (orthogonal to every other example's, at the initial prompt), and, for honest and replay, the distance to a
replay on D with the published seeds. ε_lb: threshold and statistic chosen on half the runs, Clopper-Pearson on the
other half, 95% confidence. A broken case is caught when its ε_lb exceeds the honest claim.

    python benchmarks/privacy_audit.py --trials 40 --num-examples 16 --batch-size 12 --threads 1
    python benchmarks/privacy_audit.py --model tiny --trials 20 --out /tmp/privacy_audit_tiny.json   # no download
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

import torch

from peft_post import dp_audit as A
from peft_post.io import atomic_write_json

TEMPLATE = "Review: {text}\nSentiment:"
INIT_TEXT = "Predict if sentiment of this review is positive or negative"


def load_model(kind: str, layers: list[int], num_virtual_tokens: int, workdir: str):
    """(peft model, tokenizer, description) of the real slice or the tiny test model."""
    import transformers as tf
    from peft import get_peft_model

    from peft_post import POSTConfig, make_student

    if kind == "smollm2":
        from peft_post.assets import ASSETS, default_model_path

        path = default_model_path()
        teacher = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        student = make_student(teacher, layers)
        num_layers = teacher.config.num_hidden_layers
        del teacher
        tokenizer = tf.AutoTokenizer.from_pretrained(path)
        label_words = [["negative"], ["positive"]]
        init = dict(prompt_tuning_init="TEXT", prompt_tuning_init_text=INIT_TEXT, tokenizer_name_or_path=path)
        asset = ASSETS["smollm2-135m-instruct"]
        info = {"model": "SmolLM2-135M-Instruct", "package": f"{asset.package}=={asset.version}",
                "teacher_layers": num_layers, "kept_layers": layers, "distilled": False}
    else:
        from peft_post.testing import build_tiny_model, build_tokenizer

        tokenizer = build_tokenizer(os.path.join(workdir, "tokenizer"))
        student = build_tiny_model("llama", tokenizer, os.path.join(workdir, "tiny"), num_layers=2)
        label_words = [["bad"], ["good"]]
        init = {}
        info = {"model": "tiny config-built Llama (2 layers, d=32)", "distilled": False}
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    config = POSTConfig(num_virtual_tokens=num_virtual_tokens, task_type="CAUSAL_LM", template=TEMPLATE,
                        label_words=label_words, **init)
    return get_peft_model(student, config), tokenizer, info


def load_data(kind: str, n: int, max_chars: int, seed: int):
    """n short training sentences for D' \\ {replacement}, and one more as the replacement."""
    if kind == "smollm2":
        from peft_post.assets import load_text_dataset

        train = load_text_dataset("embedded:rotten_tomatoes", split="train").select_columns(["text", "label"])
        train = train.filter(lambda r: len(r["text"]) <= max_chars)
        source = "embedded:rotten_tomatoes (train), sentences of <= %d characters" % max_chars
    else:
        from peft_post.testing import tiny_sentiment_dataset

        train = tiny_sentiment_dataset(4 * n, seed=seed)
        source = "peft_post.testing.tiny_sentiment_dataset"
    train = train.shuffle(seed=seed).select(range(n + 1))
    return train.select(range(n)), dict(train[n]), source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--layers", default="0,29", help="Layers of SmolLM2 the slice keeps.")
    parser.add_argument("--cases", nargs="+", default=list(A.CASES), choices=list(A.CASES))
    parser.add_argument("--trials", type=int, default=40, help="Runs per dataset (D and D') per case.")
    parser.add_argument("--num-examples", type=int, default=16)
    parser.add_argument("--max-chars", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--virtual-tokens", type=int, default=10)
    parser.add_argument("--optim", default="sgd")
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--no-clipping-sigma", type=float, default=0.1,
                        help="σ' of the no_clipping case. It sets the honest C = C'·σ'/σ so that σ'C' = σC: a smaller "
                        "σ' would be truer to 'no clipping' but the trainer's PLD accountant takes ~1/σ'² time and "
                        "memory (σ' = 2.5e-5 asked for 5.8 TiB).")
    parser.add_argument("--no-clipping-margin", type=float, default=1.1,
                        help="C' of the no_clipping case = this × the largest per-example gradient norm at p_0 over "
                        "D and D' (so no example is clipped).")
    parser.add_argument("--target-epsilon", type=float, default=1.0, help="The honest case's claimed ε.")
    parser.add_argument("--delta", type=float, default=1e-3)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default="runs/privacy_audit")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "privacy_audit.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from peft_post.tuning import DPConfig, PromptTrainingConfig

    start = time.perf_counter()
    layers = [int(x) for x in args.layers.split(",")]
    model, tokenizer, model_info = load_model(args.model, layers, args.virtual_tokens, args.workdir)
    data, replacement, source = load_data(args.model, args.num_examples, args.max_chars, args.seed)
    canary, candidates = A.choose_canary(model, tokenizer, data)
    training = PromptTrainingConfig(
        output_dir=os.path.join(args.workdir, "unused"), max_steps=args.steps, learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size, optim=args.optim, lr_scheduler_type="constant",
        use_cpu=not torch.cuda.is_available(), save_strategy="no", report_to="none", disable_tqdm=True)
    d_in, d_out, _ = A.neighbouring_datasets(data, canary, A.REPLACE_ONE, replacement)
    max_norm = A.max_example_gradient_norm(model, tokenizer, list(d_in) + [replacement])
    sigma = A.calibrated_noise_multiplier(
        model, tokenizer, d_in, DPConfig(target_epsilon=args.target_epsilon, target_delta=args.delta), training)
    no_clipping_norm = math.ceil(args.no_clipping_margin * max_norm * 10) / 10
    clip = no_clipping_norm * args.no_clipping_sigma / sigma
    honest = DPConfig(noise_multiplier=sigma, target_delta=args.delta, max_grad_norm=clip)
    print(f"{model_info['model']}: N = {len(d_in)}, canary {canary['text']!r} label {canary['label']}, "
          f"q = {args.batch_size}/{len(d_in)}, {args.steps} steps, honest σ = {sigma:.4f} for ε = "
          f"{args.target_epsilon} "
          f"at δ = {args.delta}, C = {clip:.4f} (noise std {sigma * clip:.4f}); no_clipping C' = {no_clipping_norm} "
          f"(largest per-example gradient norm at p_0: {max_norm:.2f})", flush=True)

    results = {}
    for case, dp in A.case_dp_configs(honest, args.cases, no_clipping_norm=no_clipping_norm).items():
        result = A.run_distinguishing_audit(
            model, tokenizer, data, canary, dp, training, trials=args.trials, statistics=A.case_statistics(case),
            replacement=replacement, confidence=args.confidence, seed=args.seed,
            progress=lambda m, c=case: print(f"[{c}] {m}", flush=True))
        results[case] = result
        b = result["bound"]
        print(f"{case}: ε_lb {result['epsilon_lb']:.3f} (max {result['max_epsilon_lb']:.3f} with these runs) via "
              f"{b['statistic']} (FNR {b['fnr']:.2f}, FPR {b['fpr']:.2f} on {b['num_in']}+{b['num_out']} runs); "
              f"ledger ε {result['claimed_epsilon']}, guarantee_holds {result['ledger'].get('guarantee_holds')}; "
              f"AUCs " + ", ".join(f"{k} {v['auc']:.2f}" for k, v in result["per_statistic"].items()) +
              f"; {result['wall_time_s']:.0f} s", flush=True)

    claimed = results["honest"]["claimed_epsilon"] if "honest" in results else None
    summary = {}
    for case, r in results.items():
        summary[case] = {
            "epsilon_lb": r["epsilon_lb"], "max_epsilon_lb": r["max_epsilon_lb"], "statistic": r["bound"]["statistic"],
            "ledger_epsilon": r["claimed_epsilon"], "guarantee_holds": r["ledger"].get("guarantee_holds"),
            "noise_multiplier": r["ledger"]["noise_multiplier"], "max_grad_norm": r["ledger"]["max_grad_norm"],
            "noise_std": r["ledger"]["noise_multiplier"] * r["ledger"]["max_grad_norm"],
            "refutes_honest_claim": None if claimed is None else bool(r["epsilon_lb"] > claimed),
            "auc": {k: v["auc"] for k, v in r["per_statistic"].items()},
            "wall_time_s": r["wall_time_s"],
        }
    print("\ncase          ε_lb   (max)   ledger ε   honest claim   caught")
    for case, s in summary.items():
        ledger_eps = s["ledger_epsilon"] if isinstance(s["ledger_epsilon"], str) else f"{s['ledger_epsilon']:.3f}"
        print(f"{case:<12} {s['epsilon_lb']:6.3f} ({s['max_epsilon_lb']:.3f})  {ledger_eps:>8}   {claimed:.3f}"
              f"        {s['refutes_honest_claim']}")
    atomic_write_json(args.out, {
        "command": "python " + " ".join(map(shlex.quote, ["benchmarks/privacy_audit.py", *sys.argv[1:]])),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": args.threads, "cpu_count": os.cpu_count()},
        "model": model_info,
        "data": {"source": source, "num_examples_in": len(d_in), "canary": canary, "replacement": replacement,
                 "canary_candidates": candidates},
        "honest_dp": {"noise_multiplier": sigma, "max_grad_norm": clip, "target_delta": args.delta},
        "no_clipping": {"max_grad_norm": no_clipping_norm, "noise_multiplier": args.no_clipping_sigma,
                        "largest_example_gradient_norm_at_p0": max_norm},
        "settings": {k: v for k, v in vars(args).items() if k not in ("workdir", "out")},
        "claimed_epsilon": claimed,
        "summary": summary,
        "results": results,
        "wall_time_s": time.perf_counter() - start,
    })
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
