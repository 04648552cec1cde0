"""The transfer cache at scale: its size is projected and logged before the build, it is stored in the compute dtype,
and above a memory budget it lives in one memory-mapped safetensors file that is reused and shared."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file

from peft_post import POSTConfig, TransferConfig, TransferTrainer
from peft_post.modeling import prompt_parameter
from peft_post.testing import sharpen_model, tiny_sentiment_dataset
from peft_post.transfer import open_transfer_cache, projected_cache_bytes, resolve_cache_dtype
from peft_post.transfer.cache import describe_cache_size

WORKER = os.path.join(os.path.dirname(__file__), "_cache_mp_worker.py")
INIT_TEXT = "predict if sentiment of this review"
# Loss and prompt gradient from a bfloat16 cache against a float32 one, on these tiny sharpened models. Measured over
# p_s seeds 0-4 × two batches: full vocabulary (loss ~1.6) |Δloss| <= 2.5e-3 (relative 1.6e-3), gradient <= 4.2e-3
# of its largest entry; top-3 support (loss ~0.3) |Δloss| <= 4.1e-3 (relative 1.05e-2), gradient <= 1.8e-2. bfloat16
# keeps 8 mantissa bits (relative rounding <= 2^-9 ≈ 2e-3) on logits of magnitude ~10-50; the KLs at T = 2 pass that
# on. The bounds below leave a factor >= 2 over the worst measured case.
BF16_LOSS_ATOL = 1e-2
BF16_GRAD_ATOL_FRACTION = 4e-2


def _task():
    return POSTConfig(num_virtual_tokens=4, label_words=[["bad", "awful"], ["good", "great"]])


def _models(load_tiny, tokenizer, seed=0):
    source = get_peft_model(sharpen_model(load_tiny("llama")),
                            POSTConfig(num_virtual_tokens=4, label_words=[["bad", "awful"], ["good", "great"]],
                                       prompt_tuning_init="TEXT", prompt_tuning_init_text=INIT_TEXT,
                                       tokenizer_name_or_path=tokenizer.name_or_path))
    torch.manual_seed(seed)
    with torch.no_grad():  # a "tuned" p_s: clearly different from any init
        prompt_parameter(source).add_(torch.randn_like(prompt_parameter(source)) * 3.0)
    target = get_peft_model(sharpen_model(load_tiny("gpt2")), _task())
    return source, target


def _trainer(source, target, tokenizer, tmp_path, n=10, **kw):
    kw.setdefault("cache_batch_size", 4)
    args = TransferConfig(output_dir=str(tmp_path / "out"), alpha=0.5, max_steps=2, per_device_train_batch_size=4,
                          logging_steps=1000, disable_tqdm=True, seed=0, **kw)
    return TransferTrainer(target, source, args, public_dataset=tiny_sentiment_dataset(n), processing_class=tokenizer)


def _loss_and_grad(trainer, rows=(7, 2, 9, 0)):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    trainer.model.train()
    prompt_parameter(trainer.model).grad = None
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), prompt_parameter(trainer.model).grad.clone()


def test_projected_size_is_the_built_size_and_is_logged(load_tiny, tokenizer, tmp_path, caplog):
    assert describe_cache_size(10_000, 128_256, dtype="float32").endswith("= 15.4 GB")
    assert describe_cache_size(10_000, 128_256, dtype=torch.bfloat16) == \
        "3 × 10000 × 128256 logits in bfloat16 = 7.7 GB"
    source, target = _models(load_tiny, tokenizer)
    for top_k in (None, 3):
        for dtype in ("float32", "bfloat16", "float16"):
            trainer = _trainer(source, target, tokenizer, tmp_path, cache_top_k=top_k, cache_dtype=dtype)
            with caplog.at_level("INFO", logger="peft_post.transfer.cache"):
                cache = trainer.build_cache()
            projected = projected_cache_bytes(10, len(tokenizer), top_k, len(trainer.verbalizer.all_token_ids), dtype)
            assert cache.nbytes == projected == trainer.cache_plan["projected_bytes"]
            assert cache.dtype == getattr(torch, dtype) and cache.path is None
            assert trainer.cache_plan["message"] in caplog.text
            assert f"logits in {dtype}" in trainer.cache_plan["message"]
            if top_k is None:
                assert "cache_top_k" in trainer.cache_plan["message"]


def test_auto_dtype_follows_the_target(load_tiny):
    model = load_tiny("gpt2")
    assert resolve_cache_dtype("auto", model) == torch.float32
    assert resolve_cache_dtype("auto", model, bf16=True) == torch.bfloat16
    assert resolve_cache_dtype("auto", model, fp16=True) == torch.float16
    assert resolve_cache_dtype("float32", model, bf16=True) == torch.float32
    assert resolve_cache_dtype("auto", model.to(torch.bfloat16)) == torch.bfloat16
    assert resolve_cache_dtype("auto", model.to(torch.float16), bf16=True) == torch.float16


@pytest.mark.parametrize("top_k", [None, 3])
def test_bfloat16_cache_halves_the_bytes_and_keeps_the_loss_close(top_k, load_tiny, tokenizer, tmp_path):
    source, target = _models(load_tiny, tokenizer)
    full = _trainer(source, target, tokenizer, tmp_path, cache_top_k=top_k, cache_dtype="float32")
    half = _trainer(source, target, tokenizer, tmp_path, cache_top_k=top_k, cache_dtype="bfloat16")
    c32, c16 = full.build_cache(), half.build_cache()
    logits = ("source_logits", "source_base_logits", "target_base_logits")
    assert sum(getattr(c16, k).nbytes for k in logits) * 2 == sum(getattr(c32, k).nbytes for k in logits)
    for name in logits:  # the logits are computed in float32 and only rounded for storage
        assert torch.equal(getattr(c16, name), getattr(c32, name).to(torch.bfloat16))
    if top_k is not None:
        assert torch.equal(c16.support, c32.support)
    assert c16.lookup(torch.tensor([1, 0]), "cpu")["source_logits"].dtype == torch.float32
    (loss32, grad32), (loss16, grad16) = _loss_and_grad(full), _loss_and_grad(half)
    assert loss32.item() > 1e-2
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32, rtol=0, atol=BF16_LOSS_ATOL)
    torch.testing.assert_close(grad16, grad32, rtol=0, atol=BF16_GRAD_ATOL_FRACTION * grad32.abs().max().item())


@pytest.mark.parametrize("dtype, top_k", [("float32", None), ("bfloat16", 3)])
def test_memory_mapped_cache_equals_the_in_memory_one(dtype, top_k, load_tiny, tokenizer, tmp_path, caplog):
    source, target = _models(load_tiny, tokenizer)
    memory = _trainer(source, target, tokenizer, tmp_path, cache_top_k=top_k, cache_dtype=dtype)
    disk = _trainer(source, target, tokenizer, tmp_path, cache_top_k=top_k, cache_dtype=dtype,
                    cache_memory_budget_mb=0)
    in_ram = memory.build_cache()
    with caplog.at_level("WARNING", logger="peft_post.transfer.cache"):
        mapped = disk.build_cache()
    assert in_ram.path is None
    assert mapped.path == disk.cache_plan["path"] and disk.cache_plan["built"] is True
    assert os.path.dirname(mapped.path) == str(tmp_path / "out" / "transfer_cache")
    assert "cache_memory_budget_mb=0" in caplog.text and mapped.path in caplog.text
    # Views of one private map of the whole file (header included), not tensors read into memory.
    storages = {t.untyped_storage().data_ptr() for t in mapped.tensors().values()}
    assert len(storages) == 1 and mapped.source_logits.untyped_storage().nbytes() == os.path.getsize(mapped.path)
    assert mapped.nbytes == in_ram.nbytes == disk.cache_plan["projected_bytes"]
    assert mapped.tensors().keys() == in_ram.tensors().keys()
    for name, value in in_ram.tensors().items():
        assert torch.equal(mapped.tensors()[name], value), name
    index = torch.tensor([9, 0, 4, 4])
    for name, value in in_ram.lookup(index, "cpu").items():
        assert (value is None and mapped.lookup(index, "cpu")[name] is None) or \
            torch.equal(mapped.lookup(index, "cpu")[name], value), name
    # A valid safetensors file: safetensors reads back the same tensors.
    read = load_file(mapped.path)
    assert read.keys() == in_ram.tensors().keys()
    for name, value in in_ram.tensors().items():
        assert torch.equal(read[name], value), name
    # Same loss and gradient, bit for bit.
    (loss_m, grad_m), (loss_d, grad_d) = _loss_and_grad(memory), _loss_and_grad(disk)
    assert torch.equal(loss_m, loss_d) and torch.equal(grad_m, grad_d)
    assert [f for f in os.listdir(os.path.dirname(mapped.path))] == [os.path.basename(mapped.path)]  # no temp left


def _count_forwards(*models):
    calls = []
    for model in models:
        # Every frozen forward embeds its input once (label_logits runs the model body, not its top-level forward).
        model.get_base_model().get_input_embeddings().register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_on_disk_cache_is_reused_and_a_damaged_one_rebuilt(load_tiny, tokenizer, tmp_path):
    source, target = _models(load_tiny, tokenizer)
    calls = _count_forwards(source, target)
    first = _trainer(source, target, tokenizer, tmp_path, cache_memory_budget_mb=0, cache_dtype="bfloat16")
    start = len(calls)  # the trainer embeds the init text once
    cache = first.build_cache()
    path, built_forwards = cache.path, len(calls) - start
    assert built_forwards == 3 * 3  # 3 batches × (a_s, b_s, b_t)
    reference = {k: v.clone() for k, v in cache.tensors().items()}
    stamp = os.stat(path).st_mtime_ns

    # A second trainer (a resumed run, another process) with the same inputs opens the file: no forward.
    second = _trainer(source, target, tokenizer, tmp_path, cache_memory_budget_mb=0, cache_dtype="bfloat16")
    start = len(calls)
    again = second.build_cache()
    assert len(calls) == start and second.cache_plan["built"] is False
    assert again.path == path and os.stat(path).st_mtime_ns == stamp
    assert all(torch.equal(again.tensors()[k], v) for k, v in reference.items())

    # Other inputs (a different p_s, top-k or dtype) name another file.
    other = _trainer(source, target, tokenizer, tmp_path, cache_memory_budget_mb=0, cache_dtype="float32")
    p_s = prompt_parameter(source).detach().clone()
    with torch.no_grad():
        prompt_parameter(source).add_(1.0)
    paths = {path}
    for trainer in (other, _trainer(source, target, tokenizer, tmp_path, cache_memory_budget_mb=0,
                                    cache_dtype="bfloat16"),
                    _trainer(source, target, tokenizer, tmp_path, cache_memory_budget_mb=0, cache_dtype="bfloat16",
                             cache_top_k=3)):
        trainer.build_cache()
        paths.add(trainer.cache_plan["path"])
    assert len(paths) == 4
    with torch.no_grad():
        prompt_parameter(source).copy_(p_s)

    # Truncated (a copy cut short) or overwritten with garbage: detected, with a clear error, and rebuilt.
    del cache, again
    size = os.path.getsize(path)
    for damage in ("truncate", "garbage"):
        with open(path, "r+b") as f:
            if damage == "truncate":
                f.truncate(size - 10)
            else:
                f.write(b"\xff" * 16)
        with pytest.raises(ValueError, match="not a usable transfer cache.*Delete it"):
            open_transfer_cache(path)
        trainer = _trainer(source, target, tokenizer, tmp_path, cache_memory_budget_mb=0, cache_dtype="bfloat16")
        before = len(calls)
        with pytest.warns(UserWarning, match="not a usable transfer cache.*Rebuilding"):
            rebuilt = trainer.build_cache()
        assert len(calls) == before + built_forwards and trainer.cache_plan["built"] is True
        assert rebuilt.path == path and os.path.getsize(path) == size
        assert all(torch.equal(rebuilt.tensors()[k], v) for k, v in reference.items())
        del rebuilt
    with pytest.raises(ValueError, match="built for other inputs"):
        open_transfer_cache(path, digest="0" * 64)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"cache_dtype": "int8"}, "cache_dtype"), ({"cache_memory_budget_mb": -1}, "cache_memory_budget_mb"),
     ({"cache_memory_budget_mb": "big"}, "cache_memory_budget_mb"), ({"cache_dir": ""}, "cache_dir")],
)
def test_cache_config_validation(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        TransferConfig(output_dir=str(tmp_path), alpha=0.5, **kwargs)


def test_two_processes_share_one_file_built_by_rank_0(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, WORKER, str(tmp_path)], env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    r0, r1 = (torch.load(str(tmp_path / f"rank-{rank}.pt")) for rank in (0, 1))
    assert r0["built"] is True and r0["forwards"] == 3  # rank 0 ran the target once per batch (3 batches)
    assert r1["built"] is False and r1["forwards"] == 0  # rank 1 waited, then opened rank 0's file
    assert r0["path"] == r1["path"] == str(tmp_path / "cache" / "shared.safetensors")
    assert r0["tensors"].keys() == r1["tensors"].keys() == {"source_logits", "source_base_logits",
                                                            "target_base_logits", "support"}
    assert all(torch.equal(r0["tensors"][k], r1["tensors"][k]) for k in r0["tensors"])
    assert r0["tensors"]["source_logits"].dtype == torch.bfloat16
    # Rank 0's failed build reaches rank 1 as an error instead of leaving it waiting.
    assert r0["failure"].startswith("OSError: disk full")
    assert r1["failure"].startswith("RuntimeError: The main process of this job stopped: OSError: disk full")
    assert r1["failure"].endswith(f"(while opening or building the transfer cache "
                                  f"{tmp_path / 'cache' / 'other.safetensors'})")
