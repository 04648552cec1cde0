"""POST stage 3: transfer a small-model soft prompt p_s into a prompt p_t of the large model, on public data only.

`TransferTrainer` trains p_t (the target `PeftModel`'s prompt, nothing else) on the POST loss
``(1 − α)·KL_T(a_t, a_s) + α·KL_T(a_t − b_t, a_s − b_s)``. Its constructor takes the frozen source `PeftModel`,
the target `PeftModel`, a public dataset (text only: the loss needs no labels) and an optional public held-out
split for accuracy; there is no argument through which private data could enter.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import torch
from peft import PeftModel, PromptTuningInit, get_peft_model
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer

from ..config import POSTConfig
from ..evaluation import evaluate_prompt
from ..losses import transfer_loss
from ..modeling import (base_model_of, forward_through, input_device, is_masked_lm, label_logits, on_main_process,
                        prompt_parameter, quiet_checkpointing_deprecation, require_data_parallel,
                        require_only_prompt_trainable, require_prompt_model, train_without_dropout, unwrap_model,
                        upcast_trainable_parameters)
from ..prompts import get_prompt, prompt_from_text, set_prompt
from ..generation import (AnswerCollator, answer_logits, answer_token_ids, check_generation_dataset,
                          evaluate_generation, generate_answers)
from ..scoring import require_scorable
from ..tasks import TaskTemplate, Verbalizer, VerbalizerCollator, check_classification_dataset, dataset_fingerprint
from .cache import (TransferCache, build_transfer_cache, frozen_logits, log_cache_plan, projected_cache_bytes,
                    resolve_cache_dtype, select_support, shared_transfer_cache, transfer_cache_digest,
                    transfer_cache_path)
from .config import TransferConfig

TASK_FIELDS = ("task_type", "task_kind", "template", "label_words", "max_length", "max_answer_tokens")


def suggest_alpha(zero_shot_acc: float, source_acc: float, num_classes: Optional[int]) -> float:
    """The paper's α heuristic (App. D.5): α = min((ZS − RG) / (C − RG), 1), clipped at 0.

    ZS: the target's zero-shot accuracy, C: the prompted small model's accuracy, RG = 1 / num_classes (random
    guessing); accuracies as fractions in [0, 1]. A strong zero-shot target (relative to what p_s achieves on the
    small model) trusts the direction term; a weak one imitates the prompted source. When C ≤ RG the source prompt
    carries no signal to imitate and the formula's limit (C → RG from above) is used: α = 1, with a warning.

    ``num_classes=None`` is the generation form: ZS and C are exact-match rates of free-form answers, which random
    guessing does not reach, so RG = 0 and α = min(ZS / C, 1).
    """
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
        raise ValueError(f"`num_classes` must be an int >= 2 (or None for a generation task), got {num_classes!r}.")
    for name, value in (("zero_shot_acc", zero_shot_acc), ("source_acc", source_acc)):
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"`{name}` must be an accuracy in [0, 1] (a fraction, not a percentage), got {value!r}.")
    random_guess = 0.0 if num_classes is None else 1.0 / num_classes
    if source_acc <= random_guess:
        warnings.warn(
            f"source_acc={source_acc} is not above random guessing ({random_guess:.3f}): the source prompt has "
            "nothing to imitate, using alpha=1 (direction term only)."
        )
        return 1.0
    return float(min(max((zero_shot_acc - random_guess) / (source_acc - random_guess), 0.0), 1.0))


def _vocab_size(model) -> int:
    base = base_model_of(model)
    head = base.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(base.config.vocab_size)


def _hidden_size(model) -> int:
    return int(base_model_of(model).get_input_embeddings().weight.shape[1])


def direct_transfer_obstacle(source_hidden: int, target_hidden: int, source_vocab: int,
                             target_vocab: int) -> Optional[str]:
    """Why p_s cannot be pasted into the target as is ("hidden sizes differ: 64 vs 32", source first), or None.

    Direct transfer needs the same hidden size (p_s is a sequence of input embeddings) and vocabulary; POST needs
    only the vocabulary. The pipeline reads the sizes from the model configs, to report direct transfer as not
    applicable without loading either model.
    """
    if source_hidden != target_hidden:
        return f"hidden sizes differ: {source_hidden} vs {target_hidden}"
    if source_vocab != target_vocab:
        return f"vocabularies differ: {source_vocab} vs {target_vocab} tokens"
    return None


def tokenizer_mismatch(tokenizer, source_tokenizer) -> Optional[str]:
    """Why two tokenizers are not one shared vocabulary ("tokenizers differ in size (500 vs 400)", source first),
    or None. POST compares the two models' logits token by token and feeds the source the target's token ids, so
    both must map every token to the same id and agree on the special tokens. Cheap: no model is loaded."""
    if source_tokenizer is tokenizer:
        return None
    if len(tokenizer) != len(source_tokenizer):
        return f"tokenizers differ in size ({len(source_tokenizer)} vs {len(tokenizer)} tokens)"
    vocab, source_vocab = tokenizer.get_vocab(), source_tokenizer.get_vocab()
    if vocab != source_vocab:
        differ = sorted(t for t in vocab.keys() | source_vocab.keys() if vocab.get(t) != source_vocab.get(t))
        return f"tokenizers map {len(differ)} tokens to different ids (e.g. {differ[0]!r})"
    for attr in ("pad_token_id", "mask_token_id", "bos_token_id", "eos_token_id"):
        if getattr(tokenizer, attr) != getattr(source_tokenizer, attr):
            return f"tokenizers disagree on `{attr}`"
    return None


def require_shared_vocabulary(model, source_model, tokenizer) -> None:
    """Raise `ValueError` unless `model` (target) and `source_model` have as many logits as each other and at least
    as many as `tokenizer` (the target's) has tokens: the check `TransferTrainer` makes, which the α heuristic needs
    too before it feeds the source the target's token ids."""
    v_t, v_s = _vocab_size(model), _vocab_size(source_model)
    if v_t != v_s:
        raise ValueError(
            f"Source and target vocabularies differ ({v_s} vs {v_t} logits): the POST loss compares logits "
            "token by token, so both models must share one tokenizer."
        )
    if len(tokenizer) > v_t:
        raise ValueError(f"The tokenizer has {len(tokenizer)} tokens but the models only {v_t} logits.")


def _name_of(model) -> Optional[str]:
    return getattr(base_model_of(model), "name_or_path", None) or None


def _privacy_of(config) -> Optional[dict]:
    return copy.deepcopy(config.privacy) if isinstance(config, POSTConfig) else None


def warn_on_shared_first_tokens(verbalizer: Verbalizer) -> None:
    """Warn when label words of different classes begin with the same token: the transfer loss reads the label slot
    (the distribution of a word's first token), which cannot tell such classes apart."""
    first: dict[int, set] = {}
    for seq, c in zip(verbalizer.word_token_ids, verbalizer.word_classes):
        first.setdefault(seq[0], set()).add(c)
    shared = {t: sorted(cs) for t, cs in first.items() if len(cs) > 1}
    if shared:
        warnings.warn(
            f"Label words of classes {sorted(shared.values())} begin with the same token: the POST loss matches the "
            "label slot's distribution (the first token of a label word), so it cannot separate those classes. "
            "Choose label words whose first tokens differ."
        )


def direct_transfer(source_peft_model, target_model, adapter_name: str = "default") -> PeftModel:
    """The paper's baseline: paste p_s unchanged into the target model.

    ``target_model`` is a plain transformers model (a prompt-tuning adapter is added, configured like the
    source's) or a prompt-tuning `PeftModel` (its prompt is overwritten). Needs the same hidden size, prompt length
    and vocabulary size; a clear error otherwise. The source's privacy ledger is copied unchanged.
    """
    require_prompt_model(source_peft_model, "source_peft_model")
    p_s = get_prompt(source_peft_model)
    source_cfg = source_peft_model.active_peft_config
    obstacle = direct_transfer_obstacle(p_s.shape[1], _hidden_size(target_model), _vocab_size(source_peft_model),
                                        _vocab_size(target_model))
    if obstacle is not None:
        raise ValueError(
            f"Direct transfer pastes p_s as is, but the source and target {obstacle}. Use TransferTrainer: the POST "
            "loss compares only vocabulary logits, so hidden sizes may differ (the vocabulary must be shared)."
        )
    if isinstance(target_model, PeftModel):
        require_prompt_model(target_model, "target_model")
        set_prompt(target_model, p_s)  # raises on a prompt-length mismatch
        peft_model = target_model
    else:
        cfg = copy.deepcopy(source_cfg)
        # The pasted tensor replaces whatever init builds; RANDOM needs no tokenizer download.
        cfg.prompt_tuning_init = PromptTuningInit.RANDOM
        cfg.prompt_tuning_init_text = None
        cfg.base_model_name_or_path = _name_of(target_model)
        with quiet_checkpointing_deprecation():
            peft_model = get_peft_model(target_model, cfg, adapter_name=adapter_name)
        set_prompt(peft_model, p_s)
    cfg = peft_model.active_peft_config
    if isinstance(cfg, POSTConfig):
        cfg.source_model_name_or_path = _name_of(source_peft_model)
        cfg.transfer_alpha = None
        cfg.privacy = _privacy_of(source_cfg)
        cfg.provenance = {
            "stage": "direct_transfer",
            "source_model": _name_of(source_peft_model),
            "target_model": _name_of(peft_model),
            "source_provenance": copy.deepcopy(getattr(source_cfg, "provenance", None)),
        }
    return peft_model


class _PublicTexts(Dataset):
    """Only the text of each public example (labels never reach training) and its position, the cache key; for a
    generation task also the answer tokens the loss is applied at (``answers``, set before training)."""

    def __init__(self, texts: list[str]):
        self.texts = texts
        self.answers: Optional[list[list[int]]] = None

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = {"text": self.texts[i], "example_index": i}
        if self.answers is not None:
            row["answer_ids"] = self.answers[i]
        return row


class _IndexedCollator:
    def __init__(self, collator):
        self.collator = collator

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collator(rows)
        batch["example_index"] = torch.tensor([row["example_index"] for row in rows], dtype=torch.long)
        return batch


class TransferTrainer(Trainer):
    """
    Trains the target prompt p_t on the POST transfer loss. Arguments:

    - ``model``: the target `PeftModel` (large model + p_t) built with a `POSTConfig`, whose template, label words
      and max length define the task. Only p_t trains; the target base model stays frozen.
    - ``source_model``: the source `PeftModel` (small model + p_s); frozen, never modified.
    - ``args``: a `TransferConfig` (α, T, cache, init, steps).
    - ``public_dataset``: the public transfer set; only its text column is read.
    - ``public_eval_dataset``: optional public held-out split with labels, for accuracy during/after training.
    - ``processing_class``: the target tokenizer; ``source_tokenizer`` (default: the same) must agree with it on
      every id the transfer uses.

    All checks run in the constructor, before any forward pass. The frozen base models run without dropout: they
    are fixed functions of the input, which is what makes caching their outputs exact. (The target runs in train
    mode without dropout, `train_without_dropout`, so that ``gradient_checkpointing=True`` takes effect.) Forwards
    run under the trainer's autocast (``bf16=True``); p_t stays an fp32 master copy and the loss is computed in fp32.
    """

    # compute_loss returns a per-batch mean, so Trainer must divide by the gradient-accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: PeftModel,
        source_model: PeftModel,
        args: TransferConfig,
        public_dataset,
        public_eval_dataset=None,
        processing_class=None,
        source_tokenizer=None,
        callbacks=None,
        optimizers=(None, None),
    ):
        if not isinstance(args, TransferConfig):
            raise ValueError(f"`args` must be a TransferConfig, got {type(args).__name__}.")
        require_prompt_model(model, "model")
        require_prompt_model(source_model, "source_model")
        if model is source_model or base_model_of(model) is base_model_of(source_model):
            raise ValueError("`model` (target) and `source_model` must be different models.")
        if processing_class is None:
            raise ValueError("`processing_class` must be the target tokenizer (a fast tokenizer).")
        target_cfg, source_cfg = model.active_peft_config, source_model.active_peft_config
        if not isinstance(target_cfg, POSTConfig):
            raise ValueError(
                "The target adapter must be built with a POSTConfig (it defines the template and label words): "
                f"got {type(target_cfg).__name__}."
            )
        self._check_task(target_cfg, source_cfg, model, source_model)
        tokenizer = processing_class
        source_tokenizer = tokenizer if source_tokenizer is None else source_tokenizer
        self.generation = target_cfg.task_kind == "generation"
        # A generation task has no verbalizer: the loss runs at the positions of each public example's answer.
        self.verbalizer = None if self.generation else Verbalizer.from_config(target_cfg, tokenizer)
        if self.verbalizer is not None:
            require_scorable(self.verbalizer, model)
            warn_on_shared_first_tokens(self.verbalizer)
        self._check_vocabulary(model, source_model, tokenizer, source_tokenizer, target_cfg)
        if self.generation:
            train_answers = args.answer_column if args.continuation == "public_answers" else None
            check_generation_dataset(public_dataset, args.text_column, train_answers, "public_dataset")
        else:
            check_classification_dataset(public_dataset, args.text_column, None, self.verbalizer.num_classes,
                                         "public_dataset")
        texts = list(public_dataset[args.text_column])
        self._check_texts(texts, "public_dataset")
        if public_eval_dataset is not None:
            if self.generation:
                check_generation_dataset(public_eval_dataset, args.text_column, args.answer_column,
                                         "public_eval_dataset")
            else:
                check_classification_dataset(public_eval_dataset, args.text_column, args.label_column,
                                             self.verbalizer.num_classes, "public_eval_dataset")
            self._check_texts(list(public_eval_dataset[args.text_column]), "public_eval_dataset")
            overlap = set(texts) & set(public_eval_dataset[args.text_column])
            if overlap:
                warnings.warn(
                    f"{len(overlap)} texts of public_eval_dataset also lie in public_dataset: the held-out accuracy "
                    "is optimistic."
                )
        prompt = require_only_prompt_trainable(model, "model")
        # p_t is an fp32 master copy even on a bf16/fp16 target (before it is initialised, so p_s is copied exactly).
        upcast_trainable_parameters(model)
        target_template = TaskTemplate.from_config(target_cfg, tokenizer)
        if source_tokenizer is not tokenizer:
            source_template = TaskTemplate.from_config(target_cfg, source_tokenizer)
            eval_texts = list(public_eval_dataset[args.text_column]) if public_eval_dataset is not None else []
            for i, text in enumerate(texts + eval_texts):
                if target_template.encode(text) != source_template.encode(text):
                    raise ValueError(
                        f"Source and target tokenizers encode public example {i} differently; POST needs one shared "
                        "tokenizer (same ids for the template, the texts and the label words)."
                    )
        if args.init_from_source:
            p_s, p_t = prompt_parameter(source_model), prompt
            if p_s.shape != p_t.shape:
                raise ValueError(
                    f"init_from_source copies p_s {tuple(p_s.shape)} into p_t {tuple(p_t.shape)}: the prompt length and "
                    "hidden size must match. Set init_from_source=False (p_t then starts from the init text)."
                )

        self.source_model = source_model
        self.source_tokenizer = source_tokenizer
        self.task_config = target_cfg
        self.public_dataset = public_dataset
        self.public_texts = texts
        self.cache: Optional[TransferCache] = None
        self._init = self._initialise_prompt(model, source_model, tokenizer, args)

        # Frozen for good: no grads, no dropout. Flags only; no weight is touched.
        source_model.requires_grad_(False)
        source_model.eval()

        self.collator = (AnswerCollator(target_template, "text", args.answer_column, target_cfg.max_answer_tokens)
                         if self.generation else
                         VerbalizerCollator(target_template, text_column="text", label_column=None))
        # For continuation='public_answers' the answers are known now; the source's greedy answers are generated
        # when training starts (`prepare_continuations`), after every check.
        self.public_answers = list(public_dataset[args.answer_column]) \
            if self.generation and args.continuation == "public_answers" else None
        super().__init__(
            model=model,
            args=args,
            data_collator=_IndexedCollator(self.collator),
            train_dataset=_PublicTexts(texts),
            eval_dataset=public_eval_dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        require_data_parallel(self)
        if _device_type(source_model) != self.args.device.type:
            self.source_model.to(self.args.device)

    # -- checks --------------------------------------------------------------------------------------------------

    @staticmethod
    def _check_task(target_cfg, source_cfg, model, source_model) -> None:
        if isinstance(source_cfg, POSTConfig):
            differ = [f for f in TASK_FIELDS if getattr(source_cfg, f) != getattr(target_cfg, f)]
            if differ:
                raise ValueError(
                    f"Source and target adapters define different tasks ({differ}): p_s was tuned for the source's "
                    "template and label words; build the target POSTConfig with the same ones."
                )
        masked = target_cfg.task_type == "FEATURE_EXTRACTION"
        for name, m in (("model", model), ("source_model", source_model)):
            if is_masked_lm(m) != masked:
                raise ValueError(
                    f"`{name}` is {'a masked' if is_masked_lm(m) else 'a causal'} LM but the task_type is "
                    f"{target_cfg.task_type!r}; source and target must both be causal or both masked LMs."
                )

    def _check_vocabulary(self, model, source_model, tokenizer, source_tokenizer, cfg) -> None:
        require_shared_vocabulary(model, source_model, tokenizer)
        mismatch = tokenizer_mismatch(tokenizer, source_tokenizer)
        if mismatch is not None:
            raise ValueError(f"Source and target {mismatch}; POST needs one shared tokenizer.")
        if source_tokenizer is not tokenizer and self.verbalizer is not None:
            source_verbalizer = Verbalizer.from_config(cfg, source_tokenizer)
            if source_verbalizer.word_token_ids != self.verbalizer.word_token_ids:
                raise ValueError(
                    f"Label words map to different ids in the source ({source_verbalizer.word_token_ids}) and target "
                    f"({self.verbalizer.word_token_ids}) tokenizers; POST needs one shared tokenizer."
                )

    @staticmethod
    def _check_texts(texts: list, name: str) -> None:
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ValueError(f"`{name}` has {len(bad)} empty or non-string texts (first at row {bad[0]}).")

    # -- prompt initialisation -----------------------------------------------------------------------------------

    @staticmethod
    def _initialise_prompt(model, source_model, tokenizer, args: TransferConfig) -> str:
        if args.init_from_source:
            set_prompt(model, get_prompt(source_model))
            return "source_prompt"
        text = getattr(source_model.active_peft_config, "prompt_tuning_init_text", None)
        if args.init_from_source_text and text:
            n = prompt_parameter(model).shape[0]
            set_prompt(model, prompt_from_text(model, tokenizer, text, n))
            return "source_init_text"
        return "target_adapter"

    # -- cache and loss ------------------------------------------------------------------------------------------

    def build_cache(self) -> TransferCache:
        """Compute a_s, b_s, b_t of every public example once (called by `train` when caching is on).

        Logs the projected size first, and keeps it with the storage dtype and place in ``self.cache_plan``. A cache
        above ``cache_memory_budget_mb`` goes to a memory-mapped safetensors file in ``cache_dir``, named by the
        digest of its inputs: built by one process, opened by the others, and reused by a later run. Under several
        processes the cache always goes to that file, so it is built once for the whole job.
        """
        args = self.args
        loader = DataLoader(
            _PublicTexts(self.public_texts), batch_size=args.cache_batch_size, shuffle=False,
            collate_fn=self.data_collator,
        )
        num_examples, label_ids = len(self.public_texts), self.verbalizer.all_token_ids
        dtype = resolve_cache_dtype(args.cache_dtype, self.model, bf16=args.bf16, fp16=args.fp16)
        vocab = _vocab_size(self.model)
        size = projected_cache_bytes(num_examples, vocab, args.cache_top_k, len(label_ids), dtype)
        path = digest = None
        # Several processes share one file, built once by the main process, whatever its size.
        if size > args.cache_memory_budget_mb * 2**20 or args.world_size > 1:
            # The autocast state changes the logits computed (not only how they are stored).
            digest = transfer_cache_digest(self.source_model, self.model, loader, label_ids, args.cache_top_k, dtype,
                                           extra={"bf16": bool(args.bf16), "fp16": bool(args.fp16)})
            path = transfer_cache_path(digest, args.cache_dir, args.output_dir)
        self.cache_plan = {"projected_bytes": size, "dtype": str(dtype).replace("torch.", ""), "path": path,
                           "message": log_cache_plan(num_examples, vocab, args.cache_top_k, len(label_ids), dtype,
                                                     path, args.cache_memory_budget_mb)}

        def build() -> TransferCache:
            # Under the same autocast as the uncached path's frozen forwards in `compute_loss` (off unless bf16/fp16).
            with self.accelerator.autocast():
                return build_transfer_cache(self.source_model, self.model, loader, num_examples, label_ids,
                                            top_k=args.cache_top_k, dtype=dtype, path=path, digest=digest or "")

        if path is None:
            self.cache, self.cache_plan["built"] = build(), True
        else:
            self.cache, self.cache_plan["built"] = shared_transfer_cache(path, digest, build)
        return self.cache

    def prepare_continuations(self) -> list[list[int]]:
        """The answer tokens of every public example that the generation loss is applied at (once): the public set's
        answers, or the prompted source's greedy answers followed by EOS (where it stopped)."""
        data = self.train_dataset
        if data.answers is None:
            cfg, tokenizer = self.task_config, self.processing_class
            if self.public_answers is not None:
                data.answers = [answer_token_ids(tokenizer, a, cfg.max_answer_tokens) for a in self.public_answers]
            else:
                def decode():
                    with self.accelerator.autocast():
                        return generate_answers(self.source_model, self.source_tokenizer, self.public_texts,
                                                self.collator.template, max_new_tokens=cfg.max_answer_tokens,
                                                batch_size=self.args.cache_batch_size)

                # Every process would decode the same answers: the main one does, the others receive them (or its
                # error, rather than waiting for answers that will not come).
                greedy = on_main_process(decode)
                eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
                # An answer cut at the budget has no EOS to add; an empty one is just "stop here".
                data.answers = [(a + eos)[: cfg.max_answer_tokens] or eos for a in greedy]
                if not all(data.answers):
                    raise ValueError("The tokenizer has no EOS token and the source answered some public inputs with "
                                     "nothing: use continuation='public_answers'.")
        return data.answers

    def train(self, *args, **kwargs):
        if self.generation:
            self.prepare_continuations()
        elif self.args.cache_source_outputs and self.cache is None:
            self.build_cache()
        output = super().train(*args, **kwargs)
        self.record_provenance()
        return output

    def frozen_inputs(self, model, inputs: dict) -> dict[str, Optional[torch.Tensor]]:
        """a_s, b_s, b_t (and the kept token set under top-k) of a batch: looked up in the cache, or computed."""
        device = inputs["input_ids"].device
        if self.args.cache_source_outputs:
            if self.cache is None:
                self.build_cache()
            return self.cache.lookup(inputs["example_index"], device)
        a_s, b_s, b_t = frozen_logits(self.source_model, model, inputs)
        support = None
        if self.args.cache_top_k is not None:
            support = select_support(a_s, b_s, self.verbalizer.all_token_ids, self.args.cache_top_k)
            a_s, b_s, b_t = (x.gather(1, support) for x in (a_s, b_s, b_t))
        return {"source_logits": a_s, "source_base_logits": b_s, "target_base_logits": b_t, "support": support}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Trainer switched the model to train mode; the frozen target base must not apply dropout (b_t is a fixed
        # function of x, and the cache holds its eval-mode value). `train_without_dropout` gives the eval-mode
        # numbers but keeps the layers in train mode, where transformers runs gradient checkpointing.
        if model.training:
            train_without_dropout(model)
        # Under the trainer's autocast (`args.bf16`): `forward_through` bypasses the autocast forward accelerate puts
        # on the model. `label_logits` returns fp32 logits, and `transfer_loss` runs in fp32.
        # `model` is the DDP wrapper under multi-process training: the frozen no-grad forwards use the bare model,
        # and only the trainable one goes through the wrapper so that p_t's gradient is all-reduced.
        if self.generation:
            return self._answer_transfer_loss(model, inputs, return_outputs)
        with self.accelerator.autocast():
            frozen = self.frozen_inputs(unwrap_model(model), inputs)
            a_t = forward_through(model, label_logits, inputs["input_ids"], inputs["attention_mask"],
                                  inputs["label_positions"])
        # On a_t's device: under a device map the target's head may lie on another GPU than its inputs.
        frozen = {k: None if v is None else v.to(a_t.device) for k, v in frozen.items()}
        if frozen["support"] is not None:
            a_t = a_t.gather(1, frozen["support"])
        loss = transfer_loss(
            a_t, frozen["target_base_logits"], frozen["source_logits"], frozen["source_base_logits"],
            alpha=self.args.alpha, temperature=self.args.temperature,
        )
        return (loss, {"target_logits": a_t}) if return_outputs else loss

    def _answer_transfer_loss(self, model, inputs, return_outputs: bool):
        """The POST loss at every answer position of a generation batch (teacher forcing on the continuation), a mean
        over the batch's answer tokens. The frozen logits are computed each step: the cache holds label slots only."""
        if model.training:
            train_without_dropout(model)
        with self.accelerator.autocast():
            with torch.no_grad():
                device = input_device(self.source_model)
                src = {k: v.to(device) for k, v in inputs.items()}
                a_s = answer_logits(self.source_model, src, prompt="auto")
                b_s = answer_logits(self.source_model, src, prompt=None)
                b_t = answer_logits(unwrap_model(model), inputs, prompt=None)
            a_t = forward_through(model, answer_logits, inputs)
        mask = inputs["target_mask"].to(a_t.device).bool()
        a_t = a_t[mask]
        a_s, b_s, b_t = (x.to(a_t.device)[mask] for x in (a_s, b_s, b_t))
        loss = transfer_loss(a_t, b_t, a_s, b_s, alpha=self.args.alpha, temperature=self.args.temperature)
        return (loss, {"target_logits": a_t}) if return_outputs else loss

    # -- evaluation on the public held-out split ------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Accuracy and macro-F1 of the prompted target on the public held-out split given at construction."""
        if eval_dataset is not None:
            raise ValueError(
                "TransferTrainer evaluates only on the public held-out split passed as `public_eval_dataset`; the "
                "provider holds no private data. Score other data with peft_post.evaluate_prompt."
            )
        if self.eval_dataset is None:
            raise ValueError("No `public_eval_dataset` was given to this TransferTrainer.")
        if self.generation:
            with self.accelerator.autocast():
                report = evaluate_generation(self.model, self.processing_class, self.eval_dataset, self.task_config,
                                             text_column=self.args.text_column, answer_column=self.args.answer_column,
                                             batch_size=self.args.per_device_eval_batch_size)
            metrics = {f"{metric_key_prefix}_{k}": report[k] for k in ("exact_match", "token_f1", "num_examples")}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics
        with self.accelerator.autocast():  # the training precision (`args.bf16`)
            report = evaluate_prompt(
                self.model, self.processing_class, self.eval_dataset, self.task_config,
                text_column=self.args.text_column, label_column=self.args.label_column,
                batch_size=self.args.per_device_eval_batch_size, disable_progress=True,
            )
        metrics = {
            f"{metric_key_prefix}_accuracy": report["accuracy"],
            f"{metric_key_prefix}_macro_f1": report["macro_f1"],
            f"{metric_key_prefix}_num_examples": report["num_examples"],
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # -- provenance and saving ------------------------------------------------------------------------------------

    def record_provenance(self) -> dict:
        """Write source, public data, α, T, steps and seed into the target POSTConfig; copy p_s's privacy ledger."""
        cfg, source_cfg = self.task_config, self.source_model.active_peft_config
        args = self.args
        public = {
            "name": args.public_dataset_name or _dataset_name(self.public_dataset),
            "size": len(self.public_texts),
            "sha256": dataset_fingerprint({args.text_column: self.public_texts}, args.text_column),
            "text_column": args.text_column,
        }
        provenance = {
            "stage": "transfer",
            "source_model": _name_of(self.source_model),
            "target_model": _name_of(self.model),
            "public_dataset": public,
            "alpha": float(args.alpha),
            "temperature": float(args.temperature),
            "steps": int(self.state.global_step),
            "seed": int(args.seed),
            "learning_rate": float(args.learning_rate),
            # The global batch of one optimizer step: every process contributes its per-device batches.
            "batch_size": int(args.train_batch_size * args.gradient_accumulation_steps * args.world_size),
            "cache": "off" if not args.cache_source_outputs or self.generation else
                     ("full" if args.cache_top_k is None else "top_k"),
            "top_k": args.cache_top_k,
            "init": self._init,
            **({"continuation": args.continuation} if self.generation else {}),
            "source_provenance": copy.deepcopy(getattr(source_cfg, "provenance", None)),
        }
        if self.eval_dataset is not None:
            provenance["public_eval_dataset"] = {
                "name": _dataset_name(self.eval_dataset),
                "size": len(self.eval_dataset),
                "sha256": dataset_fingerprint(self.eval_dataset, args.text_column),
            }
        cfg.source_model_name_or_path = _name_of(self.source_model)
        cfg.transfer_alpha = float(args.alpha)
        cfg.transfer_temperature = float(args.temperature)
        # Transfer only post-processes p_s with public data, so p_t inherits exactly p_s's DP guarantee.
        cfg.privacy = _privacy_of(source_cfg)
        cfg.provenance = provenance
        return provenance

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        self.record_provenance()
        super().save_model(output_dir, _internal_call=_internal_call)


def _device_type(model) -> str:
    return input_device(model).type


def _dataset_name(dataset) -> Optional[str]:
    info = getattr(dataset, "info", None)
    return getattr(info, "dataset_name", None) if info is not None else None
