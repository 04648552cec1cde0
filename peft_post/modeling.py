"""One forward pass that every stage shares: vocabulary logits at the label slot, with or without a soft prompt.

The prompt is prepended to the input embeddings as PEFT does, but the LM head is applied only at the label
position (DESIGN §5: the head over every position costs +30% on the full model and +170% on a 4-layer slice),
and an explicit `(B, n, d)` prompt can be passed, which is how DP training gets exact per-example gradients.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Callable, Optional, TypeVar, Union

import torch
from peft import PeftModel
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

# Architectures whose logits are exactly `head(backbone(x).last_hidden_state)`. Others take the slower exact
# path (full-sequence logits, then a gather), so no model is ever scored wrongly.
_CAUSAL_FAST = {"gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma3_text", "gemma2", "gemma", "smollm3", "phi3", "olmo2"}
_MASKED_HEADS = {"bert": "cls", "roberta": "lm_head", "xlm-roberta": "lm_head", "camembert": "lm_head"}
# RoBERTa numbers positions from padding_idx + 1.
_ROBERTA_LIKE = {"roberta", "xlm-roberta", "camembert"}


@contextlib.contextmanager
def quiet_checkpointing_deprecation():
    """Silence exactly one warning around our own `get_peft_model` / `PeftModel.from_pretrained` calls: PEFT's
    `PeftModel.__init__` reads `model.is_gradient_checkpointing`, which transformers 5 deprecated in favour of
    `is_activation_checkpointing`, so every prompted model built printed a `FutureWarning` that no user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def base_model_of(model) -> torch.nn.Module:
    """The transformers model under a `PeftModel` (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def input_device(model) -> torch.device:
    """The device a model's input ids must be on: its input embeddings' (the first device under a device map)."""
    return base_model_of(model).get_input_embeddings().weight.device


def require_prompt_model(model, name: str = "model") -> None:
    """Raise `ValueError` unless `model` is a prompt-tuning `PeftModel`."""
    if not isinstance(model, PeftModel) or not getattr(model, "prompt_encoder", None):
        raise ValueError(
            f"`{name}` must be a prompt-tuning PeftModel (get_peft_model(model, POSTConfig(...))), "
            f"got {type(model).__name__}."
        )


def prompt_parameter(model: PeftModel, adapter_name: Optional[str] = None) -> torch.nn.Parameter:
    """The (n, d) soft-prompt parameter of a prompt-tuning `PeftModel`."""
    require_prompt_model(model)
    name = adapter_name or model.active_adapter
    return model.prompt_encoder[name].embedding.weight


def require_only_prompt_trainable(model, name: str = "model") -> torch.nn.Parameter:
    """The prompt parameter, after checking it is the one and only trainable parameter of `model`."""
    prompt = prompt_parameter(model)
    if not prompt.requires_grad or any(p.requires_grad and p is not prompt for p in model.parameters()):
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        raise ValueError(
            f"Only the soft prompt of `{name}` may train, but the trainable parameters are {trainable}; build it with "
            "get_peft_model (which freezes the base model) and do not unfreeze base weights."
        )
    return prompt


# Every torch dropout module; `train_without_dropout` switches them off.
_DROPOUT_MODULES = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
                    torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


def _applies_dropout(module: torch.nn.Module) -> bool:
    """Whether `module`'s own forward may drop out when ``module.training``: it is a dropout module, it holds a float
    rate it passes to a functional dropout (Llama's ``attention_dropout``), or it reads the rate of a dropout child
    (GPT-2's and BERT's attention give ``self.attn_dropout.p if self.training`` to SDPA)."""
    if isinstance(module, _DROPOUT_MODULES):
        return True
    if any(isinstance(v, float) and "dropout" in k for k, v in vars(module).items()):
        return True
    if isinstance(module, (PreTrainedModel, GradientCheckpointingLayer)):
        # A model or a checkpointed layer: its training flag gates checkpointing (and the KV cache), and its dropout
        # children are switched off themselves. (One that applies a float rate itself was caught above: it runs in
        # eval mode, exact but not checkpointed; no supported architecture has one.)
        return False
    return any(isinstance(child, _DROPOUT_MODULES) for child in module.children())


def train_without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Train mode without dropout: ``model.train()``, then every module that would drop out switched to eval mode
    (that module only, not its children). Returns `model`.

    A frozen model must compute a fixed function of its input (eval mode), but transformers runs gradient
    checkpointing only in modules whose ``training`` is set, so ``eval()`` would silently turn checkpointing off.
    The result is numerically the eval-mode forward of every supported architecture, with checkpointing where it
    was enabled. Call it after anything that calls ``model.train()`` (Trainer does, every step).
    """
    model.train()
    for module in model.modules():
        if _applies_dropout(module):
            module.training = False
    return model


def upcast_trainable_parameters(model: torch.nn.Module) -> list[str]:
    """Cast every trainable float parameter held in half precision (bf16/fp16) to float32, in place (the same
    `Parameter` objects, so ties and optimizer references survive); returns their names.

    Trainable tensors keep fp32 master copies: an optimizer step of size lr·g is below bf16's resolution (8 bits of
    mantissa) for most prompt entries, so a bf16 prompt would mostly not move. The frozen weights keep their dtype;
    `label_logits` casts the prompt to the embeddings' dtype for the forward.
    """
    upcast = []
    for name, param in model.named_parameters():
        if param.requires_grad and param.is_floating_point() and param.element_size() < 4:
            param.data = param.data.float()
            upcast.append(name)
    return upcast


def is_masked_lm(model) -> bool:
    return "ForMaskedLM" in type(base_model_of(model)).__name__


def output_head(base) -> Optional[torch.nn.Module]:
    """The head that turns the last hidden states of `base` (a bare transformers model) into its logits, where that
    is exact: the output embeddings of a `_CAUSAL_FAST` architecture, the MLM head of a `_MASKED_HEADS` masked LM;
    None for any other model, which callers then run whole. Gemma's final logit soft-capping is the caller's
    (`soft_cap_logits`)."""
    model_type = base.config.model_type
    if model_type in _CAUSAL_FAST:
        return base.get_output_embeddings()
    attr = _MASKED_HEADS.get(model_type)
    if attr is not None and "ForMaskedLM" in type(base).__name__:
        return getattr(base, attr)
    return None


def soft_cap_logits(logits: torch.Tensor, config) -> torch.Tensor:
    """Gemma's final logit soft-capping, ``tanh(logits / cap) * cap``, when `config` sets ``final_logit_softcapping``;
    `logits` unchanged otherwise. For logits computed from `output_head` outside the model's own forward."""
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def require_data_parallel(trainer, allow_fsdp2: bool = False) -> None:
    """Refuse a distributed backend the trainer was not checked against (call after `Trainer.__init__`).

    One process and DDP (``accelerate launch`` / ``torchrun``, CPU or GPU) are supported by every trainer:
    `forward_through` routes the trainable forward through DDP's wrapper. ``allow_fsdp2`` also admits FSDP2
    (``accelerate launch --use_fsdp --fsdp_version 2``): `DistillationTrainer`, whose student is called through its
    own forward, the one FSDP2 gathers parameters in. FSDP1 and DeepSpeed are refused with the supported command.

    accelerate runs FSDP on accelerator devices only: a CPU launch asked for FSDP runs DDP instead (every process
    holds the whole model), which is said in a warning rather than left silent.
    """
    kind = trainer.accelerator.distributed_type
    name = type(trainer).__name__
    if kind.name == "MULTI_CPU" and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        warnings.warn(f"{name}: FSDP was asked for, but accelerate runs FSDP on GPUs (and other accelerators) only, "
                      "so these CPU processes run DistributedDataParallel: each holds the whole model.")
    if kind.name == "NO" or kind.name.startswith("MULTI_"):
        return
    what = kind.name
    if kind.name == "FSDP":
        what = "FSDP2" if getattr(trainer.accelerator, "is_fsdp2", False) else "FSDP1"
    if what == "FSDP2" and allow_fsdp2:
        return
    fsdp = ("FSDP2 (`accelerate launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP`) "
            "or DDP") if allow_fsdp2 else "DDP (`accelerate launch --num_processes N`, torchrun)"
    raise ValueError(
        f"{name} runs on one process or with {fsdp}, not with {what}: its forwards were checked against those only "
        "(docs/scaling.md)."
    )


def unwrap_model(model) -> torch.nn.Module:
    """The model inside the wrappers Trainer/accelerate put around it (DDP, torch.compile), else the model itself."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


def forward_through(model: torch.nn.Module, fn, *args, **kwargs):
    """``fn(bare, *args, **kwargs)``, with ``bare = unwrap_model(model)``, run as the forward of ``model``.

    Under multi-process training Trainer hands `compute_loss` a `DistributedDataParallel` wrapper, whose forward is
    what arms the gradient all-reduce of the next backward; a computation that calls the bare model's parts itself
    (the label-slot forward: backbone, then the head at one position) would skip it and every process would silently
    train alone. So the bare model's ``forward`` is shadowed by ``fn`` for this one call. An unwrapped model has
    ``fn`` called directly; a multi-process forward with gradients through any other wrapper raises instead.
    """
    bare = unwrap_model(model)
    ddp = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: route through the DDP module it compiled
    if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        if torch.is_grad_enabled() and process_rank_and_count()[1] > 1:
            raise ValueError(
                f"A multi-process training forward reached {type(ddp).__name__}, not a DistributedDataParallel "
                "wrapper: its gradients would not be synchronised. Launch with plain DDP (`accelerate launch`, torchrun)."
            )
        return fn(bare, *args, **kwargs)
    inner = ddp.module
    # accelerate may have put its own (autocast) forward on the instance; it is restored afterwards.
    saved = inner.__dict__.get("forward", _NOTHING)
    inner.forward = functools.partial(fn, bare)
    try:
        return ddp(*args, **kwargs)
    finally:
        if saved is _NOTHING:
            del inner.forward
        else:
            inner.forward = saved


def process_rank_and_count() -> tuple[int, int]:
    """(rank, number of processes) of the job's `torch.distributed` process group; (0, 1) outside one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_from_main(value):
    """`value` as the main process (rank 0) holds it, on every process (itself outside a process group); it must
    pickle. torch's own collective, so it cannot silently do nothing the way a helper keyed on accelerate's state can
    when that state is not the process group's."""
    if process_rank_and_count()[1] == 1:
        return value
    payload = [value]
    torch.distributed.broadcast_object_list(payload, src=0)
    return payload[0]


T = TypeVar("T")


def on_main_process(fn: Callable[[], T]) -> T:
    """``fn()`` run by the main process only; every process returns its result (which must pickle).

    An exception on the main process is re-raised there and raised on the others with its message, as a `ValueError`
    when it was one (a refusal: bad settings, a busy run folder) and as a `RuntimeError` otherwise, so no process is
    left waiting for a step that will not come.
    """
    rank, world = process_rank_and_count()
    if world == 1:
        return fn()
    outcome, error = None, None
    if rank == 0:
        try:
            outcome = ("ok", fn())
        except BaseException as err:  # every process must hear of it before it is raised
            error = err
            outcome = ("refused" if isinstance(err, ValueError) else "error", f"{type(err).__name__}: {err}")
    kind, value = broadcast_from_main(outcome)
    if error is not None:
        raise error
    if kind == "refused":
        raise ValueError(f"The main process of this job refused: {value}")
    if kind == "error":
        raise RuntimeError(f"The main process of this job stopped: {value}")
    return value


_NOTHING = object()


def _position_ids(base, mask: torch.Tensor) -> Optional[torch.Tensor]:
    """Positions counted over real tokens only, so left padding gives the same logits as right padding.

    None for a masked LM whose position scheme we do not know (it then keeps its own default).
    """
    model_type = base.config.model_type
    offset = 0
    if "ForMaskedLM" in type(base).__name__:
        if model_type in _ROBERTA_LIKE:
            offset = base.config.pad_token_id + 1
        elif model_type != "bert":
            return None
    return (mask.long().cumsum(-1) - 1).clamp(min=0) + offset


def label_logits(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    label_positions: torch.Tensor,
    prompt: Union[torch.Tensor, None, str] = "auto",
    **_: object,
) -> torch.Tensor:
    """Vocabulary logits (B, V) at each row's label slot, in float32 (float64 for a float64 model) whatever the
    model's dtype or autocast: every loss and score downstream is a softmax over them.

    ``label_positions`` index the unprompted sequence (as `VerbalizerCollator` returns them): (B,) gives (B, V)
    logits; (B, K) gives the (B, K, V) logits at K positions of each row (the teacher-forced scoring of multi-token
    label words, `peft_post.scoring`). ``prompt``:
    ``"auto"`` uses the active adapter's prompt of a `PeftModel` (none for a plain model); ``None`` runs the base
    model unprompted (the zero-shot logits); a tensor of shape (n, d) or (B, n, d) is prepended as given.

    Works with a model dispatched over several devices (``device_map="auto"``): the label slots are picked on the
    device of the last hidden state, and the logits come back on the head's device.
    """
    base = base_model_of(model)
    if isinstance(prompt, str):
        if prompt != "auto":
            raise ValueError(f"`prompt` must be 'auto', None or a tensor, got {prompt!r}.")
        prompt = prompt_parameter(model) if isinstance(model, PeftModel) else None
    embeds = base.get_input_embeddings()(input_ids)
    batch = input_ids.shape[0]
    mask = attention_mask
    n = 0
    if prompt is not None:
        if prompt.dim() == 2:
            prompt = prompt.unsqueeze(0).expand(batch, -1, -1)
        if prompt.dim() != 3 or prompt.shape[0] != batch or prompt.shape[2] != embeds.shape[2]:
            raise ValueError(
                f"`prompt` must be (n, {embeds.shape[2]}) or ({batch}, n, {embeds.shape[2]}), got {tuple(prompt.shape)}."
            )
        n = prompt.shape[1]
        # The prompt is an fp32 master parameter; a low-precision model gets a copy in its own dtype, and autograd
        # hands the gradient back to the prompt in fp32.
        embeds = torch.cat([prompt.to(device=embeds.device, dtype=embeds.dtype), embeds], dim=1)
        mask = torch.cat([mask.new_ones(batch, n), mask], dim=1)
    kwargs = {"inputs_embeds": embeds, "attention_mask": mask}
    position_ids = _position_ids(base, mask)
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    head = output_head(base)
    if head is None:
        logits = base(**kwargs).logits
        return _at_least_float32(logits[_label_slots(logits.device, batch, label_positions, n)])
    if not is_masked_lm(base):
        # A KV cache is of no use to one forward, and under gradient checkpointing transformers warns and drops it.
        kwargs["use_cache"] = False
    hidden = getattr(base, base.base_model_prefix)(**kwargs).last_hidden_state
    # Under a device map the last hidden state lies on the last layer's device, not the embeddings', and the head
    # may lie on a third one: index where the tensor is, then move the B rows (not the B x L states) to the head.
    hidden = hidden[_label_slots(hidden.device, batch, label_positions, n)]
    device = _parameter_device(head)
    if device is not None:
        hidden = hidden.to(device)
    # Softmax, KL and cross-entropy downstream run in fp32: the (B, V) logits are cast once here (cheap) whatever
    # the model's or autocast's compute dtype.
    return soft_cap_logits(_at_least_float32(head(hidden)), base.config)


def _label_slots(device, batch: int, label_positions: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, positions) index tensors on `device` that pick each row's label slot (or its K slots, for (B, K)
    positions), after `n` prompt tokens."""
    positions = label_positions.to(device) + n
    rows = torch.arange(batch, device=device)
    if positions.dim() == 2:
        rows = rows.unsqueeze(1).expand_as(positions)
    return rows, positions


def _parameter_device(module: torch.nn.Module) -> Optional[torch.device]:
    """The device of `module`'s weights; None when it has none or they are offloaded (on the meta device), where
    accelerate's hook on the module moves its inputs itself."""
    param = next(module.parameters(), None)
    return None if param is None or param.device.type == "meta" else param.device


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))
