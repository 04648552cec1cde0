"""The example scripts run end to end on tiny local models and data (they must not rot)."""

import os
import subprocess
import sys

from datasets import Dataset, DatasetDict

from peft_post import POSTConfig
from peft_post.testing import build_tiny_model, tiny_generation_rows, tiny_sentiment_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_distill_then_train_prompt_with_dp_then_transfer(tmp_path, tokenizer):
    teacher = str(tmp_path / "teacher")
    build_tiny_model("llama", tokenizer, teacher, num_layers=4)
    text = str(tmp_path / "text.csv")
    Dataset.from_list([{"text": r["text"]} for r in tiny_sentiment_rows(30)]).to_csv(text)
    private = str(tmp_path / "private")
    DatasetDict({"train": Dataset.from_list(tiny_sentiment_rows(16, seed=1))}).save_to_disk(private)
    public = str(tmp_path / "public.csv")
    Dataset.from_list(tiny_sentiment_rows(12, seed=2)).to_csv(public)
    common = ["--max_steps", "2", "--report_to", "none", "--use_cpu", "true"]

    run("distill.py", "--teacher", teacher, "--keep_layers", "0,-1", "--dataset", text,
        "--output_dir", str(tmp_path / "student"), "--block_size", "16", "--per_device_train_batch_size", "4", *common)
    run("train_prompt.py", "--model_name_or_path", str(tmp_path / "student"), "--dataset", private,
        "--output_dir", str(tmp_path / "prompt"), "--num_virtual_tokens", "4", "--label_words", "bad|good",
        "--per_device_train_batch_size", "4", "--dp", "true", "--target_epsilon", "8", *common)
    ledger = POSTConfig.from_pretrained(str(tmp_path / "prompt")).privacy
    assert ledger["steps"] == 2 and 0 < ledger["epsilon"] <= 8
    run("transfer.py", "--target", teacher, "--source_model", str(tmp_path / "student"),
        "--source_prompt", str(tmp_path / "prompt"), "--public_dataset", public, "--num_public_examples", "8",
        "--output_dir", str(tmp_path / "transferred"), "--alpha", "0.5", "--per_device_train_batch_size", "4",
        *common)
    cfg = POSTConfig.from_pretrained(str(tmp_path / "transferred"))
    assert cfg.transfer_alpha == 0.5 and cfg.privacy["epsilon"] == ledger["epsilon"]
    assert cfg.provenance["public_dataset"]["size"] == 8


def test_train_and_transfer_a_generation_prompt(tmp_path, tokenizer):
    """The same scripts with `--task_kind generation`: the answer column trains, and the transfer keeps the task."""
    student, target = str(tmp_path / "student"), str(tmp_path / "target")
    build_tiny_model("llama", tokenizer, student, num_layers=2)
    build_tiny_model("llama", tokenizer, target, num_layers=3, seed=1)
    private = str(tmp_path / "private")
    DatasetDict({"train": Dataset.from_list(tiny_generation_rows(16, seed=1))}).save_to_disk(private)
    public = str(tmp_path / "public.csv")
    Dataset.from_list(tiny_generation_rows(12, seed=2)).to_csv(public)
    common = ["--max_steps", "2", "--report_to", "none", "--use_cpu", "true", "--per_device_train_batch_size", "4"]
    run("train_prompt.py", "--model_name_or_path", student, "--dataset", private, "--output_dir",
        str(tmp_path / "prompt"), "--num_virtual_tokens", "4", "--task_kind", "generation", "--max_answer_tokens", "4",
        "--template", "Review: {text}\nIn short:", *common)
    assert POSTConfig.from_pretrained(str(tmp_path / "prompt")).task_kind == "generation"
    run("transfer.py", "--target", target, "--source_model", student, "--source_prompt", str(tmp_path / "prompt"),
        "--public_dataset", public, "--num_public_examples", "8", "--output_dir", str(tmp_path / "transferred"),
        "--alpha", "0.5", "--continuation", "public_answers", *common)
    cfg = POSTConfig.from_pretrained(str(tmp_path / "transferred"))
    assert cfg.task_kind == "generation" and cfg.max_answer_tokens == 4
    assert cfg.provenance["continuation"] == "public_answers"
