"""`make_student`: a shallower copy of a teacher LM (POST stage 1), initialised from the teacher's own layers."""

from __future__ import annotations

import copy
import re
from typing import Sequence

import torch

from ..modeling import base_model_of

# Where each supported family keeps its stack of transformer blocks, relative to the model's `base_model_prefix`
# backbone. Found by path rather than model_type so that Llama-family variants (SmolLM2 is a Llama) work unchanged.
_LAYER_PATHS = ("layers", "h", "encoder.layer")


def _get(module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def find_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """The state-dict prefix (e.g. ``"model.layers"``) and the ModuleList of transformer blocks of ``model``."""
    model = base_model_of(model)
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    n = getattr(model.config, "num_hidden_layers", None)
    if backbone is not None:
        for path in _LAYER_PATHS:
            layers = _get(backbone, path)
            if isinstance(layers, torch.nn.ModuleList) and len(layers) == n:
                return f"{prefix}.{path}", layers
    if model.config.get_text_config() is not model.config:
        raise ValueError(
            f"make_student needs a text-only model, got the multimodal {type(model).__name__} "
            f"(model_type={model.config.model_type!r}). Load its language model alone with "
            "`peft_post.text_models.load_text_model(path)` (for Gemma-3 4B+: a Gemma3ForCausalLM), then make the "
            "student from that.")
    raise ValueError(
        f"make_student does not know where {type(model).__name__} (model_type={model.config.model_type!r}) keeps "
        f"its layers: expected a ModuleList of num_hidden_layers={n} blocks at <{prefix or 'backbone'}>."
        f"{'|'.join(_LAYER_PATHS)}. Supported: Llama-family (Llama, Qwen2, SmolLM2, Gemma3 ForCausalLM), GPT-2 and "
        "BERT/RoBERTa ForMaskedLM."
    )


def normalize_layer_indices(keep_layers: Sequence[int], num_layers: int) -> list[int]:
    """Resolve negative indices against ``num_layers``; reject empty, non-int, out-of-range, duplicate or unsorted."""
    if isinstance(keep_layers, (str, bytes)) or not hasattr(keep_layers, "__iter__"):
        raise ValueError(f"`keep_layers` must be a list of layer indices, got {keep_layers!r}.")
    keep = list(keep_layers)
    if not keep:
        raise ValueError("`keep_layers` is empty: a student needs at least one layer, e.g. [0, -1].")
    resolved = []
    for i in keep:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"`keep_layers` must contain ints, got {i!r} in {keep}.")
        if not -num_layers <= i < num_layers:
            raise ValueError(
                f"Layer index {i} in `keep_layers` is out of range for a teacher with {num_layers} layers "
                f"(valid: {-num_layers}..{num_layers - 1})."
            )
        resolved.append(i % num_layers)
    dupes = sorted({i for i in resolved if resolved.count(i) > 1})
    if dupes:
        raise ValueError(f"`keep_layers` {keep} names layer(s) {dupes} more than once (after resolving negatives).")
    if resolved != sorted(resolved):
        raise ValueError(
            f"`keep_layers` {keep} resolves to {resolved}, which is not in increasing order; the student keeps the "
            "teacher's layer order, so list the layers bottom to top."
        )
    return resolved


def _student_config(config, keep: list[int]):
    config = copy.deepcopy(config)
    old = config.num_hidden_layers
    config.num_hidden_layers = len(keep)
    # Per-layer attributes (Gemma3/Qwen2 `layer_types`: sliding vs full attention) follow their layers.
    for name in ("layer_types",):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and len(value) == old:
            setattr(config, name, [value[i] for i in keep])
    config.post_distillation = {"teacher": getattr(config, "_name_or_path", "") or None, "teacher_num_layers": old,
                                "keep_layers": keep}
    return config


def make_student(teacher, keep_layers: Sequence[int]):
    """A new model of the teacher's class and config with only ``keep_layers`` of its transformer blocks.

    Every weight is copied from the teacher: block ``keep_layers[j]`` of the teacher becomes block ``j`` of the
    student, and the embeddings, final norm and LM/MLM head are copied as they are (tied when the teacher ties
    them). Negative indices count from the top (``[0, 1, -2, -1]``). The student shares the teacher's tokenizer,
    vocabulary and hidden size, has the teacher's dtype and device, and is returned in eval mode. Its config records
    ``post_distillation = {"teacher", "teacher_num_layers", "keep_layers"}``.
    """
    teacher = base_model_of(teacher)
    prefix, layers = find_layers(teacher)
    keep = normalize_layer_indices(keep_layers, len(layers))
    config = _student_config(teacher.config, keep)

    from transformers.initialization import no_init_weights

    # Every parameter is overwritten below, so skip the (for real models, slow) random initialisation.
    with no_init_weights():
        student = type(teacher)(config)
    ref = teacher.parameters().__next__()
    # Parameters take the teacher's dtype; buffers keep the dtype the constructor gave them (RoPE's inv_freq stays
    # fp32 in a bf16 teacher, and is copied below as it is: cast to bf16 it would round the positions' frequencies).
    student.to(device=ref.device)
    for param in student.parameters():
        param.data = param.data.to(ref.dtype)

    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in teacher.state_dict().items():
        match = pattern.match(key)
        if match is None:
            state[key] = value
        elif int(match.group(1)) in new_index:
            state[f"{prefix}.{new_index[int(match.group(1))]}.{match.group(2)}"] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    # Non-persistent buffers (rotary inv_freq, position_ids) are rebuilt by the constructor; anything else missing
    # would be an uninitialised weight, so fail loudly.
    persistent = set(student.state_dict().keys())
    missing = [k for k in missing if k in persistent]
    if missing or unexpected:
        raise RuntimeError(f"Could not copy the teacher's weights into the student: missing {missing}, "
                           f"unexpected {unexpected}.")
    # Buffers like RoPE inv_freq are recomputed by __init__; under no_init_weights make sure they match the teacher.
    teacher_buffers = dict(teacher.named_buffers())
    for name, buf in student.named_buffers():
        match = pattern.match(name)
        src = name if match is None else f"{prefix}.{keep[int(match.group(1))]}.{match.group(2)}"
        if src in teacher_buffers and teacher_buffers[src].shape == buf.shape:
            buf.copy_(teacher_buffers[src])
    if getattr(teacher.config, "tie_word_embeddings", False):
        student.tie_weights()
    return student.eval()
