"""DP-SGD for a soft prompt, one small function per step of the mechanism.

Per-example gradients come from giving every example its own copy of the prompt: a (B, n, d) leaf built from the
(n, d) parameter. One ordinary backward of the *summed* loss then leaves example i's gradient in row i of the leaf,
exactly, with no hooks. Opacus's grad-sample hooks must not be used on a PEFT prompt: PEFT looks the prompt up once
(batch 1) and repeats it, so Opacus sees a single "sample" holding the summed batch gradient and the clipping, hence
the guarantee, silently fails (see `tests/test_privacy.py`). Opacus supplies what it is good at: Poisson sampling,
the Gaussian noise sampler and the accountant interface; Google's `dp_accounting` supplies the replace-one analysis
(`accountant.py`). All randomness of the mechanism comes from a secret `NoiseSource`, never from the Trainer's seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import secrets
import warnings
from typing import TYPE_CHECKING, Callable, ContextManager, Iterable, Optional

import torch
from torch.utils.data import DataLoader, Sampler

from ..config import validate_privacy_ledger
from ..modeling import broadcast_from_main, process_rank_and_count
from .accountant import ADD_OR_REMOVE_ONE, REPLACE_ONE, calibrate_noise_multiplier

if TYPE_CHECKING:
    from .pld_accountant import PLDAccountant

# Opacus's clipping formula adds this to the norm so a zero gradient does not divide by zero.
CLIP_EPS = 1e-6
ACCOUNTANT_STATE_NAME = "dp_accountant.json"
# The NoiseSource key of a checkpoint: private, like the optimizer state; never written into a released adapter.
NOISE_KEY_NAME = "dp_noise_key.json"


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def per_example_prompts(prompt: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A (B, n, d) float32 (at least) leaf holding one independent copy of the (n, d) prompt per example."""
    return _at_least_float32(prompt.detach()).unsqueeze(0).repeat(batch_size, 1, 1).requires_grad_(True)


def per_example_gradients(
    model,
    batch: dict,
    prompt: torch.Tensor,
    losses_of: Callable,
    autocast: Optional[Callable[[], ContextManager]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-example gradients (B, n, d) of the task's per-example loss w.r.t. the prompt, and the (B,) losses.

    ``losses_of(model, batch, prompt=copies)`` returns the (B,) losses (`peft_post.scoring.example_losses`: the class
    cross-entropy, or a generated answer's mean token cross-entropy over its whole sequence).

    One forward and one backward: the loss is summed, so the gradient of example i lands only in its own copy. The
    forward may run in low precision (a bf16 model, or autocast); the copies are float32 like the prompt, so the
    gradients come back in float32 (see tests/test_low_precision.py for how far they are from fp32 ones).

    ``autocast``: a factory of the context the forward runs under (``accelerator.autocast``); the backward runs
    outside it, as torch recommends.
    """
    copies = per_example_prompts(prompt, batch["input_ids"].shape[0])
    with autocast() if autocast is not None else contextlib.nullcontext():
        # The loss of example i reads copy i only, also for multi-token words (its rows per label word share it) and
        # for a generated answer's tokens.
        losses = losses_of(model, batch, prompt=copies)
    (grads,) = torch.autograd.grad(losses.sum(), copies)
    return _at_least_float32(grads), losses.detach()


def per_example_norms(grads: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example's whole gradient (all virtual tokens together), computed in float32 at least."""
    return _at_least_float32(grads).flatten(1).norm(2, dim=1)


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """min(1, C / (‖g‖ + 1e-6)), Opacus's formula: scales every gradient into the ball of radius C."""
    return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)


def clipped_sum(grads: torch.Tensor, max_grad_norm: float, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ_i w_i · clip_C(g_i) over the batch dimension; each term has norm ≤ C (the weights `weights`, (B,), are in
    (0, 1]; none means 1), so one example moves the sum by ≤ C.

    In float32 at least, whatever the gradients' dtype: the sensitivity bound is a property of these numbers.
    """
    grads = _at_least_float32(grads)
    factors = clip_factors(per_example_norms(grads), max_grad_norm)
    if weights is not None:
        if not bool(((weights > 0) & (weights <= 1)).all()):
            raise ValueError("per-example weights must be in (0, 1]: a larger one would let an example move the "
                             "clipped sum by more than C.")
        factors = factors * _at_least_float32(weights).to(factors.device)
    return torch.einsum("b,b...->...", factors.to(grads.dtype), grads)


def signal_to_noise(grads: torch.Tensor, max_grad_norm: float, noise_multiplier: float,
                    expected_batch_size: float) -> dict:
    """How much of one DP-SGD step is signal: the expected clipped mean gradient against the noise the step adds.

    `grads` are M per-example gradients (M, ...) of one prompt (`per_example_gradients`), a sample of the data. The
    step's expected direction is the population mean of the clipped gradients, μ_C; its norm is estimated without
    the sample's own spread (`_population_mean_norm`), which at small M would otherwise pass for signal. The noise of
    a step, N(0, σ²C²I) divided by the expected batch B, has norm about σ·C·√D / B for D prompt numbers. Their ratio
    is the step's signal-to-noise: near or below 1, the noisy steps mostly point nowhere and a prompt learns little
    (Adam normalises each coordinate, so a noisy coordinate still moves by about the learning rate). `alignment` is
    ‖E[g / ‖g‖]‖: for C below every norm μ_C = C·alignment, and the ratio tends to alignment·B / (σ·√D), which no
    smaller C improves.

    Returns floats: ``signal`` (the estimate of ‖μ_C‖), ``noise`` (σ·C·√D / B), ``signal_to_noise``, ``alignment``
    and the ``clipped_share`` of examples whose norm exceeds C.
    """
    grads = _at_least_float32(grads).flatten(1)
    count, dim = grads.shape
    if count < 2:
        raise ValueError(f"`grads` must hold at least 2 per-example gradients to estimate a mean, got {count}.")
    norms = per_example_norms(grads)
    signal = _population_mean_norm(grads * clip_factors(norms, max_grad_norm).unsqueeze(1))
    noise = noise_multiplier * max_grad_norm * math.sqrt(dim) / expected_batch_size
    return {"signal": signal, "noise": noise, "signal_to_noise": signal / noise if noise > 0 else math.inf,
            "alignment": _population_mean_norm(grads / (norms.unsqueeze(1) + CLIP_EPS)),
            "clipped_share": float((norms > max_grad_norm).float().mean())}


def mean_with_sampling_variance(vectors: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The mean of M samples (M, D) and an unbiased estimate of its sampling variance E‖mean − E v‖² = tr Σ / M.
    ‖mean‖² less that variance estimates ‖E v‖² (the sample's own spread would otherwise pass for a mean)."""
    count = vectors.shape[0]
    mean = vectors.mean(0)
    # One sample has no spread to estimate: its variance counts as 0.
    trace = (float(vectors.pow(2).sum(1).mean()) - float(mean.pow(2).sum())) * count / max(count - 1, 1)
    return mean, trace / count


def _population_mean_norm(vectors: torch.Tensor) -> float:
    """An estimate of ‖E v‖ from M samples (M, D) (`mean_with_sampling_variance`), floored at 0."""
    mean, variance = mean_with_sampling_variance(vectors)
    return math.sqrt(max(float(mean.pow(2).sum()) - variance, 0.0))


def gaussian_noise(
    std: float, reference: torch.Tensor, generator: Optional[torch.Generator] = None, secure_mode: bool = False
) -> torch.Tensor:
    """N(0, std²) noise shaped like `reference`; under `secure_mode` Opacus's floating-point-attack-safe sampler."""
    from opacus.optimizers.optimizer import _generate_noise

    return _generate_noise(std=std, reference=reference, generator=generator, secure_mode=secure_mode)


def add_noise(
    summed: torch.Tensor,
    noise_multiplier: float,
    max_grad_norm: float,
    generator: Optional[torch.Generator] = None,
    secure_mode: bool = False,
) -> torch.Tensor:
    """Σ clipped + N(0, σ²C²I): the Gaussian mechanism on the clipped sum, in float32 at least (noise drawn in bf16
    would have 8 bits of mantissa). Under several processes it is applied once, to one process's partial sum, before
    the sums are all-reduced (`all_reduce_sum`)."""
    summed = _at_least_float32(summed)
    return summed + gaussian_noise(noise_multiplier * max_grad_norm, summed, generator, secure_mode)


def scale_to_mean(noised: torch.Tensor, expected_batch_size: float) -> torch.Tensor:
    """The noisy sum divided by the *expected* batch size q·N (not the sampled one), which keeps the batch size itself
    out of the output."""
    return noised / expected_batch_size


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all processes (itself under one), identical on every process.

    DP training bypasses DistributedDataParallel's gradient hooks (the per-example gradients are taken with respect
    to per-example copies of the prompt, not the parameter DDP watches), so the clipped sums are reduced here.
    """
    if process_rank_and_count()[1] == 1:
        return tensor
    reduced = tensor.clone()
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM)
    return reduced


def privatize(
    summed: torch.Tensor,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    generator: Callable[[], torch.Generator],
    secure_mode: bool = False,
) -> torch.Tensor:
    """(Σ clipped + N(0, σ²C²I)) / q·N: the noisy mean gradient of one DP-SGD step, from each process's clipped sum
    of its own shard (`summed`: the whole batch's under one process).

    The noise is drawn once per global step, by the main process of the process group (rank 0; the only process
    outside one), from ``generator()`` (called there only), and added to its partial sum before the sums are
    all-reduced (`all_reduce_sum`): the total is Σ over the whole global batch + one N(0, σ²C²I), the mechanism
    one process computes (Opacus's `DistributedDPOptimizer` does the same). Every process then holds the same
    gradient, divided by the global expected batch size q·N (`scale_to_mean`).
    """
    if process_rank_and_count()[0] == 0:
        summed = add_noise(summed, noise_multiplier, max_grad_norm, generator(), secure_mode)
    else:
        summed = _at_least_float32(summed)
    return scale_to_mean(all_reduce_sum(summed), expected_batch_size)


def sample_rate_for(batch_size: int, num_examples: int) -> float:
    """Poisson rate q = expected (global) batch size / N."""
    if num_examples < 1:
        raise ValueError("The training set is empty; DP training needs at least one example.")
    if not 1 <= batch_size <= num_examples:
        raise ValueError(
            f"The expected batch size ({batch_size}) must be between 1 and the number of training examples "
            f"({num_examples}); lower `per_device_train_batch_size`."
        )
    return batch_size / num_examples


def steps_per_epoch(sample_rate: float) -> int:
    """Poisson batches per epoch, as Opacus's sampler draws them: int(1 / q)."""
    return int(1 / sample_rate)


def planned_steps(max_steps: int, num_train_epochs: float, batches_per_epoch: int) -> int:
    """The optimizer steps the Trainer will run, as it computes them (gradient accumulation is 1 under DP)."""
    return max_steps if max_steps > 0 else math.ceil(num_train_epochs * batches_per_epoch)


# `resolve_delta`'s warning, for `warnings.filterwarnings`: the pipeline silences it for its default δ = 1/N, which
# its report states instead, and keeps it for a δ the user chose.
LARGE_DELTA_WARNING = r"δ = \S+ is >= 1/N"


def resolve_delta(target_delta: Optional[float], num_examples: int) -> float:
    """δ, defaulting to 1/N; warns when δ ≥ 1/N (such a δ permits leaking about one whole example)."""
    delta = 1.0 / num_examples if target_delta is None else float(target_delta)
    if delta >= 1.0 / num_examples:
        warnings.warn(
            f"δ = {delta:.3g} is >= 1/N = {1.0 / num_examples:.3g} (N = {num_examples} training examples): the "
            "paper's convention, but an (ε, δ) guarantee with δ this large allows fully leaking about one example "
            "with probability δ·N. Pass DPConfig(target_delta=...) well below 1/N for a stronger guarantee."
        )
    return delta


def resolve_noise_multiplier(
    target_epsilon: Optional[float],
    noise_multiplier: Optional[float],
    delta: float,
    sample_rate: float,
    steps: int,
    epsilon_tolerance: float = 0.01,
    prior_history: Optional[list] = None,
) -> float:
    """σ as given, or the smallest σ (to `epsilon_tolerance`) whose replace-one ε after `prior_history` and `steps`
    new steps is at most `target_epsilon`."""
    if noise_multiplier is not None:
        if noise_multiplier == 0:
            warnings.warn("noise_multiplier=0: no noise is added and the training has no privacy (ε = ∞).")
        return float(noise_multiplier)
    return calibrate_noise_multiplier(target_epsilon, delta, sample_rate, steps, REPLACE_ONE, epsilon_tolerance,
                                      prior_history)


def history_of_ledger(ledger: dict) -> list:
    """The (σ, q, steps) history a ledger describes: its `history`, or one phase for ledgers written before it."""
    if ledger.get("history"):
        return [(float(s), float(q), int(n)) for s, q, n in ledger["history"]]
    return [(float(ledger["noise_multiplier"]), float(ledger["sample_rate"]), int(ledger["steps"]))]


def privacy_ledger(
    accountant: PLDAccountant,
    delta: float,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    noise_source: "NoiseSource",
    void_reasons: Iterable[str] = (),
    **extra,
) -> dict:
    """The ledger stored with the prompt: the (ε, δ) guarantee, every input that determines it, and whether it holds.

    `epsilon` is for replace-one adjacency (N is published through q). `epsilon_add_remove` is the same history under
    add/remove-one, for comparison with papers that report it; it would be the guarantee only if N were secret.
    """
    reasons = list(void_reasons)
    if noise_source.replayable:
        reasons.append(
            "the sampling and noise were drawn from a fixed seed (DPConfig.insecure_noise_seed): anyone who learns "
            "the seed can replay the noise, so the released prompt is not differentially private"
        )
    if any(sigma == 0 for sigma, _, steps in accountant.history if steps > 0):
        reasons.append("some steps added no noise (noise_multiplier = 0), so ε is infinite")
    steps = len(accountant)
    ledger = {
        "epsilon": accountant.get_epsilon(delta),
        "delta": float(delta),
        "accountant": accountant.mechanism(),
        "adjacency": accountant.adjacency,
        "noise_multiplier": float(noise_multiplier),
        "max_grad_norm": float(max_grad_norm),
        "sample_rate": float(sample_rate),
        "steps": steps,
        "history": [[float(s), float(q), int(n)] for s, q, n in accountant.history],
        "epsilon_add_remove": accountant.get_epsilon(delta, ADD_OR_REMOVE_ONE),
        "noise_source": noise_source.kind,
        "guarantee_holds": not reasons,
        # A continued ledger brings its reasons along, and this run may find the same one again: state each once.
        **({"guarantee_void_reasons": list(dict.fromkeys(reasons))} if reasons else {}),
        **extra,
    }
    if steps > 0:
        validate_privacy_ledger(ledger)
    return ledger


class NoiseSource:
    """The secret randomness of DP-SGD: every Poisson batch, shuffle and noise draw comes from a generator seeded by a
    keyed hash of (purpose, step) under a 256-bit key from the operating system's entropy pool.

    Why not torch's global generator: the Trainer seeds it from `args.seed`, which is guessable (42, 0) and was
    published with the prompt; anyone holding it could replay the noise and the batches and subtract them, and the
    guarantee would be void (ε = ∞ in practice). Why per-step generators: the batch and noise of step t do not depend
    on how many draws came before, so a resumed run continues exactly the stream of an uninterrupted one once the key
    is restored from the (private) checkpoint.

    `seed` makes the key a function of that number: reproducible for tests and studies, never private; the ledger
    then says the guarantee does not hold. torch's generators are not cryptographic (Mersenne Twister on the CPU,
    Philox on CUDA); their seeds are 63 secret bits per step, derived with BLAKE2b. See docs/privacy.md for what this
    leaves open (floating-point attacks on the Gaussian sampler).
    """

    def __init__(self, seed: Optional[int] = None):
        self.replayable = seed is not None
        self._key = secrets.token_bytes(32) if seed is None else hashlib.sha256(f"peft_post:{int(seed)}".encode()).digest()

    @property
    def kind(self) -> str:
        return "fixed_seed" if self.replayable else "os_entropy"

    def generator(self, purpose: str, *index: int, device="cpu") -> torch.Generator:
        message = ":".join([purpose, *map(str, index)]).encode()
        digest = hashlib.blake2b(message, key=self._key, digest_size=8).digest()
        return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)

    def state_dict(self) -> dict:
        """The key: private. It goes only into the user's own checkpoints, never into a released adapter."""
        return {"key": self._key.hex(), "replayable": self.replayable}

    def load_state_dict(self, state: dict) -> None:
        self._key = bytes.fromhex(state["key"])
        self.replayable = bool(state["replayable"])

    def share_across_processes(self) -> None:
        """Give every process the main process's key (a no-op under one process).

        Every process must draw the same global Poisson batch (each then keeps its own shard) and agree on the step
        stream. The key travels only over the job's own process group; it is never written anywhere but the user's
        checkpoints.
        """
        rank, count = process_rank_and_count()
        if count > 1:
            self.load_state_dict(broadcast_from_main(self.state_dict() if rank == 0 else None))


class EmptyBatchCollator:
    """Wraps a collator so an empty Poisson batch becomes a batch of zero rows instead of an error."""

    def __init__(self, collate_fn: Callable, with_labels: bool = True):
        self.collate_fn = collate_fn
        self.with_labels = with_labels

    def __call__(self, rows: list) -> dict:
        if rows:
            return self.collate_fn(rows)
        empty = {
            "input_ids": torch.zeros(0, 1, dtype=torch.long),
            "attention_mask": torch.zeros(0, 1, dtype=torch.long),
            "label_positions": torch.zeros(0, dtype=torch.long),
        }
        if self.with_labels:
            empty["labels"] = torch.zeros(0, dtype=torch.long)
        return empty


class PoissonBatchSampler(Sampler):
    """Batches drawn by Opacus's Poisson sampler (every example joins independently with rate q; batches may be
    empty), each from its own `NoiseSource` generator keyed by (epoch, batch), so skipping batches on resume draws
    nothing from the stream of later ones.

    Under several processes (``world_size`` > 1, every process holding the same key) each process keeps the members
    of the global batch that lie in its own shard, the examples i with i mod world_size = rank: each shard is then
    Poisson-sampled at the global rate q, the shards are disjoint, and together they are exactly the global Poisson
    batch one process would draw. Every process yields the same number of batches; a shard's batch may be empty.
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int, noise_source: NoiseSource, rank: int = 0,
                 world_size: int = 1):
        self.num_samples, self.sample_rate, self.steps, self.noise_source = num_samples, sample_rate, steps, noise_source
        self.rank, self.world_size = _check_shard(rank, world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler  # not at import: Opacus is slow to load

        for i in range(self.steps):
            draw = UniformWithReplacementSampler(
                num_samples=self.num_samples, sample_rate=self.sample_rate, steps=1,
                generator=self.noise_source.generator("poisson", self.epoch, i),
            )
            batch = next(iter(draw))
            yield batch if self.world_size == 1 else [j for j in batch if j % self.world_size == self.rank]


class ShuffledBatchSampler(Sampler):
    """Fixed-size batches of a secret per-epoch shuffle (the last batch may be smaller): ceil(N / B) per epoch, where
    B is the global batch. Under several processes each keeps every world_size-th row of each batch, from its rank."""

    def __init__(self, num_samples: int, batch_size: int, noise_source: NoiseSource, rank: int = 0,
                 world_size: int = 1):
        self.num_samples, self.batch_size, self.noise_source = num_samples, batch_size, noise_source
        self.rank, self.world_size = _check_shard(rank, world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self):
        order = torch.randperm(self.num_samples, generator=self.noise_source.generator("shuffle", self.epoch)).tolist()
        for start in range(0, self.num_samples, self.batch_size):
            yield order[start : start + self.batch_size][self.rank :: self.world_size]


def _check_shard(rank: int, world_size: int) -> tuple[int, int]:
    if not 0 <= rank < world_size:
        raise ValueError(f"`rank` must be in [0, world_size), got rank={rank}, world_size={world_size}.")
    return int(rank), int(world_size)


class EpochDataLoader(DataLoader):
    """A DataLoader whose `set_epoch` (called by the Trainer each epoch) reaches its batch sampler."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


def secret_dataloader(dataset, batch_sampler: Sampler, collate_fn: Callable, **loader_kwargs) -> EpochDataLoader:
    """The DP training loader: batches from `batch_sampler`, empty Poisson batches collated to zero rows."""
    return EpochDataLoader(dataset, batch_sampler=batch_sampler, collate_fn=EmptyBatchCollator(collate_fn),
                           **loader_kwargs)


def chunks(batch: dict, size: Optional[int]) -> Iterable[dict]:
    """Split a batch into row chunks of at most `size` (all of it when None)."""
    n = batch["input_ids"].shape[0]
    if size is None or n <= size:
        yield batch
        return
    for start in range(0, n, size):
        yield {k: v[start : start + size] for k, v in batch.items()}
