"""`DistillationTrainer`: POST stage 1, distilling a frozen teacher LM into a `make_student` student."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional

import torch
from transformers import DataCollatorForLanguageModeling, Trainer

from ..losses import distillation_kl_loss, distillation_loss
from ..modeling import base_model_of, is_masked_lm, require_data_parallel
from .cache import TeacherCache, apply_head, hidden_and_logits, pad_right
from .config import DistillationConfig

INDEX_COLUMN = "teacher_index"
# Marks the texts `with_task_template` wrapped; prepared blocks carry a 0/1 list with 1 at each such label slot.
LABEL_SLOT_COLUMN = "label_slot"


def place_teacher(teacher: torch.nn.Module, device) -> torch.nn.Module:
    """The frozen teacher on the trainer's `device`, unless it was loaded spread over several devices (or partly
    offloaded) with a ``device_map``: a teacher too large for one device is then left where it is, never moved whole;
    accelerate's hooks move each layer's inputs, and the trainer moves the outputs to the student's device. A teacher
    on the meta device (built with ``accelerate.init_empty_weights()``, no weights loaded) stays there:
    `DistillationTrainer` accepts one only with a top-k `TeacherCache`, which gives all the loss needs of it."""
    placed = {str(d) for d in (getattr(teacher, "hf_device_map", None) or {}).values()}
    if len(placed) > 1 or any(p.device.type == "meta" for p in teacher.parameters()):
        return teacher
    return teacher.to(device)


def prepare_distillation_dataset(dataset, tokenizer, block_size: int, text_field: str = "text",
                                 masked_lm: bool = False):
    """Tokenize a text dataset, concatenate it and cut it into blocks of ``block_size`` tokens.

    Causal LMs: each text is followed by the EOS token so blocks see document boundaries. Masked LMs: each text is
    tokenized with the tokenizer's special tokens (CLS/SEP). The last, shorter block is kept (it is padded at
    collation and the padding is excluded from every loss term). Returns a `Dataset` with `input_ids`.
    """
    from datasets import Dataset

    if text_field not in dataset.column_names:
        raise ValueError(f"The dataset has no text column {text_field!r} (columns: {dataset.column_names}); set "
                         "`dataset_text_field` or pass a tokenized dataset with `input_ids`.")
    eos = [] if masked_lm or tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    flagged = dataset[LABEL_SLOT_COLUMN] if LABEL_SLOT_COLUMN in dataset.column_names and not masked_lm else None
    stream: list[int] = []
    slots: list[int] = []
    for i, text in enumerate(dataset[text_field]):
        if not isinstance(text, str):
            raise ValueError(f"Column {text_field!r} must hold strings, found {type(text).__name__}.")
        ids = tokenizer(text, add_special_tokens=masked_lm)["input_ids"]
        stream += ids + eos
        if flagged is not None:
            mark = [0] * (len(ids) + len(eos))
            if flagged[i] and ids:
                mark[len(ids) - 1] = 1
            slots += mark
    if len(stream) < 2:
        raise ValueError("The distillation dataset tokenizes to fewer than 2 tokens.")
    cuts = range(0, len(stream), block_size)
    columns = {"input_ids": [stream[i:i + block_size] for i in cuts]}
    if flagged is not None:
        columns[LABEL_SLOT_COLUMN] = [slots[i:i + block_size] for i in cuts]
    if len(columns["input_ids"][-1]) < 2:
        for blocks in columns.values():
            blocks.pop()
    return Dataset.from_dict(columns)


def with_task_template(dataset, template: str, fraction: float, seed: int = 0, text_field: str = "text"):
    """Wrap a seeded `fraction` of the texts in the task `template` (no label), then shuffle.

    The student then learns what the teacher predicts *at the label slot* on public text, which is what a prompt
    tuned on the student has to act through. A masked-LM template's ``{mask}`` becomes the tokenizer's mask token
    only later, so pass causal templates here. A boolean ``label_slot`` column flags the wrapped rows, so that
    `prepare_distillation_dataset` can mark their label slots (``DistillationConfig.alpha_label_slot``).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"`fraction` of templated texts must be in [0, 1], got {fraction!r}.")
    if template.count("{text}") != 1:
        raise ValueError(f"`template` must contain '{{text}}' exactly once, got {template!r}.")
    if "{mask}" in template:
        raise ValueError("with_task_template takes causal-LM templates (no '{mask}').")
    data = dataset.shuffle(seed=seed)
    cut = int(len(data) * fraction)
    prefix, suffix = template.split("{text}")
    return data.map(lambda row, i: {text_field: prefix + row[text_field] + suffix if i < cut else row[text_field],
                                    LABEL_SLOT_COLUMN: i < cut},
                    with_indices=True).shuffle(seed=seed + 1)


class DistillationCollator:
    """Right-pads causal-LM blocks (labels = input ids on real tokens, -100 on padding) or masks MLM blocks with
    `DataCollatorForLanguageModeling`; carries each row's dataset index for the teacher cache and, when blocks have
    one, the `label_slot` mask. The token after a label slot gets no LM label: templated texts end without their
    label, so that token (EOS or the next text) is not what a label slot should predict."""

    def __init__(self, tokenizer, masked_lm: bool, mlm_probability: float = 0.15):
        self.masked_lm = masked_lm
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.mlm = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability) \
            if masked_lm else None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        index = [r[INDEX_COLUMN] for r in rows] if INDEX_COLUMN in rows[0] else None
        if self.masked_lm:
            batch = dict(self.mlm([{"input_ids": r["input_ids"]} for r in rows]))
        else:
            ids, mask = pad_right([list(r["input_ids"]) for r in rows], self.pad_id)
            labels = ids.masked_fill(mask == 0, -100)
            if LABEL_SLOT_COLUMN in rows[0]:
                slots, _ = pad_right([list(r[LABEL_SLOT_COLUMN]) for r in rows], 0)
                labels[:, 1:] = labels[:, 1:].masked_fill(slots[:, :-1].bool(), -100)
                batch_slots = {LABEL_SLOT_COLUMN: slots.bool()}
            else:
                batch_slots = {}
            batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, **batch_slots}
        if index is not None:
            batch[INDEX_COLUMN] = torch.tensor(index, dtype=torch.long)
        return batch


class DistillationTrainer(Trainer):
    """
    Distils a frozen ``teacher`` into ``model`` (the student, e.g. from `make_student`) with
    α_ce·T²·KL(teacher ‖ student) + α_lm·(CLM or MLM loss) + α_cos·(1 − cos(h_t, h_s)) over non-padding tokens.

    ``train_dataset`` / ``eval_dataset`` are raw text datasets (tokenized and cut into ``args.block_size`` blocks
    here) or already tokenized ones with ``input_ids``. The teacher stays in eval mode, without gradients, and is run
    under ``no_grad``; it is not part of checkpoints (only the student is). Masked LMs (``*ForMaskedLM``) are trained
    with 15% MLM masking and both models see the same masked input. ``teacher_cache`` / ``eval_teacher_cache``
    (`TeacherCache`, causal LMs only) replace the teacher forward with outputs computed once.
    """

    # compute_loss returns a per-batch mean, so training_step divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, model, teacher, args: DistillationConfig, train_dataset=None, eval_dataset=None,
                 processing_class=None, teacher_cache: Optional[TeacherCache] = None,
                 eval_teacher_cache: Optional[TeacherCache] = None, data_collator=None, **kwargs):
        if not isinstance(args, DistillationConfig):
            raise ValueError(f"`args` must be a DistillationConfig, got {type(args).__name__}.")
        if processing_class is None:
            raise ValueError("Pass the teacher's tokenizer as `processing_class`: it tokenizes the text and pads.")
        tokenizer = processing_class
        student_base, teacher_base = base_model_of(model), base_model_of(teacher)
        self.masked_lm = is_masked_lm(student_base)
        if self.masked_lm != is_masked_lm(teacher_base):
            raise ValueError("Teacher and student must both be causal LMs or both masked LMs "
                             f"(got {type(teacher_base).__name__} and {type(student_base).__name__}).")
        if self.masked_lm and tokenizer.mask_token_id is None:
            raise ValueError("A masked-LM student needs a tokenizer with a mask token (tokenizer.mask_token is None).")
        t_vocab = teacher_base.get_output_embeddings().weight.shape[0]
        s_vocab = student_base.get_output_embeddings().weight.shape[0]
        if t_vocab != s_vocab:
            raise ValueError(f"Teacher and student vocabularies differ ({t_vocab} vs {s_vocab}); POST needs the same "
                             "tokenizer and vocabulary (build the student with make_student).")
        if args.alpha_cos and teacher_base.config.hidden_size != student_base.config.hidden_size:
            raise ValueError("alpha_cos > 0 needs equal hidden sizes (teacher "
                             f"{teacher_base.config.hidden_size}, student {student_base.config.hidden_size}).")
        if any(p.device.type == "meta" for p in teacher_base.parameters()):
            # A teacher too large for the training processes (docs/scaling.md): its config gives the shapes, a top-k
            # cache gives everything its weights would, and nothing reads them.
            for name, data, cache in (("teacher_cache", train_dataset, teacher_cache),
                                      ("eval_teacher_cache", eval_dataset, eval_teacher_cache)):
                if data is not None and (cache is None or cache.kind != "topk"):
                    raise ValueError(
                        f"The teacher is on the meta device (its weights are not loaded), so `{name}` must be a top-k "
                        "TeacherCache built with the real teacher (TeacherCache.build(teacher, blocks, kind='topk')); "
                        "or load the teacher's weights, spread with a device_map if it does not fit one device.")
        if (teacher_cache is not None or eval_teacher_cache is not None) and self.masked_lm:
            raise ValueError("A teacher cache works for causal LMs only: masked-LM inputs are re-masked every step.")

        train_dataset = self._prepare(train_dataset, tokenizer, args, teacher_cache, "train_dataset")
        eval_dataset = self._prepare(eval_dataset, tokenizer, args, eval_teacher_cache, "eval_dataset")
        if args.alpha_label_slot and train_dataset is not None and LABEL_SLOT_COLUMN not in train_dataset.column_names:
            raise ValueError("alpha_label_slot > 0 needs label slots in `train_dataset`: wrap (part of) the texts with "
                             "with_task_template(dataset, template, fraction), or set alpha_label_slot=0.")
        for cache in (teacher_cache, eval_teacher_cache):
            if cache is not None and args.alpha_cos and not cache.has_hidden:
                raise ValueError("alpha_cos > 0 needs the teacher's hidden states: build the cache with "
                                 "store_hidden=True.")
        if data_collator is None:
            data_collator = DistillationCollator(tokenizer, self.masked_lm, args.mlm_probability)

        if args.freeze_embeddings:
            for module in (student_base.get_input_embeddings(),):
                module.requires_grad_(False)
            for name, param in student_base.named_parameters():
                if "position_embeddings" in name or name.endswith("wpe.weight"):
                    param.requires_grad_(False)
        if args.freeze_lm_head:
            student_base.get_output_embeddings().requires_grad_(False)
        if any(p.is_floating_point() and p.element_size() < 4 for p in student_base.parameters()):
            # The student trains: fp32 master weights (a bf16 weight would not move under most updates). The whole
            # student, not only its trainable part, so that its layers see one dtype; bf16 compute comes from
            # autocast (`args.bf16`). The frozen teacher keeps its dtype.
            student_base.to(torch.float32)

        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, data_collator=data_collator, **kwargs)
        # FSDP2 too: the student is called through its own forward (the one FSDP2 gathers parameters in), and nothing
        # below reads its parameters' shapes after Trainer has wrapped it.
        require_data_parallel(self, allow_fsdp2=True)
        # The loss is a per-batch mean (scaled for accumulation by training_step); Trainer need not count the tokens
        # of every batch, a collective under multi-process training.
        self.model_accepts_loss_kwargs = False
        self.teacher = place_teacher(teacher_base, self.args.device).eval().requires_grad_(False)
        self.teacher_cache = teacher_cache
        self.eval_teacher_cache = eval_teacher_cache
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _prepare(self, dataset, tokenizer, args, cache, name):
        if dataset is None:
            return None
        if "input_ids" not in dataset.column_names:
            dataset = prepare_distillation_dataset(dataset, tokenizer, args.block_size, args.dataset_text_field,
                                                   masked_lm=self.masked_lm)
        if cache is not None:
            cache.check_matches(dataset, name)
        if INDEX_COLUMN not in dataset.column_names:
            dataset = dataset.add_column(INDEX_COLUMN, list(range(len(dataset))))
        return dataset

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        index = inputs.pop(INDEX_COLUMN, None)
        slots = inputs.pop(LABEL_SLOT_COLUMN, None)
        input_ids, attention_mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        mask = attention_mask.bool()
        # Both forwards under the trainer's autocast (`args.bf16` / `fp16`): the teacher's runs outside the autocast
        # forward accelerate gives the student. The losses upcast to fp32 (softmax, KL, cross-entropy, cosine).
        with self.accelerator.autocast():
            # The student's own forward, called through `model`: under multi-process training that is the DDP
            # wrapper, whose forward arms the gradient all-reduce. The LM loss needs the logits at every position.
            out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        s_hidden, s_logits = out.hidden_states[-1], out.logits
        cache = self.teacher_cache if model.training else self.eval_teacher_cache
        topk = t_logits = t_hidden = None
        with torch.no_grad(), self.accelerator.autocast():
            if cache is not None:
                cached = cache.batch(index, input_ids.shape[1], device=input_ids.device)
                t_hidden = cached.get("hidden")
                if cache.kind == "topk":
                    topk = (cached["topk_values"], cached["topk_indices"])
                elif args.alpha_ce or args.alpha_label_slot:
                    t_logits = apply_head(self.teacher, t_hidden)
            else:
                t_hidden, t_logits = hidden_and_logits(self.teacher, input_ids, attention_mask,
                                                       need_logits=bool(args.alpha_ce or args.alpha_label_slot))
                # A teacher spread over devices (`place_teacher`) returns them on its last device.
                t_hidden, t_logits = (None if t is None else t.to(s_logits.device) for t in (t_hidden, t_logits))
        loss, parts = distillation_loss(
            s_logits, t_logits, labels, mask, causal=not self.masked_lm, alpha_ce=args.alpha_ce,
            alpha_lm=args.alpha_lm, alpha_cos=args.alpha_cos, temperature=args.temperature,
            student_hidden=s_hidden, teacher_hidden=t_hidden, teacher_topk=topk,
            alpha_label_slot=args.alpha_label_slot if slots is not None else 0.0, label_slot_mask=slots,
        )
        mode = "train" if model.training else "eval"
        for key, value in parts.items():
            self._metrics[mode][f"loss_{key}"].append(float(value))
        return (loss, {"logits": s_logits}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        mode = "train" if "loss" in logs else "eval"
        prefix = "" if mode == "train" else "eval_"
        parts = {prefix + key: sum(values) / len(values) for key, values in self._metrics[mode].items() if values}
        self._metrics[mode].clear()
        if parts and self.accelerator.num_processes > 1:
            # Each process saw its own shard: log the mean over all of them, as Trainer does for the loss (Trainer
            # calls `log` on every process, so this collective is met everywhere).
            means = self.accelerator.reduce(torch.tensor(list(parts.values()), device=self.args.device), "mean")
            parts = dict(zip(parts, means.tolist()))
        logs.update(parts)
        super().log(logs, start_time)


@torch.no_grad()
def evaluate_distillation(student, teacher, dataset, tokenizer=None, *, block_size: int = 128,
                          text_field: str = "text", batch_size: int = 16, temperature: float = 1.0,
                          teacher_cache: Optional[TeacherCache] = None) -> dict[str, float]:
    """Held-out agreement of a causal student with its teacher, per non-padding token.

    Returns ``kl`` (T²·KL(teacher ‖ student) at ``temperature``, mean per token), ``student_next_token_accuracy`` and
    ``teacher_next_token_accuracy`` (top-1 prediction equals the next real token), ``top1_agreement`` (student and
    teacher top-1 agree) and ``num_tokens``. ``dataset`` is raw text (needs ``tokenizer``) or has ``input_ids``.
    """
    s_base, t_base = base_model_of(student), base_model_of(teacher)
    if is_masked_lm(s_base):
        raise ValueError("evaluate_distillation scores causal LMs (next-token accuracy).")
    if "input_ids" not in dataset.column_names:
        if tokenizer is None:
            raise ValueError("Pass `tokenizer` to evaluate a raw text dataset.")
        dataset = prepare_distillation_dataset(dataset, tokenizer, block_size, text_field)
    if teacher_cache is not None:
        teacher_cache.check_matches(dataset)
    pad_id = 0 if tokenizer is None or tokenizer.pad_token_id is None else tokenizer.pad_token_id
    device = s_base.get_input_embeddings().weight.device
    was = s_base.training, t_base.training
    s_base.eval(), t_base.eval()
    sums = defaultdict(float)
    rows = dataset["input_ids"]
    try:
        for start in range(0, len(rows), batch_size):
            ids, mask = pad_right(rows[start:start + batch_size], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            _, s_logits = hidden_and_logits(s_base, ids, mask)
            if teacher_cache is not None:
                index = torch.arange(start, start + ids.shape[0])
                t_logits = apply_head(t_base, teacher_cache.batch(index, ids.shape[1], device)["hidden"])
            else:
                _, t_logits = hidden_and_logits(t_base, ids, mask)
            m = mask.bool()
            n = int(m.sum())
            sums["kl"] += float(distillation_kl_loss(s_logits, t_logits, temperature, m)) * n
            sums["num_tokens"] += n
            s_top, t_top = s_logits.argmax(-1), t_logits.argmax(-1)
            sums["agree"] += float(((s_top == t_top) & m).sum())
            nxt = m[:, 1:] & m[:, :-1]
            sums["s_acc"] += float(((s_top[:, :-1] == ids[:, 1:]) & nxt).sum())
            sums["t_acc"] += float(((t_top[:, :-1] == ids[:, 1:]) & nxt).sum())
            sums["next"] += float(nxt.sum())
    finally:
        s_base.train(was[0]), t_base.train(was[1])
    return {
        "kl": sums["kl"] / sums["num_tokens"],
        "student_next_token_accuracy": sums["s_acc"] / max(sums["next"], 1),
        "teacher_next_token_accuracy": sums["t_acc"] / max(sums["next"], 1),
        "top1_agreement": sums["agree"] / sums["num_tokens"],
        "num_tokens": int(sums["num_tokens"]),
    }
