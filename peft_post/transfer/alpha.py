"""Choosing POST's α on public data: when the paper's heuristic may be trusted, and a choice that reads no labels.

The heuristic (`suggest_alpha`) reads two accuracies on a public labelled held-out split: the unprompted target's and
the prompted source's, both scored with the *private* task's template and label words. They mean something only
when the public labels live in the private task's label space. A public set of another family (sentiment labels
scored against topic label words) gives numbers that look like weak accuracies and silently drive α to an extreme,
so `label_space_mismatch` refuses them first:

- labels that are not class indices of the private task (out of ``0..num_classes - 1``, or not integers);
- both accuracies below chance (1 / num_classes), by more than the noise of ``n`` examples explains (see
  `below_chance_bound`).

`ALPHA_GRID`, `predict_classes`, `agreement` and `pick_alpha_by_agreement` make the label-free choice: transfer one
prompt per α of the grid and keep the one whose predictions on public held-out *texts* agree most with the prompted
source's (the pipeline's `transfer_prompt` runs it).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from ..modeling import input_device
from ..scoring import class_scores_of
from ..tasks import TaskTemplate, Verbalizer, VerbalizerCollator, label_problem

ALPHA_METHODS = ("heuristic", "agreement")
# Five points span [0, 1] at the resolution the paper reports α (it uses 0.25-step values); each point costs one
# transfer, so a finer grid is a cost the provider pays for little: gap closed moves smoothly with α.
ALPHA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
# Level of the below-chance test: a label-compatible public set whose two accuracies are on average at or above chance
# is refused by noise alone with probability at most this (the bound is loose: simulated at exactly chance, with
# both point estimates also required below chance, the rate is <= 1.1% for 2-4 classes and 8-128 examples, even when
# the two models err on the same examples). A refusal costs little (α falls back to 0.5, said in a warning and the
# record); a miss is the silent α = 1 of a public set of another family. 0.05 catches that case on
# 64 examples already (zero-shot 3/64, source 12/64: bound 0.029).
MISMATCH_LEVEL = 0.05


def _bernoulli_kl(q: float, p: float) -> float:
    """KL(Bernoulli(q) ‖ Bernoulli(p)), with 0·log 0 = 0."""
    kl = 0.0
    if q > 0:
        kl += q * math.log(q / p)
    if q < 1:
        kl += (1 - q) * math.log((1 - q) / (1 - p))
    return kl


def below_chance_bound(mean_accuracy: float, num_classes: int, num_examples: int) -> float:
    """An upper bound on the probability of a mean accuracy this far below chance when the models are at least at
    chance: ``exp(−n·KL(mean ‖ 1/C))`` for ``mean < 1/C``, else 1.

    ``mean_accuracy`` is the average of the zero-shot and source accuracies over the same ``n`` examples, i.e. the
    mean of n i.i.d. per-example scores in {0, ½, 1}. Hoeffding's relative-entropy bound (1963, Thm 1) holds for any
    [0, 1]-valued i.i.d. scores, so it needs no assumption on how the two models' errors correlate, and it holds for
    every true mean ≥ 1/C (the KL only grows as the true mean moves up).
    """
    chance = 1.0 / num_classes
    if mean_accuracy >= chance:
        return 1.0
    return math.exp(-num_examples * _bernoulli_kl(mean_accuracy, chance))


def below_chance_threshold(num_classes: int, num_examples: int, level: float = MISMATCH_LEVEL) -> float:
    """The mean accuracy under which `below_chance_bound` falls below `level` (chance minus the margin of n
    examples), found by bisection: e.g. 0.161 for 4 classes and 128 examples (chance 0.25), 0.392 for 2 and 128 (chance 0.5)."""
    chance = 1.0 / num_classes
    target = math.log(1.0 / level) / num_examples
    if _bernoulli_kl(0.0, chance) <= target:
        return 0.0  # too few examples: no accuracy refutes chance at this level
    lo, hi = 0.0, chance
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _bernoulli_kl(mid, chance) > target else (lo, mid)
    return lo


def label_space_mismatch(num_classes: int, labels: Optional[Sequence] = None, zero_shot_acc: Optional[float] = None,
                         source_acc: Optional[float] = None, num_examples: Optional[int] = None,
                         level: float = MISMATCH_LEVEL) -> Optional[str]:
    """Why the public held-out labels do not fit the private task's label space (a sentence), or None.

    ``labels``: the public label column, checked first (`tasks.label_problem`: not integer class indices of
    ``0..num_classes - 1``). Then, with both accuracies and ``num_examples``: both below chance 1/C *and* their mean
    below it by more than noise (`below_chance_bound` < ``level``). A real task on which the models are merely weak
    sits near chance and is kept; scored against label words of another task, the labels are mostly "wrong" by
    construction and both models land far below chance.
    """
    if labels is not None:
        problem = label_problem(labels, num_classes)
        if problem:
            return f"the public held-out split {problem}"
    if zero_shot_acc is None or source_acc is None or num_examples is None:
        return None
    chance = 1.0 / num_classes
    mean = (zero_shot_acc + source_acc) / 2
    bound = below_chance_bound(mean, num_classes, num_examples)
    if zero_shot_acc < chance and source_acc < chance and bound < level:
        threshold = below_chance_threshold(num_classes, num_examples, level)
        return (f"both public accuracies are below chance {chance:.3f} (zero-shot {zero_shot_acc:.3f}, source "
                f"{source_acc:.3f}; their mean {mean:.3f} is under {threshold:.3f}, which models at or above chance reach "
                f"with probability <= {bound:.1e} on {num_examples} examples): "
                "the public labels are not the private task's classes")
    return None


@torch.no_grad()
def predict_classes(model, tokenizer, texts: Sequence[str], config, batch_size: int = 32,
                    prompt="auto") -> torch.Tensor:
    """The predicted class (argmax over `config`'s label words) of each text, as a (N,) long tensor: reads texts only.

    ``prompt`` as in `label_logits` ("auto": the adapter's prompt; None: the unprompted base model). Runs in eval mode
    (restored after) on the device of the model's input embeddings, in the caller's autocast if any.
    """
    verbalizer = Verbalizer.from_config(config, tokenizer)
    collator = VerbalizerCollator(TaskTemplate.from_config(config, tokenizer), text_column="text", label_column=None)
    loader = DataLoader([{"text": t} for t in texts], batch_size=batch_size, shuffle=False, collate_fn=collator)
    device = input_device(model)
    was_training = model.training
    model.eval()
    predictions = []
    try:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            predictions.append(class_scores_of(model, **batch, verbalizer=verbalizer, prompt=prompt).argmax(-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(predictions)


def agreement(predictions: torch.Tensor, reference: torch.Tensor) -> float:
    """The share of examples on which two (N,) class predictions agree."""
    if predictions.shape != reference.shape or predictions.numel() == 0:
        raise ValueError(f"Need two non-empty predictions of one shape, got {tuple(predictions.shape)} and "
                         f"{tuple(reference.shape)}.")
    return float((predictions == reference).float().mean())


def pick_alpha_by_agreement(agreements: Mapping[float, float]) -> float:
    """The α of highest agreement; ties go to the α closest to 0.5, then to the larger α.

    Agreement is a count over a few hundred public texts, so exact ties are common. 0.5 weighs imitation and
    direction equally, the least committed choice when the data cannot tell them apart; between two α equally far
    from it, the larger one leans on the direction term, which lets the stronger target keep what it does better than
    the source (agreement with the source cannot reward that, and imitation, α → 0, is what it favours).
    """
    if not agreements:
        raise ValueError("No agreements to pick from.")
    return max(agreements, key=lambda a: (agreements[a], -abs(a - 0.5), a))


def agreement_note(alpha: float, agreements: Mapping[float, float], num_examples: int) -> str:
    """The report's sentence on an α chosen by agreement."""
    listed = ", ".join(f"{a:g}: {agreements[a]:.3f}" for a in sorted(agreements))
    return (f"alpha={alpha:g} chosen by agreement: of one transfer per alpha, the prompt whose predictions on the "
            f"{num_examples} public held-out texts agree most with the prompted source's (no public labels read; "
            f"agreement per alpha {listed}).")


def heuristic_note(alpha: float, zero_shot_acc: float, source_acc: float) -> str:
    """The report's sentence on an α chosen by `suggest_alpha` (the wording the runner used before)."""
    return (f"alpha={alpha:.3f} from the paper's heuristic on the public held-out split (zero-shot "
            f"{zero_shot_acc:.3f}, source {source_acc:.3f}).")
