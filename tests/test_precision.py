"""Precision and placement as options: what `dtype`/`device` "auto" picks on each kind of machine, the CPU probe and
its cache, the errors for choices a machine cannot honour, and what the pipeline loads, trains and records."""

import json
import os

import pytest
import torch

from peft_post import precision as precision_module
from peft_post.modeling import prompt_parameter
from peft_post.pipeline import PipelineConfig, load_model, new_prompted_model
from peft_post.precision import (CPU_BF16_ENV, CPU_BF16_MIN_SPEEDUP, PROBE_FILE, Precision, cpu_bf16_speedup,
                                 quantization_config, resolve_device, resolve_precision)


@pytest.fixture
def unpinned(monkeypatch, tmp_path):
    """The CPU choice left to the probe (conftest pins it to fp32), with an empty cache."""
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    monkeypatch.setenv("PEFT_POST_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine that reports a CUDA device, with or without bf16 (`fake_cuda(bf16=...)`)."""
    def make(bf16: bool):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    return make


def test_auto_device_is_cuda_when_available(fake_cuda):
    assert resolve_device("cpu") == "cpu"
    fake_cuda(bf16=True)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES=1"):
        resolve_device("cuda:1")


def test_auto_dtype_on_cuda_is_bf16_where_supported_else_fp32(fake_cuda):
    fake_cuda(bf16=True)
    chosen = resolve_precision()
    assert (chosen.device, chosen.dtype) == ("cuda", "bfloat16")
    assert chosen.trainer_arguments() == {"bf16": True, "fp16": False, "use_cpu": False}
    fake_cuda(bf16=False)
    assert resolve_precision().dtype == "float32"  # fp16 is never picked by itself


@pytest.mark.parametrize("speedup,expected", [(7.4, "bfloat16"), (CPU_BF16_MIN_SPEEDUP, "bfloat16"),
                                              (1.2, "float32"), (0.02, "float32")])
def test_auto_dtype_on_cpu_follows_the_probe(unpinned, monkeypatch, speedup, expected):
    monkeypatch.setattr(precision_module, "cpu_bf16_speedup", lambda: speedup)
    chosen = resolve_precision("cpu", "auto")
    assert chosen.dtype == expected and "probe" in chosen.reason
    assert chosen.trainer_arguments()["bf16"] == (expected == "bfloat16")


def test_the_environment_overrides_the_probe(unpinned, monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_bf16_speedup", lambda: pytest.fail("probed despite the override"))
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert resolve_precision("cpu").dtype == "bfloat16"
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert resolve_precision("cpu").dtype == "float32"
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(ValueError, match=CPU_BF16_ENV):
        resolve_precision("cpu")
    # A dtype given is taken as it is.
    assert resolve_precision("cpu", "float32").reason == "given"


def test_the_probe_is_measured_once_per_machine_and_cached(unpinned, monkeypatch, tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return {"speedup": 3.5, "float32_ms": 7.0, "bfloat16_ms": 2.0}

    monkeypatch.setattr(precision_module, "measure_matmul_speedup", measure)
    assert cpu_bf16_speedup() == 3.5 and cpu_bf16_speedup() == 3.5
    assert len(calls) == 1
    probes = json.loads((tmp_path / "cache" / PROBE_FILE).read_text())
    (key, entry), = probes.items()
    assert entry["speedup"] == 3.5 and torch.__version__ in key and f"threads {torch.get_num_threads()}" in key
    assert cpu_bf16_speedup(refresh=True) == 3.5 and len(calls) == 2
    (tmp_path / "cache" / PROBE_FILE).write_text("{not json")  # a damaged cache is measured again
    assert cpu_bf16_speedup() == 3.5 and len(calls) == 3


def test_the_probe_measures_both_dtypes():
    result = precision_module.measure_matmul_speedup(shape=(16, 32, 64), repeats=3)
    assert result["float32_ms"] > 0 and result["bfloat16_ms"] > 0
    assert result["speedup"] == pytest.approx(result["float32_ms"] / result["bfloat16_ms"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(dtype="half"), "`dtype` must be 'auto' or one of"),
    (dict(device="tpu"), "`device` must be"),
    (dict(device=""), "`device` must be"),
    (dict(device="cpu", dtype="float16"), "float16 runs on CUDA only"),
    (dict(device="cpu", device_map="auto"), "`device_map` places the target on CUDA"),
    (dict(device_map="everywhere"), "`device_map` must be None"),
    (dict(device="cpu", quantization="8bit"), "`quantization` places the target on CUDA"),
    (dict(quantization="3bit"), "`quantization` must be None or one of"),
])
def test_choices_this_machine_cannot_honour_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolve_precision(**kwargs)


def test_fp16_is_refused_for_dp_before_any_work():
    with pytest.raises(ValueError, match="float16 cannot train with `dp`"):
        PipelineConfig(preset="quick", dtype="float16", dp=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_names_the_fix():
    with pytest.raises(ValueError, match="--device cpu"):
        resolve_precision("cuda")
    with pytest.raises(ValueError, match="--device cpu"):
        PipelineConfig(preset="quick", device="cuda")


def test_quantization_without_bitsandbytes_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ImportError, match=r"peft-post\[quantization\]"):
        quantization_config("4bit", torch.bfloat16)


def test_load_kwargs_by_role():
    p = Precision(device="cuda", dtype="bfloat16", device_map="auto")
    assert p.load_kwargs("frozen") == {"dtype": torch.bfloat16}
    assert p.load_kwargs("trainable") == {"dtype": torch.float32}
    assert p.load_kwargs("target") == {"dtype": torch.bfloat16, "device_map": "auto"}
    with pytest.raises(ValueError, match="`role`"):
        p.load_kwargs("teacher")


def test_pipeline_config_carries_the_precision_to_every_trainer(monkeypatch):
    cfg = PipelineConfig(preset="quick")
    assert cfg.precision() == Precision(reason=f"${CPU_BF16_ENV}=0")
    assert not cfg.tune_args(".").bf16 and cfg.tune_args(".").use_cpu
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    cfg = PipelineConfig(preset="quick")
    for args in (cfg.distill_args("."), cfg.tune_args("."), cfg.transfer_args(".")):
        assert args.bf16 and not args.fp16 and args.use_cpu
    assert PipelineConfig(preset="quick", dtype="float32").precision().dtype == "float32"
    checkpointed = PipelineConfig(preset="quick", gradient_checkpointing=True)
    for args in (checkpointed.distill_args("."), checkpointed.tune_args("."), checkpointed.transfer_args(".")):
        assert args.gradient_checkpointing  # the old name reads the new field
    # A JSON device map is parsed; a broken one names the field.
    with pytest.raises(ValueError, match="`device_map`"):
        PipelineConfig(preset="quick", device_map="{broken")


def test_frozen_models_load_in_the_compute_dtype_and_prompts_stay_fp32(tiny_model_dirs):
    bf16 = Precision(dtype="bfloat16")
    model = load_model(tiny_model_dirs["llama"], False, bf16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and not model.training
    assert {p.dtype for p in load_model(tiny_model_dirs["llama"], False, bf16, "trainable").parameters()} == \
        {torch.float32}
    assert {p.dtype for p in load_model(tiny_model_dirs["llama"], False).parameters()} == {torch.float32}
    cfg = PipelineConfig(preset="quick", num_virtual_tokens=4, label_words="bad|good")
    prompted = new_prompted_model(tiny_model_dirs["llama"], cfg.post_config(tiny_model_dirs["llama"]), False, 0, bf16)
    assert prompt_parameter(prompted).dtype == torch.float32
    assert prompted.get_base_model().get_input_embeddings().weight.dtype == torch.bfloat16


def test_a_pipeline_run_records_its_precision_and_is_not_reused_in_another(tiny_run, capsys):
    from transformers import AutoConfig

    from peft_post.cli import main
    from peft_post.pipeline import stage_record

    run_dir, flags = tiny_run
    assert main(["run", *flags, "--dp", "false", "--dtype", "float32", "--device", "cpu"]) == 0
    report = json.loads(open(os.path.join(run_dir, "report.json")).read())
    expected = {"device": "cpu", "dtype": "float32", "device_map": None, "quantization": None, "reason": "given"}
    assert report["precision"] == expected
    assert "- precision: float32 on cpu (given)" in open(os.path.join(run_dir, "report.md")).read()
    transfer = stage_record(run_dir, "transfer")
    assert transfer["precision"] == expected
    # The transfer cache's projected size, as logged before it was built: 3 × N × V float32 logits.
    cache = transfer["transfer_cache"]
    assert cache["dtype"] == "float32" and not cache["memory_mapped"]
    vocab = AutoConfig.from_pretrained(flags[flags.index("--target_model") + 1]).vocab_size
    assert cache["projected_bytes"] == 3 * transfer["num_public_examples"] * vocab * 4
    assert "float32" in cache["message"]
    # The same recipe in bf16 computes other numbers: the finished stages are refused, naming the dtype.
    capsys.readouterr()
    assert main(["run", *flags, "--dp", "false", "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert "--dtype 'float32' then, 'bfloat16' now" in err, err


def test_a_student_of_a_bf16_teacher_keeps_its_rope_frequencies_exact(tiny_model_dirs):
    from peft_post import make_student

    teacher = load_model(tiny_model_dirs["llama"], False, Precision(dtype="bfloat16"))
    student = make_student(teacher, [0, -1])
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}
    teacher_buffers, student_buffers = dict(teacher.named_buffers()), dict(student.named_buffers())
    frequencies = [name for name in student_buffers if name.endswith("inv_freq")]
    assert frequencies
    for name in frequencies:
        # fp32 as transformers keeps them in a bf16 model: rounded to bf16 they would shift every position's angle.
        assert student_buffers[name].dtype == teacher_buffers[name].dtype == torch.float32
        assert torch.equal(student_buffers[name], teacher_buffers[name])
