"""EntropyDistribution / TokenEntropyCounter against brute-force float64 references (numpy.histogram, torch.quantile,
collections.Counter)."""

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_entropy.distribution import (
    EntropyDistribution,
    TokenEntropyCounter,
    merge_distributions,
    merge_token_counters,
)

MAX_ENTROPY = math.log(49152)
QUANTILES = [0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0]


def feed(distribution: EntropyDistribution, values: torch.Tensor, chunk_sizes) -> None:
    for chunk in torch.split(values, chunk_sizes):
        distribution.update(chunk)


def random_chunk_sizes(n: int, generator: torch.Generator, low: int = 1, high: int = 5000) -> list[int]:
    sizes = []
    while sum(sizes) < n:
        sizes.append(min(int(torch.randint(low, high, (1,), generator=generator)), n - sum(sizes)))
    return sizes


def realistic_entropies(n: int, seed: int) -> torch.Tensor:
    """Entropies shaped like a trained LM's: most tokens near 0 over several decades, a long tail, exact zeros."""
    g = torch.Generator().manual_seed(seed)
    low = torch.exp(torch.randn(n, generator=g) * 2.5 - 5.0)
    tail = torch.rand(n, generator=g) * 6.0
    pick = torch.rand(n, generator=g)
    values = torch.where(pick < 0.8, low, tail)
    return torch.where(pick > 0.97, torch.zeros_like(values), values).float()


def distributions():
    g = torch.Generator().manual_seed(1)
    return {
        "realistic": realistic_entropies(60_000, seed=0),
        # A random-init model: every token within ~1e-3 nats of log V, all in one histogram bin.
        "concentrated": (4.02 + 1e-4 * torch.randn(40_000, generator=g)).float(),
        "uniform": (torch.rand(30_000, generator=g) * MAX_ENTROPY).float(),
        "heavy_ties": torch.randint(0, 5, (30_000,), generator=g).float() * 0.5,
        "bfloat16": realistic_entropies(20_000, seed=3).bfloat16(),
    }


@pytest.mark.parametrize("name", list(distributions()))
def test_quantiles_are_exact(name):
    values = distributions()[name]
    distribution = EntropyDistribution(MAX_ENTROPY)
    feed(distribution, values, random_chunk_sizes(values.numel(), torch.Generator().manual_seed(2)))
    expected = torch.quantile(values.double(), torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    np.testing.assert_allclose(distribution.quantiles(QUANTILES), expected, rtol=1e-12, atol=1e-15)


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(st.floats(0.0, 12.0, allow_nan=False, width=32), min_size=1, max_size=3000),
    chunk=st.integers(1, 700),
    q=st.floats(0.0, 1.0),
)
def test_quantile_equals_torch_quantile_for_any_data(data, chunk, q):
    values = torch.tensor(data, dtype=torch.float32)
    distribution = EntropyDistribution(MAX_ENTROPY)
    feed(distribution, values, chunk)
    (got,) = distribution.quantiles([q])
    expected = torch.quantile(values.double(), torch.tensor(q, dtype=torch.float64)).item()
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_histogram_counts_are_exact():
    g = torch.Generator().manual_seed(6)
    distribution = EntropyDistribution(MAX_ENTROPY, bins=64)
    edges = distribution.edges
    # Values exactly on every edge, just around them, outside the range, and non-finite / masked ones.
    on_edges = torch.tensor(edges, dtype=torch.float32)
    around = torch.cat([on_edges + 1e-6, on_edges - 1e-6])
    random = torch.rand(20_000, generator=g) * (MAX_ENTROPY + 2.0) - 1.0
    special = torch.tensor([math.nan, math.inf, -math.inf, 0.0, MAX_ENTROPY, 50.0, -3.0])
    values = torch.cat([on_edges, around, random, special]).float()
    mask = torch.rand(values.shape, generator=g) > 0.1
    for chunk, chunk_mask in zip(values.split(997), mask.split(997)):
        distribution.update(chunk.view(-1, 1), chunk_mask.view(-1, 1))
    kept = values[mask & torch.isfinite(values)].double().numpy()
    expected, _ = np.histogram(np.clip(kept, 0.0, edges[-1]), bins=edges)
    counts, returned_edges = distribution.histogram()
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_array_equal(returned_edges, edges)
    assert distribution.count == kept.size
    assert distribution.invalid_count == int((mask & ~torch.isfinite(values)).sum())


def test_moments_match_float64():
    values = realistic_entropies(10_000, seed=7)
    distribution = EntropyDistribution(MAX_ENTROPY)
    feed(distribution, values, 1234)
    x = values.double()
    assert distribution.count == x.numel()
    assert distribution.mean == pytest.approx(x.mean().item(), rel=1e-12)
    assert distribution.std == pytest.approx(x.std(unbiased=False).item(), rel=1e-9)
    assert distribution.min == x.min().item()
    assert distribution.max == x.max().item()


def test_fraction_above_matches_brute_force():
    values = realistic_entropies(50_000, seed=8)
    distribution = EntropyDistribution(MAX_ENTROPY)
    feed(distribution, values, 4096)
    x = values.double()
    for threshold in [0.0, 1e-3, 0.05, 0.5, 2.0, 5.9, 7.0]:
        exact = (x > threshold).double().mean().item()
        assert distribution.fraction_above(threshold) == exact


def test_merge_equals_single_process_on_same_chunks():
    values = realistic_entropies(40_000, seed=9)
    chunks = list(values.split(random_chunk_sizes(values.numel(), torch.Generator().manual_seed(10))))
    single = EntropyDistribution(MAX_ENTROPY)
    for chunk in chunks:
        single.update(chunk)
    ranks = [EntropyDistribution(MAX_ENTROPY) for _ in range(3)]
    for index, chunk in enumerate(chunks):  # round-robin over three "ranks"
        ranks[index % 3].update(chunk)
    merged = merge_distributions(ranks)
    merged_reversed = merge_distributions(ranks[::-1])
    np.testing.assert_array_equal(merged.histogram()[0], single.histogram()[0])
    assert merged.count == single.count
    assert (merged.min, merged.max) == (single.min, single.max)
    assert merged.mean == pytest.approx(single.mean, rel=1e-12)
    for distribution in (merged, merged_reversed):
        np.testing.assert_allclose(distribution.quantiles(QUANTILES), single.quantiles(QUANTILES), rtol=1e-12)
        assert distribution.fraction_above(1.0) == pytest.approx(single.fraction_above(1.0), rel=1e-12)


def test_state_dict_round_trip_through_json():
    values = realistic_entropies(3000, seed=11)
    distribution = EntropyDistribution(MAX_ENTROPY, bins=32)
    feed(distribution, values, 700)
    restored = EntropyDistribution.from_state_dict(json.loads(json.dumps(distribution.state_dict())))
    np.testing.assert_array_equal(restored.histogram()[0], distribution.histogram()[0])
    assert restored.quantiles(QUANTILES) == distribution.quantiles(QUANTILES)
    assert (restored.count, restored.mean, restored.min, restored.max) == (
        distribution.count,
        distribution.mean,
        distribution.min,
        distribution.max,
    )


def test_empty_and_fully_masked_inputs_never_corrupt_statistics():
    distribution = EntropyDistribution(MAX_ENTROPY)
    assert math.isnan(distribution.mean) and math.isnan(distribution.quantiles(0.5)[0]) and distribution.count == 0
    distribution.update(torch.empty(0))
    distribution.update(torch.full((4, 3), math.nan), torch.zeros(4, 3, dtype=torch.bool))  # masked NaNs are padding
    distribution.update(torch.tensor([[math.nan, math.inf]]), torch.ones(1, 2, dtype=torch.bool))
    assert distribution.count == 0 and distribution.invalid_count == 2
    assert all(math.isnan(v) for v in distribution.quantiles(QUANTILES))
    assert math.isnan(distribution.min) and math.isnan(distribution.fraction_above(1.0))
    distribution.update(torch.tensor([[2.0, math.nan]]), torch.tensor([[True, True]]))
    assert distribution.quantiles([0.0, 0.5, 1.0]) == [2.0, 2.0, 2.0]
    assert distribution.mean == 2.0 and distribution.invalid_count == 3
    state = distribution.state_dict()
    assert json.loads(json.dumps(state, allow_nan=False)) == state


def test_reset_forgets_everything():
    distribution = EntropyDistribution(MAX_ENTROPY)
    distribution.update(torch.rand(100))
    distribution.reset()
    assert distribution.count == 0 and distribution.histogram()[0].sum() == 0 and distribution.invalid_count == 0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"max_value": 0.0}, "max_value"),
        ({"max_value": math.inf}, "max_value"),
        ({"max_value": 5.0, "bins": 0}, "bins"),
        ({"max_value": 5.0, "bins": 513}, "bins"),
    ],
)
def test_invalid_arguments_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EntropyDistribution(**kwargs)


def test_bad_calls_raise_clear_errors():
    distribution = EntropyDistribution(MAX_ENTROPY)
    with pytest.raises(ValueError, match="quantile"):
        distribution.quantiles([1.5])
    with pytest.raises(ValueError, match="mask"):
        distribution.update(torch.rand(3, 2), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bins"):
        merge_distributions([EntropyDistribution(MAX_ENTROPY, bins=10), EntropyDistribution(MAX_ENTROPY, bins=20)])
    with pytest.raises(ValueError, match="at least one"):
        merge_distributions([])


def token_stream(seed: int, n: int = 3000, vocab: int = 50):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n,), generator=g)
    entropies = torch.rand(n, generator=g) * 3
    selected = torch.rand(n, generator=g) < 0.3
    return ids, selected, entropies


def brute_force_token_stats(ids, selected, entropies):
    counts, sums = Counter(), Counter()
    for i, s, e in zip(ids.tolist(), selected.tolist(), entropies.double().tolist()):
        if s:
            counts[i] += 1
            sums[i] += e
    return counts, sums


def test_token_counter_matches_counter_and_ranks_by_count():
    ids, selected, entropies = token_stream(12)
    counter = TokenEntropyCounter(50)
    for a, b, c in zip(ids.split(700), selected.split(700), entropies.split(700)):
        counter.update(a, b, c)
    counts, sums = brute_force_token_stats(ids, selected, entropies)
    top = counter.top(100)
    assert {i: c for i, c, _ in top} == dict(counts)
    for token_id, count, mean_entropy in top:
        assert mean_entropy == pytest.approx(sums[token_id] / count, rel=1e-6)
    assert [c for _, c, _ in top] == sorted((c for _, c, _ in top), reverse=True)
    assert len(counter.top(3)) == 3


def test_token_counter_merge_equals_whole():
    ids, selected, entropies = token_stream(13)
    whole = TokenEntropyCounter(50)
    whole.update(ids, selected, entropies)
    parts = [TokenEntropyCounter(50) for _ in range(2)]
    parts[0].update(ids[:1000], selected[:1000], entropies[:1000])
    parts[1].update(ids[1000:], selected[1000:], entropies[1000:])
    merged = merge_token_counters(parts)
    assert [(i, c) for i, c, _ in merged.top(50)] == [(i, c) for i, c, _ in whole.top(50)]
    restored = TokenEntropyCounter.from_state_dict(json.loads(json.dumps(merged.state_dict())))
    assert restored.top(50) == merged.top(50)
    with pytest.raises(ValueError, match="vocab_size"):
        merge_token_counters([TokenEntropyCounter(5), TokenEntropyCounter(6)])
    with pytest.raises(ValueError, match="vocab_size"):
        TokenEntropyCounter(0)
