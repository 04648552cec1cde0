"""Stage 2 of POST: tune a soft prompt on the small model, with (`DPPromptTrainer`) or without (`PromptTrainer`) DP."""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import speed_metrics

from ..config import POSTConfig, validate_privacy_ledger
from ..evaluation import accuracy_report, predict_class_scores
from ..io import atomic_write_json, drop_training_arguments
from ..modeling import (base_model_of, forward_through, input_device, prompt_parameter, require_data_parallel,
                        require_only_prompt_trainable, require_prompt_model, train_without_dropout, unwrap_model,
                        upcast_trainable_parameters)
from ..prompts import prompt_norms
from ..generation import AnswerCollator, answer_losses, check_generation_dataset, evaluate_generation
from ..scoring import example_losses, require_scorable
from ..tasks import TaskTemplate, Verbalizer, VerbalizerCollator, check_classification_dataset
from . import privacy
from .config import DPConfig, PromptTrainingConfig


def _post_config(model) -> POSTConfig:
    require_prompt_model(model)
    config = model.peft_config[model.active_adapter]
    if not isinstance(config, POSTConfig):
        raise ValueError(
            f"The adapter's config is a {type(config).__name__}, not a POSTConfig: build the adapter with "
            "`get_peft_model(model, POSTConfig(...))` so the trainer knows the template and label words."
        )
    return config


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


class PromptTrainer(Trainer):
    """
    Trains only the soft prompt of `get_peft_model(model, POSTConfig(...))` with the verbalizer cross-entropy, for
    causal LMs (``CAUSAL_LM``) and masked LMs (``FEATURE_EXTRACTION``). Datasets hold raw ``text``/``label`` rows;
    the collator renders them through the config's template. `evaluate` reports accuracy and macro-F1 (via
    `predict_class_scores`), the loss, and the prompt's row norms next to the model's word-embedding norms.

    Precision: ``bf16=True`` (or ``fp16``) runs the forwards, evaluation included, under the trainer's autocast; the
    prompt is kept as an fp32 master copy, also on a model loaded in bf16, and the loss is computed in fp32.
    ``gradient_checkpointing=True`` works: the frozen LM runs in train mode with its dropout switched off
    (`train_without_dropout`), which computes what eval mode would.

    Example::

        model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), POSTConfig(num_virtual_tokens=20))
        trainer = PromptTrainer(model, PromptTrainingConfig("out", max_steps=300), train_dataset=train,
                                eval_dataset=dev, processing_class=tokenizer)
        trainer.train(); trainer.evaluate()
    """

    _stage = "prompt_tuning"

    def __init__(
        self,
        model: PeftModel,
        args: Optional[PromptTrainingConfig] = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        data_collator=None,
        **kwargs,
    ):
        self.post_config = _post_config(model)
        if processing_class is None:
            raise ValueError("`processing_class` (the tokenizer) is required: it maps the label words to token ids.")
        if args is None:
            args = PromptTrainingConfig(output_dir="prompt-tuning")
        if args.remove_unused_columns:
            raise ValueError("Set `remove_unused_columns=False`: the collator needs the raw text and label columns.")
        self.text_column = getattr(args, "text_column", "text")
        self.label_column = getattr(args, "label_column", "label")
        self.answer_column = getattr(args, "answer_column", "answer")
        self.generation = self.post_config.task_kind == "generation"
        # Generation has no verbalizer: its loss is the answer tokens' cross-entropy.
        self.verbalizer = None if self.generation else Verbalizer.from_config(self.post_config, processing_class)
        if self.verbalizer is not None:
            require_scorable(self.verbalizer, model)
        self.example_losses = example_losses(self.post_config, processing_class)
        for name, data in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            sets = data.values() if isinstance(data, dict) else [data]
            for d in sets:
                if d is not None:
                    self._check_dataset(d, name)
        require_only_prompt_trainable(model)
        # The prompt is an fp32 master copy even on a bf16/fp16 model; bf16 compute comes from `args.bf16` (autocast).
        upcast_trainable_parameters(model)
        if getattr(args, "disable_dropout", True):
            _disable_dropout(base_model_of(model))
        if data_collator is None:
            template = TaskTemplate.from_config(self.post_config, processing_class)
            data_collator = (AnswerCollator(template, self.text_column, self.answer_column,
                                            self.post_config.max_answer_tokens) if self.generation else
                             VerbalizerCollator(template, self.text_column, self.label_column))
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            data_collator=data_collator,
            **kwargs,
        )
        require_data_parallel(self)
        # The loss is a sum over examples divided by the examples of the whole accumulated batch (counted below),
        # so gradient accumulation gives exactly the full-batch mean gradient.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = True

    # ---- loss ----

    def _check_dataset(self, dataset, name: str) -> None:
        if self.generation:
            check_generation_dataset(dataset, self.text_column, self.answer_column, name)
        else:
            check_classification_dataset(dataset, self.text_column, self.label_column, self.verbalizer.num_classes,
                                         name)

    def _get_num_items_in_batch(self, batch_samples, device):
        return sum(int(b["input_ids"].shape[0]) for b in batch_samples) or None

    def _frozen_train_mode(self, model) -> None:
        """Trainer put `model` in train mode; the frozen LM runs without dropout (`train_without_dropout`: eval-mode
        numbers, gradient checkpointing still on) unless ``args.disable_dropout`` is False."""
        if getattr(self.args, "disable_dropout", True):
            train_without_dropout(model)
        else:
            model.train()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self._frozen_train_mode(model)
        # Under the trainer's autocast (`args.bf16` / `fp16`): `forward_through` calls the bare model's parts, which
        # bypasses the autocast forward accelerate puts on the model. `label_logits` returns fp32 logits.
        # Through `model`, which is the DDP wrapper under multi-process training, so the prompt's gradient is all-reduced.
        # The losses lie on the logits' device: under a device map the head may lie on another GPU than the inputs.
        with self.accelerator.autocast():
            losses = forward_through(model, self.example_losses, inputs)
        divisor = num_items_in_batch if num_items_in_batch else inputs["input_ids"].shape[0]
        loss = losses.sum() / divisor
        return (loss, {"losses": losses}) if return_outputs else loss

    # ---- evaluation ----

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Accuracy, macro-F1, loss and prompt norms on `eval_dataset` (or each dataset of a dict, prefixed by its
        name)."""
        override = eval_dataset is not None
        eval_dataset = eval_dataset if override else self.eval_dataset
        if isinstance(eval_dataset, dict):
            metrics = {}
            for name, data in eval_dataset.items():
                metrics.update(
                    self.evaluate(data if override else name, ignore_keys, f"{metric_key_prefix}_{name}")
                )
            return metrics
        if eval_dataset is None:
            raise ValueError("Evaluation needs an `eval_dataset` (pass one here or to the trainer).")
        if override and not isinstance(eval_dataset, str):
            self._check_dataset(eval_dataset, "eval_dataset")
        self._memory_tracker.start()
        start = time.time()
        data = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else eval_dataset
        # Not prepared by accelerate, which would hand each process only its shard: every process scores the whole
        # set, so the metrics are the set's under any number of processes.
        loader = DataLoader(data, batch_size=self.args.eval_batch_size, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers)
        p = metric_key_prefix
        with self.accelerator.autocast():  # the training precision (`args.bf16` / `fp16`)
            metrics = self._generation_metrics(data, loader, p) if self.generation else \
                self._classification_metrics(loader, p)
        metrics.update(self._norm_metrics(p))
        metrics.update(speed_metrics(p, start, num_samples=metrics[f"{p}_num_examples"]))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self._memory_tracker.stop_and_update_metrics(metrics)
        return metrics

    def _classification_metrics(self, loader, p: str) -> dict:
        scores, labels = predict_class_scores(
            self.model, loader, self.verbalizer, prompt="auto", disable_progress=self.args.disable_tqdm
        )
        report = accuracy_report(scores.argmax(-1).numpy(), labels.numpy(), self.verbalizer.num_classes)
        return {
            f"{p}_loss": float(F.cross_entropy(scores, labels)),
            f"{p}_accuracy": report["accuracy"],
            f"{p}_macro_f1": report["macro_f1"],
            f"{p}_num_examples": report["num_examples"],
            **{f"{p}_accuracy_class_{c}": v["correct"] / v["total"] for c, v in report["per_class"].items() if v["total"]},
        }

    def _generation_metrics(self, data, loader, p: str) -> dict:
        """The answers' mean token cross-entropy under teacher forcing, and exact match and token F1 of greedy
        answers."""
        device = input_device(self.model)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                losses = torch.cat([answer_losses(self.model, {k: v.to(device) for k, v in batch.items()}).cpu()
                                    for batch in loader])
        finally:
            self.model.train(was_training)
        report = evaluate_generation(self.model, self.processing_class, data, self.post_config,
                                     text_column=self.text_column, answer_column=self.answer_column,
                                     batch_size=self.args.eval_batch_size, disable_progress=self.args.disable_tqdm)
        return {
            f"{p}_loss": float(losses.mean()),
            f"{p}_exact_match": report["exact_match"],
            f"{p}_token_f1": report["token_f1"],
            f"{p}_num_examples": report["num_examples"],
        }

    def _norm_metrics(self, prefix: str) -> dict:
        norms = prompt_norms(prompt_parameter(self.model))
        emb = base_model_of(self.model).get_input_embeddings().weight.detach().float().norm(dim=-1)
        return {
            f"{prefix}_prompt_norm_mean": float(norms.mean()),
            f"{prefix}_prompt_norm_max": float(norms.max()),
            f"{prefix}_embedding_norm_mean": float(emb.mean()),
        }

    # ---- saving ----

    def _provenance(self) -> dict:
        # Deliberately no fingerprint of the training texts: the data is private, and a hash of it is not DP.
        return {
            "stage": self._stage,
            "trainer": type(self).__name__,
            "global_step": int(self.state.global_step),
            "num_train_examples": len(self.train_dataset) if self.train_dataset is not None else None,
            "learning_rate": self.args.learning_rate,
            "weight_decay": self.args.weight_decay,
            "seed": self.args.seed,
        }

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        self.post_config.provenance = {**(self.post_config.provenance or {}), **self._provenance()}
        super()._save(output_dir, state_dict)

    # ---- the privacy claim ----

    def train(self, *args, **kwargs):
        self._update_privacy_claim()
        return super().train(*args, **kwargs)

    def _update_privacy_claim(self) -> None:
        """Non-private training voids a DP ledger the starting prompt carried: the new steps are not accounted for."""
        ledger = self.post_config.privacy
        if ledger is None:
            return
        warnings.warn(
            f"The starting prompt carries a DP ledger (ε = {ledger['epsilon']:.3g}), but {type(self).__name__} trains "
            "without DP: the prompt it saves has no DP guarantee, and its ledger is cleared. Use DPPromptTrainer to "
            "keep a guarantee."
        )
        self.post_config.privacy = None
        self.post_config.provenance = {
            **(self.post_config.provenance or {}),
            "dp_claim_cleared": {
                "reason": f"trained further without DP by {type(self).__name__}; those steps are not accounted for",
                "previous_epsilon": ledger["epsilon"],
                "previous_delta": ledger["delta"],
            },
        }


def _trained_without_dp(provenance: Optional[dict]) -> bool:
    """Whether a prompt's provenance shows non-private training, here or in the source it was transferred from."""
    if not provenance:
        return False
    if provenance.get("stage") == PromptTrainer._stage or "dp_claim_cleared" in provenance:
        return True
    return _trained_without_dp(provenance.get("source_provenance"))


def _refuse_selection_on_private_data(args, callbacks) -> None:
    """Refuse the Trainer features that choose the released prompt by its metrics on (private) evaluation data.

    Their choice depends on private data and is not accounted for by the DP analysis: picking the best of 20
    checkpoints, or stopping early, is a release the ledger does not cover.
    """
    from transformers import EarlyStoppingCallback

    found = []
    if args.load_best_model_at_end:
        found.append("`load_best_model_at_end=True` (picks a checkpoint by its evaluation metric)")
    if args.metric_for_best_model is not None:
        found.append(f"`metric_for_best_model={args.metric_for_best_model!r}` (ranks checkpoints by a metric)")
    if getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type) == "reduce_lr_on_plateau":
        found.append("`lr_scheduler_type='reduce_lr_on_plateau'` (the schedule follows an evaluation metric)")
    for callback in callbacks or []:
        cls = callback if isinstance(callback, type) else type(callback)
        if issubclass(cls, EarlyStoppingCallback):
            found.append(f"the callback {cls.__name__} (stops when an evaluation metric stalls)")
    if found:
        raise ValueError(
            "DPPromptTrainer refuses choices made on evaluation metrics, which are computed on data the DP analysis "
            "does not account for: " + "; ".join(found) + ". Remove them and train a fixed number of steps (a "
            "schedule fixed in advance, such as 'linear' or 'cosine', is post-processing and allowed)."
        )


class DPPromptTrainer(PromptTrainer):
    """
    `PromptTrainer` with differential privacy (PromptDPSGD, DESIGN §2): each optimizer step draws a Poisson batch
    (rate q = per_device_train_batch_size × processes / N), computes every example's exact prompt gradient in one
    backward, clips each to C, sums, adds N(0, σ²C²I), divides by the expected batch size and hands that to the
    optimizer.
    A replace-one PLD accountant tracks ε; `privacy_report()` is the ledger, saved in the adapter's
    ``post_config.json`` and, with the accountant's history, in every checkpoint so that resuming keeps ε exact.

    The batches and the noise come from a secret `privacy.NoiseSource` (a key from the OS), never from `args.seed`,
    which the Trainer uses for everything else; the key goes only into the user's checkpoints. Settings that select
    the prompt on evaluation metrics are refused. Starting from a prompt with a DP ledger continues its accountant
    history, so the saved ε covers both runs.

    Under ``bf16=True`` the per-example forward runs in bf16 (the gradients then differ from fp32 ones by about 1%:
    tests/test_low_precision.py measures it); norms, clipping, the sum and the noise are always fp32, so each
    example's clipped contribution is ≤ C to fp32 precision. fp16 is refused (its loss scaler would rescale the
    noised gradient).

    Several processes (``accelerate launch``, torchrun; DDP only) run one global DP step together: every process holds
    the main process's secret key, draws the same global Poisson batch and keeps its shard (examples i with
    i mod world_size = rank), clips and sums its shard's gradients; the main process adds the step's noise to its
    sum, the sums are all-reduced, and every process divides by q·N. The accountant steps once per global step on
    every process. The released prompt and ledger are those one process would produce from the same batches: with
    ``DPConfig(insecure_noise_seed=...)`` a 2-process run equals a 1-process run (tests/test_multiprocess.py).

    What is protected: the prompt's training set (replace-one adjacency; N is public). Not protected: inference
    queries sent to a model that uses the prompt, and anything logged locally during training (loss, evaluation
    metrics, checkpoints): those stay in the user's workspace.
    """

    _stage = "dp_prompt_tuning"

    def __init__(
        self,
        model: PeftModel,
        args: Optional[PromptTrainingConfig] = None,
        dp_config: Optional[DPConfig] = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        data_collator=None,
        **kwargs,
    ):
        if not isinstance(dp_config, DPConfig):
            raise ValueError("`dp_config` must be a DPConfig (give target_epsilon or noise_multiplier).")
        if args is None:
            args = PromptTrainingConfig(output_dir="dp-prompt-tuning")
        if args.max_grad_norm:
            raise ValueError(
                f"`max_grad_norm` of the training arguments must be 0 under DP (got {args.max_grad_norm}): the "
                "Trainer would clip the already-noised batch gradient. Set the per-example bound in "
                "DPConfig(max_grad_norm=...)."
            )
        if args.fp16:
            raise ValueError(
                "fp16 is not supported under DP: fp16 needs loss scaling, and the scaler would rescale (and may skip) "
                "the already-noised gradient the optimizer receives. Use `bf16=True`, which needs no scaling."
            )
        if args.gradient_accumulation_steps != 1:
            raise ValueError(
                f"`gradient_accumulation_steps` must be 1 under DP (got {args.gradient_accumulation_steps}): "
                "accumulating several Poisson batches changes the sampling the accountant analyses. To save memory, "
                "set DPConfig(max_physical_batch_size=...), which splits each Poisson batch exactly."
            )
        _refuse_selection_on_private_data(args, kwargs.get("callbacks"))
        if train_dataset is None:
            raise ValueError("DP training needs `train_dataset`: N sets the sampling rate and δ.")
        if isinstance(train_dataset, torch.utils.data.IterableDataset):
            raise ValueError("DP training needs a map-style `train_dataset` of known size N, not an iterable one.")
        self.dp_config = dp_config
        super().__init__(
            model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            data_collator=data_collator,
            **kwargs,
        )
        if dp_config.class_weights is not None:
            if self.generation:
                raise ValueError("DPConfig.class_weights weigh classes: a generation task has none. Leave it None.")
            if len(dp_config.class_weights) != self.verbalizer.num_classes:
                raise ValueError(f"DPConfig.class_weights has {len(dp_config.class_weights)} weights for the "
                                 f"{self.verbalizer.num_classes} classes of the label words: give one per class.")
        n = len(train_dataset)
        self.noise_source = privacy.NoiseSource(dp_config.insecure_noise_seed)
        # Under several processes all must draw the same global batches: they share the main process's key.
        self.noise_source.share_across_processes()
        self.noise_draws = 0
        # The expected global batch is the per-process batch times the processes, as under DDP.
        self.sample_rate = privacy.sample_rate_for(self.global_batch_size, n)
        self.expected_batch_size = self.sample_rate * n
        # σ is calibrated for the steps the Trainer will really run: int(1/q) Poisson batches per epoch, or
        # ceil(N/B) fixed-size ones.
        self.planned_steps = privacy.planned_steps(self.args.max_steps, self.args.num_train_epochs,
                                                   len(self._batch_sampler()))
        self.delta = privacy.resolve_delta(dp_config.target_delta, n)
        prior_ledger, self.ledger_notes = self._starting_ledger()
        prior_history = privacy.history_of_ledger(prior_ledger) if prior_ledger else []
        self.noise_multiplier = privacy.resolve_noise_multiplier(
            dp_config.target_epsilon,
            dp_config.noise_multiplier,
            self.delta,
            self.sample_rate,
            self.planned_steps,
            dp_config.epsilon_tolerance,
            prior_history,
        )
        from .pld_accountant import PLDAccountant  # imports Opacus: only when a DP trainer is built

        self.accountant = PLDAccountant()
        self.accountant.history = list(prior_history)
        self.prior_steps = len(self.accountant)
        if not dp_config.poisson_sampling:
            warnings.warn(
                "poisson_sampling=False: batches are shuffled fixed-size slices, but the accountant's ε assumes "
                "Poisson sampling; the reported ε is then a common approximation, not a proven bound."
            )

    def _starting_ledger(self) -> tuple[Optional[dict], dict]:
        """The DP ledger the starting prompt carries (its history is continued), and notes the new ledger keeps."""
        ledger = self.post_config.privacy
        notes = {}
        if ledger is not None:
            notes["void_reasons"] = list(ledger.get("guarantee_void_reasons", []))
            if "initial_prompt" in ledger:
                notes["initial_prompt"] = ledger["initial_prompt"]
        if _trained_without_dp(self.post_config.provenance):
            if not self.dp_config.public_initial_prompt:
                raise ValueError(
                    "The starting prompt was trained without DP (its provenance says so), and a DP guarantee cannot "
                    "cover what that training revealed about private data. Start from a prompt initialised from public "
                    "text, or, if that training used public data only, say so with "
                    "DPConfig(public_initial_prompt=True)."
                )
            notes["initial_prompt"] = ("trained without DP; the user stated it used public data only "
                                       "(DPConfig.public_initial_prompt)")
        return ledger, notes

    @property
    def global_batch_size(self) -> int:
        """The expected batch of one DP step over all processes: ``per_device_train_batch_size × world_size``."""
        return self.args.per_device_train_batch_size * self.args.world_size

    def _batch_sampler(self):
        n = len(self.train_dataset)
        shard = dict(rank=self.args.process_index, world_size=self.args.world_size)
        if self.dp_config.poisson_sampling:
            return privacy.PoissonBatchSampler(n, self.sample_rate, privacy.steps_per_epoch(self.sample_rate),
                                               self.noise_source, **shard)
        return privacy.ShuffledBatchSampler(n, self.global_batch_size, self.noise_source, **shard)

    def _update_privacy_claim(self) -> None:
        # This trainer continues the starting ledger's history instead of clearing it (see `_starting_ledger`).
        return None

    def add_callback(self, callback):
        _refuse_selection_on_private_data(self.args, [callback])
        super().add_callback(callback)

    def hyperparameter_search(self, *args, **kwargs):
        raise ValueError(
            "DPPromptTrainer refuses hyperparameter search: trials compared on private evaluation data are releases "
            "the DP analysis does not account for. Choose hyperparameters on public data, then train once."
        )

    # ---- data ----

    def get_train_dataloader(self):
        # Not passed through accelerate: it would re-batch or re-shard the secret batches, which `_batch_sampler`
        # already splits into this process's shard.
        return privacy.secret_dataloader(self.train_dataset, self._batch_sampler(), self.data_collator,
                                         num_workers=self.args.dataloader_num_workers)

    # ---- the DP step ----

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step >= self.planned_steps:
            # Checked before the batch is read: a step past the plan spends budget σ was not calibrated for. The
            # Trainer takes one when it resumes from a checkpoint saved at its last step.
            raise RuntimeError(
                f"DP step {self.state.global_step + 1} would exceed the {self.planned_steps} steps σ was calibrated "
                "for. A checkpoint saved at the last step is finished: load its adapter instead of resuming from "
                "it, or resume from an earlier checkpoint.")
        self._frozen_train_mode(model)
        inputs = self._prepare_inputs(inputs)
        # The bare model, not the DDP wrapper: the gradients are taken w.r.t. per-example copies of the prompt, which
        # DDP's hooks never see; the clipped sums are all-reduced by `privacy.privatize` instead.
        bare = unwrap_model(model)
        prompt = prompt_parameter(self.model)
        summed = torch.zeros_like(prompt, dtype=torch.float32)
        loss_total = torch.zeros((), device=self.args.device)
        count = int(inputs["input_ids"].shape[0])
        if count:
            with self.compute_loss_context_manager():
                for chunk in privacy.chunks(inputs, self.dp_config.max_physical_batch_size):
                    # The forward under the trainer's autocast (bf16 when `args.bf16`); the gradients come back in
                    # fp32, and the norms, clipping, sum and noise below are fp32.
                    grads, losses = privacy.per_example_gradients(
                        bare, chunk, prompt, self.example_losses,
                        autocast=self.accelerator.autocast,
                    )
                    weights = None if self.dp_config.class_weights is None else torch.tensor(
                        self.dp_config.class_weights)[chunk["labels"].cpu()]
                    summed += privacy.clipped_sum(grads.float(), self.dp_config.max_grad_norm, weights)
                    loss_total = loss_total + losses.sum().float().to(loss_total.device)
        # An empty Poisson batch still releases noise and counts as a step: skipping it would change the mechanism
        # (and under several processes, a process whose shard is empty still joins the sum). Draw t comes from its own
        # secret generator, t = the optimizer step (so a resumed run draws what an uninterrupted one would) and never
        # a t already drawn (a step called twice gets fresh noise); only the main process draws it.
        draw = max(self.noise_draws, self.state.global_step)
        self.noise_draws = draw + 1
        grad = privacy.privatize(
            summed, self.noise_multiplier, self.dp_config.max_grad_norm, self.expected_batch_size,
            lambda: self.noise_source.generator("noise", draw, device=summed.device),
        )
        prompt.grad = grad.to(prompt.dtype)
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        # The logged loss is the mean over the global batch (a local log, computed from private data without noise).
        totals = privacy.all_reduce_sum(torch.stack([loss_total.detach().float(),
                                                     torch.tensor(float(count), device=loss_total.device)]))
        return totals[0] / totals[1].clamp(min=1.0)

    # ---- ledger ----

    def privacy_report(self) -> dict:
        """The privacy ledger: ε spent so far at δ (replace-one), and σ, C, q, steps, history and accountant that
        produced it, where the noise came from, and whether the guarantee holds."""
        extra = {"initial_prompt": self.ledger_notes["initial_prompt"]} if "initial_prompt" in self.ledger_notes else {}
        if self.dp_config.class_weights is not None:
            extra["class_weights"] = list(self.dp_config.class_weights)
        return privacy.privacy_ledger(
            self.accountant,
            self.delta,
            self.noise_multiplier,
            self.dp_config.max_grad_norm,
            self.sample_rate,
            self.noise_source,
            void_reasons=self.ledger_notes.get("void_reasons", []),
            target_epsilon=self.dp_config.target_epsilon,
            target_delta=self.dp_config.target_delta,  # None: δ = 1/N, the default (the report says so)
            poisson_sampling=self.dp_config.poisson_sampling,
            **extra,
        )

    def _provenance(self) -> dict:
        # The training seed is left out: it does not seed the noise, but nothing about the run's randomness is
        # published with a DP prompt.
        provenance = super()._provenance()
        provenance.pop("seed", None)
        return provenance

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        report = self.privacy_report()
        if report["steps"] > 0:
            validate_privacy_ledger(report)
            self.post_config.privacy = report
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            state = {**self.accountant.state_dict(), "ledger": report}
            atomic_write_json(os.path.join(output_dir, privacy.ACCOUNTANT_STATE_NAME), state)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not _internal_call and self.args.should_save:
            # The released folder is the adapter and its ledger; the training arguments (seed, paths, batch size)
            # stay in the user's checkpoints.
            drop_training_arguments(output_dir)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self.args.should_save:
            # The noise key, in the checkpoint only (private, like the optimizer state): resuming continues the noise
            # stream of the interrupted run instead of starting another.
            atomic_write_json(os.path.join(output_dir, privacy.NOISE_KEY_NAME), self.noise_source.state_dict())

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, privacy.ACCOUNTANT_STATE_NAME)
        if not os.path.isfile(path):
            raise ValueError(
                f"{checkpoint} has no {privacy.ACCOUNTANT_STATE_NAME}: without the accountant's history the resumed "
                "run would understate ε. Resume only from checkpoints written by DPPromptTrainer."
            )
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}): the accountant's history is damaged, so this "
                             f"checkpoint cannot be resumed. Delete {checkpoint} to resume from an earlier one, or "
                             "start the stage again.") from None
        if state.get("mechanism") != self.accountant.mechanism():
            raise ValueError(
                f"{checkpoint} was accounted with {state.get('mechanism')!r}, this trainer uses "
                f"{self.accountant.mechanism()!r}; resume with the library version that wrote it, or start again."
            )
        self.accountant.load_state_dict({**state, "history": [tuple(h) for h in state["history"]]})
        ledger = state.get("ledger", {})
        for key, mine in (("noise_multiplier", self.noise_multiplier), ("sample_rate", self.sample_rate),
                          ("max_grad_norm", self.dp_config.max_grad_norm), ("delta", self.delta)):
            if key in ledger and not math.isclose(ledger[key], mine, rel_tol=1e-9):
                raise ValueError(
                    f"The checkpoint was trained with {key}={ledger[key]}, this run has {mine}; resume with the same "
                    "DPConfig, batch size, dataset and step plan so the guarantee stays the one computed."
                )
        if len(self.accountant) != self.prior_steps + self.state.global_step:
            raise ValueError(
                f"The checkpoint's accountant counts {len(self.accountant)} steps but the starting ledger and the "
                f"trainer state add up to {self.prior_steps + self.state.global_step}; the checkpoint is inconsistent."
            )
        key_path = os.path.join(checkpoint, privacy.NOISE_KEY_NAME)
        if os.path.isfile(key_path):
            with open(key_path, encoding="utf-8") as f:
                self.noise_source.load_state_dict(json.load(f))
        else:
            warnings.warn(f"{checkpoint} has no {privacy.NOISE_KEY_NAME}: the resumed steps draw fresh secret noise "
                          "(still private, but not the stream an uninterrupted run would have drawn).")
        # Every process continues with the main process's key, whatever its own copy of the checkpoint held.
        self.noise_source.share_across_processes()

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        target = self.dp_config.target_epsilon
        eps = self.accountant.get_epsilon(self.delta)  # the headline ε only, not the whole ledger
        if target is not None and eps > target:
            warnings.warn(
                f"ε = {eps:.3f} exceeds target_epsilon = {target} (more steps were run than the {self.planned_steps} "
                "the noise was calibrated for)."
            )
        return output
