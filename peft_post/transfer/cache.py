"""The frozen side of the POST transfer loss, computed once per public example.

Φ_s, p_s and Φ_t are frozen during transfer, so of the four label-slot logits of the loss only a_t = z_t(p_t ⊕ x)
changes: a_s = z_s(p_s ⊕ x), b_s = z_s(x) and b_t = z_t(x) are computed here once and looked up by example index,
which turns the reference code's four forwards per step into one prompted forward + backward of the target.

Storage is the full vocabulary by default (exact). With ``top_k`` each example keeps a fixed-size token set S
(see `select_support`) and only the logits on S; the loss then compares distributions renormalised over S.

Size. Three (N, V) tensors: Llama-3-8B (V = 128256) with 10,000 public examples is 15.4 GB in float32.
`projected_cache_bytes` gives the size before anything is built; the logits can be stored in the compute dtype
(`resolve_cache_dtype`: half of that in bfloat16) and are always handed to the loss as float32. Above a budget the
cache is written once to a safetensors file (`build_transfer_cache(path=...)`, filled batch by batch through a
writable memory map, so the N×V tensors never sit in RAM) that `open_transfer_cache` memory-maps: pages are read
from disk when a step looks them up, and every process of a run shares the one file (`shared_transfer_cache`).
The file's name carries `transfer_cache_digest`, a hash of everything that determines its contents, so a resumed
run reuses it and a changed input builds a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from peft import PeftModel
from transformers.utils import logging

from ..modeling import (base_model_of, input_device, label_logits, on_main_process, process_rank_and_count,
                        prompt_parameter)

CACHE_TENSORS = ("source_logits", "source_base_logits", "target_base_logits")
# Written into the file's safetensors metadata: a file without it (or with another version) is not reused.
CACHE_FORMAT = "peft_post.transfer_cache/1"
CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# safetensors' dtype names of what a transfer cache holds.
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
_TORCH_DTYPES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
# safetensors refuses headers above 100 MB; ours is a few hundred bytes, so anything near that is garbage.
_MAX_HEADER = 100_000_000
# Caches above this are announced as a warning, smaller ones as info.
_LOUD_BYTES = 1_000_000_000

logger = logging.get_logger(__name__)


@torch.no_grad()
def frozen_logits(source_model, target_model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a_s, b_s, b_t): prompted source, plain source and plain target label logits of a collated batch.

    The three no-grad forwards of the uncached path and of cache building; the results lie on the device of the
    target's logits (its head's, under a device map).
    """
    keys = ("input_ids", "attention_mask", "label_positions")
    src_dev, tgt_dev = input_device(source_model), input_device(target_model)
    src = {k: batch[k].to(src_dev) for k in keys}
    tgt = {k: batch[k].to(tgt_dev) for k in keys}
    b_t = label_logits(target_model, **tgt, prompt=None)
    a_s = label_logits(source_model, **src, prompt="auto").to(b_t.device)
    b_s = label_logits(source_model, **src, prompt=None).to(b_t.device)
    return a_s, b_s, b_t


def support_size(vocab_size: int, top_k: int, num_label_tokens: int) -> int:
    return min(vocab_size, 2 * top_k + num_label_tokens)


def _as_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"A transfer cache dtype must be one of {sorted(CACHE_DTYPES)}, got {dtype!r}.")
    return CACHE_DTYPES[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def projected_cache_bytes(num_examples: int, vocab_size: int, top_k: Optional[int] = None, num_label_tokens: int = 0,
                          dtype: Union[str, torch.dtype] = torch.float32) -> int:
    """The bytes `build_transfer_cache` will hold, before it runs: three (N, W) logits tensors in ``dtype``, plus the
    (N, W) int64 kept token ids under ``top_k``; W = V for the full vocabulary, else `support_size`. Equals the
    built cache's `TransferCache.nbytes`."""
    width = vocab_size if top_k is None else support_size(vocab_size, top_k, num_label_tokens)
    total = len(CACHE_TENSORS) * num_examples * width * _as_dtype(dtype).itemsize
    if top_k is not None:
        total += num_examples * width * torch.int64.itemsize
    return total


def format_bytes(num_bytes: int) -> str:
    """``7.7 GB``: decimal units, as disks and `df` count them."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


def describe_cache_size(num_examples: int, vocab_size: int, top_k: Optional[int] = None, num_label_tokens: int = 0,
                        dtype: Union[str, torch.dtype] = torch.float32) -> str:
    """``3 × 10000 × 128256 logits in bfloat16 = 7.7 GB``: what `projected_cache_bytes` counts, in words."""
    dtype = _as_dtype(dtype)
    width = vocab_size if top_k is None else support_size(vocab_size, top_k, num_label_tokens)
    text = f"{len(CACHE_TENSORS)} × {num_examples} × {width} logits in {_dtype_name(dtype)}"
    if top_k is not None:
        text += f" + {num_examples} × {width} int64 token ids (cache_top_k={top_k})"
    return f"{text} = {format_bytes(projected_cache_bytes(num_examples, vocab_size, top_k, num_label_tokens, dtype))}"


def transfer_cache_path(digest: str, cache_dir: Optional[str] = None, output_dir: str = ".") -> str:
    """The file a cache of ``digest`` lives in, in ``cache_dir`` (default ``<output_dir>/transfer_cache``): the name
    says which inputs built it, so another run or process with the same inputs finds it, and one with other inputs
    does not."""
    folder = cache_dir if cache_dir is not None else os.path.join(output_dir, "transfer_cache")
    return os.path.join(folder, f"transfer-cache-{digest[:32]}.safetensors")


def log_cache_plan(num_examples: int, vocab_size: int, top_k: Optional[int], num_label_tokens: int,
                   dtype: Union[str, torch.dtype], path: Optional[str] = None,
                   budget_mb: Optional[float] = None) -> str:
    """Log, before the build, what a transfer cache will cost and where it will live; returns the message. A warning
    when it goes to disk or exceeds 1 GB, info otherwise."""
    size = projected_cache_bytes(num_examples, vocab_size, top_k, num_label_tokens, dtype)
    text = f"Transfer cache: {describe_cache_size(num_examples, vocab_size, top_k, num_label_tokens, dtype)}"
    if path is None:
        text += " (host memory, in every process)"
    else:
        above = f", above cache_memory_budget_mb={budget_mb:g}" if budget_mb is not None else ""
        text += f"{above}: built once into {path} and memory-mapped by every process"
    if top_k is None:
        text += "; set cache_top_k (e.g. 64) to shrink it"
    text += "."
    (logger.warning if path is not None or size > _LOUD_BYTES else logger.info)(text)
    return text


def logits_dtype(model) -> torch.dtype:
    """The dtype a model computes its logits in: its output head's weights (the embedding's for a tied head), or its
    first floating parameter's when the head's weights are quantized."""
    base = base_model_of(model)
    head = base.get_output_embeddings()
    weight = getattr(head, "weight", None) if head is not None else None
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    return base.dtype


def resolve_cache_dtype(cache_dtype: Union[str, torch.dtype], target_model=None, bf16: bool = False,
                        fp16: bool = False) -> torch.dtype:
    """The storage dtype of a transfer cache. ``"auto"``: the target's compute dtype, i.e. bfloat16 (float16) when
    its weights are bfloat16 (float16) or, for float32 weights, when the training arguments set ``bf16`` (``fp16``);
    float32 otherwise. Storing logits finer than they were computed would only cost memory."""
    if cache_dtype != "auto":
        return _as_dtype(cache_dtype)
    weights = logits_dtype(target_model) if target_model is not None else torch.float32
    if weights in (torch.bfloat16, torch.float16):
        return weights
    if bf16:
        return torch.bfloat16
    if fp16:
        return torch.float16
    return torch.float32


def select_support(
    source_logits: torch.Tensor, source_base_logits: torch.Tensor, label_token_ids: Sequence[int], top_k: int
) -> torch.Tensor:
    """The kept token set S of each row, as (B, M) ascending token ids with M = min(V, 2k + #label tokens).

    S = the label words ∪ the top-k tokens of a_s (the imitation term's reference mass) ∪ the top-k tokens of
    a_s − b_s (the direction term's reference mass, which can sit on tokens a_s alone ranks low), then filled up
    to M with the next-highest tokens of a_s so that every row has the same size. Ties break by token id.
    """
    batch, vocab = source_logits.shape
    label_ids = torch.as_tensor(list(label_token_ids), dtype=torch.long, device=source_logits.device)
    size = support_size(vocab, top_k, len(label_ids))
    if size == vocab:
        return torch.arange(vocab, device=source_logits.device).expand(batch, vocab).clone()
    k = min(top_k, vocab)
    keep = torch.zeros(batch, vocab, dtype=torch.bool, device=source_logits.device)
    keep[:, label_ids] = True
    keep.scatter_(1, source_logits.topk(k, dim=-1).indices, True)
    keep.scatter_(1, (source_logits - source_base_logits).topk(k, dim=-1).indices, True)
    order = source_logits.argsort(dim=-1, descending=True, stable=True)
    free = ~keep.gather(1, order)
    missing = size - keep.sum(-1, keepdim=True)
    fill = free & (free.long().cumsum(-1) <= missing)
    keep.scatter_(1, order, keep.gather(1, order) | fill)
    return keep.nonzero()[:, 1].reshape(batch, size)


@dataclass
class TransferCache:
    """Frozen label logits of every public example, indexed by example position.

    ``support`` is None for the full vocabulary; otherwise (N, M) token ids and every logits tensor is (N, M),
    holding the values at those ids. The logits are stored in `dtype` (float32 unless asked otherwise) and
    `lookup` returns them as float32. ``path`` is the safetensors file the tensors are memory-mapped from, or None
    when they live in memory.
    """

    source_logits: torch.Tensor
    source_base_logits: torch.Tensor
    target_base_logits: torch.Tensor
    support: Optional[torch.Tensor] = None
    top_k: Optional[int] = None
    path: Optional[str] = None

    def __len__(self) -> int:
        return self.source_logits.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.source_logits.dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (the names of the safetensors file)."""
        out = {name: getattr(self, name) for name in CACHE_TENSORS}
        if self.support is not None:
            out["support"] = self.support
        return out

    def lookup(self, example_index: torch.Tensor, device) -> dict[str, Optional[torch.Tensor]]:
        idx = example_index.to(self.source_logits.device)
        # float32 whatever the storage dtype: the softmax and KL of the loss must not run in bfloat16. A no-op (the
        # same tensor) for a float32 cache.
        out: dict[str, Optional[torch.Tensor]] = {
            name: getattr(self, name)[idx].to(device, non_blocking=True).float() for name in CACHE_TENSORS
        }
        out["support"] = None
        if self.support is not None:
            out["support"] = self.support[idx].to(device, non_blocking=True)
        return out


def _fill_cache(source_model, target_model, dataloader, num_examples: int, label_token_ids: Sequence[int],
                top_k: Optional[int], dtype: Optional[torch.dtype],
                allocate: Callable[[int, Optional[torch.dtype], bool], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The frozen forwards, batch by batch, written into the tensors that ``allocate(width, dtype, has_support)``
    returns on the first batch (in memory, or views of a writable file map)."""
    modes = (source_model.training, target_model.training)
    source_model.eval()
    target_model.eval()
    parts: Optional[dict[str, torch.Tensor]] = None
    seen = torch.zeros(num_examples, dtype=torch.bool)
    try:
        for batch in dataloader:
            a_s, b_s, b_t = frozen_logits(source_model, target_model, batch)
            # S is chosen on the logits as computed; only the kept values are rounded to the storage dtype.
            support = select_support(a_s, b_s, label_token_ids, top_k) if top_k is not None else None
            if support is not None:
                a_s, b_s, b_t = (x.gather(1, support) for x in (a_s, b_s, b_t))
            idx = batch["example_index"].cpu()
            values = {"source_logits": a_s, "source_base_logits": b_s, "target_base_logits": b_t}
            if support is not None:
                values["support"] = support
            if parts is None:
                parts = allocate(a_s.shape[1], dtype or a_s.dtype, support is not None)
            for name, value in values.items():
                dest = parts[name]
                dest[idx] = value.to(dest.device, dest.dtype)
            seen[idx] = True
    finally:
        source_model.train(modes[0])
        target_model.train(modes[1])
    if not bool(seen.all()):
        raise ValueError(f"The cache dataloader skipped {int((~seen).sum())} of {num_examples} public examples.")
    return parts


def build_transfer_cache(
    source_model,
    target_model,
    dataloader,
    num_examples: int,
    label_token_ids: Sequence[int],
    top_k: Optional[int] = None,
    storage_device="cpu",
    dtype: Union[str, torch.dtype, None] = None,
    path: Optional[str] = None,
    digest: str = "",
) -> TransferCache:
    """Run the three frozen forwards once over a dataloader of collated batches carrying ``example_index``.

    Both models are put in eval mode for the duration (dropout would make the "frozen" logits random) and restored.
    ``dtype`` is the storage dtype of the logits (None: as computed). With ``path`` the cache is written there as a
    safetensors file (filled through a memory map, so it never sits in RAM whole; atomically: a reader sees the
    finished file or none) and returned memory-mapped from it; ``digest`` goes into the file's metadata, for
    `open_transfer_cache` to check.
    """
    dtype = _as_dtype(dtype) if dtype is not None else None
    if path is None:
        def allocate(width, value_dtype, has_support):
            shapes = {name: value_dtype for name in CACHE_TENSORS}
            if has_support:
                shapes["support"] = torch.int64
            return {name: torch.empty((num_examples, width), dtype=d, device=storage_device)
                    for name, d in shapes.items()}

        parts = _fill_cache(source_model, target_model, dataloader, num_examples, label_token_ids, top_k, dtype,
                            allocate)
        return TransferCache(**{name: parts[name] for name in CACHE_TENSORS}, support=parts.get("support"),
                             top_k=top_k)

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    metadata = {"format": "pt", "peft_post": CACHE_FORMAT, "digest": digest, "num_examples": str(num_examples),
                "top_k": "none" if top_k is None else str(top_k)}
    try:
        def allocate(width, value_dtype, has_support):
            specs = {name: ((num_examples, width), value_dtype) for name in CACHE_TENSORS}
            if has_support:
                specs["support"] = ((num_examples, width), torch.int64)
            return _create_mapped_file(tmp, specs, metadata)

        parts = _fill_cache(source_model, target_model, dataloader, num_examples, label_token_ids, top_k, dtype,
                            allocate)
        # Unmap before syncing: the storage goes when its last view does.
        del parts
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return open_transfer_cache(path, digest=digest or None)


def _create_mapped_file(path: str, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                        metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """Write a safetensors header for ``specs`` (name -> (shape, dtype)) into ``path``, size the file for the data
    (sparse: nothing is written yet) and return writable tensors mapped onto their places in it."""
    # Widest dtype first keeps every tensor aligned to its element size (the header is padded to 8 bytes).
    order = sorted(specs, key=lambda name: (-specs[name][1].itemsize, name))
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name in order:
        shape, dtype = specs[name]
        size = dtype.itemsize
        for dim in shape:
            size *= dim
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    start = 8 + len(encoded)
    total = start + offset
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        f.truncate(total)
        if hasattr(os, "posix_fallocate"):
            # Reserve the blocks now: a sparse file filled through the mapping would die of SIGBUS on a full disk
            # instead of raising an OSError here, before any forward.
            os.posix_fallocate(f.fileno(), 0, total)
    return _map_tensors(path, header, start, total, shared=True)


def _map_tensors(path: str, header: dict, start: int, total: int, shared: bool) -> dict[str, torch.Tensor]:
    """Tensors viewing ``path`` through one memory map: ``shared`` writes go to the file; otherwise pages are read
    lazily, on first touch, and never written back."""
    if total == start:  # nothing to map (an empty cache): mmap refuses length 0
        storage = torch.UntypedStorage(0)
    else:
        storage = torch.UntypedStorage.from_file(path, shared=shared, nbytes=total)
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _TORCH_DTYPES[entry["dtype"]]
        begin = start + entry["data_offsets"][0]
        out[name] = torch.empty(0, dtype=dtype).set_(storage, begin // dtype.itemsize, tuple(entry["shape"]))
    return out


def open_transfer_cache(path: str, digest: Optional[str] = None) -> TransferCache:
    """Memory-map a transfer cache file written by `build_transfer_cache`: no tensor is read until looked up.

    Raises FileNotFoundError when there is no file, and ValueError, saying what is wrong, when it is not a complete
    transfer cache (truncated, another format, tensors missing or of the wrong size) or was built for other inputs
    (``digest`` differs).
    """
    size = os.path.getsize(path)

    def bad(reason: str) -> ValueError:
        return ValueError(f"{path} is not a usable transfer cache: {reason}. Delete it; the trainer builds a new one.")

    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise bad(f"the file has {size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if length > min(_MAX_HEADER, size - 8):
            raise bad(f"its header claims {length} bytes but the file has {size}")
        try:
            header = json.loads(f.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise bad(f"its header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or metadata.get("peft_post") != CACHE_FORMAT:
        raise bad(f"its metadata does not name the format {CACHE_FORMAT!r}")
    if digest is not None and metadata.get("digest") != digest:
        raise bad(f"it was built for other inputs (digest {metadata.get('digest')!r}, expected {digest!r})")
    start = 8 + length
    names = set(CACHE_TENSORS) | ({"support"} if "support" in header else set())
    if set(header) - {"__metadata__"} != names:
        raise bad(f"it holds tensors {sorted(set(header) - {'__metadata__'})}, expected {sorted(names)}")
    shapes = set()
    end = 0
    for name in names:
        entry = header[name]
        try:
            dtype = _TORCH_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, stop = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has a malformed header entry") from None
        numel = shape[0] * shape[1] if len(shape) == 2 else -1
        if numel < 0 or stop - begin != numel * dtype.itemsize or (start + begin) % dtype.itemsize:
            raise bad(f"tensor {name!r} has an inconsistent shape, dtype or offsets")
        if (name == "support") != (dtype == torch.int64) or (name != "support" and not dtype.is_floating_point):
            raise bad(f"tensor {name!r} has dtype {entry['dtype']}")
        shapes.add(shape)
        end = max(end, stop)
    logits_dtypes = {header[name]["dtype"] for name in CACHE_TENSORS}
    if len(shapes) != 1 or len(logits_dtypes) != 1:
        raise bad("its tensors differ in shape or dtype")
    if str(next(iter(shapes))[0]) != metadata.get("num_examples"):
        raise bad("its tensors do not hold the number of examples its metadata names")
    if start + end != size:
        raise bad(f"it has {size} bytes but its header describes {start + end} (truncated or appended to)")
    tensors = _map_tensors(path, header, start, size, shared=False)
    top_k = metadata.get("top_k", "none")
    return TransferCache(**{name: tensors[name] for name in CACHE_TENSORS}, support=tensors.get("support"),
                         top_k=None if top_k == "none" else int(top_k), path=os.path.abspath(path))


def _model_identity(model, hasher) -> None:
    """What names a model's weights, cheaply: class, name, config, and for every parameter and buffer its name,
    shape, dtype and a strided sample of at most 256 values (reading every weight of an 8B model would cost more
    than a rebuild saves; two checkpoints that differ at all differ in their samples in practice)."""
    base = base_model_of(model)
    config = getattr(base, "config", None)
    hasher.update(json.dumps({"class": type(base).__name__, "name": getattr(base, "name_or_path", None),
                              "config": config.to_json_string() if config is not None else None}).encode())
    for name, tensor in list(base.named_parameters()) + list(base.named_buffers()):
        hasher.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)]
        hasher.update(sample.to("cpu").contiguous().view(torch.uint8).numpy().tobytes())


def transfer_cache_digest(source_model, target_model, dataloader, label_token_ids: Sequence[int],
                          top_k: Optional[int], dtype: Union[str, torch.dtype], extra: Optional[dict] = None) -> str:
    """sha256 of what a transfer cache's contents depend on: both models (see `_model_identity`), the source prompt
    p_s in full, every collated batch of ``dataloader`` (token ids, masks, label positions, example indices: the
    texts as the template encodes them, and the batching, which moves the logits in their last bits), the label
    token ids, ``top_k``, the storage dtype and ``extra`` (JSON-able). Tokenizes the data once; runs no model."""
    hasher = hashlib.sha256(CACHE_FORMAT.encode())
    for model in (source_model, target_model):
        _model_identity(model, hasher)
    if isinstance(source_model, PeftModel):
        p_s = prompt_parameter(source_model).detach().to("cpu").contiguous()
        hasher.update(f"prompt:{tuple(p_s.shape)}:{p_s.dtype}".encode())
        hasher.update(p_s.view(torch.uint8).numpy().tobytes())
    hasher.update(json.dumps({"labels": [int(t) for t in label_token_ids], "top_k": top_k,
                              "dtype": _dtype_name(_as_dtype(dtype)), "extra": extra}, sort_keys=True).encode())
    for batch in dataloader:
        for key in ("example_index", "input_ids", "attention_mask", "label_positions"):
            value = batch[key].to("cpu", torch.int64).contiguous()
            hasher.update(f"{key}:{tuple(value.shape)}".encode())
            hasher.update(value.numpy().tobytes())
    return hasher.hexdigest()


def shared_transfer_cache(path: str, digest: str, build: Callable[[], TransferCache]) -> tuple[TransferCache, bool]:
    """The cache in ``path``: opened when a valid file for ``digest`` is there, else built by ``build()`` (which
    must write ``path``, e.g. `build_transfer_cache(path=path, digest=digest)`); returns (cache, built).

    Under `torch.distributed`, only rank 0 opens-or-builds (`modeling.on_main_process`: a failure there reaches
    every rank as an error instead of leaving them waiting); the others then open the file it left, and report
    built = False. A file that exists but is unusable (truncated, corrupt, other inputs) is rebuilt with a warning.
    """
    rank, _ = process_rank_and_count()
    made: dict[str, TransferCache] = {}

    def open_or_build() -> bool:
        try:
            made["cache"] = open_transfer_cache(path, digest=digest)
            return False
        except FileNotFoundError:
            pass
        except ValueError as err:
            warnings.warn(f"{err} Rebuilding it.")
        made["cache"] = build()
        return True

    try:
        built = on_main_process(open_or_build)
    except (RuntimeError, ValueError) as err:
        if "cache" in made or rank == 0:
            raise
        # The main process's own error names what failed there; the others also say which cache it was building.
        raise type(err)(f"{err} (while opening or building the transfer cache {path})") from err
    if "cache" in made:
        return made["cache"], built
    try:
        return open_transfer_cache(path, digest=digest), False
    except (OSError, ValueError) as err:
        raise RuntimeError(
            f"Rank {rank} cannot open the transfer cache that rank 0 wrote ({err}); `cache_dir` must be a folder "
            "every process of the run reads (one shared filesystem)."
        ) from err
