"""DP prompt tuning: exact per-example gradients, clipping, noise, Poisson sampling, accounting, ledger, resume."""

import functools
import json
import math
import os
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_post import POSTConfig
from peft_post.config import validate_privacy_ledger
from peft_post.losses import verbalizer_loss
from peft_post.modeling import label_logits, prompt_parameter
from peft_post.tasks import TaskTemplate, Verbalizer, VerbalizerCollator
from peft_post.testing import tiny_sentiment_dataset, tiny_sentiment_rows
from peft_post.tuning import DPConfig, DPPromptTrainer, PromptTrainingConfig
from peft_post.tuning import privacy
from peft_post.tuning.accountant import ADD_OR_REMOVE_ONE, history_epsilon
from peft_post.tuning.pld_accountant import PLDAccountant
from peft_post.scoring import classification_losses

CAUSAL = dict(task_type="CAUSAL_LM", template="{text} It was", label_words=[["bad"], ["good"]])
MASKED = dict(task_type="FEATURE_EXTRACTION", template="{text} It was {mask}.", label_words=[["bad"], ["good"]])


def losses_of(verbalizer):
    return functools.partial(classification_losses, verbalizer=verbalizer)


def post_config(kind, n=3):
    return POSTConfig(num_virtual_tokens=n, **(MASKED if kind in ("roberta", "bert") else CAUSAL))


def peft_model(load_tiny, kind, n=3, seed=0):
    torch.manual_seed(seed)
    return get_peft_model(load_tiny(kind), post_config(kind, n))


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                save_strategy="no", disable_tqdm=True, seed=0)
    base.update(kw)
    return PromptTrainingConfig(**base)


def dp_trainer(model, tokenizer, tmp_path, dp=None, data=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DPPromptTrainer(
            model, args(tmp_path, **kw), dp or DPConfig(noise_multiplier=1.0), train_dataset=data or tiny_sentiment_dataset(16),
            processing_class=tokenizer,
        )


def batch_of(tokenizer, config, rows, padding_side="right"):
    collator = VerbalizerCollator(TaskTemplate.from_config(config, tokenizer), padding_side=padding_side)
    return collator(rows)


def brute_force_grads(model, verbalizer, batch):
    """One backward per example, each on its own unpadded row: the definition of a per-example gradient."""
    prompt = prompt_parameter(model)
    grads = []
    for i in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][i].bool()
        ids = batch["input_ids"][i][real].unsqueeze(0)
        first = int(real.long().argmax())
        pos = (batch["label_positions"][i] - first).view(1)
        logits = label_logits(model, ids, torch.ones_like(ids), pos, prompt=prompt)
        loss = verbalizer_loss(logits, batch["labels"][i : i + 1], verbalizer.index, verbalizer.weight)
        (g,) = torch.autograd.grad(loss, prompt)
        grads.append(g)
    return torch.stack(grads)


@pytest.mark.parametrize(
    "kind,padding_side", [("gpt2", "right"), ("gpt2", "left"), ("llama", "left"), ("qwen2", "right"),
                          ("roberta", "right"), ("bert", "right")]
)
def test_per_example_gradients_equal_brute_force(load_tiny, tokenizer, kind, padding_side):
    model = peft_model(load_tiny, kind).eval()
    config = model.peft_config["default"]
    verbalizer = Verbalizer.from_config(config, tokenizer)
    rows = tiny_sentiment_rows(6, seed=3)
    batch = batch_of(tokenizer, config, rows, padding_side)
    lengths = batch["attention_mask"].sum(-1)
    assert lengths.min() < lengths.max(), "the batch must mix lengths so that padding is exercised"
    grads, losses = privacy.per_example_gradients(model, batch, prompt_parameter(model), losses_of(verbalizer))
    expected = brute_force_grads(model, verbalizer, batch)
    assert grads.shape == (6, 3, model.config.hidden_size if hasattr(model.config, "hidden_size") else 32)
    torch.testing.assert_close(grads, expected, atol=1e-5, rtol=1e-5)
    assert prompt_parameter(model).grad is None, "per-example gradients must not touch the parameter's .grad"
    # Examples really differ: a batch-summed gradient copied to every row would fail here.
    assert (grads[0] - grads[1]).abs().max() > 1e-4


def test_clipping_formula_and_bound():
    torch.manual_seed(0)
    grads = torch.randn(5, 3, 4) * torch.tensor([0.1, 1.0, 3.0, 10.0, 0.0]).view(5, 1, 1)
    norms = privacy.per_example_norms(grads)
    torch.testing.assert_close(norms, torch.stack([g.flatten().norm() for g in grads]))
    factors = privacy.clip_factors(norms, 1.0)
    torch.testing.assert_close(factors, torch.clamp(1.0 / (norms + 1e-6), max=1.0))
    clipped = grads * factors.view(5, 1, 1)
    assert (privacy.per_example_norms(clipped) <= 1.0 + 1e-6).all()
    torch.testing.assert_close(privacy.clipped_sum(grads, 1.0), clipped.sum(0))
    # Gradients inside the ball are untouched.
    torch.testing.assert_close(clipped[0], grads[0])


@pytest.mark.parametrize("kind,physical", [("gpt2", None), ("bert", None), ("llama", 3)])
def test_noiseless_step_is_mean_of_clipped_brute_force_gradients(load_tiny, tokenizer, tmp_path, kind, physical):
    model = peft_model(load_tiny, kind)
    config = model.peft_config["default"]
    data = tiny_sentiment_dataset(8, seed=1)
    verbalizer = Verbalizer.from_config(config, tokenizer)
    g = brute_force_grads(model.eval(), verbalizer, batch_of(tokenizer, config, list(data)))
    norms = g.flatten(1).norm(dim=1)
    clip = float(norms.median())  # half the examples are clipped, half are not
    assert (norms > clip).any() and (norms < clip).any()
    expected_grad = (g * torch.clamp(clip / (norms + 1e-6), max=1.0).view(-1, 1, 1)).sum(0) / 8
    # Expected batch = N gives q = 1: every example is in the one Poisson batch, so the step is known exactly.
    trainer = dp_trainer(
        model, tokenizer, tmp_path, DPConfig(noise_multiplier=0.0, max_grad_norm=clip, max_physical_batch_size=physical),
        data=data, max_steps=1, per_device_train_batch_size=8, optim="sgd", learning_rate=1.0,
        lr_scheduler_type="constant",
    )
    before = prompt_parameter(model).detach().clone()
    trainer.train()
    after = prompt_parameter(model).detach()
    torch.testing.assert_close(before - after, expected_grad, atol=1e-6, rtol=1e-5)
    assert trainer.privacy_report()["epsilon"] == math.inf


def test_noise_has_std_sigma_c_over_expected_batch():
    gen = torch.Generator().manual_seed(1234)
    summed = torch.zeros(400, 500)
    out = privacy.privatize(summed, noise_multiplier=2.0, max_grad_norm=0.5, expected_batch_size=4.0,
                            generator=lambda: gen)
    std = 2.0 * 0.5 / 4.0
    n = out.numel()
    # Sample mean and std of 200k Gaussians: 4 standard errors is far outside chance at a fixed seed.
    assert abs(float(out.mean())) < 4 * std / math.sqrt(n)
    assert abs(float(out.std()) - std) < 4 * std / math.sqrt(2 * n)
    # The noise is added to the clipped sum before dividing.
    gen = torch.Generator().manual_seed(1234)
    shifted = privacy.privatize(summed + 8.0, 2.0, 0.5, 4.0, generator=lambda: gen)
    torch.testing.assert_close(shifted, out + 2.0)


def test_empty_poisson_batch_releases_pure_noise(load_tiny, tokenizer, tmp_path):
    model = peft_model(load_tiny, "gpt2")
    trainer = dp_trainer(model, tokenizer, tmp_path, DPConfig(noise_multiplier=3.0, max_grad_norm=2.0))
    empty = privacy.EmptyBatchCollator(trainer.data_collator)([])
    assert empty["input_ids"].shape == (0, 1) and empty["labels"].shape == (0,)
    torch.manual_seed(0)
    samples = []
    for _ in range(60):
        loss = trainer.training_step(model, dict(empty))
        assert float(loss) == 0.0
        samples.append(prompt_parameter(model).grad.flatten().clone())
    noise = torch.cat(samples)
    std = 3.0 * 2.0 / trainer.expected_batch_size
    assert abs(float(noise.std()) - std) < 4 * std / math.sqrt(2 * noise.numel())
    assert len(trainer.accountant) == 60, "an empty batch is still a step of the mechanism"


def test_a_noiseless_run_states_that_its_guarantee_does_not_hold(load_tiny, tokenizer, tmp_path):
    trainer = dp_trainer(peft_model(load_tiny, "gpt2"), tokenizer, tmp_path, DPConfig(noise_multiplier=0.0))
    trainer.train()
    ledger = trainer.privacy_report()
    assert ledger["epsilon"] == math.inf and ledger["guarantee_holds"] is False
    assert "noise_multiplier = 0" in ledger["guarantee_void_reasons"][0]


def test_poisson_dataloader_samples_independently_with_rate_q(tokenizer):
    data = tiny_sentiment_dataset(40)
    config = post_config("gpt2")
    collator = VerbalizerCollator(TaskTemplate.from_config(config, tokenizer))
    sampler = privacy.PoissonBatchSampler(len(data), 0.1, 400, privacy.NoiseSource(seed=0))
    loader = privacy.secret_dataloader(data, sampler, collator)
    sizes = [b["input_ids"].shape[0] for b in loader]
    assert len(sizes) == 400
    mean = sum(sizes) / len(sizes)
    # Binomial(40, 0.1): mean 4, sd 1.9; the mean of 400 draws is within 4 standard errors of 4.
    assert abs(mean - 4.0) < 4 * math.sqrt(40 * 0.1 * 0.9 / 400)
    assert len(set(sizes)) > 3 and 0 in sizes, "Poisson batches vary in size and may be empty"


def test_naive_opacus_hooks_give_wrong_per_sample_gradients_for_a_peft_prompt(load_tiny, tokenizer):
    """The trap of DESIGN §4, kept in code: do not 'simplify' DPPromptTrainer to Opacus's GradSampleModule."""
    from opacus import GradSampleModule

    model = peft_model(load_tiny, "gpt2")
    # Opacus records activations only in train mode; dropout off keeps both paths deterministic.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    config = model.peft_config["default"]
    verbalizer = Verbalizer.from_config(config, tokenizer)
    batch = batch_of(tokenizer, config, tiny_sentiment_rows(4, seed=5))
    ours, _ = privacy.per_example_gradients(model, batch, prompt_parameter(model), losses_of(verbalizer))

    wrapped = GradSampleModule(model)
    out = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    rows = torch.arange(4)
    logits = out.logits[rows, batch["label_positions"] + 3]
    verbalizer_loss(logits, batch["labels"], verbalizer.index, verbalizer.weight, reduction="sum").backward()
    grad_sample = prompt_parameter(model).grad_sample
    wrapped._close()
    # Opacus reports ONE "sample" for a batch of four: the summed batch gradient.
    assert grad_sample.shape[0] == 1
    torch.testing.assert_close(grad_sample[0], ours.sum(0), atol=1e-5, rtol=1e-5)
    # Clipping that single "sample" bounds the batch sum, not any one example: the sensitivity is wrong.
    clipped_naive = privacy.clipped_sum(grad_sample, 1e-3)
    clipped_true = privacy.clipped_sum(ours, 1e-3)
    assert (clipped_naive - clipped_true).norm() > 1e-4


def test_reported_epsilon_is_the_replace_one_pld_epsilon_and_meets_target(load_tiny, tokenizer, tmp_path):
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    model = peft_model(load_tiny, "gpt2")
    data = tiny_sentiment_dataset(16)
    trainer = dp_trainer(model, tokenizer, tmp_path, DPConfig(target_epsilon=4.0, target_delta=1e-3,
                                                             epsilon_tolerance=0.2), data=data, max_steps=5)
    q = 4 / 16
    sigma = trainer.noise_multiplier
    trainer.train()
    report = trainer.privacy_report()
    # dp_accounting's PLD accountant, used directly at its default (finer) discretisation: ours is pessimistic too.
    reference = pld_privacy_accountant.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE)
    reference.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), 5)
    assert report["epsilon"] == pytest.approx(reference.get_epsilon(1e-3), rel=1e-3)
    assert 4.0 - 0.2 <= report["epsilon"] <= 4.0, "the calibrated σ meets the target, to within the tolerance"
    assert report["epsilon_add_remove"] < report["epsilon"], "replace-one is the stronger adversary"
    assert report["noise_multiplier"] == sigma and report["history"] == [[sigma, q, 5]]
    assert report["steps"] == 5 and report["sample_rate"] == q and report["delta"] == 1e-3
    assert report["accountant"] == "pld" and report["adjacency"] == "replace_one"
    assert report["noise_source"] == "os_entropy" and report["guarantee_holds"] is True
    validate_privacy_ledger(report)


def test_ledger_is_saved_in_the_adapter(load_tiny, tokenizer, tmp_path):
    model = peft_model(load_tiny, "roberta")
    trainer = dp_trainer(model, tokenizer, tmp_path, DPConfig(noise_multiplier=1.3, target_delta=1e-3), max_steps=2)
    trainer.train()
    out = str(tmp_path / "final")
    trainer.save_model(out)
    loaded = POSTConfig.from_pretrained(out)
    assert loaded.privacy == json.loads(json.dumps(trainer.privacy_report()))
    validate_privacy_ledger(loaded.privacy)
    assert loaded.provenance["stage"] == "dp_prompt_tuning" and loaded.provenance["global_step"] == 2
    assert "fingerprint" not in json.dumps(loaded.provenance), "a hash of the private data is not DP"
    with open(os.path.join(out, privacy.ACCOUNTANT_STATE_NAME)) as f:
        assert json.load(f)["history"] == [[trainer.noise_multiplier, 0.25, 2]]
    # Plain PEFT still loads the adapter.
    plain = PeftModel.from_pretrained(load_tiny("roberta"), out)
    torch.testing.assert_close(prompt_parameter(plain), prompt_parameter(model))


def test_resume_keeps_the_accountant_history(load_tiny, tokenizer, tmp_path):
    # sigma given (not searched) keeps the test fast; the search is covered above.
    dp = DPConfig(noise_multiplier=1.1, target_delta=1e-3)
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2)
    full = dp_trainer(peft_model(load_tiny, "gpt2"), tokenizer, tmp_path / "a", dp, **kw)
    full.train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    with open(ckpt / privacy.ACCOUNTANT_STATE_NAME) as f:
        assert json.load(f)["history"] == [[full.noise_multiplier, 0.25, 2]]

    resumed = dp_trainer(peft_model(load_tiny, "gpt2", seed=1), tokenizer, tmp_path / "b", dp, **kw)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.accountant.history == full.accountant.history
    assert resumed.privacy_report() == full.privacy_report()
    assert resumed.state.global_step == 4
    # Without the accountant's history a resume would restart ε at zero: refused.
    os.remove(ckpt / privacy.ACCOUNTANT_STATE_NAME)
    again = dp_trainer(peft_model(load_tiny, "gpt2"), tokenizer, tmp_path / "c", dp, **kw)
    with pytest.raises(ValueError, match="understate"):
        again.train(resume_from_checkpoint=str(ckpt))
    # A resume under a different mechanism would compute a different guarantee: refused.
    other = dp_trainer(peft_model(load_tiny, "gpt2"), tokenizer, tmp_path / "d", DPConfig(noise_multiplier=0.7), **kw)
    with pytest.raises(ValueError, match="noise_multiplier"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(target_epsilon=0.0), "target_epsilon"),
        (dict(target_epsilon=-1.0), "target_epsilon"),
        (dict(target_epsilon=float("inf")), "target_epsilon"),
        (dict(noise_multiplier=-0.5), "noise_multiplier"),
        (dict(target_epsilon=8.0, target_delta=0.0), "target_delta"),
        (dict(target_epsilon=8.0, target_delta=1.0), "target_delta"),
        (dict(target_epsilon=8.0, max_grad_norm=0.0), "max_grad_norm"),
        (dict(target_epsilon=8.0, max_grad_norm=-1.0), "max_grad_norm"),
        (dict(target_epsilon=8.0, noise_multiplier=1.0), "exactly one"),
        (dict(), "exactly one"),
        (dict(target_epsilon=8.0, accountant="gdp"), "accountant"),
        (dict(target_epsilon=8.0, accountant="prv"), "accountant"),
        (dict(target_epsilon=8.0, insecure_noise_seed="1"), "insecure_noise_seed"),
        (dict(target_epsilon=8.0, secure_mode=True), "torchcsprng"),
        (dict(target_epsilon=8.0, max_physical_batch_size=0), "max_physical_batch_size"),
        (dict(target_epsilon=8.0, class_weights=[0.5, 1.5]), "class_weights"),
        (dict(target_epsilon=8.0, class_weights=[0.0, 1.0]), "class_weights"),
        (dict(target_epsilon=8.0, class_weights=[]), "class_weights"),
        (dict(target_epsilon=8.0, class_weights="half|1"), "class_weights"),
    ],
)
def test_bad_dp_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPConfig(**kwargs)


def test_bad_dp_trainer_setup_raises(load_tiny, tokenizer, tmp_path):
    model = peft_model(load_tiny, "gpt2")
    dp = DPConfig(noise_multiplier=1.0)
    data = tiny_sentiment_dataset(16)
    with pytest.raises(ValueError, match="max_grad_norm"):
        DPPromptTrainer(model, args(tmp_path, max_grad_norm=1.0), dp, train_dataset=data, processing_class=tokenizer)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        DPPromptTrainer(model, args(tmp_path, gradient_accumulation_steps=2), dp, train_dataset=data,
                        processing_class=tokenizer)
    with pytest.raises(ValueError, match="batch size"):
        DPPromptTrainer(model, args(tmp_path, per_device_train_batch_size=17), dp, train_dataset=data,
                        processing_class=tokenizer)
    with pytest.raises(ValueError, match="dp_config"):
        DPPromptTrainer(model, args(tmp_path), None, train_dataset=data, processing_class=tokenizer)
    with pytest.raises(ValueError, match="train_dataset"):
        DPPromptTrainer(model, args(tmp_path), dp, processing_class=tokenizer)


def test_delta_defaults_to_one_over_n_and_warns(load_tiny, tokenizer, tmp_path):
    model = peft_model(load_tiny, "gpt2")
    data = tiny_sentiment_dataset(16)
    with pytest.warns(UserWarning, match="1/N"):
        t = DPPromptTrainer(model, args(tmp_path), DPConfig(noise_multiplier=1.0), train_dataset=data,
                            processing_class=tokenizer)
    assert t.delta == 1 / 16
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        t = DPPromptTrainer(model, args(tmp_path), DPConfig(noise_multiplier=1.0, target_delta=1e-3),
                            train_dataset=data, processing_class=tokenizer)
    assert t.delta == 1e-3


def test_accountant_state_round_trip():
    acc = PLDAccountant()
    acc.step(noise_multiplier=1.1, sample_rate=0.01)
    acc.step(noise_multiplier=1.1, sample_rate=0.01)
    acc.step(noise_multiplier=0.9, sample_rate=0.01)
    assert acc.history == [(1.1, 0.01, 2), (0.9, 0.01, 1)] and len(acc) == 3
    state = json.loads(json.dumps(acc.state_dict()))
    fresh = PLDAccountant()
    fresh.load_state_dict({**state, "history": [tuple(h) for h in state["history"]]})
    assert fresh.get_epsilon(1e-5) == acc.get_epsilon(1e-5)
    assert acc.get_epsilon(1e-5) == history_epsilon([(1.1, 0.01, 2), (0.9, 0.01, 1)], 1e-5)
    assert acc.get_epsilon(1e-5, ADD_OR_REMOVE_ONE) < acc.get_epsilon(1e-5)
    assert history_epsilon([], 1e-5) == 0.0 and history_epsilon([(0.0, 0.1, 1)], 1e-5) == math.inf


def test_fixed_size_batches_warn_and_are_still_accounted(load_tiny, tokenizer, tmp_path):
    model = peft_model(load_tiny, "gpt2")
    with pytest.warns(UserWarning, match="not a proven bound"):
        trainer = DPPromptTrainer(model, args(tmp_path), DPConfig(noise_multiplier=1.0, target_delta=1e-3,
                                                                  poisson_sampling=False),
                                  train_dataset=tiny_sentiment_dataset(16), processing_class=tokenizer)
    trainer.train()
    report = trainer.privacy_report()
    assert report["steps"] == 2 and report["poisson_sampling"] is False


def test_tiny_noise_multipliers_get_a_finite_upper_bound_quickly():
    """σ = 2.5e-5 made the PLD ask for 5.8 TiB; below SMALL_SIGMA the unamplified Gaussian bound is used instead."""
    import time

    from peft_post.tuning.accountant import SMALL_SIGMA

    start = time.perf_counter()
    tiny = history_epsilon([(2.5e-5, 0.7, 4)], 1e-3)
    assert math.isfinite(tiny) and time.perf_counter() - start < 5
    # Monotone across the switch: less noise never reports less privacy loss.
    assert tiny > history_epsilon([(SMALL_SIGMA / 2, 0.7, 4)], 1e-3) > history_epsilon([(SMALL_SIGMA, 0.7, 4)], 1e-3)
    assert history_epsilon([(SMALL_SIGMA / 2, 0.7, 4)], 1e-3, ADD_OR_REMOVE_ONE) < history_epsilon(
        [(SMALL_SIGMA / 2, 0.7, 4)], 1e-3)


@pytest.mark.parametrize("sigma,q,steps,delta", [(0.73, 0.125, 80, 1 / 256), (1.1, 0.01, 300, 1e-5)])
def test_the_add_remove_figure_agrees_with_opacus_and_replace_one_is_above_it(sigma, q, steps, delta):
    """Anchor to Opacus: its PRV accountant (add/remove) gives the ledger's `epsilon_add_remove` for the same steps."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = PLDAccountant()
    acc.history = [(sigma, q, steps)]
    prv = PRVAccountant()
    prv.history = [(sigma, q, steps)]
    rdp = RDPAccountant()
    rdp.history = [(sigma, q, steps)]
    ours = acc.get_epsilon(delta, ADD_OR_REMOVE_ONE)
    assert ours == pytest.approx(prv.get_epsilon(delta), rel=0.02)
    assert ours <= rdp.get_epsilon(delta), "RDP is the looser analysis of the same mechanism"
    assert acc.get_epsilon(delta) > ours


def test_signal_to_noise_measures_the_clipped_mean_against_the_steps_noise():
    from peft_post.tuning.privacy import signal_to_noise

    # Identical gradients of norm 2 (8 prompt numbers): clipped at C = 1 their mean is a unit vector.
    same = torch.full((16, 2, 4), 2 / math.sqrt(8))
    out = signal_to_noise(same, max_grad_norm=1.0, noise_multiplier=0.5, expected_batch_size=64)
    assert out["signal"] == pytest.approx(1.0) and out["alignment"] == pytest.approx(1.0)
    assert out["noise"] == pytest.approx(0.5 * math.sqrt(8) / 64)
    assert out["signal_to_noise"] == pytest.approx(64 / (0.5 * math.sqrt(8))) and out["clipped_share"] == 1.0
    # Unclipped (C above every norm), the signal is the raw mean's norm and the noise grows with C.
    loose = signal_to_noise(same, max_grad_norm=4.0, noise_multiplier=0.5, expected_batch_size=64)
    assert loose["signal"] == pytest.approx(2.0) and loose["clipped_share"] == 0.0
    assert loose["signal_to_noise"] == pytest.approx(out["signal_to_noise"] / 2)
    # Gradients that cancel (±g) have no mean: no signal, whatever their sample's mean happens to be.
    torch.manual_seed(0)
    signs = torch.tensor([1.0, -1.0]).repeat(8)[:, None, None]
    cancel = signal_to_noise(signs * same, 1.0, 0.5, 64)
    assert cancel["signal"] == 0.0 and cancel["alignment"] == 0.0
    # Independent random directions: the sample mean of 400 unit vectors has norm about 1/20, the estimate near 0.
    noise_only = torch.randn(400, 1000)
    estimate = signal_to_noise(noise_only, 1.0, 1.0, 100)
    assert float(noise_only.div(noise_only.norm(dim=1, keepdim=True)).mean(0).norm()) > 0.04
    assert estimate["alignment"] < 0.02 and estimate["signal"] < 0.02
    # A common direction under per-example noise is recovered: g_i = u + noise of norm ~3 (u a unit vector).
    u = torch.zeros(1000)
    u[0] = 1.0
    mixed = signal_to_noise(u + 3 * torch.randn(400, 1000) / math.sqrt(1000), 10.0, 1.0, 100)
    assert mixed["signal"] == pytest.approx(1.0, abs=0.1)
    with pytest.raises(ValueError, match="at least 2"):
        signal_to_noise(same[:1], 1.0, 0.5, 64)


def test_class_weights_scale_each_clipped_gradient_and_keep_the_bound(load_tiny, tokenizer, tmp_path):
    torch.manual_seed(0)
    grads = torch.randn(4, 3, 4) * 5
    weights = torch.tensor([1.0, 0.25, 0.5, 1.0])
    clipped = grads * privacy.clip_factors(privacy.per_example_norms(grads), 1.0).view(4, 1, 1)
    torch.testing.assert_close(privacy.clipped_sum(grads, 1.0, weights), (clipped * weights.view(4, 1, 1)).sum(0))
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        privacy.clipped_sum(grads, 1.0, torch.tensor([1.0, 2.0, 1.0, 1.0]))
    assert DPConfig(target_epsilon=8.0, class_weights="0.45|1").class_weights == [0.45, 1.0]

    # In the trainer: a noiseless step with every example in the batch (q = 1) is the mean of the weighted clipped
    # gradients, each weighted by its class's weight; the ledger records the weights, and σ is unchanged by them.
    model = peft_model(load_tiny, "gpt2")
    config = model.peft_config["default"]
    data = tiny_sentiment_dataset(8, seed=1)
    verbalizer = Verbalizer.from_config(config, tokenizer)
    g = brute_force_grads(model.eval(), verbalizer, batch_of(tokenizer, config, list(data)))
    clip = float(g.flatten(1).norm(dim=1).median())
    per_class = torch.tensor([0.5, 1.0])[torch.tensor(data["label"])]
    factors = torch.clamp(clip / (g.flatten(1).norm(dim=1) + 1e-6), max=1.0) * per_class
    trainer = dp_trainer(model, tokenizer, tmp_path,
                         DPConfig(noise_multiplier=0.0, max_grad_norm=clip, class_weights=[0.5, 1.0]), data=data,
                         max_steps=1, per_device_train_batch_size=8, optim="sgd", learning_rate=1.0,
                         lr_scheduler_type="constant")
    before = prompt_parameter(model).detach().clone()
    trainer.train()
    torch.testing.assert_close(before - prompt_parameter(model).detach(), (g * factors.view(-1, 1, 1)).sum(0) / 8,
                               atol=1e-6, rtol=1e-5)
    assert trainer.privacy_report()["class_weights"] == [0.5, 1.0]
    weighted = dp_trainer(peft_model(load_tiny, "gpt2"), tokenizer, tmp_path,
                          DPConfig(target_epsilon=8.0, class_weights=[0.5, 1.0]))
    plain = dp_trainer(peft_model(load_tiny, "gpt2"), tokenizer, tmp_path, DPConfig(target_epsilon=8.0))
    assert weighted.noise_multiplier == plain.noise_multiplier
    with pytest.raises(ValueError, match="one per class"):
        dp_trainer(peft_model(load_tiny, "gpt2"), tokenizer, tmp_path,
                   DPConfig(noise_multiplier=1.0, class_weights=[1.0, 1.0, 1.0]))
