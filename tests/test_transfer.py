import copy
import warnings

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, PromptTuningConfig, get_peft_model

from peft_post import POSTConfig, TransferConfig, TransferTrainer, direct_transfer, suggest_alpha, transfer_loss
from peft_post.losses import temperature_kl
from peft_post.modeling import label_logits, prompt_parameter
from peft_post.prompts import get_prompt, prompt_from_text
from peft_post.tasks import dataset_fingerprint
from peft_post.testing import build_tiny_model, sharpen_model, tiny_sentiment_dataset
from peft_post.transfer import select_support

INIT_TEXT = "predict if sentiment of this review"
LEDGER = {"epsilon": 8.0, "delta": 1e-5, "accountant": "prv", "noise_multiplier": 1.1, "max_grad_norm": 1.0,
          "sample_rate": 0.05, "steps": 300}


def _task(kind="llama", **kw):
    if kind in ("roberta", "bert"):
        kw.setdefault("template", "{text} It was {mask}.")
        kw.setdefault("task_type", "FEATURE_EXTRACTION")
    return POSTConfig(num_virtual_tokens=4, label_words=[["bad", "awful"], ["good", "great"]], **kw)


def _source(load_tiny, tokenizer, kind="llama", privacy=None, seed=0):
    cfg = _task(kind, prompt_tuning_init="TEXT", prompt_tuning_init_text=INIT_TEXT,
                tokenizer_name_or_path=tokenizer.name_or_path, privacy=privacy,
                provenance={"stage": "prompt_tuning", "seed": seed})
    source = get_peft_model(sharpen_model(load_tiny(kind)), cfg)
    torch.manual_seed(seed)
    with torch.no_grad():  # a "tuned" p_s: clearly different from any init
        prompt_parameter(source).add_(torch.randn_like(prompt_parameter(source)) * 3.0)
    return source


def _big_target(tokenizer, tmp_path, kind="llama", hidden_size=48, num_layers=3):
    model = build_tiny_model(kind, tokenizer, str(tmp_path / f"target-{kind}-{hidden_size}"), seed=1,
                             num_layers=num_layers, hidden_size=hidden_size)
    return sharpen_model(model)


def _args(tmp_path, **kw):
    kw.setdefault("alpha", 0.5)
    kw.setdefault("max_steps", 5)
    kw.setdefault("per_device_train_batch_size", 4)
    kw.setdefault("learning_rate", 5e-2)
    kw.setdefault("logging_steps", 1000)
    kw.setdefault("disable_tqdm", True)
    return TransferConfig(output_dir=str(tmp_path / "out"), **kw)


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _public_loss(trainer):
    """Mean transfer loss over the whole public set, from scratch (no cache), in eval mode."""
    loader = torch.utils.data.DataLoader(trainer.train_dataset, batch_size=64, collate_fn=trainer.data_collator)
    batch = next(iter(loader))
    cached = trainer.args.cache_source_outputs
    trainer.args.cache_source_outputs = False
    try:
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, batch).item()
    finally:
        trainer.args.cache_source_outputs = cached


def test_transfer_lowers_the_loss_and_changes_only_the_target_prompt(load_tiny, tokenizer, tmp_path):
    source = _source(load_tiny, tokenizer)
    target = get_peft_model(_big_target(tokenizer, tmp_path), _task())  # hidden 48 vs the source's 32
    before = {"source": _snapshot(source), "target_base": _snapshot(target.get_base_model())}
    trainer = TransferTrainer(target, source, _args(tmp_path, max_steps=30, learning_rate=0.1),
                              public_dataset=tiny_sentiment_dataset(16), processing_class=tokenizer)
    p_t0 = get_prompt(target)
    loss0 = _public_loss(trainer)
    trainer.train()
    loss1 = _public_loss(trainer)
    assert loss0 > 0.5, "the test models must disagree for the test to mean anything"
    assert loss1 < 0.6 * loss0
    assert not torch.equal(get_prompt(target), p_t0)
    for name, module in (("source", source), ("target_base", target.get_base_model())):
        after = _snapshot(module)
        assert after.keys() == before[name].keys()
        for key in after:
            assert torch.equal(after[key], before[name][key]), f"{name}.{key} changed during transfer"
    assert trainer.state.global_step == 30


@pytest.mark.parametrize("kind", ["gpt2", "roberta"])  # gpt2 has dropout 0.1; roberta is a masked LM
@pytest.mark.parametrize("top_k", [None, 3])
def test_cached_and_uncached_give_the_same_loss_and_gradient_at_step_0(kind, top_k, load_tiny, tokenizer, tmp_path):
    source = _source(load_tiny, tokenizer, kind)
    target = get_peft_model(sharpen_model(load_tiny(kind)), _task(kind))
    args = _args(tmp_path, cache_top_k=top_k, cache_batch_size=5, seed=3)
    trainer = TransferTrainer(target, source, args, public_dataset=tiny_sentiment_dataset(12), processing_class=tokenizer)
    trainer.build_cache()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in (7, 2, 11, 0)])
    results = []
    for cache in (True, False):
        trainer.args.cache_source_outputs = cache
        target.train()  # as Trainer.training_step leaves it
        prompt_parameter(target).grad = None
        loss = trainer.compute_loss(target, batch)
        loss.backward()
        results.append((loss.detach(), prompt_parameter(target).grad.clone()))
    (loss_c, grad_c), (loss_u, grad_u) = results
    assert loss_c.item() > 1e-3
    torch.testing.assert_close(loss_c, loss_u, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_c, grad_u, rtol=1e-5, atol=1e-8)
    assert grad_c.abs().sum() > 0


def test_full_vocabulary_cache_holds_the_exact_frozen_logits(load_tiny, tokenizer, tmp_path):
    source = _source(load_tiny, tokenizer)
    target = get_peft_model(_big_target(tokenizer, tmp_path), _task())
    data = tiny_sentiment_dataset(6)
    trainer = TransferTrainer(target, source, _args(tmp_path, cache_batch_size=4), public_dataset=data,
                              processing_class=tokenizer)
    cache = trainer.build_cache()
    assert cache.support is None and cache.source_logits.shape == (6, len(tokenizer))
    for i in range(6):
        b = trainer.data_collator([trainer.train_dataset[i]])
        with torch.no_grad():
            a_s = label_logits(source, b["input_ids"], b["attention_mask"], b["label_positions"])
            b_s = label_logits(source, b["input_ids"], b["attention_mask"], b["label_positions"], prompt=None)
            b_t = label_logits(target, b["input_ids"], b["attention_mask"], b["label_positions"], prompt=None)
        torch.testing.assert_close(cache.source_logits[i], a_s[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.source_base_logits[i], b_s[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.target_base_logits[i], b_t[0], rtol=1e-5, atol=1e-5)


def test_select_support_and_restricted_kl():
    g = torch.Generator().manual_seed(0)
    a_s, b_s, a_t, b_t = (torch.randn(3, 50, generator=g) * 4 for _ in range(4))
    labels = [7, 11, 49]
    support = select_support(a_s, b_s, labels, top_k=4)
    assert support.shape == (3, 2 * 4 + 3)
    for r in range(3):
        kept = set(support[r].tolist())
        assert len(kept) == 11 and support[r].tolist() == sorted(kept)
        assert set(labels) <= kept
        assert set(a_s[r].topk(4).indices.tolist()) <= kept
        assert set((a_s[r] - b_s[r]).topk(4).indices.tolist()) <= kept
        # Filled with the next-best a_s tokens: every token left out ranks below every filler.
        rest = [t for t in range(50) if t not in kept]
        extra = kept - set(labels) - set(a_s[r].topk(4).indices.tolist()) - set((a_s[r] - b_s[r]).topk(4).indices.tolist())
        if extra:
            assert min(a_s[r, list(extra)]) >= max(a_s[r, rest])
    # Restricted KL = KL of the two distributions renormalised over the kept set, by brute force.
    T, alpha = 2.0, 0.3
    got = transfer_loss(*(x.gather(1, support) for x in (a_t, b_t, a_s, b_s)), alpha=alpha, temperature=T)
    expected = 0.0
    for r in range(3):
        idx = support[r]
        p1, q1 = torch.softmax(a_s[r, idx] / T, -1), torch.softmax(a_t[r, idx] / T, -1)
        p2 = torch.softmax((a_s[r, idx] - b_s[r, idx]) / T, -1)
        q2 = torch.softmax((a_t[r, idx] - b_t[r, idx]) / T, -1)
        expected += T * T * ((1 - alpha) * (p1 * (p1 / q1).log()).sum() + alpha * (p2 * (p2 / q2).log()).sum())
    torch.testing.assert_close(got, expected / 3)
    # A support as large as the vocabulary is the whole vocabulary: the exact full loss.
    full = select_support(a_s, b_s, labels, top_k=25)
    assert torch.equal(full, torch.arange(50).expand(3, 50))
    torch.testing.assert_close(transfer_loss(*(x.gather(1, full) for x in (a_t, b_t, a_s, b_s)), alpha=alpha),
                               transfer_loss(a_t, b_t, a_s, b_s, alpha=alpha))
    assert temperature_kl(a_t, a_s).item() > 0


def test_saved_adapter_loads_in_plain_peft_with_provenance_and_ledger(load_tiny, tokenizer, tmp_path):
    source = _source(load_tiny, tokenizer, privacy=LEDGER)
    target = get_peft_model(_big_target(tokenizer, tmp_path), _task())
    public, held_out = tiny_sentiment_dataset(12, seed=0), tiny_sentiment_dataset(6, seed=5)
    args = _args(tmp_path, max_steps=3, seed=7, public_dataset_name="tiny-public", alpha=0.25, temperature=1.5)
    trainer = TransferTrainer(target, source, args, public_dataset=public, public_eval_dataset=held_out,
                              processing_class=tokenizer)
    trainer.train()
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["eval_num_examples"] == 6
    assert 0.0 <= metrics["eval_macro_f1"] <= 1.0
    out = tmp_path / "adapter"
    trainer.save_model(str(out))

    fresh = _big_target(tokenizer, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loaded = PeftModel.from_pretrained(fresh, str(out))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        want = label_logits(target, batch["input_ids"], batch["attention_mask"], batch["label_positions"])
        got = label_logits(loaded, batch["input_ids"], batch["attention_mask"], batch["label_positions"])
        got_plain = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want)
    assert got_plain.shape[1] == batch["input_ids"].shape[1] + 4  # PEFT's own forward prepends the prompt

    cfg = POSTConfig.from_pretrained(str(out))
    assert cfg.privacy == LEDGER
    assert cfg.transfer_alpha == 0.25 and cfg.transfer_temperature == 1.5
    assert cfg.source_model_name_or_path == source.get_base_model().name_or_path
    prov = cfg.provenance
    assert prov["stage"] == "transfer" and prov["steps"] == 3 and prov["seed"] == 7
    assert prov["alpha"] == 0.25 and prov["temperature"] == 1.5
    assert prov["public_dataset"] == {"name": "tiny-public", "size": 12, "sha256": dataset_fingerprint(public, "text"),
                                      "text_column": "text"}
    assert prov["public_eval_dataset"]["sha256"] == dataset_fingerprint(held_out, "text")
    assert prov["source_provenance"] == {"stage": "prompt_tuning", "seed": 0}
    assert prov["init"] == "source_init_text"
    assert source.active_peft_config.privacy == LEDGER  # copied, not moved


def test_prompt_initialisation(load_tiny, tokenizer, tmp_path):
    source = _source(load_tiny, tokenizer)
    target = get_peft_model(_big_target(tokenizer, tmp_path), _task())
    TransferTrainer(target, source, _args(tmp_path), public_dataset=tiny_sentiment_dataset(4), processing_class=tokenizer)
    torch.testing.assert_close(get_prompt(target), prompt_from_text(target, tokenizer, INIT_TEXT, 4))

    same = get_peft_model(sharpen_model(load_tiny("llama")), _task())
    TransferTrainer(same, source, _args(tmp_path, init_from_source=True), public_dataset=tiny_sentiment_dataset(4),
                    processing_class=tokenizer)
    assert torch.equal(get_prompt(same), get_prompt(source))

    kept = get_peft_model(sharpen_model(load_tiny("llama")), _task())
    p0 = get_prompt(kept)
    TransferTrainer(kept, source, _args(tmp_path, init_from_source_text=False), public_dataset=tiny_sentiment_dataset(4),
                    processing_class=tokenizer)
    assert torch.equal(get_prompt(kept), p0)


def test_every_check_raises_a_clear_error_before_any_work(load_tiny, tokenizer, tmp_path):
    source = _source(load_tiny, tokenizer)
    public = tiny_sentiment_dataset(4)

    def make(target=None, src=None, data=public, args=None, **kw):
        target = target if target is not None else get_peft_model(_big_target(tokenizer, tmp_path), _task())
        return TransferTrainer(target, src if src is not None else source, args or _args(tmp_path), public_dataset=data,
                               processing_class=kw.pop("processing_class", tokenizer), **kw)

    with pytest.raises(ValueError, match="empty"):
        make(data=Dataset.from_dict({"text": []}))
    with pytest.raises(ValueError, match="no text column"):
        make(data=Dataset.from_dict({"sentence": ["a good film"]}))
    with pytest.raises(ValueError, match="empty or non-string"):
        make(data=Dataset.from_dict({"text": ["fine", "  "]}))
    bigger_vocab = _big_target(tokenizer, tmp_path)
    bigger_vocab.resize_token_embeddings(len(tokenizer) + 8)
    with pytest.raises(ValueError, match="vocabularies differ"):
        make(target=get_peft_model(bigger_vocab, _task()))
    other_tok = copy.deepcopy(tokenizer)
    other_tok.add_tokens(["zzqx"])
    with pytest.raises(ValueError, match="tokenizers differ in size"):
        make(source_tokenizer=other_tok)
    # Multi-token label words transfer (the loss reads the label slot), with a warning when two classes share the
    # first token the slot's distribution can see.
    shared = POSTConfig(num_virtual_tokens=4, label_words=[["very bad"], ["very good"]])
    with pytest.warns(UserWarning, match="begin with the same token"):
        make(target=get_peft_model(_big_target(tokenizer, tmp_path), shared),
             src=get_peft_model(load_tiny("llama"), shared))
    with pytest.raises(ValueError, match="different tasks"):
        make(target=get_peft_model(_big_target(tokenizer, tmp_path), _task(template="{text} It was")))
    with pytest.raises(ValueError, match="POSTConfig"):
        make(target=get_peft_model(_big_target(tokenizer, tmp_path), PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                          num_virtual_tokens=4)))
    with pytest.raises(ValueError, match="prompt-tuning PeftModel"):
        make(src=load_tiny("llama"))
    with pytest.raises(ValueError, match="init_from_source"):
        make(args=_args(tmp_path, init_from_source=True))  # hidden 32 vs 48
    masked_task = _task("roberta")
    with pytest.raises(ValueError, match="both be causal or both masked"):
        make(target=get_peft_model(load_tiny("roberta"), masked_task), src=get_peft_model(load_tiny("llama"), masked_task))
    with pytest.raises(ValueError, match="processing_class"):
        make(processing_class=None)
    trainer = make()
    with pytest.raises(ValueError, match="public held-out split"):
        trainer.evaluate(eval_dataset=tiny_sentiment_dataset(4))
    with pytest.raises(ValueError, match="No `public_eval_dataset`"):
        trainer.evaluate()
    assert trainer.cache is None, "checks must not run any forward pass"


@pytest.mark.parametrize(
    "kwargs, match",
    [({"alpha": None}, "suggest_alpha"), ({"alpha": 1.2}, "alpha"), ({"temperature": 0}, "temperature"),
     ({"cache_top_k": 0}, "cache_top_k"), ({"max_steps": -1}, "fixed number of steps"),
     ({"remove_unused_columns": True}, "remove_unused_columns"), ({"cache_batch_size": 0}, "cache_batch_size")],
)
def test_transfer_config_validation(kwargs, match, tmp_path):
    kwargs = {"alpha": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        TransferConfig(output_dir=str(tmp_path), **kwargs)


def test_direct_transfer(load_tiny, tokenizer, tmp_path):
    source = _source(load_tiny, tokenizer, privacy=LEDGER)
    target = direct_transfer(source, sharpen_model(load_tiny("qwen2")))  # same hidden size, another architecture
    assert isinstance(target, PeftModel)
    assert torch.equal(get_prompt(target), get_prompt(source))
    cfg = target.active_peft_config
    assert cfg.privacy == LEDGER and cfg.provenance["stage"] == "direct_transfer"
    assert cfg.template == source.active_peft_config.template
    existing = get_peft_model(sharpen_model(load_tiny("llama")), _task())
    assert direct_transfer(source, existing) is existing and torch.equal(get_prompt(existing), get_prompt(source))
    with pytest.raises(ValueError, match="hidden size"):
        direct_transfer(source, _big_target(tokenizer, tmp_path))
    with pytest.raises(ValueError, match="does not fit"):
        direct_transfer(source, get_peft_model(load_tiny("llama"), POSTConfig(num_virtual_tokens=6)))
    with pytest.raises(ValueError, match="prompt-tuning PeftModel"):
        direct_transfer(load_tiny("llama"), load_tiny("llama"))


def test_suggest_alpha():
    # Paper, Llama2-7b SST-2: ZS 78.67, small prompted 78.78, binary.
    assert suggest_alpha(0.7867, 0.7878, 2) == pytest.approx((0.7867 - 0.5) / (0.7878 - 0.5))
    assert suggest_alpha(0.9, 0.8, 2) == 1.0
    assert suggest_alpha(0.4, 0.8, 2) == 0.0
    assert suggest_alpha(0.5, 0.8, 4) == pytest.approx((0.5 - 0.25) / (0.8 - 0.25))
    with pytest.warns(UserWarning, match="random guessing"):
        assert suggest_alpha(0.7, 0.5, 2) == 1.0
    with pytest.raises(ValueError, match="fraction"):
        suggest_alpha(78.67, 78.78, 2)
    with pytest.raises(ValueError, match="num_classes"):
        suggest_alpha(0.7, 0.8, 1)


def test_gradient_accumulation_matches_one_big_batch(load_tiny, tokenizer, tmp_path):
    prompts = []
    for bs, ga in ((4, 1), (2, 2)):
        source = _source(load_tiny, tokenizer)
        target = get_peft_model(sharpen_model(load_tiny("llama")), _task())
        args = _args(tmp_path, max_steps=1, per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                     learning_rate=1e-2, optim="sgd", seed=0)
        TransferTrainer(target, source, args, public_dataset=tiny_sentiment_dataset(4), processing_class=tokenizer).train()
        prompts.append(get_prompt(target))
    torch.testing.assert_close(prompts[0], prompts[1], rtol=1e-4, atol=1e-6)
