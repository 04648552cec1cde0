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
from ..io import atomic_write_json
from ..losses import verbalizer_loss
from ..modeling import (base_model_of, forward_through, label_logits, prompt_parameter, require_data_parallel,
                        require_only_prompt_trainable, require_prompt_model, require_single_process)
from ..prompts import prompt_norms
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
    the collator renders them through the config's template. `evaluate` reports accuracy (via
    `predict_class_scores`), the loss, and the prompt's row norms next to the model's word-embedding norms.

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
        self.verbalizer = Verbalizer.from_config(self.post_config, processing_class)
        for name, data in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            sets = data.values() if isinstance(data, dict) else [data]
            for d in sets:
                if d is not None:
                    check_classification_dataset(d, self.text_column, self.label_column, self.verbalizer.num_classes, name)
        require_only_prompt_trainable(model)
        if getattr(args, "disable_dropout", True):
            _disable_dropout(base_model_of(model))
        if data_collator is None:
            template = TaskTemplate.from_config(self.post_config, processing_class)
            data_collator = VerbalizerCollator(template, self.text_column, self.label_column)
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

    def _get_num_items_in_batch(self, batch_samples, device):
        return sum(int(b["labels"].shape[0]) for b in batch_samples) or None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Through `model`, which is the DDP wrapper under multi-process training, so the prompt's gradient is all-reduced.
        logits = forward_through(model, label_logits, inputs["input_ids"], inputs["attention_mask"],
                                 inputs["label_positions"])
        index, weight = self.verbalizer.index.to(logits.device), self.verbalizer.weight.to(logits.device)
        total = verbalizer_loss(logits, inputs["labels"], index, weight, reduction="sum")
        divisor = num_items_in_batch if num_items_in_batch else inputs["labels"].shape[0]
        loss = total / divisor
        return (loss, logits) if return_outputs else loss

    # ---- evaluation ----

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Accuracy, loss and prompt norms on `eval_dataset` (or each dataset of a dict, prefixed by its name)."""
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
            check_classification_dataset(
                eval_dataset, self.text_column, self.label_column, self.verbalizer.num_classes, "eval_dataset"
            )
        self._memory_tracker.start()
        start = time.time()
        data = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else eval_dataset
        # Not prepared by accelerate, which would hand each process only its shard: every process scores the whole
        # set, so the metrics are the set's under any number of processes.
        loader = DataLoader(data, batch_size=self.args.eval_batch_size, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers)
        scores, labels = predict_class_scores(
            self.model, loader, self.verbalizer, prompt="auto", disable_progress=self.args.disable_tqdm
        )
        report = accuracy_report(scores.argmax(-1).numpy(), labels.numpy(), self.verbalizer.num_classes)
        p = metric_key_prefix
        metrics = {
            f"{p}_loss": float(F.cross_entropy(scores, labels)),
            f"{p}_accuracy": report["accuracy"],
            f"{p}_num_examples": report["num_examples"],
            **{f"{p}_accuracy_class_{c}": v["correct"] / v["total"] for c, v in report["per_class"].items() if v["total"]},
            **self._norm_metrics(p),
        }
        metrics.update(speed_metrics(p, start, num_samples=report["num_examples"]))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self._memory_tracker.stop_and_update_metrics(metrics)
        return metrics

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


class DPPromptTrainer(PromptTrainer):
    """
    `PromptTrainer` with differential privacy (PromptDPSGD, DESIGN §2): each optimizer step draws a Poisson batch
    (rate q = per_device_train_batch_size / N), computes every example's exact prompt gradient in one backward,
    clips each to C, sums, adds N(0, σ²C²I), divides by the expected batch size and hands that to the optimizer.
    An Opacus accountant tracks ε; `privacy_report()` is the ledger, saved in the adapter's ``post_config.json``
    and, with the accountant's history, in every checkpoint so that resuming keeps ε exact.

    What is protected: the prompt's training set (add/remove one example). Not protected: inference queries sent
    to a model that uses the prompt, and anything logged locally during training (loss, evaluation metrics).
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
        if args.gradient_accumulation_steps != 1:
            raise ValueError(
                f"`gradient_accumulation_steps` must be 1 under DP (got {args.gradient_accumulation_steps}): "
                "accumulating several Poisson batches changes the sampling the accountant analyses. To save memory, "
                "set DPConfig(max_physical_batch_size=...), which splits each Poisson batch exactly."
            )
        require_single_process(
            args, "DPPromptTrainer",
            "each process would draw its own Poisson batches, clip and add its own noise, and count its own privacy "
            "steps, so the reported epsilon would not describe the released prompt. Launch one process (plain "
            "`python`); non-private PromptTrainer, TransferTrainer and DistillationTrainer do run on several.",
        )
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
        n = len(train_dataset)
        self.sample_rate = privacy.sample_rate_for(self.args.per_device_train_batch_size, n)
        self.expected_batch_size = self.sample_rate * n
        self.planned_steps = (
            self.args.max_steps
            if self.args.max_steps > 0
            else math.ceil(self.args.num_train_epochs * privacy.steps_per_epoch(self.sample_rate))
        )
        self.delta = privacy.resolve_delta(dp_config.target_delta, n)
        self.noise_multiplier = privacy.resolve_noise_multiplier(
            dp_config.target_epsilon,
            dp_config.noise_multiplier,
            self.delta,
            self.sample_rate,
            self.planned_steps,
            dp_config.accountant,
            dp_config.epsilon_tolerance,
        )
        self.accountant = privacy.make_accountant(dp_config.accountant)
        self.noise_generator = self._secure_generator() if dp_config.secure_mode else None
        if not dp_config.poisson_sampling:
            warnings.warn(
                "poisson_sampling=False: batches are shuffled fixed-size slices, but the accountant's ε assumes "
                "Poisson sampling; the reported ε is then a common approximation, not a proven bound."
            )

    @staticmethod
    def _secure_generator():
        import torchcsprng

        return torchcsprng.create_random_device_generator("/dev/urandom")

    # ---- data ----

    def get_train_dataloader(self):
        if not self.dp_config.poisson_sampling:
            return super().get_train_dataloader()
        # Not passed through accelerate: it would re-batch or shard the Poisson batches (single process only).
        return privacy.poisson_dataloader(
            self.train_dataset,
            self.sample_rate,
            self.data_collator,
            steps=privacy.steps_per_epoch(self.sample_rate),
            generator=self.noise_generator,
            num_workers=self.args.dataloader_num_workers,
        )

    # ---- the DP step ----

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        prompt = prompt_parameter(self.model)
        summed = torch.zeros_like(prompt, dtype=torch.float32)
        loss_total = torch.zeros((), device=self.args.device)
        count = int(inputs["input_ids"].shape[0])
        if count:
            with self.compute_loss_context_manager():
                for chunk in privacy.chunks(inputs, self.dp_config.max_physical_batch_size):
                    grads, losses = privacy.per_example_gradients(
                        model, chunk, prompt, self.verbalizer.index, self.verbalizer.weight
                    )
                    summed += privacy.clipped_sum(grads.float(), self.dp_config.max_grad_norm)
                    loss_total = loss_total + losses.sum().float().to(loss_total.device)
        # An empty Poisson batch still releases noise and counts as a step: skipping it would change the mechanism.
        grad = privacy.privatize(
            summed,
            self.noise_multiplier,
            self.dp_config.max_grad_norm,
            self.expected_batch_size,
            self.noise_generator,
            self.dp_config.secure_mode,
        )
        prompt.grad = grad.to(prompt.dtype)
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return (loss_total / max(count, 1)).detach()

    # ---- ledger ----

    def privacy_report(self) -> dict:
        """The privacy ledger: ε spent so far at δ, and σ, C, q, steps and accountant that produced it."""
        return privacy.privacy_ledger(
            self.accountant,
            self.delta,
            self.noise_multiplier,
            self.dp_config.max_grad_norm,
            self.sample_rate,
            target_epsilon=self.dp_config.target_epsilon,
            poisson_sampling=self.dp_config.poisson_sampling,
            secure_mode=self.dp_config.secure_mode,
        )

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        report = self.privacy_report()
        if report["steps"] > 0:
            validate_privacy_ledger(report)
            self.post_config.privacy = report
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            state = {**privacy.accountant_state(self.accountant), "ledger": report}
            atomic_write_json(os.path.join(output_dir, privacy.ACCOUNTANT_STATE_NAME), state)

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
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        privacy.load_accountant_state(self.accountant, state)
        ledger = state.get("ledger", {})
        for key, mine in (("noise_multiplier", self.noise_multiplier), ("sample_rate", self.sample_rate),
                          ("max_grad_norm", self.dp_config.max_grad_norm), ("delta", self.delta)):
            if key in ledger and not math.isclose(ledger[key], mine, rel_tol=1e-9):
                raise ValueError(
                    f"The checkpoint was trained with {key}={ledger[key]}, this run has {mine}; resume with the same "
                    "DPConfig, batch size, dataset and step plan so the guarantee stays the one computed."
                )
        if privacy.accountant_steps(self.accountant) != self.state.global_step:
            raise ValueError(
                f"The checkpoint's accountant counts {privacy.accountant_steps(self.accountant)} steps but its trainer "
                f"state is at step {self.state.global_step}; the checkpoint is inconsistent."
            )

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        target = self.dp_config.target_epsilon
        eps = self.privacy_report()["epsilon"]
        if target is not None and eps > target:
            warnings.warn(
                f"ε = {eps:.3f} exceeds target_epsilon = {target} (more steps were run than the {self.planned_steps} "
                "the noise was calibrated for)."
            )
        return output
