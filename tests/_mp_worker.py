"""Worker of tests/test_multiprocess.py: trains each multi-process stage on tiny models, saves what it trained.

``accelerate launch --multi_gpu --num_processes 2 tests/_mp_worker.py WORKDIR OUT`` runs every stage with per-device
batch 2 (global 4) and writes ``OUT/<stage>-<rank>.pt``; the test imports the same functions for the one-process
reference with batch 4. WORKDIR holds the tokenizer and models that `test_multiprocess.py` prepared.
"""

from __future__ import annotations

import hashlib
import os
import sys

import torch
import transformers as tf
from accelerate import PartialState
from datasets import Dataset
from peft import get_peft_model

from peft_post import (DistillationConfig, DistillationTrainer, DPConfig, DPPromptTrainer, POSTConfig, PromptTrainer,
                       PromptTrainingConfig, TransferConfig, TransferTrainer, make_student)
from peft_post.distill import prepare_distillation_dataset
from peft_post.modeling import prompt_parameter
from peft_post.testing import tiny_corpus, tiny_generation_dataset, tiny_sentiment_dataset

STEPS = 3
TASK = dict(num_virtual_tokens=4, label_words=[["bad", "awful"], ["good", "great"]], prompt_tuning_init="TEXT",
            prompt_tuning_init_text="predict if sentiment of this review")
GENERATION_TASK = dict({k: v for k, v in TASK.items() if k != "label_words"}, task_kind="generation",
                       template="Review: {text}\nMood:", max_answer_tokens=3)
# SGD: the update is linear in the gradient, so equal gradients give equal parameters. Adam's first step is
# lr·g/(|g| + eps), which would blow the float noise of near-zero gradient entries up to a visible difference.
COMMON = dict(max_steps=STEPS, optim="sgd", seed=0, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
              logging_steps=STEPS, dataloader_drop_last=True)


def tokenizer_in(workdir):
    return tf.AutoTokenizer.from_pretrained(os.path.join(workdir, "tokenizer"))


def causal_lm_in(workdir, name):
    return tf.AutoModelForCausalLM.from_pretrained(os.path.join(workdir, name)).eval()


def prompted_lm_in(workdir, name, tokenizer, task=TASK):
    config = POSTConfig(tokenizer_name_or_path=os.path.join(workdir, "tokenizer"), **task)
    return get_peft_model(causal_lm_in(workdir, name), config)


def train_transfer(workdir, out, batch, accumulation=1):
    """p_t after transferring the source's p_s (a perturbed prompt saved by the test) into the target."""
    tokenizer = tokenizer_in(workdir)
    source = prompted_lm_in(workdir, "source", tokenizer)
    with torch.no_grad():
        prompt_parameter(source).copy_(torch.load(os.path.join(workdir, "source_prompt.pt")))
    target = prompted_lm_in(workdir, "target", tokenizer)
    args = TransferConfig(os.path.join(out, "transfer"), alpha=0.5, learning_rate=1.0,
                          per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, **COMMON)
    trainer = TransferTrainer(target, source, args, public_dataset=tiny_sentiment_dataset(8), processing_class=tokenizer)
    start = prompt_parameter(target).detach().clone()
    trainer.train()
    return {"start": start, "prompt": prompt_parameter(target).detach().clone(),
            "batch_size": trainer.record_provenance()["batch_size"]}


def train_generation_transfer(workdir, out, batch, accumulation=1):
    """p_t after transferring a generation prompt on the source's greedy answers, the answers trained on, and how
    many times this process decoded them (the main process decodes, the others receive its answers)."""
    import peft_post.transfer.trainer as transfer_trainer

    tokenizer = tokenizer_in(workdir)
    source = prompted_lm_in(workdir, "source", tokenizer, GENERATION_TASK)
    with torch.no_grad():
        prompt_parameter(source).copy_(torch.load(os.path.join(workdir, "source_prompt.pt")))
    target = prompted_lm_in(workdir, "target", tokenizer, GENERATION_TASK)
    args = TransferConfig(os.path.join(out, "generation"), alpha=0.5, learning_rate=1.0,
                          per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, **COMMON)
    trainer = TransferTrainer(target, source, args, public_dataset=tiny_generation_dataset(8),
                              processing_class=tokenizer)
    decoded, generate = [], transfer_trainer.generate_answers
    transfer_trainer.generate_answers = lambda *a, **k: decoded.append(1) or generate(*a, **k)
    try:
        start = prompt_parameter(target).detach().clone()
        trainer.train()
    finally:
        transfer_trainer.generate_answers = generate
    return {"start": start, "prompt": prompt_parameter(target).detach().clone(),
            "answers": trainer.train_dataset.answers, "decoded": len(decoded)}


def train_prompt(workdir, out, batch):
    """The prompt after non-private prompt tuning."""
    tokenizer = tokenizer_in(workdir)
    model = prompted_lm_in(workdir, "target", tokenizer)
    args = PromptTrainingConfig(os.path.join(out, "prompt"), learning_rate=10.0, per_device_train_batch_size=batch,
                                **COMMON)
    trainer = PromptTrainer(model, args, train_dataset=tiny_sentiment_dataset(8), eval_dataset=tiny_sentiment_dataset(6, 1),
                            processing_class=tokenizer)
    start = prompt_parameter(model).detach().clone()
    trainer.train()
    metrics = trainer.evaluate()
    # A training forward that skips the DDP wrapper must raise under several processes (and only then).
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    try:
        trainer.compute_loss(model, batch)
        refused = False
    except ValueError:
        refused = True
    return {"start": start, "prompt": prompt_parameter(model).detach().clone(), "accuracy": metrics["eval_accuracy"],
            "num_examples": metrics["eval_num_examples"], "refuses_unwrapped": refused}


def train_dp_prompt(workdir, out, batch):
    """The prompt and the ledger after DP prompt tuning with the reproducible (test-only) noise seed, and the examples
    each process's Poisson batches held."""
    tokenizer = tokenizer_in(workdir)
    model = prompted_lm_in(workdir, "target", tokenizer)
    args = PromptTrainingConfig(os.path.join(out, "dp"), learning_rate=10.0, per_device_train_batch_size=batch,
                                max_grad_norm=0.0, **{**COMMON, "max_steps": 4, "dataloader_drop_last": False})
    # Clipping binds for some examples and not others (C between their norms), and σ is small enough for the update
    # to be mostly signal: a wrong shard, sum or scale would show.
    dp = DPConfig(noise_multiplier=0.3, max_grad_norm=0.05, insecure_noise_seed=7)
    trainer = DPPromptTrainer(model, args, dp, train_dataset=tiny_sentiment_dataset(12), processing_class=tokenizer)
    start = prompt_parameter(model).detach().clone()
    batches = [list(b) for b in trainer.get_train_dataloader().batch_sampler]
    trainer.train()
    ledger = trainer.privacy_report()
    # A secret key (no seed): each process draws its own from the OS, and the trainer must replace it with the main
    # process's. Compared by digest only.
    secret = DPPromptTrainer(prompted_lm_in(workdir, "target", tokenizer), args, DPConfig(noise_multiplier=0.3),
                             train_dataset=tiny_sentiment_dataset(12), processing_class=tokenizer)
    key = hashlib.sha256(bytes.fromhex(secret.noise_source.state_dict()["key"])).hexdigest()
    return {"start": start, "prompt": prompt_parameter(model).detach().clone(), "ledger": ledger, "batches": batches,
            "sample_rate": trainer.sample_rate, "secret_key_sha256": key,
            "secret_batches": [list(b) for b in secret.get_train_dataloader().batch_sampler]}


def train_distillation(workdir, out, batch):
    """The student's trainable weights and the logged loss terms after distillation."""
    tokenizer = tokenizer_in(workdir)
    teacher = causal_lm_in(workdir, "teacher")
    student = make_student(teacher, [0, 3])
    # Full blocks only: each process's loss is a mean over its tokens, and the mean of two equal-sized shards' means
    # is the mean over the whole batch only when every row holds the same number of tokens.
    blocks = prepare_distillation_dataset(Dataset.from_dict({"text": tiny_corpus()[:16]}), tokenizer, 16)
    blocks = blocks.filter(lambda row: len(row["input_ids"]) == 16)
    args = DistillationConfig(os.path.join(out, "distill"), learning_rate=0.5, block_size=16,
                              per_device_train_batch_size=batch, **COMMON)
    trainer = DistillationTrainer(student, teacher, args, train_dataset=blocks, processing_class=tokenizer)
    start = {k: v.detach().clone() for k, v in student.named_parameters() if v.requires_grad}
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "loss_kl" in h)
    return {"start": start, "weights": {k: v.detach().clone() for k, v in student.named_parameters() if v.requires_grad},
            "log": {k: logged[k] for k in ("loss", "loss_kl", "loss_lm", "loss_cos")}}


def main(workdir, out):
    rank = int(os.environ["RANK"])
    results = {
        "transfer": train_transfer(workdir, out, batch=1, accumulation=2),
        "generation_transfer": train_generation_transfer(workdir, out, batch=2),
        "prompt": train_prompt(workdir, out, batch=2),
        "distill": train_distillation(workdir, out, batch=2),
        "dp_prompt": train_dp_prompt(workdir, out, batch=2),
    }
    for stage, result in results.items():
        torch.save(result, os.path.join(out, f"{stage}-{rank}.pt"))
    # Left to interpreter teardown, the gloo group's threads can abort a finished process ("terminate called without
    # an active exception", exit -6): seen once in a full CI run, so the launch failed after every result was saved.
    state = PartialState()
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
