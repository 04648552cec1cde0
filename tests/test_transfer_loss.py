import math

import pytest
import torch

from peft_post.losses import temperature_kl, transfer_loss


def _direct_kl_t(u, v, T):
    """T² · Σ_j p_j log(p_j / q_j), p = softmax(v/T) (reference), q = softmax(u/T), averaged over rows, by loops."""
    total = 0.0
    for row_u, row_v in zip(u.tolist(), v.tolist()):
        zu = sum(math.exp(x / T) for x in row_u)
        zv = sum(math.exp(x / T) for x in row_v)
        kl = 0.0
        for a, b in zip(row_u, row_v):
            p, q = math.exp(b / T) / zv, math.exp(a / T) / zu
            kl += p * math.log(p / q)
        total += T * T * kl
    return total / len(u)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.0, 3.5])
def test_transfer_loss_matches_direct_formula(alpha, T):
    g = torch.Generator().manual_seed(int(10 * alpha + T))
    a_t, b_t, a_s, b_s = (torch.randn(5, 11, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    expected = (1 - alpha) * _direct_kl_t(a_t, a_s, T) + alpha * _direct_kl_t(a_t - b_t, a_s - b_s, T)
    got = transfer_loss(a_t, b_t, a_s, b_s, alpha=alpha, temperature=T)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_kl_t_properties():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    assert temperature_kl(v, v).item() == pytest.approx(0.0, abs=1e-6)
    assert (temperature_kl(u, v, reduction="none") > 0).all()
    # Direction: source is the reference, so swapping arguments changes the value.
    assert temperature_kl(u, v).item() != pytest.approx(temperature_kl(v, u).item(), rel=1e-3)
    # Softmax is shift invariant per row: adding a constant to a row changes nothing.
    torch.testing.assert_close(temperature_kl(u + 5.0, v - 2.0), temperature_kl(u, v))
    torch.testing.assert_close(temperature_kl(u, v, reduction="sum"), temperature_kl(u, v, reduction="none").sum())
    with pytest.raises(ValueError, match="temperature"):
        temperature_kl(u, v, temperature=0)
    with pytest.raises(ValueError, match="reduction"):
        temperature_kl(u, v, reduction="max")
    with pytest.raises(ValueError, match="same shape"):
        temperature_kl(u, v[:, :3])


def test_transfer_loss_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    b_t, a_s, b_s = (torch.randn(3, 7, generator=g, dtype=torch.float64) for _ in range(3))
    for alpha in (0.0, 0.4, 1.0):
        a_t = torch.randn(3, 7, generator=g, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: transfer_loss(x, b_t, a_s, b_s, alpha, 2.0), (a_t,))


def test_transfer_loss_gradient_closed_form():
    # d/da_t of T²·KL(p ‖ softmax(u/T)) is T·(q − p)/B per term: check the mixture against it.
    g = torch.Generator().manual_seed(2)
    B, T, alpha = 4, 2.0, 0.25
    a_t = torch.randn(B, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b_t, a_s, b_s = (torch.randn(B, 6, generator=g, dtype=torch.float64) for _ in range(3))
    transfer_loss(a_t, b_t, a_s, b_s, alpha, T).backward()
    sm = lambda x: torch.softmax(x / T, -1)  # noqa: E731
    x = a_t.detach()
    expected = ((1 - alpha) * (sm(x) - sm(a_s)) + alpha * (sm(x - b_t) - sm(a_s - b_s))) * T / B
    torch.testing.assert_close(a_t.grad, expected)


def test_transfer_loss_is_zero_when_target_equals_source_and_handles_half_precision():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    assert transfer_loss(a, b, a, b, 0.5).item() == pytest.approx(0.0, abs=1e-6)
    half = transfer_loss(a.bfloat16(), b.bfloat16(), (a + 1).bfloat16(), b.bfloat16(), 0.5)
    assert half.dtype == torch.float32
    # A masked-out (-inf) token does not poison a term whose weight is zero.
    a_inf = a.clone()
    a_inf[:, 0] = -float("inf")
    assert torch.isfinite(transfer_loss(a, b, a_inf, a_inf, alpha=0.0))


def test_transfer_loss_rejects_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="alpha"):
        transfer_loss(x, x, x, x, alpha=1.5)
    with pytest.raises(ValueError, match="one shape"):
        transfer_loss(x, x, x, torch.zeros(2, 4), alpha=0.5)
    with pytest.raises(ValueError, match="one shape"):
        transfer_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3), alpha=0.5)
