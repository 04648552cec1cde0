"""Where and in which precision the stages run: `device`, `dtype`, `device_map` and quantized loading.

`resolve_precision` turns a user's choices, ``"auto"`` included, into a `Precision`: the device, the compute dtype,
and how frozen models are placed and loaded. ``dtype="auto"`` picks

- bfloat16 on a CUDA device that supports it (fp16 is never picked by itself: it needs loss scaling and overflows
  where bf16 does not), float32 on other CUDA devices;
- on a CPU, bfloat16 when a short probe finds bf16 matmuls clearly faster than fp32 (`CPU_BF16_MIN_SPEEDUP`), as on
  CPUs with AMX or AVX512-BF16, else float32. Without those units bf16 is emulated and far *slower* than fp32 (on
  an AVX2-only AMD EPYC here, 0.02x), so a fixed choice would be wrong somewhere. The probe takes about a second and
  is measured once per machine: its result is cached in ``<cache_dir>/precision_probe.json``, keyed by the CPU,
  torch version and thread count. ``$PEFT_POST_CPU_BF16`` (``1``/``0``) overrides it.

What runs in the compute dtype: the frozen models (the target for transfer and evaluation, the student for prompt
tuning, the teacher for distillation) load directly in it, and the trainers' forwards run under autocast
(`TrainingArguments.bf16` / ``fp16``, from `Precision.trainer_arguments`). Trainable tensors keep fp32 master
copies (the prompts; the student while it is distilled), and softmax, KL and cross-entropy run in fp32.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Optional, Union

import torch

DEVICES_HELP = "'auto' (CUDA when available), 'cpu' or 'cuda'"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("8bit", "4bit")
# Placement strategies accelerate's `device_map` accepts by name (a dict maps modules to devices).
DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")
# "Clearly faster": bf16 changes the numbers a little, so it is picked on a CPU only for a real gain. AMX CPUs
# measured 7.4x on the probe's matmul shape.
CPU_BF16_MIN_SPEEDUP = 1.5
CPU_BF16_ENV = "PEFT_POST_CPU_BF16"
PROBE_FILE = "precision_probe.json"
# The probe's matmul: the shape of a SmolLM2-135M MLP projection over a batch of short sequences.
PROBE_SHAPE = (256, 576, 1536)


@dataclass(frozen=True)
class Precision:
    """Where and how a run computes: `resolve_precision` makes one from the user's (possibly "auto") choices."""

    device: str = "cpu"
    dtype: str = "float32"
    device_map: Optional[Union[str, dict]] = None
    quantization: Optional[str] = None
    reason: str = "given"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def low_precision(self) -> bool:
        return self.dtype != "float32"

    def trainer_arguments(self) -> dict:
        """The `TrainingArguments` that make a trainer compute on `device` in `dtype` (mixed precision: autocast
        over fp32 trainable parameters)."""
        return {"bf16": self.dtype == "bfloat16", "fp16": self.dtype == "float16", "use_cpu": self.device == "cpu"}

    def load_kwargs(self, role: str = "frozen") -> dict:
        """`from_pretrained` keyword arguments for a model in `role`: ``"frozen"`` loads in the compute dtype,
        ``"trainable"`` in fp32 (the master weights of the student while it is distilled), and ``"target"`` (the
        frozen large model) also takes `device_map` and `quantization`. The caller moves a model loaded without a
        device map to `device`."""
        if role not in ("frozen", "trainable", "target"):
            raise ValueError(f"`role` must be 'frozen', 'trainable' or 'target', got {role!r}.")
        kwargs: dict = {"dtype": torch.float32 if role == "trainable" else self.torch_dtype}
        if role == "target" and self.quantization is not None:
            kwargs["quantization_config"] = quantization_config(self.quantization, self.torch_dtype)
            kwargs["device_map"] = {"": self.device}  # bitsandbytes places the weights as it loads them
        if role == "target" and self.device_map is not None:
            kwargs["device_map"] = self.device_map
        return kwargs

    def record(self) -> dict:
        """What a stage record and the report state about it."""
        return asdict(self)


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when CUDA is available, else ``"cpu"``; any other value is checked and returned."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"`device` must be {DEVICES_HELP}, got {device!r}.") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"`device` must be {DEVICES_HELP}, got {device!r}.")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"`device` is {device!r} but torch finds no CUDA device (torch {torch.__version__}); "
                             "pass `--device cpu`, or `--device auto` to use CUDA only when it is there.")
        if parsed.index not in (None, 0):
            # Trainer places what it trains on the first visible GPU whatever the model's device; a run split between
            # cuda:0 (training) and cuda:N (loading, evaluation) would fail on mixed devices.
            raise ValueError(f"`device` {device!r}: runs use the first visible GPU. Choose the GPU with "
                             f"CUDA_VISIBLE_DEVICES={parsed.index} and pass `--device cuda`.")
    return str(parsed)


def check_precision_choices(device: str, dtype: str, device_map, quantization) -> None:
    """Refuse values no device accepts (before any work: `resolve_precision` checks what depends on the machine)."""
    if not isinstance(device, str) or not device:
        raise ValueError(f"`device` must be {DEVICES_HELP}, got {device!r}.")
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"`dtype` must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}.")
    if device_map is not None and not isinstance(device_map, dict) and device_map not in DEVICE_MAP_NAMES:
        raise ValueError(f"`device_map` must be None, one of {list(DEVICE_MAP_NAMES)} or a dict of module -> device, "
                         f"got {device_map!r}.")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"`quantization` must be None or one of {list(QUANTIZATIONS)}, got {quantization!r}.")


def resolve_precision(device: str = "auto", dtype: str = "auto", device_map=None,
                      quantization: Optional[str] = None) -> Precision:
    """The `Precision` for these choices on this machine (see the module docstring for what "auto" picks)."""
    check_precision_choices(device, dtype, device_map, quantization)
    resolved_device = resolve_device(device)
    on_cuda = resolved_device.startswith("cuda")
    if dtype == "auto":
        resolved_dtype, reason = _auto_dtype(resolved_device)
    else:
        resolved_dtype, reason = dtype, "given"
    if resolved_dtype == "float16" and not on_cuda:
        raise ValueError("`dtype` float16 runs on CUDA only (torch's CPU float16 is emulated and its mixed precision "
                         "needs a GPU grad scaler); on a CPU pass `--dtype bfloat16` or `--dtype float32`.")
    if resolved_dtype == "bfloat16" and on_cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(f"`dtype` bfloat16 is not supported by {torch.cuda.get_device_name()}; pass `--dtype "
                         "float16` or `--dtype float32`.")
    if (device_map is not None or quantization is not None) and not on_cuda:
        what = "`device_map`" if device_map is not None else "`quantization`"
        raise ValueError(f"{what} places the target on CUDA devices, but the run's device is {resolved_device!r}; "
                         f"drop {what} or run with `--device cuda`.")
    if quantization is not None:
        quantization_config(quantization, DTYPES[resolved_dtype])  # a missing extra is reported before any work
    return Precision(resolved_device, resolved_dtype, device_map, quantization, reason)


def _auto_dtype(device: str) -> tuple[str, str]:
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "CUDA device with bf16"
        return "float32", "CUDA device without bf16"
    forced = os.environ.get(CPU_BF16_ENV)
    if forced is not None:
        if forced not in ("0", "1"):
            raise ValueError(f"${CPU_BF16_ENV} must be 1 (bf16 on the CPU) or 0 (fp32), got {forced!r}.")
        return ("bfloat16" if forced == "1" else "float32"), f"${CPU_BF16_ENV}={forced}"
    speedup = cpu_bf16_speedup()
    choice = "bfloat16" if speedup >= CPU_BF16_MIN_SPEEDUP else "float32"
    return choice, f"CPU probe: bf16 matmul {speedup:.2f}x the speed of fp32 (bf16 from {CPU_BF16_MIN_SPEEDUP}x)"


def cpu_bf16_speedup(refresh: bool = False) -> float:
    """fp32 time / bf16 time of a matmul on this CPU (above 1: bf16 is faster). Measured once per CPU model, torch
    version and thread count, then read from the cache (``refresh`` measures again)."""
    from .assets import cache_dir
    from .io import atomic_write_json

    key = f"{cpu_name()}|torch {torch.__version__}|{torch.backends.cpu.get_cpu_capability()}|" \
          f"threads {torch.get_num_threads()}"
    path = os.path.join(cache_dir(), PROBE_FILE)
    if not refresh and (key, path) in _UNSAVED_PROBES:
        return _UNSAVED_PROBES[(key, path)]
    probes = {}
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                probes = json.load(f)
        except (OSError, ValueError):
            probes = {}  # a damaged cache is measured again
    if not refresh and isinstance(probes.get(key), dict) and isinstance(probes[key].get("speedup"), (int, float)):
        return float(probes[key]["speedup"])
    measured = measure_matmul_speedup()
    probes[key] = measured
    try:
        atomic_write_json(path, probes)
    except OSError:
        _UNSAVED_PROBES[(key, path)] = measured["speedup"]  # a read-only cache: measured once per process instead
    return measured["speedup"]


_UNSAVED_PROBES: dict = {}


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_matmul_speedup(shape: tuple[int, int, int] = PROBE_SHAPE, repeats: int = 5) -> dict:
    """fp32 and bf16 times of an (m, k) @ (k, n) matmul on the CPU, interleaved, and their ratio (medians)."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    pairs = {"float32": (a, b), "bfloat16": (a.bfloat16(), b.bfloat16())}
    times: dict = {name: [] for name in pairs}
    for name, (x, y) in pairs.items():
        x @ y  # warm-up: kernel selection and first-touch allocations
    for _ in range(repeats):
        for name, (x, y) in pairs.items():
            start = time.perf_counter()
            x @ y
            times[name].append(time.perf_counter() - start)
    fp32, bf16 = statistics.median(times["float32"]), statistics.median(times["bfloat16"])
    return {"speedup": fp32 / bf16, "float32_ms": fp32 * 1e3, "bfloat16_ms": bf16 * 1e3, "shape": list(shape),
            "repeats": repeats}


def quantization_config(quantization: str, compute_dtype: torch.dtype):
    """The `BitsAndBytesConfig` of 8-bit or 4-bit (NF4) loading; an `ImportError` naming the extra without it."""
    import importlib.util

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"`quantization` must be None or one of {list(QUANTIZATIONS)}, got {quantization!r}.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"`quantization` {quantization!r} loads the frozen target through bitsandbytes, which is "
                          "not installed: `pip install 'peft-post[quantization]'` (CUDA only), or drop `--quantization`.")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
