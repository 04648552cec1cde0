"""Stage 1: make_student, the distillation loss terms, DistillationTrainer and the teacher-output cache."""

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from datasets import Dataset

from peft_post import DistillationConfig, DistillationTrainer, make_student
from peft_post.distill import TeacherCache, evaluate_distillation, prepare_distillation_dataset
from peft_post.distill.cache import apply_head, hidden_and_logits, pad_right
from peft_post.losses import (cosine_hidden_loss, distillation_kl_loss, distillation_loss, lm_loss,
                              topk_distillation_kl_loss)
from peft_post.testing import TINY_KINDS, tiny_config, tiny_corpus, tiny_model

LAYER_PREFIX = {"gpt2": "transformer.h", "llama": "model.layers", "qwen2": "model.layers",
                "roberta": "roberta.encoder.layer", "bert": "bert.encoder.layer", "gemma3": "model.layers"}


def gemma3_model(vocab_size, num_layers=6):
    config = tf.Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4, max_position_embeddings=64,
        layer_types=["sliding_attention"] * (num_layers - 1) + ["full_attention"], final_logit_softcapping=30.0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return tf.Gemma3ForCausalLM(config).eval()


def make_teacher(kind, tokenizer):
    return gemma3_model(len(tokenizer)) if kind == "gemma3" else tiny_model(kind, tokenizer)


def config(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=4, report_to=[],
                    block_size=32, learning_rate=1e-3, use_cpu=True, save_strategy="no", disable_tqdm=True,
                    logging_steps=1, seed=0)
    defaults.update(kwargs)
    return DistillationConfig(**defaults)


def texts(start, stop):
    return Dataset.from_dict({"text": tiny_corpus()[start:stop]})


# ---- make_student -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(TINY_KINDS) + ["gemma3"])
def test_student_with_all_layers_equals_teacher(kind, tokenizer):
    teacher = make_teacher(kind, tokenizer)
    n = teacher.config.num_hidden_layers
    student = make_student(teacher, list(range(n)))
    assert type(student) is type(teacher)
    ids = torch.randint(5, len(tokenizer), (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        expected = teacher(input_ids=ids, attention_mask=mask).logits
        got = student(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(expected, got)


@pytest.mark.parametrize("kind", list(TINY_KINDS) + ["gemma3"])
def test_student_keeps_exactly_the_chosen_layers(kind, tokenizer):
    teacher = make_teacher(kind, tokenizer)
    n = teacher.config.num_hidden_layers
    keep = [0, -1]
    student = make_student(teacher, keep)
    assert student.config.num_hidden_layers == 2
    assert student.config.post_distillation["keep_layers"] == [0, n - 1]
    prefix = LAYER_PREFIX[kind]
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for key, value in s_state.items():
        if key.startswith(prefix + "."):
            j, rest = key[len(prefix) + 1:].split(".", 1)
            source = f"{prefix}.{[0, n - 1][int(j)]}.{rest}"
        else:
            source = key
        assert torch.equal(value, t_state[source]), key
    # Non-layer weights: every one copied, none left behind.
    assert {k for k in t_state if not k.startswith(prefix + ".")} == {k for k in s_state if not k.startswith(prefix + ".")}
    tied = teacher.get_input_embeddings().weight is teacher.get_output_embeddings().weight
    assert (student.get_input_embeddings().weight is student.get_output_embeddings().weight) == tied
    assert student.config.vocab_size == teacher.config.vocab_size
    assert student.config.hidden_size == teacher.config.hidden_size
    if kind == "gemma3":
        assert student.config.layer_types == ["sliding_attention", "full_attention"]
        assert student.model.layers[0].self_attn.is_sliding and not student.model.layers[1].self_attn.is_sliding


def test_student_tied_embeddings_stay_tied_in_training(tokenizer):
    student = make_student(tiny_model("llama", tokenizer), [0, 3])
    assert student.lm_head.weight is student.model.embed_tokens.weight
    with torch.no_grad():
        student.model.embed_tokens.weight[5] += 1.0
    assert torch.equal(student.lm_head.weight[5], student.model.embed_tokens.weight[5])


@pytest.mark.parametrize(
    "keep, match",
    [([], "empty"), ([0, -4], "more than once"), ([0, 4], "out of range"), ([-5], "out of range"),
     ([2, 0], "increasing"), ([0, 1.0], "ints"), ("01", "list")],
)
def test_student_rejects_bad_layer_lists(keep, match, tokenizer):
    with pytest.raises(ValueError, match=match):
        make_student(tiny_model("llama", tokenizer), keep)


def test_student_rejects_unknown_architecture(tokenizer):
    model = tf.GPT2Model(tiny_config("gpt2", len(tokenizer)))  # no LM head, no `transformer` prefix attribute
    with pytest.raises(ValueError, match="does not know where"):
        make_student(model, [0])


# ---- loss terms against their formulas ----------------------------------------------------------------------------


def fixed_batch(seed=0, B=2, L=5, V=7, d=4):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, L, V, generator=g) * 2
    t = torch.randn(B, L, V, generator=g) * 2
    hs = torch.randn(B, L, d, generator=g)
    ht = torch.randn(B, L, d, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False
    labels = torch.randint(0, V, (B, L), generator=g).masked_fill(~mask, -100)
    return s, t, hs, ht, mask, labels


def test_kl_term_is_t_squared_kl_over_real_tokens():
    s, t, _, _, mask, _ = fixed_batch()
    T = 2.0
    terms = []
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if mask[b, i]:
                p = [math.exp(x / T) for x in t[b, i].tolist()]
                q = [math.exp(x / T) for x in s[b, i].tolist()]
                p = [x / sum(p) for x in p]
                q = [x / sum(q) for x in q]
                terms.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
    expected = T * T * sum(terms) / len(terms)
    assert distillation_kl_loss(s, t, T, mask).item() == pytest.approx(expected, rel=1e-5)
    assert distillation_kl_loss(t, t, T, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_topk_kl_is_exact_with_the_whole_vocabulary_and_renormalises_otherwise():
    s, t, _, _, mask, _ = fixed_batch()
    T = 2.0
    values, indices = t.topk(t.shape[-1], dim=-1)
    assert topk_distillation_kl_loss(s, values, indices, T, mask).item() == pytest.approx(
        distillation_kl_loss(s, t, T, mask).item(), rel=1e-5)
    v3, i3 = t.topk(3, dim=-1)
    b, i = 0, 1
    p = torch.softmax(v3[b, i] / T, -1)
    logq = torch.log_softmax(s[b, i] / T, -1)[i3[b, i]]
    one = (T * T * (p * (p.log() - logq)).sum()).item()
    single = torch.zeros_like(mask)
    single[b, i] = True
    assert topk_distillation_kl_loss(s, v3, i3, T, single).item() == pytest.approx(one, rel=1e-5)


def test_cosine_term_is_mean_one_minus_cosine_over_real_tokens():
    _, _, hs, ht, mask, _ = fixed_batch()
    terms = []
    for b in range(hs.shape[0]):
        for i in range(hs.shape[1]):
            if mask[b, i]:
                x, y = hs[b, i].tolist(), ht[b, i].tolist()
                dot = sum(a * c for a, c in zip(x, y))
                terms.append(1 - dot / (math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(c * c for c in y))))
    assert cosine_hidden_loss(hs, ht, mask).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_lm_term_causal_shifts_and_masked_does_not():
    s, _, _, _, mask, labels = fixed_batch()
    terms = []
    for b in range(s.shape[0]):
        for i in range(s.shape[1] - 1):
            if labels[b, i + 1] != -100:
                terms.append(-torch.log_softmax(s[b, i], -1)[labels[b, i + 1]].item())
    assert lm_loss(s, labels, causal=True).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    own = [-torch.log_softmax(s[b, i], -1)[labels[b, i]].item()
           for b in range(s.shape[0]) for i in range(s.shape[1]) if labels[b, i] != -100]
    assert lm_loss(s, labels, causal=False).item() == pytest.approx(sum(own) / len(own), rel=1e-5)


def test_combined_loss_is_the_weighted_sum_and_skips_zero_weights():
    s, t, hs, ht, mask, labels = fixed_batch()
    total, parts = distillation_loss(s, t, labels, mask, causal=True, alpha_ce=5, alpha_lm=2, alpha_cos=1,
                                     temperature=2, student_hidden=hs, teacher_hidden=ht)
    expected = 5 * distillation_kl_loss(s, t, 2, mask) + 2 * lm_loss(s, labels, True) + cosine_hidden_loss(hs, ht, mask)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total, parts = distillation_loss(s, None, labels, mask, causal=True, alpha_ce=0, alpha_lm=1, alpha_cos=0)
    assert set(parts) == {"lm"} and total.item() == pytest.approx(lm_loss(s, labels, True).item(), rel=1e-6)


# ---- DistillationConfig / DistillationTrainer ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(alpha_ce=0, alpha_lm=0, alpha_cos=0), "all 0"), (dict(temperature=0), "temperature"),
     (dict(temperature=-1), "temperature"), (dict(alpha_lm=-1), "alpha_lm"), (dict(mlm_probability=0), "mlm"),
     (dict(block_size=1), "block_size")],
)
def test_config_rejects_bad_arguments(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **kwargs)


def test_config_defaults_are_the_papers(tmp_path):
    args = DistillationConfig(output_dir=str(tmp_path), report_to=[])
    assert (args.alpha_ce, args.alpha_lm, args.alpha_cos, args.temperature, args.learning_rate) == (5, 2, 1, 2, 2.5e-4)
    assert args.remove_unused_columns is False


def test_masked_lm_without_mask_token_is_rejected(tokenizer, tmp_path):
    tok = copy.deepcopy(tokenizer)
    tok.mask_token = None
    teacher = tiny_model("bert", tokenizer)
    with pytest.raises(ValueError, match="mask token"):
        DistillationTrainer(make_student(teacher, [0]), teacher, config(tmp_path), train_dataset=texts(0, 50),
                            processing_class=tok)


def test_mismatched_teacher_and_student_are_rejected(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="both"):
        DistillationTrainer(tiny_model("llama", tokenizer), tiny_model("bert", tokenizer), config(tmp_path),
                            train_dataset=texts(0, 50), processing_class=tokenizer)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_trainer_loss_equals_formula_on_a_fixed_batch(kind, tokenizer, tmp_path):
    teacher = tiny_model(kind, tokenizer, init_range=0.2)
    student = make_student(teacher, [0, 3])
    trainer = DistillationTrainer(student, teacher, config(tmp_path), train_dataset=texts(0, 40),
                                  processing_class=tokenizer)
    torch.manual_seed(0)
    rows = trainer.train_dataset
    batch = trainer.data_collator([rows[i] for i in (0, 1, 2, len(rows) - 1)])  # the last block is short: padding
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel()
    student.eval()  # no dropout: the two paths must see the same function
    loss = trainer.compute_loss(student, dict(batch))
    # Independent path: the models' own forward with output_hidden_states.
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        s_out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    m = mask.bool()
    kl = distillation_kl_loss(s_out.logits, t_out.logits, 2.0, m)
    if kind == "bert":
        lm = F.cross_entropy(s_out.logits.reshape(-1, s_out.logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        assert (labels != -100).any() and (ids == tokenizer.mask_token_id).any()
    else:
        lm = F.cross_entropy(s_out.logits[:, :-1].reshape(-1, s_out.logits.shape[-1]), labels[:, 1:].reshape(-1),
                             ignore_index=-100)
        assert torch.equal(labels[m], ids[m]) and (labels[~m] == -100).all()
    cos = (1 - F.cosine_similarity(s_out.hidden_states[-1][m], t_out.hidden_states[-1][m], dim=-1)).mean()
    assert loss.item() == pytest.approx((5 * kl + 2 * lm + cos).item(), rel=1e-4)


def test_short_run_lowers_heldout_kl_and_freezes_the_teacher(tokenizer, tmp_path):
    teacher = tiny_model("llama", tokenizer, init_range=0.3)
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = make_student(teacher, [0, -1])
    heldout = texts(300, 360)
    before = evaluate_distillation(student, teacher, heldout, tokenizer, block_size=32)
    trainer = DistillationTrainer(student, teacher, config(tmp_path, max_steps=25), train_dataset=texts(0, 200),
                                  processing_class=tokenizer)
    trainer.train()
    after = evaluate_distillation(student, teacher, heldout, tokenizer, block_size=32)
    assert after["kl"] < 0.9 * before["kl"]
    assert all(torch.equal(v, t_before[k]) for k, v in teacher.state_dict().items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    logged = [h for h in trainer.state.log_history if "loss_kl" in h]
    assert logged and {"loss_kl", "loss_lm", "loss_cos"} <= set(logged[0])


def test_masked_lm_run_and_eval(tokenizer, tmp_path):
    teacher = tiny_model("roberta", tokenizer, init_range=0.2)
    student = make_student(teacher, [0])
    trainer = DistillationTrainer(student, teacher, config(tmp_path, max_steps=3), train_dataset=texts(0, 60),
                                  eval_dataset=texts(300, 320), processing_class=tokenizer)
    trainer.train()
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and "eval_loss_kl" in metrics


def test_freeze_embeddings_and_head(tokenizer, tmp_path):
    teacher = tiny_model("qwen2", tokenizer)  # untied: embeddings and head are separate
    student = make_student(teacher, [0, 3])
    emb, head = student.model.embed_tokens.weight.clone(), student.lm_head.weight.clone()
    layer = student.model.layers[0].mlp.up_proj.weight.clone()
    trainer = DistillationTrainer(student, teacher, config(tmp_path, max_steps=2, freeze_embeddings=True),
                                  train_dataset=texts(0, 60), processing_class=tokenizer)
    trainer.train()
    assert torch.equal(student.model.embed_tokens.weight, emb)
    assert not torch.equal(student.lm_head.weight, head)
    assert not torch.equal(student.model.layers[0].mlp.up_proj.weight, layer)
    student = make_student(teacher, [0, 3])
    trainer = DistillationTrainer(student, teacher, config(tmp_path, max_steps=2, freeze_lm_head=True),
                                  train_dataset=texts(0, 60), processing_class=tokenizer)
    trainer.train()
    assert torch.equal(student.lm_head.weight, head) and not torch.equal(student.model.embed_tokens.weight, emb)


def test_checkpoint_resume_matches_an_uninterrupted_run(tokenizer, tmp_path):
    teacher = tiny_model("llama", tokenizer, init_range=0.2)
    data = texts(0, 120)

    def run(out, **kw):
        student = make_student(teacher, [0, 3])
        args = config(tmp_path, output_dir=str(out), max_steps=4, save_strategy="steps", save_steps=2, **kw)
        trainer = DistillationTrainer(student, teacher, args, train_dataset=data, processing_class=tokenizer)
        return trainer, student

    trainer, full = run(tmp_path / "a")
    trainer.train()
    assert os.path.isdir(tmp_path / "a" / "checkpoint-2")
    trainer, resumed = run(tmp_path / "a")
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for (k, v), w in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(v, w, atol=1e-6), k


def test_prepare_dataset_blocks_and_document_boundaries(tokenizer):
    data = Dataset.from_dict({"text": ["the movie", "was great"]})
    blocks = prepare_distillation_dataset(data, tokenizer, block_size=3)
    stream = (tokenizer("the movie", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
              + tokenizer("was great", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    flat = [t for b in blocks["input_ids"] for t in b]
    assert flat == stream[: len(flat)] and all(len(b) == 3 for b in blocks["input_ids"][:-1])
    with pytest.raises(ValueError, match="no text column"):
        prepare_distillation_dataset(data.rename_column("text", "body"), tokenizer, 3)


# ---- teacher cache ------------------------------------------------------------------------------------------------


def test_hidden_cache_is_exact_and_trains_identically(tokenizer, tmp_path):
    teacher = tiny_model("llama", tokenizer, init_range=0.2)
    data = prepare_distillation_dataset(texts(0, 120), tokenizer, 32)
    cache = TeacherCache.build(teacher, data, batch_size=8, disable_progress=True)
    assert cache.kind == "hidden" and len(cache) == len(data)
    results = []
    for c in (None, cache):
        student = make_student(teacher, [0, 3])
        trainer = DistillationTrainer(student, teacher, config(tmp_path, max_steps=3), train_dataset=data,
                                      processing_class=tokenizer, teacher_cache=c)
        trainer.train()
        results.append(student.state_dict())
    for k in results[0]:
        assert torch.allclose(results[0][k], results[1][k], atol=1e-5), k
    # save / load round trip, and a cache refuses a dataset it was not built on
    cache.save(str(tmp_path / "cache"))
    loaded = TeacherCache.load(str(tmp_path / "cache"))
    assert loaded.meta == cache.meta and torch.equal(loaded.tensors["hidden"], cache.tensors["hidden"])
    other = prepare_distillation_dataset(texts(0, 100), tokenizer, 32)
    with pytest.raises(ValueError, match="not built on"):
        DistillationTrainer(make_student(teacher, [0]), teacher, config(tmp_path), train_dataset=other,
                            processing_class=tokenizer, teacher_cache=loaded)
    with pytest.raises(ValueError, match="causal"):
        TeacherCache.build(tiny_model("bert", tokenizer), data)


def test_topk_cache_error_shrinks_with_k_and_costs_more_bytes_per_token_than_hidden_only_for_large_k(tokenizer):
    """Exactness vs size of the two cache kinds on a tiny model (speed is measured in benchmarks/distill.py)."""
    teacher = tiny_model("llama", tokenizer, init_range=0.3)
    student = make_student(teacher, [0, 3])
    data = prepare_distillation_dataset(texts(300, 360), tokenizer, 32)
    rows = data["input_ids"]
    ids, mask = pad_right(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        _, s_logits = hidden_and_logits(student, ids, mask)
    hidden_cache = TeacherCache.build(teacher, data, disable_progress=True)
    with torch.no_grad():
        exact = distillation_kl_loss(s_logits, apply_head(teacher, hidden_cache.tensors["hidden"]), 2.0, mask.bool())
        _, t_logits = hidden_and_logits(teacher, ids, mask)
    assert exact.item() == pytest.approx(distillation_kl_loss(s_logits, t_logits, 2.0, mask.bool()).item(), rel=1e-5)
    errors = []
    for k in (4, 32, len(tokenizer)):
        c = TeacherCache.build(teacher, data, kind="topk", top_k=k, store_hidden=False, disable_progress=True)
        approx = topk_distillation_kl_loss(s_logits, c.tensors["topk_values"], c.tensors["topk_indices"], 2.0,
                                           mask.bool())
        errors.append(abs(approx.item() - exact.item()) / exact.item())
        assert c.nbytes == len(rows) * ids.shape[1] * k * 8  # float32 value + int32 index per kept logit
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5
    assert errors[0] > 0.01  # k=4 is visibly approximate on this flat-tailed teacher
    assert hidden_cache.nbytes == len(rows) * ids.shape[1] * teacher.config.hidden_size * 4


def test_with_task_template_wraps_exactly_the_requested_share():
    from datasets import Dataset

    from peft_post.distill import with_task_template

    data = Dataset.from_dict({"text": [f"text {i}" for i in range(20)]})
    out = with_task_template(data, "Review: {text}\nSentiment:", 0.25, seed=3)
    wrapped = [t for t in out["text"] if t.startswith("Review: ")]
    assert len(out) == 20 and len(wrapped) == 5
    assert all(t.endswith("\nSentiment:") for t in wrapped)
    assert {t.removeprefix("Review: ").removesuffix("\nSentiment:") for t in out["text"]} == set(data["text"])
    assert out["text"] == with_task_template(data, "Review: {text}\nSentiment:", 0.25, seed=3)["text"]
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            with_task_template(data, "Review: {text}", bad)
    with pytest.raises(ValueError, match="mask"):
        with_task_template(data, "{text} It was {mask}.", 0.5)


# ---- the label-slot term ------------------------------------------------------------------------------------------


def test_label_slot_term_is_the_kl_averaged_over_the_slots_only():
    s, t, hs, ht, mask, labels = fixed_batch()
    slots = torch.zeros_like(mask)
    slots[0, 2] = slots[1, 1] = True
    slots[1, 4] = True  # a padding position: never counted
    total, parts = distillation_loss(s, t, labels, mask, causal=True, alpha_ce=5, alpha_lm=2, alpha_cos=0,
                                     temperature=2, alpha_label_slot=3, label_slot_mask=slots)
    rows = torch.stack([s[0, 2], s[1, 1]])[:, None], torch.stack([t[0, 2], t[1, 1]])[:, None]
    slot_kl = distillation_kl_loss(*rows, 2.0)
    assert parts["label_slot"].item() == pytest.approx(slot_kl.item(), rel=1e-6)
    expected = 5 * distillation_kl_loss(s, t, 2, mask) + 2 * lm_loss(s, labels, True) + 3 * slot_kl
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    # A batch without a label slot adds exactly 0; a missing mask is an error, not a silent 0.
    _, parts = distillation_loss(s, t, labels, mask, causal=True, alpha_ce=5, alpha_lm=0, alpha_cos=0,
                                 alpha_label_slot=3, label_slot_mask=torch.zeros_like(mask))
    assert parts["label_slot"].item() == 0.0
    with pytest.raises(ValueError, match="label_slot_mask"):
        distillation_loss(s, t, labels, mask, causal=True, alpha_ce=0, alpha_lm=0, alpha_cos=0, alpha_label_slot=1)


def test_prepared_blocks_mark_the_last_token_of_each_templated_text(tokenizer):
    from peft_post.distill import with_task_template

    data = Dataset.from_dict({"text": [f"plain text number {i}" for i in range(6)]})
    templated = with_task_template(data, "Review: {text}\nSentiment:", 0.5, seed=1)
    blocks = prepare_distillation_dataset(templated, tokenizer, block_size=7)
    ids = [t for b in blocks["input_ids"] for t in b]
    slots = [m for b in blocks["label_slot"] for m in b]
    assert [len(b) for b in blocks["label_slot"]] == [len(b) for b in blocks["input_ids"]]
    # Brute force: walk the texts, the slot is the last token before each templated text's EOS.
    expected, stream = [], []
    for text, flagged in zip(templated["text"], templated["label_slot"]):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        stream += piece + [tokenizer.eos_token_id]
        expected += [0] * (len(piece) - 1) + [int(flagged)] + [0]
    assert ids == stream[: len(ids)] and slots == expected[: len(slots)]
    assert sum(slots) == 3 == sum(t.endswith("Sentiment:") for t in templated["text"])
    # Without the flag column nothing is marked (and no column is added).
    assert "label_slot" not in prepare_distillation_dataset(data, tokenizer, 7).column_names


def test_collator_drops_the_lm_label_after_a_label_slot_and_trainer_needs_slots(tokenizer, tmp_path):
    from peft_post.distill import DistillationCollator, with_task_template

    data = with_task_template(texts(0, 40), "Review: {text}\nSentiment:", 0.5, seed=0)
    blocks = prepare_distillation_dataset(data, tokenizer, block_size=32)
    rows = [blocks[i] for i in range(4)]
    batch = DistillationCollator(tokenizer, masked_lm=False)(rows)
    slots, labels, ids = batch["label_slot"], batch["labels"], batch["input_ids"]
    assert slots.dtype == torch.bool and slots.any()
    after = torch.zeros_like(slots)
    after[:, 1:] = slots[:, :-1]
    assert (labels[after] == -100).all()
    real = batch["attention_mask"].bool() & ~after
    assert torch.equal(labels[real], ids[real])
    teacher = tiny_model("llama", tokenizer)
    with pytest.raises(ValueError, match="alpha_label_slot"):
        DistillationTrainer(make_student(teacher, [0]), teacher, config(tmp_path, alpha_label_slot=1.0),
                            train_dataset=texts(0, 40), processing_class=tokenizer)
    with pytest.raises(ValueError, match="alpha_label_slot"):
        config(tmp_path, alpha_label_slot=-1.0)


def test_trainer_label_slot_loss_equals_formula(tokenizer, tmp_path):
    from peft_post.distill import with_task_template

    teacher = tiny_model("llama", tokenizer, init_range=0.2)
    student = make_student(teacher, [0, 3])
    data = with_task_template(texts(0, 40), "Review: {text}\nSentiment:", 0.5, seed=0)
    trainer = DistillationTrainer(student, teacher, config(tmp_path, alpha_label_slot=4.0, alpha_cos=0),
                                  train_dataset=data, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    student.eval()
    loss = trainer.compute_loss(student, dict(batch))
    ids, mask, labels, slots = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["label_slot"]
    with torch.no_grad():
        s_logits = student(input_ids=ids, attention_mask=mask).logits
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits
    kl = distillation_kl_loss(s_logits, t_logits, 2.0, mask.bool())
    slot_kl = distillation_kl_loss(s_logits[slots][:, None], t_logits[slots][:, None], 2.0)
    lm = lm_loss(s_logits, labels, True)
    assert loss.item() == pytest.approx((5 * kl + 2 * lm + 4 * slot_kl).item(), rel=1e-4)


def test_a_teacher_spread_over_devices_is_never_moved_whole(load_tiny):
    from peft_post.distill import place_teacher

    teacher = load_tiny("llama")
    # `to(meta)` stands for the move to the training device: visible on CPU-only machines too.
    assert all(p.device.type == "meta" for p in place_teacher(teacher, torch.device("meta")).parameters())
    spread = load_tiny("llama")
    spread.hf_device_map = {"model.embed_tokens": 0, "model.layers": 1, "lm_head": 1}
    assert place_teacher(spread, torch.device("meta")) is spread
    assert all(p.device.type == "cpu" for p in spread.parameters())
    one = load_tiny("llama")
    one.hf_device_map = {"": "cpu"}  # one device: moved like a plain model
    assert all(p.device.type == "meta" for p in place_teacher(one, torch.device("meta")).parameters())


def test_a_top_k_cache_distils_without_the_teacher_in_memory(tokenizer, tmp_path):
    """The path for a teacher too large for the training processes: build a top-k cache once (the teacher may be
    spread by a device_map there), then distil from the cache with the teacher only on the meta device: it is never
    moved, and its weights are never read. The student equals one distilled from the same cache with the real teacher."""
    from accelerate import init_empty_weights

    teacher = tiny_model("llama", tokenizer, init_range=0.3)
    data = prepare_distillation_dataset(texts(0, 40), tokenizer, 16)
    cache = TeacherCache.build(teacher, data, kind="topk", top_k=8, store_hidden=False, disable_progress=True)
    with init_empty_weights():
        shell = tf.AutoModelForCausalLM.from_config(teacher.config)
    assert all(p.device.type == "meta" for p in shell.parameters())
    start = make_student(teacher, [0, 3])
    results = []
    for frozen in (teacher, shell):
        student = copy.deepcopy(start)
        args = DistillationConfig(str(tmp_path), max_steps=3, learning_rate=0.5, optim="sgd", per_device_train_batch_size=4,
                                  block_size=16, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                                  seed=0, alpha_cos=0.0)
        trainer = DistillationTrainer(student, frozen, args, train_dataset=data, processing_class=tokenizer,
                                      teacher_cache=cache)
        trainer.train()
        results.append({k: v.detach().clone() for k, v in student.named_parameters()})
    assert all(p.device.type == "meta" for p in shell.parameters())
    moved = max((results[0][k] - v).abs().max() for k, v in start.named_parameters())
    assert moved > 1e-3
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=0, atol=0, msg=name)


def test_a_teacher_without_weights_needs_a_top_k_cache(tokenizer, tmp_path):
    from accelerate import init_empty_weights

    teacher = tiny_model("llama", tokenizer)
    data = prepare_distillation_dataset(texts(0, 20), tokenizer, 16)
    with init_empty_weights():
        shell = tf.AutoModelForCausalLM.from_config(teacher.config)
    args = DistillationConfig(str(tmp_path), max_steps=1, use_cpu=True, report_to=[], save_strategy="no")
    hidden = TeacherCache.build(teacher, data, disable_progress=True)
    for cache in (None, hidden):
        with pytest.raises(ValueError, match="meta device.*`teacher_cache` must be a top-k TeacherCache"):
            DistillationTrainer(make_student(teacher, [0, 3]), shell, args, train_dataset=data,
                                processing_class=tokenizer, teacher_cache=cache)
