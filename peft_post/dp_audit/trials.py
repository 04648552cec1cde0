"""The trials of the DP audit: the attacker's view of one release, the statistics it computes, the neighbouring
datasets and the canary, and `run_distinguishing_audit`, which trains T prompts on each dataset and bounds ε."""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..tuning.accountant import ADD_OR_REMOVE_ONE, ADJACENCIES, REPLACE_ONE
from .bounds import METHODS, distinguishing_bound

# An out-of-distribution canary for sentiment tasks: rare words and symbols, so its prompt gradient points where the
# task's examples do not push; its label is chosen against the model's initial prediction (`flipped_label`).
DEFAULT_CANARY_TEXT = "zq xv 0x7f qqj ~~ vvk pfft zzt 9z9 kx jjq wxq"


@dataclass
class Release:
    """What the attacker sees of one training run: the released prompt and the published artifacts.

    `seed` is the Trainer seed (published in older releases' provenance, and guessable from defaults);
    `noise_seed` is `DPConfig.insecure_noise_seed` when the run used one (then the ledger says the guarantee is
    void and the seed counts as published), None for secret OS-entropy noise."""

    prompt: torch.Tensor
    ledger: dict
    seed: int
    noise_seed: Optional[int] = None


class AuditSetup:
    """The model (loaded once), the two neighbouring datasets and the recipe; `train` runs the mechanism once.

    Statistic functions get ``(release, setup)`` and may use everything here: the threat model is the strongest
    one DP covers, an attacker who knows all of D and D' and the training recipe and sees the released prompt.
    """

    def __init__(self, model, tokenizer, dataset_in, dataset_out, canary: dict, replacement: Optional[dict],
                 dp_config, training_args, adjacency: str):
        from ..modeling import prompt_parameter
        from ..prompts import get_prompt
        from ..tasks import TaskTemplate, Verbalizer, VerbalizerCollator

        self.model = model
        self.tokenizer = tokenizer
        self.dataset_in, self.dataset_out = dataset_in, dataset_out
        self.canary, self.replacement = canary, replacement
        self.dp_config = dp_config
        self.training_args = training_args
        self.adjacency = adjacency
        self.post_config = model.peft_config[model.active_adapter]
        self.verbalizer = Verbalizer.from_config(self.post_config, tokenizer)
        self.text_column = getattr(training_args, "text_column", "text")
        self.label_column = getattr(training_args, "label_column", "label")
        self.collator = VerbalizerCollator(TaskTemplate.from_config(self.post_config, tokenizer), self.text_column,
                                           self.label_column)
        self.initial_prompt = get_prompt(model)
        self._prompt = prompt_parameter(model)
        self._cache: dict = {}
        self._noise_multipliers: dict = {}
        self.warnings: set = set()

    # ---- the mechanism
    def reset_prompt(self) -> None:
        from ..prompts import set_prompt

        set_prompt(self.model, self.initial_prompt)

    def train(self, dataset, seed: int, noise_seed: Optional[int] = None) -> Release:
        """One run of `DPPromptTrainer` from the initial prompt on `dataset`; returns its release."""
        from transformers.trainer_callback import PrinterCallback

        from ..prompts import get_prompt
        from ..tuning import DPPromptTrainer

        self.reset_prompt()
        dp = self.dp_config
        if noise_seed is not None:
            dp = dataclasses.replace(dp, insecure_noise_seed=noise_seed)
        # σ and the ledger depend on the DPConfig and N only (not on the run's randomness): calibrate σ and compute
        # the ledger once per (config, N) rather than per run.
        key = (len(dataset), repr(dataclasses.replace(dp, insecure_noise_seed=None) if noise_seed is not None else dp),
               noise_seed is not None)
        known = self._noise_multipliers.get(key)
        run_dp = dp
        if known is not None and dp.target_epsilon is not None:
            run_dp = dataclasses.replace(dp, target_epsilon=None, noise_multiplier=known[0])
        outdir = tempfile.mkdtemp(prefix="peft-post-dp-audit-")
        try:
            args = dataclasses.replace(self.training_args, output_dir=outdir, seed=seed)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer = DPPromptTrainer(self.model, args, dp_config=run_dp, train_dataset=dataset,
                                          processing_class=self.tokenizer)
                trainer.remove_callback(PrinterCallback)
                trainer.train()
                if known is None:
                    known = (float(trainer.noise_multiplier), trainer.privacy_report())
                    self._noise_multipliers[key] = known
            self.warnings.update(str(w.message).split("\n")[0][:200] for w in caught)
        finally:
            shutil.rmtree(outdir, ignore_errors=True)
        if int(trainer.state.global_step) != int(known[1]["steps"]):
            raise RuntimeError(f"A run took {trainer.state.global_step} steps, its ledger counts {known[1]['steps']}.")
        return Release(prompt=get_prompt(self.model), ledger=dict(known[1]), seed=seed,
                       noise_seed=dp.insecure_noise_seed)

    # ---- helpers for statistics
    def example_batch(self, rows: Sequence[dict]) -> dict:
        return self.collator(list(rows))

    def class_scores(self, prompt: torch.Tensor, rows: Sequence[dict]) -> torch.Tensor:
        """(B, C) class scores of `rows` under `prompt` (no gradient)."""
        from ..modeling import label_logits

        batch = self.example_batch(rows)
        device = self._prompt.device
        with torch.no_grad(), _eval_mode(self.model):
            logits = label_logits(self.model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                  batch["label_positions"].to(device), prompt=prompt.to(device))
        return self.verbalizer.class_scores(logits).float().cpu()

    def prompt_gradient(self, row: dict, prompt: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The (n, d) gradient of `row`'s verbalizer loss w.r.t. the prompt (default: the initial prompt)."""
        from ..losses import verbalizer_loss
        from ..modeling import label_logits

        device = self._prompt.device
        p = (self.initial_prompt if prompt is None else prompt).detach().to(device).clone().requires_grad_(True)
        batch = self.example_batch([row])
        with _eval_mode(self.model):
            logits = label_logits(self.model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                  batch["label_positions"].to(device), prompt=p.unsqueeze(0))
        loss = verbalizer_loss(logits, batch["labels"].to(device), self.verbalizer.index.to(device),
                               self.verbalizer.weight.to(device))
        (grad,) = torch.autograd.grad(loss, p)
        return grad.detach().float().cpu()

    def cached(self, key: str, compute: Callable):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]


class _eval_mode:
    """Run the model in eval mode (no dropout) and restore its mode afterwards."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


Statistic = Callable[[Release, AuditSetup], float]


def canary_loss_statistic(release: Release, setup: AuditSetup) -> float:
    """−(verbalizer cross-entropy of the canary) under the released prompt: higher when the canary was trained on."""
    scores = setup.class_scores(release.prompt, [setup.canary])
    label = torch.tensor([int(setup.canary[setup.label_column])])
    return -float(torch.nn.functional.cross_entropy(scores, label))


def canary_margin_statistic(release: Release, setup: AuditSetup) -> float:
    """The canary's class-score margin s_y − max_{c≠y} s_c under the released prompt."""
    scores = setup.class_scores(release.prompt, [setup.canary])[0]
    y = int(setup.canary[setup.label_column])
    others = torch.cat([scores[:y], scores[y + 1:]])
    return float(scores[y] - others.max())


def canary_direction(setup: AuditSetup) -> torch.Tensor:
    """Unit vector of the canary's prompt gradient at p_0 with the span of every other training example's gradient at
    p_0 projected out (the rows D and D' share, and the replacement): the direction in which only the canary pushes.
    Cached per setup; N + 1 single-example backward passes."""
    def compute():
        rows = [dict(r) for r in setup.dataset_out]
        basis = torch.stack([setup.prompt_gradient(r).flatten().double() for r in rows])
        g = setup.prompt_gradient(setup.canary).flatten().double()
        q, _ = torch.linalg.qr(basis.T)  # orthonormal basis of the others' gradients (d, N)
        residual = g - q @ (q.T @ g)
        if residual.norm() < 1e-6 * g.norm().clamp_min(1e-30):
            residual = g  # the canary's gradient lies in the others' span: fall back to it
        return (residual / residual.norm().clamp_min(1e-30)).float().view_as(setup.initial_prompt)

    return setup.cached("canary_direction", compute)


def gradient_alignment_statistic(release: Release, setup: AuditSetup) -> float:
    """White-box: how far the prompt moved against the canary's gradient, ⟨p_0 − p, u⟩ with u = `canary_direction`
    (the canary's gradient at p_0, orthogonal to every other example's). Each step that samples the canary moves the
    prompt along −g_canary, and the other examples' steps move it (to first order) only within their own span, so
    releases on D score higher and the sampling of the other examples adds little variance."""
    u = canary_direction(setup)
    return float(((setup.initial_prompt.float() - release.prompt.float().cpu()) * u).sum())


def replay_statistic(release: Release, setup: AuditSetup) -> float:
    """The replay attack: retrain on D with the seeds the release publishes (the Trainer seed and, when the run used
    one, `insecure_noise_seed`) and return −‖release − replay‖. Replayable noise gives exactly 0 for releases on D;
    secret noise gives a fresh draw, unrelated to the release. Costs one training run per release."""
    replay = setup.train(setup.dataset_in, seed=release.seed, noise_seed=release.noise_seed)
    return 0.0 - float((release.prompt.float() - replay.prompt.float()).norm())  # 0.0, not -0.0, for a replay


STATISTICS: dict = {
    "canary_loss": canary_loss_statistic,
    "canary_margin": canary_margin_statistic,
    "gradient_alignment": gradient_alignment_statistic,
    "replay": replay_statistic,
}
DEFAULT_STATISTICS = ("canary_loss", "canary_margin", "gradient_alignment")


def neighbouring_datasets(dataset, canary: dict, adjacency: str = REPLACE_ONE, replacement: Optional[dict] = None):
    """(D, D'): D is `dataset` with `canary` appended; D' has `replacement` in the canary's place (replace-one;
    default replacement: the dataset's first example, duplicated) or no last row at all (add/remove).

    The canary sits at the same index in both, so Poisson sampling with the same randomness picks the same rows."""
    from datasets import Dataset, concatenate_datasets

    if adjacency not in ADJACENCIES:
        raise ValueError(f"`adjacency` must be one of {ADJACENCIES}, got {adjacency!r}.")
    columns = dataset.column_names
    missing = [c for c in columns if c not in canary]
    if missing:
        raise ValueError(f"The canary lacks the dataset's columns {missing}.")
    features = dataset.features

    def row(r):
        return Dataset.from_list([{c: r[c] for c in columns}], features=features)

    d_in = concatenate_datasets([dataset, row(canary)])
    if adjacency == ADD_OR_REMOVE_ONE:
        return d_in, dataset, None
    replacement = dict(dataset[0]) if replacement is None else replacement
    return d_in, concatenate_datasets([dataset, row(replacement)]), replacement


def flipped_label(model, tokenizer, text: str, label_column: str = "label", text_column: str = "text") -> int:
    """The class the model (with its current prompt) scores LOWEST for `text`: a canary labelled so has a large loss,
    hence a large (clipped) gradient, at the start of training."""
    from ..modeling import label_logits
    from ..tasks import TaskTemplate, Verbalizer, VerbalizerCollator

    config = model.peft_config[model.active_adapter]
    collator = VerbalizerCollator(TaskTemplate.from_config(config, tokenizer), text_column, None)
    batch = collator([{text_column: text}])
    device = next(model.parameters()).device
    with torch.no_grad(), _eval_mode(model):
        logits = label_logits(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                              batch["label_positions"].to(device))
    return int(Verbalizer.from_config(config, tokenizer).class_scores(logits)[0].argmin())


CANARY_CANDIDATES = (
    DEFAULT_CANARY_TEXT,
    "a",
    ".",
    "Review: great\nSentiment: positive\nReview: awful\nSentiment: negative\nReview: fine",
    "Sentiment: Sentiment: Sentiment: Sentiment:",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15",
)


def choose_canary(model, tokenizer, dataset, texts: Sequence[str] = CANARY_CANDIDATES, text_column: str = "text",
                  label_column: str = "label") -> tuple[dict, list]:
    """The auditor's canary: among `texts`, each labelled with `flipped_label`, the one whose prompt gradient at the
    initial prompt has the largest component orthogonal to every example of `dataset` (`canary_direction`): the
    strongest signal the canary statistics can pick up. Depends on the model and the public recipe only, never on a
    run's outcome. Returns the canary row and every candidate's (text, label, gradient norm, orthogonal part)."""
    from ..tuning import DPConfig, PromptTrainingConfig

    table, best = [], None
    args = PromptTrainingConfig(output_dir="unused", text_column=text_column, label_column=label_column)
    for text in texts:
        row = {text_column: text, label_column: flipped_label(model, tokenizer, text, label_column, text_column)}
        d_in, d_out, replacement = neighbouring_datasets(dataset, row, ADD_OR_REMOVE_ONE)
        setup = AuditSetup(model, tokenizer, d_in, d_out, row, None, DPConfig(noise_multiplier=1.0), args,
                           ADD_OR_REMOVE_ONE)
        g = setup.prompt_gradient(row)
        orthogonal = float((g * canary_direction(setup)).sum())
        table.append({"text": text, "label": row[label_column], "gradient_norm": float(g.norm()),
                      "orthogonal_norm": orthogonal})
        if best is None or orthogonal > best[0]:
            best = (orthogonal, row)
    return best[1], table


def max_example_gradient_norm(model, tokenizer, rows: Sequence[dict], text_column: str = "text",
                              label_column: str = "label") -> float:
    """The largest per-example prompt-gradient norm over `rows` at the model's current prompt: a clipping bound
    above it clips nothing (at the start of training)."""
    from ..tuning import DPConfig, PromptTrainingConfig

    rows = [dict(r) for r in rows]
    from datasets import Dataset

    data = Dataset.from_list(rows)
    args = PromptTrainingConfig(output_dir="unused", text_column=text_column, label_column=label_column)
    setup = AuditSetup(model, tokenizer, data, data, rows[0], None, DPConfig(noise_multiplier=1.0), args,
                       ADD_OR_REMOVE_ONE)
    return max(float(setup.prompt_gradient(r).norm()) for r in rows)


def _json_number(x):
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    return x


def to_jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float):
        return _json_number(obj)
    return obj


def claimed_epsilon(ledger: dict, adjacency: str) -> float:
    """The ledger's ε for `adjacency` (`epsilon` is the trainer's stated guarantee; `epsilon_add_remove` when the
    ledger states replace-one and the audit uses add/remove)."""
    if adjacency == ADD_OR_REMOVE_ONE and ledger.get("adjacency", REPLACE_ONE) != ADD_OR_REMOVE_ONE:
        return float(ledger.get("epsilon_add_remove", ledger["epsilon"]))
    return float(ledger["epsilon"])


def run_distinguishing_audit(
    model_factory: Union[Callable[[], object], object],
    tokenizer,
    dataset,
    canary: dict,
    dp_config,
    training_args,
    trials: int = 32,
    statistics: Union[Sequence[str], Mapping[str, Statistic]] = DEFAULT_STATISTICS,
    adjacency: str = REPLACE_ONE,
    replacement: Optional[dict] = None,
    confidence: float = 0.95,
    method: str = "split",
    seed: int = 0,
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """Train `trials` releases on D = dataset + canary and `trials` on its neighbour D', score each with every
    statistic, and bound ε from below (`distinguishing_bound`, selecting the statistic on the selection half).

    `model_factory` returns a fresh ``get_peft_model(base, POSTConfig(...))`` (or is that model); it is called once and
    the prompt is reset to its initial value before every run. `dp_config` is a `DPConfig`; when it sets
    `insecure_noise_seed`, every run gets its own fresh seed (trials must be independent), which counts as
    published. `training_args` is a `PromptTrainingConfig` (or a dict of its arguments); its seed is replaced by a
    fresh one per run. Runs on D and D' alternate, each with seeds drawn independently of its side. Returns a
    JSON-ready dict: every score, the bound and its test, the claimed ε of the ledger, the full ledger, the settings.
    """
    from ..tuning import DPConfig, PromptTrainingConfig

    if not isinstance(dp_config, DPConfig):
        raise ValueError(f"`dp_config` must be a DPConfig, got {type(dp_config).__name__}.")
    if isinstance(training_args, dict):
        training_args = PromptTrainingConfig(**{"output_dir": "dp-audit", **training_args})
    if not isinstance(training_args, PromptTrainingConfig):
        raise ValueError(f"`training_args` must be a PromptTrainingConfig or a dict, got "
                         f"{type(training_args).__name__}.")
    if not isinstance(trials, int) or trials < 2:
        raise ValueError(f"`trials` (runs per dataset) must be an int >= 2, got {trials!r}.")
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    if not isinstance(statistics, Mapping):
        unknown = [s for s in statistics if s not in STATISTICS]
        if unknown:
            raise ValueError(f"Unknown statistics {unknown}; choose from {sorted(STATISTICS)} or pass functions.")
        statistics = {name: STATISTICS[name] for name in statistics}
    if not statistics:
        raise ValueError("Give at least one statistic.")
    training_args = dataclasses.replace(training_args, save_strategy="no", report_to="none", disable_tqdm=True,
                                        logging_strategy="no")
    say = progress or (lambda message: None)
    start = time.perf_counter()
    is_factory = callable(model_factory) and not isinstance(model_factory, torch.nn.Module)
    model = model_factory() if is_factory else model_factory
    d_in, d_out, replacement = neighbouring_datasets(dataset, canary, adjacency, replacement)
    setup = AuditSetup(model, tokenizer, d_in, d_out, canary, replacement, dp_config, training_args, adjacency)
    replayable = dp_config.insecure_noise_seed is not None

    rng = np.random.default_rng(seed)
    order = [side for _ in range(trials) for side in (True, False)]
    seeds = rng.integers(0, 2**31 - 1, size=(len(order), 2))
    scores = {True: {name: [] for name in statistics}, False: {name: [] for name in statistics}}
    runs, ledgers = [], {}
    for i, (side, (train_seed, noise_seed)) in enumerate(zip(order, seeds)):
        t0 = time.perf_counter()
        release = setup.train(d_in if side else d_out, int(train_seed), int(noise_seed) if replayable else None)
        ledgers.setdefault(side, release.ledger)
        t1 = time.perf_counter()
        values = {name: float(fn(release, setup)) for name, fn in statistics.items()}
        for name, value in values.items():
            scores[side][name].append(value)
        runs.append({"canary_in": side, "seed": int(train_seed), "noise_seed": release.noise_seed,
                     "train_s": t1 - t0, "statistics_s": time.perf_counter() - t1, **values})
        if (i + 1) % 10 == 0 or i + 1 == len(order):
            say(f"dp audit: {i + 1}/{len(order)} runs, {time.perf_counter() - start:.0f} s")
    setup.reset_prompt()

    names = list(statistics)
    matrix_in = np.array([scores[True][n] for n in names]).T
    matrix_out = np.array([scores[False][n] for n in names]).T
    delta = float(ledgers[True]["delta"])
    bound = distinguishing_bound(matrix_in, matrix_out, delta, confidence, method=method, seed=seed)
    bound["statistic"] = names[bound["statistic"]]
    per_statistic = {}
    for j, name in enumerate(names):
        b = distinguishing_bound(matrix_in[:, j], matrix_out[:, j], delta, confidence, method=method, seed=seed)
        b.pop("statistic")
        per_statistic[name] = {**b, "scores_in": scores[True][name], "scores_out": scores[False][name],
                               "auc": _auc(scores[True][name], scores[False][name])}
    claimed = claimed_epsilon(ledgers[True], adjacency)
    dp_settings = {k: v for k, v in dataclasses.asdict(dp_config).items()}
    return to_jsonable({
        "epsilon_lb": bound["epsilon_lb"],
        "claimed_epsilon": claimed,
        "refutes_claim": bool(bound["epsilon_lb"] > claimed),
        "max_epsilon_lb": bound["max_epsilon_lb"],
        "bound": bound,
        "per_statistic": per_statistic,
        "ledger": ledgers[True],
        "ledger_out": ledgers[False] if ledgers[False] != ledgers[True] else None,
        "adjacency": adjacency,
        "trials_per_dataset": trials,
        "num_examples_in": len(d_in),
        "num_examples_out": len(d_out),
        "canary": dict(canary),
        "replacement": dict(replacement) if replacement is not None else None,
        "dp_config": dp_settings,
        "training_args": {k: getattr(training_args, k) for k in (
            "max_steps", "num_train_epochs", "per_device_train_batch_size", "learning_rate", "weight_decay", "optim",
            "lr_scheduler_type")},
        "statistics": names,
        "runs": runs,
        "warnings": sorted(setup.warnings),
        "wall_time_s": time.perf_counter() - start,
    })


def _auc(scores_in: Sequence[float], scores_out: Sequence[float]) -> float:
    """P(score_in > score_out) + ½ P(tie): how well the statistic ranks releases on D above releases on D'."""
    a, b = np.asarray(scores_in)[:, None], np.asarray(scores_out)[None, :]
    return float((a > b).mean() + 0.5 * (a == b).mean())
