"""Placement and precision on a CUDA device: skipped without one (CI has none); `benchmarks/gpu_check.sh` runs them on
a GPU machine. What they check: "auto" picks the GPU and bf16, models load there in the compute dtype, a target
spread by `device_map` scores like one on a single device, a trainer step keeps fp32 master prompts, and the tiny
pipeline runs end to end on CUDA and records it."""

import json
import os

import pytest
import torch

from peft_post.modeling import label_logits, prompt_parameter
from peft_post.pipeline import PipelineConfig, load_model, new_prompted_model
from peft_post.precision import Precision, resolve_precision

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_auto_picks_the_gpu_and_its_best_dtype():
    chosen = resolve_precision()
    assert chosen.device == "cuda"
    assert chosen.dtype == ("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    assert PipelineConfig(preset="quick").tune_args(".").use_cpu is False


def test_models_load_on_the_gpu_in_the_compute_dtype(tiny_model_dirs):
    precision = Precision(device="cuda", dtype="bfloat16")
    model = load_model(tiny_model_dirs["llama"], False, precision)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cuda", torch.bfloat16)}
    cfg = PipelineConfig(preset="quick", num_virtual_tokens=4, label_words="bad|good", device="cuda")
    prompted = new_prompted_model(tiny_model_dirs["llama"], cfg.post_config(tiny_model_dirs["llama"]), False, 0,
                                  precision)
    prompt = prompt_parameter(prompted)
    assert prompt.dtype == torch.float32 and prompt.device.type == "cuda"


def test_a_target_spread_by_device_map_scores_like_one_on_a_single_device(tiny_model_dirs, tokenizer):
    single = load_model(tiny_model_dirs["llama"], False, Precision(device="cuda"))
    layers = single.config.num_hidden_layers
    # Half the blocks and the head on the GPU, the embeddings and the rest on the CPU: label_logits must index the
    # last hidden state where it lies and move it to the head.
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": 0, "lm_head": 0,
                  **{f"model.layers.{i}": ("cpu" if i < layers // 2 else 0) for i in range(layers)}}
    spread = load_model(tiny_model_dirs["llama"], False, Precision(device="cuda", device_map=device_map), "target")
    batch = tokenizer(["a good film", "bad"], return_tensors="pt", padding=True)
    positions = batch["attention_mask"].sum(-1) - 1
    with torch.no_grad():
        expected = label_logits(single, batch["input_ids"].cuda(), batch["attention_mask"].cuda(), positions.cuda())
        got = label_logits(spread, batch["input_ids"], batch["attention_mask"], positions)
    torch.testing.assert_close(got.float().cpu(), expected.float().cpu(), rtol=1e-4, atol=1e-4)


def test_the_tiny_pipeline_runs_on_cuda_in_bf16(tiny_run):
    from peft_post.cli import main
    from peft_post.pipeline import stage_record

    if not torch.cuda.is_bf16_supported():
        pytest.skip("needs a GPU with bf16")
    run_dir, flags = tiny_run
    main(["run", *flags, "--device", "cuda", "--dtype", "bfloat16"])
    report = json.loads(open(os.path.join(run_dir, "report.json")).read())
    assert report["precision"]["device"] == "cuda" and report["precision"]["dtype"] == "bfloat16"
    assert stage_record(run_dir, "transfer")["precision"]["dtype"] == "bfloat16"
    for value in report["accuracy"].values():
        assert value is None or 0 <= value <= 1
