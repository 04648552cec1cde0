"""bf16 in the trainers' own forwards, fp32 where it matters, and gradient checkpointing in every trainer.

- Forwards run under the trainer's autocast (`TrainingArguments.bf16`), the trainers' evaluation loops included.
- Logits, losses, DP norms, clipping, sums and noise are fp32; trainable tensors (prompts, a distilled student) are
  fp32 master copies, also on a model loaded in bf16.
- `train_without_dropout` gives eval-mode numbers in train mode, so `gradient_checkpointing=True` takes effect.
- `label_logits` under a device map spanning a GPU and the CPU (CUDA only).

bf16 matmuls are slow on a CPU without AMX, so the models here are tiny (hidden 32, 2 layers) and batches small.
"""

import functools
import copy
import math
import warnings

import pytest
import torch
import transformers as tf
from datasets import Dataset
from peft import get_peft_model
from transformers.modeling_layers import GradientCheckpointingLayer

from peft_post import DistillationConfig, DistillationTrainer, POSTConfig, TransferConfig, TransferTrainer, make_student
from peft_post.evaluation import evaluate_prompt, score_dataset
from peft_post.losses import (class_scores, distillation_kl_loss, temperature_kl, transfer_loss, verbalizer_loss)
from peft_post.modeling import (label_logits, prompt_parameter, train_without_dropout,
                                upcast_trainable_parameters)
from peft_post.tasks import TaskTemplate, Verbalizer, VerbalizerCollator
from peft_post.testing import sharpen_model, tiny_corpus, tiny_sentiment_dataset, tiny_sentiment_rows
from peft_post.tuning import DPConfig, DPPromptTrainer, PromptTrainer, PromptTrainingConfig, privacy
from peft_post.scoring import classification_losses

TASK = dict(task_type="CAUSAL_LM", template="{text} It was", label_words=[["bad"], ["good"]])


def losses_of(verbalizer):
    return functools.partial(classification_losses, verbalizer=verbalizer)


def llama(tokenizer, seed=0, dtype=torch.float32, **config):
    """The tiny config-built Llama of these tests: hidden 32, 2 layers, 4 heads over 2 KV heads."""
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **config)
    return tf.LlamaForCausalLM(cfg).to(dtype).eval()


def prompted(tokenizer, seed=0, dtype=torch.float32, sharpen=False, **config):
    base = llama(tokenizer, seed, **config)
    if sharpen:
        sharpen_model(base, 5.0, 2.0)
    model = get_peft_model(base.to(dtype), POSTConfig(num_virtual_tokens=3, **TASK))
    with torch.no_grad():
        prompt_parameter(model).normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    return model


def prompt_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, save_strategy="no",
                disable_tqdm=True, report_to=[], use_cpu=True, seed=0, optim="sgd", learning_rate=1.0,
                lr_scheduler_type="constant")
    base.update(kw)
    return PromptTrainingConfig(**base)


def transfer_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), alpha=0.5, max_steps=1, per_device_train_batch_size=4,
                learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", disable_tqdm=True, use_cpu=True,
                report_to=[], save_strategy="no", cache_source_outputs=False, seed=0)
    base.update(kw)
    return TransferConfig(**base)


def distill_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1, report_to=[],
                block_size=16, learning_rate=1e-2, optim="sgd", lr_scheduler_type="constant", use_cpu=True,
                save_strategy="no", disable_tqdm=True, seed=0)
    base.update(kw)
    return DistillationConfig(**base)


def dp_trainer(model, tokenizer, tmp_path, data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # δ ≥ 1/N and σ = 0 warnings
        return DPPromptTrainer(model, prompt_args(tmp_path, per_device_train_batch_size=len(data), **kw),
                               DPConfig(noise_multiplier=0.0, max_grad_norm=1e6), train_dataset=data,
                               processing_class=tokenizer)


def transfer_trainer(tokenizer, tmp_path, target, **kw):
    source = prompted(tokenizer, seed=5, sharpen=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransferTrainer(target, source, transfer_args(tmp_path, **kw), public_dataset=tiny_sentiment_dataset(4),
                               public_eval_dataset=tiny_sentiment_dataset(4, seed=9), processing_class=tokenizer)


def linear_output_dtypes(*models):
    """Record the output dtype of every Linear of `models` (hooks); returns the set, filled as forwards run."""
    seen = set()
    for model in models:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    return seen


def count_layer_runs(model):
    """How often the first decoder layer's MLP starts: once per forward, once more per checkpointed backward (a
    pre-hook: the recompute may stop early, inside the MLP, once it has what the backward needs)."""
    calls = []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


def batch_for(tokenizer, model, rows):
    config = model.peft_config["default"]
    return VerbalizerCollator(TaskTemplate.from_config(config, tokenizer))(rows), Verbalizer.from_config(config, tokenizer)


# ---- logits and losses in fp32 ------------------------------------------------------------------------------------


def test_label_logits_are_float32_for_a_bf16_model_and_under_autocast(tokenizer):
    model = prompted(tokenizer)
    batch, _ = batch_for(tokenizer, model, tiny_sentiment_rows(3))
    args = batch["input_ids"], batch["attention_mask"], batch["label_positions"]
    with torch.no_grad():
        fp32 = label_logits(model, *args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = label_logits(model, *args)
        bf16_model = copy.deepcopy(model).to(torch.bfloat16)
        bf16 = label_logits(bf16_model, *args)
    assert fp32.dtype == autocast.dtype == bf16.dtype == torch.float32
    assert fp32.shape == autocast.shape == bf16.shape == (3, len(tokenizer))
    # Computed in bf16 (not silently in fp32), yet close: bf16 rounds to 2^-8 relative.
    for low in (autocast, bf16):
        assert not torch.equal(low, fp32)
        torch.testing.assert_close(low, fp32, rtol=0.05, atol=0.05)


def test_losses_compute_in_float32_whatever_they_are_given():
    torch.manual_seed(0)
    a, b, c, d = (torch.randn(4, 50) * 3 for _ in range(4))
    low = [x.to(torch.bfloat16) for x in (a, b, c, d)]
    up = [x.float() for x in low]  # the same values, held in fp32
    index, weight = torch.tensor([[3, 7], [11, 0]]), torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    pairs = [
        (transfer_loss(*low, alpha=0.6), transfer_loss(*up, alpha=0.6)),
        (temperature_kl(low[0], low[1]), temperature_kl(up[0], up[1])),
        (distillation_kl_loss(low[0][None], low[1][None]), distillation_kl_loss(up[0][None], up[1][None])),
        (class_scores(low[0], index, weight), class_scores(up[0], index, weight)),
        (verbalizer_loss(low[0], labels, index, weight), verbalizer_loss(up[0], labels, index, weight)),
    ]
    for got, expected in pairs:
        assert got.dtype == torch.float32
        # Exactly the fp32 computation on the upcast values: nothing (a − b, the class means) rounds in bf16 first.
        assert torch.equal(got, expected)


def test_upcast_trainable_parameters_makes_an_fp32_master_prompt_on_a_bf16_model(tokenizer, tmp_path):
    model = prompted(tokenizer).to(torch.bfloat16)  # the prompt too, as `.to(dtype)` on the whole model does
    prompt = prompt_parameter(model)
    assert prompt.dtype == torch.bfloat16
    names = upcast_trainable_parameters(model)
    assert len(names) == 1 and prompt_parameter(model) is prompt and prompt.dtype == torch.float32
    assert {p.dtype for p in model.get_base_model().parameters()} == {torch.bfloat16}
    assert upcast_trainable_parameters(model) == []
    # Every trainer makes the prompt it trains an fp32 master copy.
    data = tiny_sentiment_dataset(4)
    builders = {
        "prompt": lambda m: PromptTrainer(m, prompt_args(tmp_path), train_dataset=data, processing_class=tokenizer),
        "dp": lambda m: dp_trainer(m, tokenizer, tmp_path, data),
        "transfer": lambda m: transfer_trainer(tokenizer, tmp_path, m),
    }
    for name, build in builders.items():
        model = prompted(tokenizer).to(torch.bfloat16)
        build(model)
        assert prompt_parameter(model).dtype == torch.float32, name


# ---- autocast in the trainers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bf16", [False, True])
def test_prompt_trainers_train_and_evaluate_under_the_trainers_autocast(tokenizer, tmp_path, bf16):
    data = tiny_sentiment_dataset(4)
    for cls in (PromptTrainer, DPPromptTrainer):
        model = prompted(tokenizer)
        if cls is PromptTrainer:
            trainer = PromptTrainer(model, prompt_args(tmp_path, bf16=bf16), train_dataset=data, eval_dataset=data,
                                    processing_class=tokenizer)
        else:
            trainer = dp_trainer(model, tokenizer, tmp_path, data, bf16=bf16)
            trainer.eval_dataset = data
        seen = linear_output_dtypes(model)
        trainer.train()
        assert seen == {torch.bfloat16 if bf16 else torch.float32}, cls.__name__
        assert prompt_parameter(model).dtype == torch.float32
        seen.clear()
        trainer.evaluate()
        assert seen == {torch.bfloat16 if bf16 else torch.float32}, cls.__name__


@pytest.mark.parametrize("bf16", [False, True])
def test_transfer_trainer_forwards_and_evaluation_run_under_its_autocast(tokenizer, tmp_path, bf16):
    target = prompted(tokenizer, seed=1)
    trainer = transfer_trainer(tokenizer, tmp_path, target, bf16=bf16)
    seen = linear_output_dtypes(target, trainer.source_model)  # a_t, and the frozen a_s, b_s, b_t
    trainer.train()
    assert seen == {torch.bfloat16 if bf16 else torch.float32}
    seen.clear()
    trainer.evaluate()
    assert seen == {torch.bfloat16 if bf16 else torch.float32}


@pytest.mark.parametrize("bf16", [False, True])
def test_distillation_forwards_of_student_and_teacher_run_under_its_autocast(tokenizer, tmp_path, bf16):
    teacher = llama(tokenizer, seed=3)
    student = make_student(teacher, [0])
    data = {"text": tiny_corpus()[:12]}
    trainer = DistillationTrainer(student, teacher, distill_args(tmp_path, bf16=bf16), train_dataset=Dataset.from_dict(data),
                                  eval_dataset=Dataset.from_dict(data), processing_class=tokenizer)
    seen_student, seen_teacher = linear_output_dtypes(student), linear_output_dtypes(teacher)
    trainer.train()
    expected = {torch.bfloat16 if bf16 else torch.float32}
    assert seen_student == expected and seen_teacher == expected
    seen_student.clear(), seen_teacher.clear()
    assert math.isfinite(trainer.evaluate()["eval_loss"])
    assert seen_student == expected and seen_teacher == expected


# ---- a model loaded in bf16 trains an fp32 prompt -------------------------------------------------------------------


def test_every_trainer_trains_an_fp32_prompt_on_a_bf16_model(tokenizer, tmp_path):
    """One SGD step (lr 1) from the same prompt on the fp32 model and on its bf16 copy: the bf16 model's update is the
    fp32 one to bf16 accuracy, and lands in an fp32 prompt."""
    data = tiny_sentiment_dataset(4)
    updates = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name in ("prompt", "dp", "transfer"):
            model = prompted(tokenizer, sharpen=True, dtype=dtype)  # the same fp32 prompt on both
            if name == "prompt":
                trainer = PromptTrainer(model, prompt_args(tmp_path), train_dataset=data, processing_class=tokenizer)
            elif name == "dp":
                trainer = dp_trainer(model, tokenizer, tmp_path, data)
            else:
                trainer = transfer_trainer(tokenizer, tmp_path, model)
            prompt = prompt_parameter(model)
            assert prompt.dtype == torch.float32, f"{name}: the prompt must be an fp32 master copy"
            before = prompt.detach().clone()
            trainer.train()
            assert prompt.dtype == torch.float32
            updates[name, dtype] = prompt.detach() - before
    for name in ("prompt", "dp", "transfer"):
        fp32, bf16 = updates[name, torch.float32], updates[name, torch.bfloat16]
        assert fp32.norm() > 1e-3
        cosine = torch.nn.functional.cosine_similarity(fp32.flatten(), bf16.flatten(), dim=0)
        assert cosine > 0.999 and (bf16 - fp32).norm() / fp32.norm() < 0.05, name


def test_distillation_trains_an_fp32_student_loaded_in_bf16(tokenizer, tmp_path):
    teacher = llama(tokenizer, seed=3, dtype=torch.bfloat16)
    student = make_student(teacher, [0])
    trainer = DistillationTrainer(student, teacher, distill_args(tmp_path, bf16=True),
                                  train_dataset=Dataset.from_dict({"text": tiny_corpus()[:12]}),
                                  processing_class=tokenizer)
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    before = student.model.layers[0].mlp.up_proj.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, student.model.layers[0].mlp.up_proj.weight)
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


# ---- DP: per-example gradients from a bf16 forward; norms, clipping, sum and noise in fp32 -------------------------

# Tolerance of bf16 per-example prompt gradients against fp32 brute force (one example at a time, fp32 model).
# bf16 keeps 8 significant bits: each rounding is off by up to 2^-8 ≈ 0.0039 relative, and a forward + backward
# through 2 layers rounds a few dozen times, the errors partly cancelling. Measured with this test's setup (tiny
# sharpened Llama, hidden 32, batch 4, seeds 0-11; an fp32 model under bf16 autocast and a bf16 model): the largest
# per-example relative error ||g_bf16 − g_fp32|| / ||g_fp32|| was 0.0147 (autocast) and 0.0154 (bf16 model), about
# 4 roundings' worth, and the smallest cosine 0.99989; at hidden 64 the largest error was 0.0140. fp32 per-example
# gradients agree with brute force to 7e-7. The bounds leave margin: 0.04 (10 roundings, 2.6x the worst seen) and
# cosine 0.9995 (1 − cos 4.5x the worst seen).
BF16_GRAD_REL_ERROR = 0.04
BF16_GRAD_MIN_COSINE = 0.9995


def brute_force_fp32_grads(model, verbalizer, batch):
    """The definition of a per-example gradient: one example at a time, unpadded, fp32 model, fp32 prompt."""
    prompt = prompt_parameter(model)
    grads = []
    for i in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][i].bool()
        ids = batch["input_ids"][i][real].unsqueeze(0)
        position = (batch["label_positions"][i] - int(real.long().argmax())).view(1)
        logits = label_logits(model, ids, torch.ones_like(ids), position, prompt=prompt)
        loss = verbalizer_loss(logits, batch["labels"][i:i + 1], verbalizer.index, verbalizer.weight)
        grads.append(torch.autograd.grad(loss, prompt)[0])
    return torch.stack(grads)


def test_bf16_per_example_gradients_match_fp32_brute_force_within_the_measured_tolerance(tokenizer):
    worst_error, worst_cosine = 0.0, 1.0
    for seed in range(3):
        model = prompted(tokenizer, seed=seed, sharpen=True)
        batch, verbalizer = batch_for(tokenizer, model, tiny_sentiment_rows(4, seed=seed))
        reference = brute_force_fp32_grads(model, verbalizer, batch)
        bf16_model = copy.deepcopy(model).to(torch.bfloat16)
        upcast_trainable_parameters(bf16_model)
        candidates = [
            privacy.per_example_gradients(model, batch, prompt_parameter(model), losses_of(verbalizer),
                                          autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))[0],
            privacy.per_example_gradients(bf16_model, batch, prompt_parameter(bf16_model), losses_of(verbalizer))[0],
        ]
        for grads in candidates:
            assert grads.dtype == torch.float32 and grads.shape == reference.shape
            assert not torch.equal(grads, reference)  # really computed in bf16
            error = (grads - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)
            cosine = torch.nn.functional.cosine_similarity(grads.flatten(1), reference.flatten(1), dim=1)
            worst_error, worst_cosine = max(worst_error, float(error.max())), min(worst_cosine, float(cosine.min()))
    print(f"bf16 per-example gradients vs fp32 brute force: max relative error {worst_error:.4f}, "
          f"min cosine {worst_cosine:.5f}")
    assert worst_error < BF16_GRAD_REL_ERROR and worst_cosine > BF16_GRAD_MIN_COSINE


def test_clipping_summing_and_noise_of_bf16_gradients_run_in_fp32():
    torch.manual_seed(0)
    grads = (torch.randn(64, 3, 32) * torch.logspace(-3, 3, 64).view(64, 1, 1)).to(torch.bfloat16)
    clip = 1.0
    up = grads.float()
    norms = privacy.per_example_norms(grads)
    assert norms.dtype == torch.float32 and torch.equal(norms, privacy.per_example_norms(up))
    summed = privacy.clipped_sum(grads, clip)
    assert summed.dtype == torch.float32 and torch.equal(summed, privacy.clipped_sum(up, clip))
    clipped = up * privacy.clip_factors(norms, clip).view(-1, 1, 1)
    # ≤ C up to fp32 rounding of the recomputed norm (a few units of 2^-24), where bf16 clipping would be off by
    # up to 2^-8: the sensitivity bound holds at fp32 precision.
    assert (privacy.per_example_norms(clipped) <= clip * (1 + 4 * 2**-24)).all()
    in_bf16 = grads * privacy.clip_factors(norms, clip).to(torch.bfloat16).view(-1, 1, 1)
    assert (in_bf16.float().flatten(1).norm(dim=1) > clip * (1 + 1e-3)).any()  # the check above can fail
    noisy = privacy.privatize(summed.to(torch.bfloat16), 1.0, clip, 8.0, lambda: torch.Generator().manual_seed(0))
    assert noisy.dtype == torch.float32


def test_dp_trainer_refuses_fp16(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="fp16 is not supported under DP"):
        dp_trainer(prompted(tokenizer), tokenizer, tmp_path, tiny_sentiment_dataset(4), fp16=True)


# ---- train mode without dropout, and gradient checkpointing -------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_train_without_dropout_gives_the_eval_numbers_in_train_mode(load_tiny, tokenizer, kind):
    if kind == "llama":
        base = llama(tokenizer, attention_dropout=0.5)  # a float rate the attention passes to SDPA itself
    else:
        base = load_tiny(kind)  # dropout 0.1: modules, and GPT-2/BERT attention reading its child's rate
    task = dict(TASK, task_type="FEATURE_EXTRACTION", template="{text} It was {mask}.") if kind == "bert" else TASK
    model = get_peft_model(base, POSTConfig(num_virtual_tokens=3, **task))
    batch, _ = batch_for(tokenizer, model, tiny_sentiment_rows(4))
    args = batch["input_ids"], batch["attention_mask"], batch["label_positions"]
    with torch.no_grad():
        expected = label_logits(model.eval(), *args)
        torch.manual_seed(0)
        dropped = label_logits(model.train(), *args)
        assert not torch.equal(dropped, expected), "the model must apply dropout in plain train mode"
        assert train_without_dropout(model) is model
        torch.manual_seed(0)
        assert torch.equal(label_logits(model, *args), expected)
    assert model.training and model.get_base_model().training
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers and all(layer.training for layer in layers), "checkpointed layers must stay in train mode"


def _one_step(trainer, model, counted):
    calls = count_layer_runs(counted)
    before = prompt_parameter(model).detach().clone() if hasattr(model, "peft_config") else None
    trainer.train()
    return calls, before


@pytest.mark.parametrize("name", ["prompt", "dp", "transfer"])
def test_gradient_checkpointing_runs_and_gives_the_same_update_in_the_prompt_trainers(tokenizer, tmp_path, name):
    data = tiny_sentiment_dataset(4)
    results = {}
    for checkpointing in (False, True):
        model = prompted(tokenizer, sharpen=True)
        if name == "prompt":
            trainer = PromptTrainer(model, prompt_args(tmp_path, gradient_checkpointing=checkpointing),
                                    train_dataset=data, processing_class=tokenizer)
        elif name == "dp":
            trainer = dp_trainer(model, tokenizer, tmp_path, data, gradient_checkpointing=checkpointing)
        else:
            trainer = transfer_trainer(tokenizer, tmp_path, model, gradient_checkpointing=checkpointing)
        calls, before = _one_step(trainer, model, model)
        results[checkpointing] = (len(calls), prompt_parameter(model).detach() - before)
    (plain_calls, plain), (ckpt_calls, ckpt) = results[False], results[True]
    # The prompted forward runs the layer once, and once more in the backward when checkpointed; the transfer step
    # also runs the frozen target once (b_t, without gradients: never checkpointed).
    frozen = 1 if name == "transfer" else 0
    assert (plain_calls, ckpt_calls) == (1 + frozen, 2 + frozen)
    assert plain.norm() > 1e-3
    torch.testing.assert_close(ckpt, plain, rtol=1e-6, atol=1e-7)


def test_gradient_checkpointing_runs_and_gives_the_same_update_in_distillation(tokenizer, tmp_path):
    data = Dataset.from_dict({"text": tiny_corpus()[:4]})
    results = {}
    for checkpointing in (False, True):
        teacher = llama(tokenizer, seed=3)
        student = make_student(teacher, [0, 1])
        trainer = DistillationTrainer(student, teacher, distill_args(tmp_path, gradient_checkpointing=checkpointing),
                                      train_dataset=data, processing_class=tokenizer)
        before = {k: v.detach().clone() for k, v in student.named_parameters()}
        calls = count_layer_runs(student)
        trainer.train()
        steps = int(trainer.state.global_step)
        results[checkpointing] = (len(calls) / steps, {k: v.detach() - before[k] for k, v in student.named_parameters()})
    assert (results[False][0], results[True][0]) == (1, 2)
    for key, update in results[False][1].items():
        torch.testing.assert_close(results[True][1][key], update, rtol=1e-6, atol=1e-7)
    assert any(u.norm() > 0 for u in results[False][1].values())


# ---- evaluation ---------------------------------------------------------------------------------------------------


def test_evaluate_prompt_scores_a_bf16_model_and_an_fp32_one_under_autocast(tokenizer):
    model = prompted(tokenizer, sharpen=True)
    config = model.peft_config["default"]
    data = tiny_sentiment_dataset(8)
    seen = linear_output_dtypes(model)
    default = score_dataset(model, tokenizer, data, config, batch_size=4, disable_progress=True)
    assert seen == {torch.float32}
    assert all(torch.equal(a, b) for a, b in zip(default, score_dataset(model, tokenizer, data, config, batch_size=4,
                                                                        disable_progress=True, autocast_dtype=None)))
    seen.clear()
    scores, _ = score_dataset(model, tokenizer, data, config, batch_size=4, disable_progress=True,
                              autocast_dtype=torch.bfloat16)
    assert seen == {torch.bfloat16} and scores.dtype == torch.float32
    torch.testing.assert_close(scores, default[0], rtol=0.05, atol=0.05)
    report = evaluate_prompt(model, tokenizer, data, config, disable_progress=True, autocast_dtype=torch.bfloat16)
    assert report["num_examples"] == 8
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    bf16_scores, _ = score_dataset(bf16_model, tokenizer, data, config, batch_size=4, disable_progress=True)
    assert bf16_scores.dtype == torch.float32
    torch.testing.assert_close(bf16_scores, default[0], rtol=0.05, atol=0.05)


# ---- a device map across a GPU and the CPU --------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_label_logits_under_a_device_map_across_cuda_and_cpu_equal_one_device(tokenizer):
    from accelerate import dispatch_model

    model = prompted(tokenizer, sharpen=True)
    batch, _ = batch_for(tokenizer, model, tiny_sentiment_rows(4))
    args = batch["input_ids"], batch["attention_mask"], batch["label_positions"]
    with torch.no_grad():
        expected = label_logits(model, *args)
    base = model.get_base_model()
    # Embeddings and the first layer on the GPU, the last layer and the norm on the CPU, the head on the GPU again:
    # the last hidden state lies on neither the embeddings' device nor (necessarily) the head's.
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
                  "model.norm": "cpu", "lm_head": 0}
    dispatch_model(base, device_map=device_map)  # the prompt stays on the CPU: label_logits moves it to the embeddings
    with torch.no_grad():
        got = label_logits(model, *(t.to("cuda:0") for t in args))
    assert got.device == torch.device("cuda:0") and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)
