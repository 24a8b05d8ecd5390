"""The maths module against float64 brute-force references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_entropy import ops


def brute_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Float64 reference: -sum p log p with p = softmax(z / T), 0 log 0 = 0."""
    z = logits.double() / temperature
    p = torch.softmax(z, dim=-1)
    logp = torch.log_softmax(z, dim=-1).masked_fill(p.detach() == 0, 0.0)
    return -(p * logp).sum(-1)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("chunk_elements", [None, 7, 100])
def test_token_entropy_matches_float64(temperature, chunk_elements):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 50) * 4
    got = ops.token_entropy(logits, temperature, chunk_elements=chunk_elements)
    assert got.dtype == torch.float32 and got.shape == (3, 5)
    torch.testing.assert_close(got.double(), brute_entropy(logits, temperature), atol=1e-5, rtol=1e-5)


def test_token_entropy_extreme_and_masked_logits():
    logits = torch.tensor(
        [
            [1e4, -1e4, 0.0, 5e3],  # one dominant logit: entropy ~0
            [1e4, 1e4, -1e4, -1e4],  # two tied huge logits: log 2
            [0.0, float("-inf"), 0.0, float("-inf")],  # masked vocabulary: log 2 over the finite pair
            [float("inf"), 3.0, float("inf"), float("inf")],  # limit case: uniform over the +inf entries
        ]
    )
    got = ops.token_entropy(logits)
    assert torch.isfinite(got).all()
    expected = torch.tensor([0.0, math.log(2), math.log(2), math.log(3)])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_token_entropy_nan_row_is_nan_and_isolated():
    logits = torch.randn(3, 10)
    logits[1, 4] = float("nan")
    got = ops.token_entropy(logits)
    assert torch.isnan(got[1])
    torch.testing.assert_close(got[[0, 2]].double(), brute_entropy(logits[[0, 2]]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_token_entropy_low_precision_accumulates_in_fp32(dtype):
    torch.manual_seed(1)
    logits = (torch.randn(4, 6, 300) * 3).to(dtype)
    got = ops.token_entropy(logits, 0.7)
    assert got.dtype == torch.float32
    # Reference on the same (rounded) inputs: only the accumulation differs.
    torch.testing.assert_close(got.double(), brute_entropy(logits.double(), 0.7), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_token_entropy_gradient_matches_autograd_and_closed_form(temperature):
    torch.manual_seed(2)
    logits = (torch.randn(2, 3, 40) * 2).requires_grad_(True)
    logits.data[0, 0, :5] = float("-inf")  # masked entries must get a zero gradient
    weights = torch.randn(2, 3)
    (ops.token_entropy(logits, temperature, chunk_elements=80) * weights).sum().backward()

    ref_logits = logits.detach().double().requires_grad_(True)
    (brute_entropy(ref_logits, temperature) * weights.double()).sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, atol=1e-6, rtol=1e-5)
    assert (logits.grad[0, 0, :5] == 0).all()

    # The closed form dH/dz'_i = -p_i (log p_i + H) on the scaled logits.
    z = logits.detach().double()[1, 2] / temperature
    p = torch.softmax(z, -1)
    h = brute_entropy(z)
    closed = -p * (torch.log(p) + h)
    torch.testing.assert_close(ops.entropy_gradient(z.float(), h.float()).double(), closed, atol=1e-6, rtol=1e-5)


def test_token_entropy_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        ops.token_entropy(torch.randn(2, 3), temperature=0.0)
    with pytest.raises(TypeError, match="floating"):
        ops.token_entropy(torch.ones(2, 3, dtype=torch.long))


def test_entropy_from_topk_logprobs_is_renormalised_entropy_in_bits():
    torch.manual_seed(3)
    full = torch.log_softmax(torch.randn(5, 100), -1)
    top = full.topk(20, dim=-1).values
    got = ops.entropy_from_topk_logprobs(top)
    q = top.double().exp()
    q = q / q.sum(-1, keepdim=True)
    expected = -(q * torch.log2(q)).sum(-1)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-6)
    # Uniform over k alternatives gives log2 k; a missing alternative (-inf) is ignored.
    uniform = torch.full((1, 8), math.log(1 / 8))
    assert ops.entropy_from_topk_logprobs(uniform).item() == pytest.approx(3.0, abs=1e-6)
    partial = torch.tensor([[math.log(0.5), math.log(0.5), float("-inf")]])
    assert ops.entropy_from_topk_logprobs(partial).item() == pytest.approx(1.0, abs=1e-6)
    assert ops.entropy_from_topk_logprobs(partial, base=math.e).item() == pytest.approx(math.log(2), abs=1e-6)
    with pytest.raises(ValueError, match="base"):
        ops.entropy_from_topk_logprobs(partial, base=1)


def test_self_certainty_is_kl_from_uniform():
    torch.manual_seed(4)
    logits = torch.randn(3, 4, 30) * 2
    got = ops.self_certainty(logits, temperature=0.8, chunk_elements=50)
    p = torch.softmax(logits.double() / 0.8, -1)
    u = torch.full_like(p, 1 / 30)
    expected = (u * (u.log() - p.log())).sum(-1)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    assert ops.self_certainty(torch.zeros(1, 30)).abs().item() < 1e-6  # uniform -> 0
    masked = torch.tensor([[0.0, 0.0, float("-inf")]])
    assert ops.self_certainty(masked).abs().item() < 1e-6  # uniform over its support -> 0


def brute_top_mask(entropies, mask, ratio):
    """Reference selection: python sort of (entropy desc, index asc) over valid tokens."""
    flat_e = entropies.reshape(-1).tolist()
    flat_m = mask.reshape(-1).tolist()
    valid = [i for i, m in enumerate(flat_m) if m]
    k = math.ceil(round(ratio * len(valid), 9)) if valid else 0
    k = max(1, k) if valid else 0
    chosen = sorted(valid, key=lambda i: (-flat_e[i], i))[:k]
    out = torch.zeros(len(flat_e), dtype=torch.bool)
    out[chosen] = True
    return out.view(entropies.shape)


@pytest.mark.parametrize("ratio", [0.01, 0.2, 0.5, 0.7, 1.0])
def test_high_entropy_mask_selects_exact_top_k(ratio):
    torch.manual_seed(5)
    entropies = torch.rand(4, 9)
    mask = (torch.rand(4, 9) > 0.3).int()
    got = ops.high_entropy_mask(entropies, mask, ratio)
    n_valid = int(mask.sum())
    assert int(got.sum()) == max(1, math.ceil(round(ratio * n_valid, 9)))
    assert not (got & ~mask.bool()).any()
    assert torch.equal(got, brute_top_mask(entropies, mask, ratio))
    bottom = ops.high_entropy_mask(entropies, mask, ratio, mode="bottom")
    assert torch.equal(bottom, mask.bool() & ~got)


def test_high_entropy_mask_ties_and_padding():
    entropies = torch.tensor([[1.0, 1.0, 1.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # the 9.0 is padding: never selected
    got = ops.high_entropy_mask(entropies, mask, 0.3)  # ceil(0.3 * 7) = 3: the first three valid ties
    assert torch.equal(got, torch.tensor([[True, True, True, False], [False, False, False, False]]))
    assert ops.selected_token_count(10, 0.7) == 7  # no float-error overshoot
    assert ops.selected_token_count(3, 0.01) == 1
    assert ops.selected_token_count(0, 0.5) == 0


def test_high_entropy_mask_all_padding_and_nan():
    entropies = torch.rand(2, 3)
    assert not ops.high_entropy_mask(entropies, torch.zeros(2, 3), 0.2).any()
    entropies[0, 0] = float("nan")
    got = ops.high_entropy_mask(entropies, torch.ones(2, 3), 1.0)
    assert got.sum() == 5 and not got[0, 0]


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_high_entropy_mask_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match=r"`ratio` must be in \(0, 1\]"):
        ops.high_entropy_mask(torch.rand(2, 2), torch.ones(2, 2), ratio)


def test_high_entropy_mask_rejects_bad_mode_and_shape():
    with pytest.raises(ValueError, match="mode"):
        ops.high_entropy_mask(torch.rand(2, 2), torch.ones(2, 2), 0.5, mode="middle")
    with pytest.raises(ValueError, match="shape"):
        ops.high_entropy_mask(torch.rand(2, 2), torch.ones(2, 3), 0.5)


def test_masked_sequence_reduce_mean_sum_and_empty_rows():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [5.0, 5.0, 5.0, 5.0], [7.0, 7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    mean = ops.masked_sequence_reduce(values, mask, "mean")
    assert mean[:2].tolist() == [2.0, 5.0] and torch.isnan(mean[2])
    assert ops.masked_sequence_reduce(values, mask, "sum").tolist() == [6.0, 20.0, 0.0]
    with pytest.raises(ValueError, match="reduction"):
        ops.masked_sequence_reduce(values, mask, "median")
    with pytest.raises(ValueError, match="window"):
        ops.masked_sequence_reduce(values, mask, "min_window_mean")


def test_masked_sequence_reduce_min_window_mean_brute_force():
    torch.manual_seed(6)
    values = torch.randn(6, 12)
    mask = torch.rand(6, 12) > 0.25
    mask[5] = False
    for window in (1, 3, 5, 20):
        got = ops.masked_sequence_reduce(values, mask, "min_window_mean", window=window)
        for row in range(6):
            kept = values[row][mask[row]].tolist()
            if not kept:
                assert torch.isnan(got[row])
                continue
            if len(kept) < window:
                expected = sum(kept) / len(kept)
            else:
                expected = min(sum(kept[i : i + window]) / window for i in range(len(kept) - window + 1))
            assert got[row].item() == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Properties (hypothesis)
# ---------------------------------------------------------------------------------------------------------------------

logit_rows = st.lists(st.floats(-50, 50, allow_nan=False), min_size=2, max_size=40)


@settings(max_examples=60, deadline=None)
@given(logit_rows, st.floats(0.1, 5.0))
def test_entropy_is_bounded_by_zero_and_log_v(row, temperature):
    h = ops.token_entropy(torch.tensor([row]), temperature).item()
    assert -1e-6 <= h <= math.log(len(row)) + 1e-5


@settings(max_examples=60, deadline=None)
@given(logit_rows, st.floats(-1e3, 1e3, allow_nan=False))
def test_entropy_invariant_to_constant_shift(row, shift):
    logits = torch.tensor([row], dtype=torch.float64)
    base = ops.token_entropy(logits).item()
    shifted = ops.token_entropy(logits + shift).item()
    assert shifted == pytest.approx(base, abs=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=30),
    st.floats(0.01, 1.0),
    st.floats(0.01, 1.0),
)
def test_mask_is_monotone_in_ratio(entropies, ratio_a, ratio_b):
    small, large = sorted((ratio_a, ratio_b))
    e = torch.tensor([entropies])
    m = torch.ones_like(e)
    mask_small = ops.high_entropy_mask(e, m, small)
    mask_large = ops.high_entropy_mask(e, m, large)
    assert not (mask_small & ~mask_large).any()  # a larger ratio keeps a superset


# ---------------------------------------------------------------------------------------------------------------------
# Thresholds (Think Just Enough)
# ---------------------------------------------------------------------------------------------------------------------


def test_thresholds_closed_forms():
    mu_c, s_c, mu_i, s_i = 1.0, 0.2, 2.0, 0.5
    d = ops.cohens_d(mu_c, s_c, 10, mu_i, s_i, 10)
    assert d == pytest.approx((mu_c - mu_i) / math.sqrt((s_c**2 + s_i**2) / 2))
    assert ops.threshold_mean(mu_c) == mu_c
    assert ops.threshold_info(mu_c, s_c, d) == pytest.approx(mu_c + s_c * math.log(1 + abs(d)))
    assert ops.threshold_universal(mu_c, s_c, mu_i, d) == pytest.approx(
        mu_c + abs(d) / (1 + abs(d)) * (mu_i - mu_c) * (1 - s_c / mu_c)
    )
    # Bayes boundary: equal Gaussian densities, between the means.
    tau = ops.threshold_bayes(mu_c, s_c, mu_i, s_i)
    assert mu_c < tau < mu_i

    def log_density(x, mu, s):
        return -math.log(s) - 0.5 * ((x - mu) / s) ** 2

    assert log_density(tau, mu_c, s_c) == pytest.approx(log_density(tau, mu_i, s_i), abs=1e-9)
    assert ops.threshold_bayes(1.0, 0.3, 3.0, 0.3) == pytest.approx(2.0)  # equal variances: midpoint
    with pytest.raises(ValueError, match="sigma"):
        ops.threshold_bayes(1.0, 0.0, 2.0, 0.3)
    with pytest.raises(ValueError, match="zero variance"):
        ops.cohens_d(1.0, 0.0, 3, 2.0, 0.0, 3)
