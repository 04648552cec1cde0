"""Multi-process (DDP, gloo on CPU) training gives one process's result, DP prompt tuning included."""

import json
import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

import _mp_worker
from peft_post.modeling import prompt_parameter, require_data_parallel
from peft_post.tuning import privacy
from peft_post.testing import sharpen_model, tiny_model

WORKER = os.path.join(os.path.dirname(__file__), "_mp_worker.py")
TOL = dict(rtol=0, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tokenizer, tiny_model_dirs, tmp_path_factory):
    import transformers as tf

    path = tmp_path_factory.mktemp("mp")
    tokenizer.save_pretrained(str(path / "tokenizer"))
    # Sharpened (peft_post.testing.sharpen_model): config-built models barely react to a prompt, so every gradient
    # would be ~0.
    for name, kind in (("source", "llama"), ("target", "gpt2")):
        sharpen_model(tf.AutoModelForCausalLM.from_pretrained(tiny_model_dirs[kind])).save_pretrained(str(path / name))
    tiny_model("llama", tokenizer, init_range=0.2).save_pretrained(str(path / "teacher"))
    source = _mp_worker.prompted_lm_in(str(path), "source", tokenizer)
    torch.manual_seed(0)
    p_s = prompt_parameter(source).detach()
    torch.save(p_s + 3.0 * torch.randn_like(p_s), str(path / "source_prompt.pt"))  # a "tuned" p_s, far from init
    return str(path)


@pytest.fixture(scope="module")
def two_processes(workdir, tmp_path_factory):
    """The worker's results on ranks 0 and 1 of an `accelerate launch` with 2 CPU processes, per-device batch 2."""
    out = str(tmp_path_factory.mktemp("mp-out"))
    # `--multi_gpu` is accelerate's DDP launcher; without a GPU it starts CPU processes on gloo (`--cpu` would start
    # only one process).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), WORKER, workdir, out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    print(f"2-process launch: {time.time() - start:.1f} s")
    return {stage: [torch.load(os.path.join(out, f"{stage}-{rank}.pt")) for rank in (0, 1)]
            for stage in ("transfer", "generation_transfer", "prompt", "distill", "dp_prompt")}


def _same_on_both_ranks(results, key):
    a, b = (r[key] for r in results)
    for name in (a if isinstance(a, dict) else {"": a}):
        x, y = (a[name], b[name]) if name else (a, b)
        assert torch.equal(x, y), f"ranks disagree on {key} {name}: gradients were not synchronised"


def _check_moved_and_matches(start, multi, single):
    """The run moved the tensor by far more than the tolerance, and 2 processes ended where 1 did."""
    assert (single - start).abs().max() > 1000 * TOL["atol"]
    torch.testing.assert_close(multi, single, **TOL)


def _prompt_matches_one_process(multi, train, workdir, tmp_path) -> dict:
    """`train` in this process at batch 4; the 2-process prompts agree and end where it did. Its result."""
    single = train(workdir, str(tmp_path), batch=4)
    _same_on_both_ranks(multi, "prompt")
    _check_moved_and_matches(single["start"], multi[0]["prompt"], single["prompt"])
    return single


def test_transfer_with_two_processes_and_accumulation_equals_one_process(two_processes, workdir, tmp_path):
    # 2 processes x per-device 1 x accumulation 2 (DDP's no_sync path) against 1 process x batch 4.
    single = _prompt_matches_one_process(two_processes["transfer"], _mp_worker.train_transfer, workdir, tmp_path)
    assert [r["batch_size"] for r in two_processes["transfer"]] == [4, 4] and single["batch_size"] == 4


def test_generation_transfer_with_two_processes_decodes_once_and_equals_one_process(two_processes, workdir, tmp_path):
    multi = two_processes["generation_transfer"]
    single = _prompt_matches_one_process(multi, _mp_worker.train_generation_transfer, workdir, tmp_path)
    # The source's greedy answers were decoded by the main process only, and both ranks trained on them.
    assert [r["decoded"] for r in multi] == [1, 0] and single["decoded"] == 1
    assert multi[0]["answers"] == multi[1]["answers"] == single["answers"] and all(single["answers"])


def test_prompt_tuning_with_two_processes_equals_one_process(two_processes, workdir, tmp_path):
    multi = two_processes["prompt"]
    single = _prompt_matches_one_process(multi, _mp_worker.train_prompt, workdir, tmp_path)
    # Every process scores the whole held-out set, not its shard.
    assert [r["num_examples"] for r in multi] == [6, 6] and single["num_examples"] == 6
    assert [r["accuracy"] for r in multi] == [single["accuracy"]] * 2
    assert [r["refuses_unwrapped"] for r in multi] == [True, True] and not single["refuses_unwrapped"]


def test_distillation_with_two_processes_equals_one_process(two_processes, workdir, tmp_path):
    single = _mp_worker.train_distillation(workdir, str(tmp_path), batch=4)
    multi = two_processes["distill"]
    _same_on_both_ranks(multi, "weights")
    assert multi[0]["weights"].keys() == single["weights"].keys()
    for name, value in single["weights"].items():
        torch.testing.assert_close(multi[0]["weights"][name], value, **TOL, msg=name)
    moved = max((value - single["start"][name]).abs().max() for name, value in single["weights"].items())
    assert moved > 1000 * TOL["atol"]
    # The logged loss terms are means over both shards, as one process computes them over the whole batch.
    for rank in (0, 1):
        for key, value in single["log"].items():
            assert multi[rank]["log"][key] == pytest.approx(value, rel=1e-5), key


def test_dp_prompt_tuning_with_two_processes_equals_one_process(two_processes, workdir, tmp_path):
    single = _mp_worker.train_dp_prompt(workdir, str(tmp_path), batch=4)
    multi = two_processes["dp_prompt"]
    _same_on_both_ranks(multi, "prompt")
    # Each process holds a disjoint shard of the global Poisson batch (same key, same draws), and together they are
    # exactly the batch one process draws at the same global rate q = 4 / 12.
    assert [r["sample_rate"] for r in multi] == [single["sample_rate"]] * 2 == [pytest.approx(1 / 3)] * 2
    for step, batch in enumerate(single["batches"]):
        shards = [multi[rank]["batches"][step] for rank in (0, 1)]
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == sorted(batch)
        assert all(i % 2 == rank for rank in (0, 1) for i in shards[rank])
    assert sum(len(b) for b in single["batches"]) > 0
    # The same noise once per global step (not once per process) and the same scale: the prompts agree to float
    # rounding, and the ledger is identical.
    assert (single["prompt"] - single["start"]).abs().max() > 1000 * 1e-6
    torch.testing.assert_close(multi[0]["prompt"], single["prompt"], rtol=0, atol=1e-6)
    assert multi[0]["ledger"] == multi[1]["ledger"] == single["ledger"]
    assert single["ledger"]["steps"] == 4
    # With a secret key (no seed) too, both processes hold the main process's key, so their shards are one batch.
    assert multi[0]["secret_key_sha256"] == multi[1]["secret_key_sha256"] != single["secret_key_sha256"]
    for step in range(len(multi[0]["secret_batches"])):
        shards = [multi[rank]["secret_batches"][step] for rank in (0, 1)]
        assert all(i % 2 == rank for rank in (0, 1) for i in shards[rank])


def test_dp_sampler_shards_are_a_global_poisson_batch():
    """Without a fixed seed too: processes sharing a key draw one global batch and split it by shard."""
    source = privacy.NoiseSource()
    one = list(privacy.PoissonBatchSampler(12, 0.25, 30, source))
    shards = [list(privacy.PoissonBatchSampler(12, 0.25, 30, source, rank=r, world_size=3)) for r in range(3)]
    for step, batch in enumerate(one):
        assert sorted(sum((shards[r][step] for r in range(3)), [])) == sorted(batch)
    assert any(len(shards[r][step]) == 0 for r in range(3) for step in range(30))  # shards of 4 at q = 0.25: P(some empty) > 1 - 1e-20
    fixed = [list(privacy.ShuffledBatchSampler(10, 4, source, rank=r, world_size=2)) for r in range(2)]
    whole = list(privacy.ShuffledBatchSampler(10, 4, source))
    assert [sorted(a + b) for a, b in zip(*fixed)] == [sorted(b) for b in whole]
    with pytest.raises(ValueError, match="rank"):
        privacy.PoissonBatchSampler(12, 0.25, 3, source, rank=2, world_size=2)


@pytest.mark.parametrize("backend", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_backends_other_than_ddp_are_refused(backend):
    trainer = SimpleNamespace(accelerator=SimpleNamespace(distributed_type=backend, is_fsdp2=True))
    with pytest.raises(ValueError, match=r"with DDP \(`accelerate launch.*not with (FSDP2|DEEPSPEED)"):
        require_data_parallel(trainer)
    for fine in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        require_data_parallel(SimpleNamespace(accelerator=SimpleNamespace(distributed_type=fine)))


def test_fsdp2_is_admitted_where_allowed_and_fsdp1_and_deepspeed_are_refused_naming_fsdp2():
    fsdp2 = SimpleNamespace(accelerator=SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True))
    require_data_parallel(fsdp2, allow_fsdp2=True)
    for backend, is_fsdp2, shown in ((DistributedType.FSDP, False, "FSDP1"), (DistributedType.DEEPSPEED, False,
                                                                             "DEEPSPEED")):
        trainer = SimpleNamespace(accelerator=SimpleNamespace(distributed_type=backend, is_fsdp2=is_fsdp2))
        with pytest.raises(ValueError, match=f"FSDP2 .*--fsdp_version 2.*not with {shown}"):
            require_data_parallel(trainer, allow_fsdp2=True)


def test_a_cpu_launch_that_asked_for_fsdp_is_told_it_runs_ddp(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    trainer = SimpleNamespace(accelerator=SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
    with pytest.warns(UserWarning, match="FSDP on GPUs .* only.*DistributedDataParallel"):
        require_data_parallel(trainer, allow_fsdp2=True)


FSDP_WORKER = os.path.join(os.path.dirname(__file__), "_fsdp_worker.py")


def _fsdp2_distillation(workdir: str, out: str, processes: int, device: str = "cpu") -> list:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
           "--fsdp_cpu_ram_efficient_loading", "false", "--fsdp_state_dict_type", "FULL_STATE_DICT",
           FSDP_WORKER, workdir, out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "FSDP_WORKER_DEVICE": device}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    infos = []
    for rank in range(processes):
        with open(os.path.join(out, f"info-{rank}.json"), encoding="utf-8") as f:
            infos.append(json.load(f))
    assert all(i["distributed_type"] == "FSDP" and i["is_fsdp2"] and i["sharded"] for i in infos), infos
    return infos


def _check_fsdp2_student(workdir: str, out: str, infos: list, tmp_path, atol: float) -> None:
    """The student FSDP2 saved (gathered from its shards) is the one a single CPU process distils."""
    from safetensors.torch import load_file

    single = _mp_worker.train_distillation(workdir, str(tmp_path / "one"), batch=4)
    saved = load_file(os.path.join(out, "saved", "model.safetensors"))
    moved = 0.0
    for name, value in single["weights"].items():
        torch.testing.assert_close(saved[name].float().cpu(), value, rtol=0, atol=atol, msg=name)
        moved = max(moved, float((value - single["start"][name]).abs().max()))
    assert moved > 100 * atol
    for info in infos:
        for key, value in single["log"].items():
            assert info["log"][key] == pytest.approx(value, rel=100 * atol), key
    # The label-slot forward on the sharded student is the saved, whole student's.
    import transformers as tf

    from peft_post.modeling import label_logits

    whole = tf.AutoModelForCausalLM.from_pretrained(os.path.join(out, "saved")).eval()
    for rank in range(len(infos)):
        found = torch.load(os.path.join(out, f"logits-{rank}.pt"))
        with torch.no_grad():
            expected = label_logits(whole, found["ids"], found["mask"], found["positions"], prompt=None)
        torch.testing.assert_close(found["logits"], expected, rtol=0, atol=100 * atol)


def test_distillation_under_fsdp2_with_two_processes_equals_one_process(workdir, tmp_path):
    """The student sharded by FSDP2 over 2 gloo processes (the teacher left whole), saved by gathering its shards,
    ends where one process's student does."""
    out = str(tmp_path / "fsdp")
    _check_fsdp2_student(workdir, out, _fsdp2_distillation(workdir, out, 2), tmp_path, TOL["atol"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_distillation_under_fsdp2_on_gpus_equals_one_cpu_process(workdir, tmp_path):
    """accelerate's own FSDP2 path on CUDA (no CPU harness): 1 or 2 GPUs, global batch 4 (benchmarks/gpu_check.sh)."""
    out = str(tmp_path / "fsdp-cuda")
    processes = min(torch.cuda.device_count(), 2)
    _check_fsdp2_student(workdir, out, _fsdp2_distillation(workdir, out, processes, "cuda"), tmp_path, 1e-4)
