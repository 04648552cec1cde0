"""Measure how much the public embedded sets overlap the private Rotten Tomatoes task, and how long loading takes.

VADER's movieReviewSnippets and the Rotten Tomatoes corpus are both Pang & Lee critic snippets; a public set that
contains the private task's sentences must not be used for transfer or distillation. This script counts exact
(normalised) overlaps and near-duplicates (>= 50% of a text's word 5-grams found in the private corpus).

    python benchmarks/assets_overlap.py [--model]

`--model` also times `default_model_path()` in a fresh temporary cache (downloads ~93 MB, ~1.2 GB RAM).
Writes benchmarks/results/assets_overlap.json.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shlex
import sys
import tempfile
import time

from peft_post import assets as A
from peft_post.io import atomic_write_json


def _grams(text: str, n: int = 5) -> list[tuple]:
    w = re.findall(r"[a-z0-9]+", text.lower())
    return [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="store_true", help="also time building the model in a fresh cache")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the warm-cache load timings")
    args = parser.parse_args()

    timings = {}
    for name, fn in [("rotten_tomatoes", A.load_rotten_tomatoes), ("vader_amazon", lambda: A.load_vader("amazon")),
                     ("distillation_text", A.load_distillation_text)]:
        runs = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t)
        timings[name + "_warm_load_s"] = sorted(runs)[len(runs) // 2]

    rt = A.load_rotten_tomatoes()
    private = list(rt["train"]["text"]) + list(rt["test"]["text"])
    test_keys = {A.normalize_text(t) for t in rt["test"]["text"]}
    keys = {A.normalize_text(t) for t in private}
    grams = {g for t in private for g in _grams(t)}

    overlap = {}
    for name in A.VADER_SETS:
        texts = [t for _, t in A.vader_rows(name)]
        exact = [t for t in texts if A.normalize_text(t) in keys]
        rest = [t for t in texts if A.normalize_text(t) not in keys]
        near = [t for t in rest if (g := _grams(t)) and sum(x in grams for x in g) / len(g) >= 0.5]
        in_test = sum(A.normalize_text(t) in test_keys for t in texts)
        overlap[f"vader_{name}"] = {"texts": len(texts), "exact_in_private": len(exact), "near_duplicates": len(near),
                                    "exact_fraction": len(exact) / len(texts),
                                    "private_test_sentences_covered": in_test, "private_test_size": len(test_keys)}
    for source in ("sms", "trec"):
        texts = list(A.load_distillation_text([source])["text"])
        overlap[source] = {"texts": len(texts), "exact_in_private": sum(A.normalize_text(t) in keys for t in texts)}
    distill = A.load_distillation_text()
    overlap["distillation_text"] = {"texts": len(distill),
                                    "exact_in_private": sum(A.normalize_text(t) in keys for t in distill["text"])}

    model = None
    if args.model:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            A.default_model_path(cache_dir=tmp)
            first = time.perf_counter() - t
            t = time.perf_counter()
            A.default_model_path(cache_dir=tmp)
            model = {"first_build_s_including_download": first, "second_call_s": time.perf_counter() - t,
                     "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    out = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "private": {"train": len(rt["train"]), "test": len(rt["test"])},
        "overlap_with_rotten_tomatoes": overlap,
        "timings_median_s": timings,
        "model": model,
    }
    for name, o in overlap.items():
        extra = (f", near-duplicates {o['near_duplicates']}, covers {o['private_test_sentences_covered']}/"
                 f"{o['private_test_size']} test sentences") if "near_duplicates" in o else ""
        print(f"{name:18s} {o['exact_in_private']:6d} of {o['texts']:6d} texts are private sentences{extra}")
    for k, v in timings.items():
        print(f"{k:32s} {v:.2f} s")
    if model:
        print(model)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "assets_overlap.json")
    atomic_write_json(path, out)
    print("wrote", path)


if __name__ == "__main__":
    main()
