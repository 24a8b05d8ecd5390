"""EM-INF and the adaptive-temperature baseline against float64 brute-force references and torch's own optimisers."""

import math

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from trl_entropy import inference, ops
from trl_entropy.decoding.processors import (
    AdaptiveTemperatureConfig,
    AdaptiveTemperatureLogitsProcessor,
    EMInfConfig,
    EMInfLogitsProcessor,
    EMInfRequestLogitsProcessor,
    apply_em_inf_to_rows,
    em_inf_config_from_extra_args,
)

NEG_INF = float("-inf")


def brute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Float64 reference -sum p log p over the last dim, 0 log 0 = 0."""
    z = logits.double()
    p = torch.softmax(z, dim=-1)
    logp = torch.log_softmax(z, dim=-1)
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def lm_like_logits(n: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    """Rows with a heavy head, like a language model's: Gaussian noise plus a few boosted tokens."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab, generator=g) * scale
    boost = torch.randint(0, vocab, (n, 3), generator=g)
    z.scatter_add_(1, boost, torch.rand(n, 3, generator=g) * 4 * scale)
    return z


def reference_em_inf_row(z0: torch.Tensor, threshold, steps, lr, kl_weight, optimizer, betas=(0.9, 0.999), eps=1e-8):
    """One row with torch.optim and autograd in float64: the released script's loop, per row."""
    z = torch.nn.Parameter(z0.double().clone())
    opt = torch.optim.Adam([z], lr=lr, betas=betas, eps=eps) if optimizer == "adam" else torch.optim.SGD([z], lr=lr)
    p0 = torch.softmax(z0.double(), -1)
    taken = 0
    for _ in range(steps):
        with torch.no_grad():
            if brute_entropy(z) < threshold:
                break
        opt.zero_grad()
        logq = torch.log_softmax(z, -1)
        entropy = -(logq.exp() * logq).sum()
        kl = (p0 * (torch.log(p0) - logq)).sum()
        (entropy + kl_weight * kl).backward()
        opt.step()
        taken += 1
    out = z.detach()
    if brute_entropy(out) > brute_entropy(z0):
        return z0.double(), 0
    return out, taken


def adam_step_bound(steps: int, betas=(0.9, 0.999)) -> float:
    """Largest total distance a coordinate can travel in ``steps`` Adam steps of lr 1 (Cauchy-Schwarz on m and v)."""
    b1, b2 = betas
    return sum(
        (1 - b1)
        / (1 - b1**t)
        * math.sqrt((1 - b2**t) / (1 - b2))
        * math.sqrt(sum((b1 * b1 / b2) ** j for j in range(t)))
        for t in range(1, steps + 1)
    )


# ------------------------------------------------------------------------------------------------ closed-form gradient


@pytest.mark.parametrize("kl_weight", [0.0, 0.05, 1.0])
def test_em_inf_gradient_matches_autograd_float64(kl_weight):
    torch.manual_seed(0)
    z = (torch.randn(6, 40, dtype=torch.float64) * 3).requires_grad_(True)
    p0 = torch.softmax(torch.randn(6, 40, dtype=torch.float64) * 2, -1)
    logq = torch.log_softmax(z, -1)
    objective = -(logq.exp() * logq).sum(-1) + kl_weight * (p0 * (p0.log() - logq)).sum(-1)
    (expected,) = torch.autograd.grad(objective.sum(), z)
    grad, entropy = ops.em_inf_gradient(z.detach(), p0, kl_weight)
    assert grad.dtype == torch.float64
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(entropy, brute_entropy(z.detach()), atol=1e-12, rtol=1e-10)


def test_em_inf_gradient_is_zero_on_masked_entries_and_matches_the_reduced_problem():
    torch.manual_seed(1)
    z = torch.randn(4, 12, dtype=torch.float64) * 2
    masked = torch.zeros_like(z, dtype=torch.bool)
    masked[:, [1, 5, 6]] = True
    z_masked = z.masked_fill(masked, NEG_INF)
    p0 = torch.softmax(z_masked + 0.3 * torch.randn_like(z), -1)  # zero on the masked entries too
    grad, _ = ops.em_inf_gradient(z_masked, p0, 0.05)
    assert torch.isfinite(grad).all() and (grad[masked] == 0).all()
    keep = ~masked[0]
    reduced, _ = ops.em_inf_gradient(z[:, keep], p0[:, keep], 0.05)
    torch.testing.assert_close(grad[:, keep], reduced, atol=1e-12, rtol=1e-10)


# --------------------------------------------------------------------------------------------------- optimisation loop


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize(("threshold", "steps", "kl_weight"), [(0.0, 3, 0.05), (0.3, 10, 0.05), (1.5, 5, 0.0)])
def test_em_inf_matches_torch_optimiser_loop(optimizer, threshold, steps, kl_weight):
    logits = lm_like_logits(12, 50, seed=2, scale=1.0)
    lr = 0.1 if optimizer == "adam" else 2.0
    result = ops.em_inf_logits(
        logits, threshold=threshold, steps=steps, lr=lr, kl_weight=kl_weight, optimizer=optimizer
    )
    for i in range(logits.size(0)):
        expected, taken = reference_em_inf_row(logits[i], threshold, steps, lr, kl_weight, optimizer)
        assert int(result.steps_taken[i]) == taken, i
        torch.testing.assert_close(result.logits[i].double(), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("kl_weight", [0.0, 0.05, 2.0])
@pytest.mark.parametrize("scale", [0.1, 1.0, 4.0, 12.0])
def test_em_inf_entropy_never_increases_and_stops_at_threshold_or_step_budget(optimizer, kl_weight, scale):
    threshold, steps = 0.3, 4
    logits = lm_like_logits(64, 300, seed=3, scale=scale)
    result = ops.em_inf_logits(logits, threshold=threshold, steps=steps, kl_weight=kl_weight, optimizer=optimizer)
    before, after = brute_entropy(logits), brute_entropy(result.logits)
    assert (after <= before + 1e-6).all()
    torch.testing.assert_close(result.entropy_before.double(), before, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(result.entropy_after.double(), after, atol=1e-4, rtol=1e-5)
    # Every row either got below the threshold, spent its step budget, or was left as it came (already below it).
    below_at_start = before < threshold
    assert torch.equal(result.logits[below_at_start], logits[below_at_start])
    assert (result.steps_taken[below_at_start] == 0).all()
    optimised = ~below_at_start
    done = (after < threshold + 1e-6) | (result.steps_taken == steps)
    assert done[optimised].all()
    # The output never exceeds max(threshold, input entropy).
    assert (after <= torch.clamp_min(before, threshold) + 1e-6).all()


def test_em_inf_safeguard_returns_the_input_when_the_optimiser_would_raise_the_entropy():
    # A KL weight of 5 with Adam at lr 1 oscillates around the original distribution and can end above it.
    logits = lm_like_logits(40, 50, seed=16, scale=3.0)
    settings = dict(threshold=0.0, steps=5, lr=1.0, kl_weight=5.0, optimizer="adam")
    result = ops.em_inf_logits(logits, **settings)
    reverted = result.steps_taken == 0
    assert reverted.any() and (~reverted).any()
    assert torch.equal(result.logits[reverted], logits[reverted])
    assert (brute_entropy(result.logits) <= brute_entropy(logits) + 1e-6).all()
    for i in range(logits.size(0)):  # the reference loop, with the same rule, agrees row by row
        expected, taken = reference_em_inf_row(logits[i], **settings)
        assert int(result.steps_taken[i]) == taken
        torch.testing.assert_close(result.logits[i].double(), expected, atol=1e-4, rtol=1e-4)


def test_em_inf_lowers_entropy_below_threshold_given_enough_steps():
    logits = lm_like_logits(32, 200, seed=4, scale=2.0)
    result = ops.em_inf_logits(logits, threshold=0.3, steps=200, lr=0.1, kl_weight=0.0)
    assert (brute_entropy(result.logits) < 0.3).all()
    assert (result.steps_taken < 200).all()


def test_em_inf_zero_steps_is_identity():
    logits = lm_like_logits(4, 30, seed=5)
    result = ops.em_inf_logits(logits, steps=0)
    assert torch.equal(result.logits, logits) and (result.steps_taken == 0).all()


def test_em_inf_rows_are_independent_of_the_batch():
    logits = lm_like_logits(10, 80, seed=6, scale=1.5)
    logits[2] = logits[2] * 20  # already confident: below the threshold from the start
    logits[3, :40] = NEG_INF  # masked half
    logits[4, 7] = float("nan")  # a broken row must not affect the others
    logits[5] = NEG_INF
    settings = dict(threshold=0.3, steps=6, lr=0.1, kl_weight=0.05)
    batched = ops.em_inf_logits(logits, **settings)
    for i in range(logits.size(0)):
        alone = ops.em_inf_logits(logits[i : i + 1], **settings)
        torch.testing.assert_close(batched.logits[i : i + 1], alone.logits, atol=1e-6, rtol=1e-6, equal_nan=True)
        assert torch.equal(batched.steps_taken[i : i + 1], alone.steps_taken)
    # Permuting the batch permutes the output.
    perm = torch.randperm(logits.size(0), generator=torch.Generator().manual_seed(0))
    permuted = ops.em_inf_logits(logits[perm], **settings)
    torch.testing.assert_close(permuted.logits, batched.logits[perm], atol=1e-6, rtol=1e-6, equal_nan=True)


def test_em_inf_chunking_does_not_change_the_result_and_restores_the_denormal_mode():
    logits = lm_like_logits(9, 64, seed=17, scale=6.0)  # improbable tokens: Adam's second moment goes denormal
    settings = dict(threshold=0.3, steps=5, lr=0.1, kl_weight=0.05)
    whole = ops.em_inf_logits(logits, chunk_elements=10**9, **settings)
    tiny = torch.tensor([torch.finfo(torch.float32).tiny])
    denormal_before = bool(tiny / 4 > 0)
    for chunk_elements in (1, 64, 200):  # one row, one row, three rows per chunk
        chunked = ops.em_inf_logits(logits, chunk_elements=chunk_elements, **settings)
        torch.testing.assert_close(chunked.logits, whole.logits, atol=1e-6, rtol=1e-6)
        assert torch.equal(chunked.steps_taken, whole.steps_taken)
    assert bool(tiny / 4 > 0) == denormal_before  # the caller's floating-point mode is left as it was


def test_em_inf_keeps_neg_inf_and_leaves_degenerate_rows_unchanged():
    logits = lm_like_logits(6, 50, seed=7, scale=1.0)
    topk = logits.topk(5, dim=-1)
    filtered = torch.full_like(logits, NEG_INF).scatter(1, topk.indices, topk.values)  # top-k filtered
    filtered[1, :] = NEG_INF  # fully masked row
    filtered[2, 3] = float("nan")
    filtered[3, 0] = float("inf")
    result = ops.em_inf_logits(filtered, threshold=0.0, steps=5)
    out = result.logits
    masked = torch.isneginf(filtered)
    assert torch.isneginf(out[masked]).all()
    for i in (0, 4, 5):  # ordinary rows: only the 5 kept tokens are finite, and they changed
        assert torch.isfinite(out[i][~masked[i]]).all() and (result.steps_taken[i] == 5)
        assert brute_entropy(out[i]) < brute_entropy(filtered[i])
    for i in (1, 2, 3):  # degenerate rows come back bit for bit
        assert torch.equal(out[i].isnan(), filtered[i].isnan())
        assert torch.equal(out[i].nan_to_num(), filtered[i].nan_to_num())
        assert result.steps_taken[i] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_em_inf_dtype_round_trip(dtype):
    logits32 = lm_like_logits(16, 120, seed=8, scale=2.0)
    logits32[0, :10] = NEG_INF
    logits = logits32.to(dtype)
    result = ops.em_inf_logits(logits, threshold=0.3, steps=3)
    assert result.logits.dtype == dtype and result.logits.shape == logits.shape
    assert torch.isneginf(result.logits[0, :10]).all()
    # Entropy judged on what is returned, in float64: never above the input's.
    assert (brute_entropy(result.logits) <= brute_entropy(logits) + 1e-6).all()
    # Same maths as float32 on the same values, up to the output dtype's rounding.
    expected = ops.em_inf_logits(logits.float(), threshold=0.3, steps=3).logits
    changed = result.steps_taken > 0
    assert changed.float().mean() > 0.5
    tol = {torch.float16: 2e-2, torch.bfloat16: 1.5e-1, torch.float64: 1e-6}[dtype]
    torch.testing.assert_close(result.logits[changed].float(), expected[changed], atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------------------------- argmax


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("steps", [3, 15])
def test_em_inf_preserves_argmax_in_the_common_case(optimizer, steps):
    logits = lm_like_logits(500, 400, seed=9, scale=2.0)
    lr = 0.1
    result = ops.em_inf_logits(logits, threshold=0.0, steps=steps, lr=lr, kl_weight=0.0, optimizer=optimizer)
    top2 = logits.topk(2, dim=-1).values
    clear_winner = (top2[:, 0] - top2[:, 1]) > lr * adam_step_bound(steps)
    assert clear_winner.sum() >= 100  # the bound below is not vacuous
    preserved = result.logits.argmax(-1) == logits.argmax(-1)
    assert preserved[clear_winner].all()
    assert preserved.float().mean() > 0.99


def test_em_inf_argmax_changes_only_in_near_ties_under_adam_and_never_under_sgd():
    """Documented behaviour: Adam normalises each coordinate by its own gradient history, so among near-tied tokens
    the ordering can change; the original top token's logit never decreases (its gradient is never positive when
    kl_weight = 0), so a token overtakes it only if it started within Adam's maximal travel, lr * sum_t C(t) ~ lr *
    steps. Plain gradient descent without KL never changes the argmax (the top token's gradient is the most
    negative: f(p) = p (log p + H) is increasing above exp(-1 - H))."""
    g = torch.Generator().manual_seed(0)
    # 63 near-tied tokens and one clearly worse token: all tied tokens are pushed up by ~lr per step, in an order
    # decided by tiny differences in their gradient histories.
    near_ties = torch.randn(2000, 64, generator=g) * 1e-4
    near_ties[:, 0] = -0.03
    random_rows = lm_like_logits(2000, 64, seed=10, scale=0.5)
    logits = torch.cat([near_ties, random_rows])
    lr, steps = 0.1, 3
    adam = ops.em_inf_logits(logits, threshold=0.0, steps=steps, lr=lr, kl_weight=0.0, optimizer="adam")
    flipped = adam.logits.argmax(-1) != logits.argmax(-1)
    assert flipped[:2000].float().mean() > 0.5  # it does happen, on near ties
    new_top = adam.logits.argmax(-1, keepdim=True)
    gap = logits.max(-1).values - logits.gather(1, new_top).squeeze(1)
    assert (gap[flipped] < lr * adam_step_bound(steps)).all()
    assert (gap[flipped] < 1e-3).all()  # in practice, much closer than the bound
    sgd = ops.em_inf_logits(logits, threshold=0.0, steps=steps, lr=lr, kl_weight=0.0, optimizer="sgd")
    assert torch.equal(sgd.logits.argmax(-1), logits.argmax(-1))


# --------------------------------------------------------------------------------------------- adaptive temperature


def test_adaptive_temperature_reaches_target_within_tolerance():
    logits = lm_like_logits(64, 200, seed=11, scale=1.0)
    logits[0] = logits[0] * 30  # already confident: T = 1
    logits[1, :2] = 50.0  # two tied top tokens: entropy can not go below log 2 > target
    cfg = AdaptiveTemperatureConfig(threshold=0.3, alpha=0.5, tol=0.1)
    temperature = cfg.temperatures(logits)
    assert temperature.shape == (64,) and temperature.dtype == torch.float32
    h0 = brute_entropy(logits)
    target = torch.clamp_min(0.5 * h0, 0.3)
    reached = brute_entropy(logits.double() / temperature.double().unsqueeze(-1))
    assert temperature[0] == 1.0 and h0[0] <= 0.3
    unreachable = brute_entropy(logits.double() / cfg.t_min) > target + cfg.tol
    assert unreachable[1] and temperature[1] < cfg.t_min + 1e-6
    searched = (h0 > target) & ~unreachable
    assert searched.sum() > 50
    assert ((reached - target).abs() < cfg.tol + 1e-5)[searched].all()
    assert ((temperature >= cfg.t_min) & (temperature <= cfg.t_max)).all()


def test_adaptive_temperature_processor_divides_by_the_row_temperature():
    logits = lm_like_logits(8, 60, seed=12).to(torch.bfloat16)
    logits[0, :5] = NEG_INF
    processor = AdaptiveTemperatureLogitsProcessor(alpha=0.4)
    out = processor(None, logits)
    assert out.dtype == torch.bfloat16 and torch.isneginf(out[0, :5]).all()
    temperature = ops.adaptive_temperature(logits, alpha=0.4)
    torch.testing.assert_close(out.float(), (logits.float() / temperature.unsqueeze(-1)).bfloat16().float())
    assert (brute_entropy(out) <= brute_entropy(logits) + 1e-3).all()


# ------------------------------------------------------------------------------------------------------- processors


def test_processor_matches_pure_function_and_tracks_stats():
    logits = lm_like_logits(8, 70, seed=13, scale=1.0)
    processor = EMInfLogitsProcessor(threshold=0.3, steps=5, track_stats=True)
    out = processor(torch.zeros(8, 3, dtype=torch.long), logits)
    expected = ops.em_inf_logits(logits, threshold=0.3, steps=5)
    assert torch.equal(out, expected.logits)
    stats = processor.stats
    assert stats["calls"] == 1 and stats["rows"] == 8
    assert stats["mean_steps_per_row"] == pytest.approx(expected.steps_taken.float().mean().item())
    assert stats["mean_entropy_after"] < stats["mean_entropy_before"]
    processor.reset_stats()
    assert processor.stats["calls"] == 0


def _generate(model, tokenizer, processors, **kwargs):
    inputs = tokenizer(["what is 3 + 4 ?", "what is 10 + 2 ? the answer"], return_tensors="pt", padding=True)
    return model.generate(
        **inputs,
        logits_processor=LogitsProcessorList(processors),
        max_new_tokens=6,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


def test_processor_inside_generate_greedy(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    tokenizer.padding_side = "left"
    processor = EMInfLogitsProcessor(threshold=0.0, steps=3, track_stats=True)
    out = _generate(model, tokenizer, [processor], do_sample=False)
    assert processor.stats["calls"] == len(out.scores) == 6
    for raw, processed in zip(out.logits, out.scores):
        # What generate scored is exactly EM-INF of the model's raw logits.
        torch.testing.assert_close(processed, ops.em_inf_logits(raw, threshold=0.0, steps=3).logits)
        assert (brute_entropy(processed) < brute_entropy(raw)).all()


@pytest.mark.parametrize("topk_first", [False, True])
def test_processor_inside_generate_with_topk_topp_temperature(tiny_model_and_tokenizer, topk_first):
    model, tokenizer = tiny_model_and_tokenizer
    tokenizer.padding_side = "left"
    em_inf = EMInfLogitsProcessor(threshold=0.0, steps=3)
    processors = [TopKLogitsWarper(top_k=5), em_inf] if topk_first else [em_inf]
    torch.manual_seed(0)
    out = _generate(model, tokenizer, processors, do_sample=True, temperature=0.7, top_k=5, top_p=0.9)
    for raw, processed in zip(out.logits, out.scores):
        # generate runs the custom list, then its own warpers: temperature, top-k, top-p.
        expected = LogitsProcessorList(
            [*processors, TemperatureLogitsWarper(0.7), TopKLogitsWarper(5), TopPLogitsWarper(0.9)]
        )(None, raw)
        torch.testing.assert_close(processed, expected)
        finite = torch.isfinite(processed).sum(-1)
        assert ((finite >= 1) & (finite <= 5)).all()
    new_tokens = out.sequences[:, -6:]
    assert ((new_tokens >= 0) & (new_tokens < model.config.vocab_size)).all()


# ------------------------------------------------------------------------------------------------- configs and vLLM


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"threshold": -0.1}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"steps": -1}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"kl_weight": -1.0}, "kl_weight"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_em_inf_config_validation(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        EMInfConfig(**kwargs)
    with pytest.raises(ValueError, match=f"`{name}`"):
        EMInfLogitsProcessor(**kwargs)
    with pytest.raises(ValueError, match=f"`{name}`"):
        ops.em_inf_logits(torch.zeros(1, 3), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"t_min": 0.0}, "t_min"),
        ({"t_max": 0.001}, "t_min"),
        ({"tol": 0.0}, "tol"),
        ({"max_iter": 0}, "max_iter"),
        ({"threshold": -1.0}, "threshold"),
    ],
)
def test_adaptive_temperature_config_validation(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        AdaptiveTemperatureConfig(**kwargs)
    with pytest.raises(ValueError, match=f"`{name}`"):
        ops.adaptive_temperature(torch.zeros(1, 3), **kwargs)


def test_request_level_callable_matches_pure_function():
    row = lm_like_logits(1, 90, seed=14)[0]
    config = EMInfConfig(threshold=0.2, steps=4)
    out = EMInfRequestLogitsProcessor(config)([1, 2, 3], row.clone())
    assert out.shape == row.shape
    torch.testing.assert_close(out, ops.em_inf_logits(row.unsqueeze(0), threshold=0.2, steps=4).logits[0])


def test_extra_args_parsing():
    assert em_inf_config_from_extra_args(None) is None
    assert em_inf_config_from_extra_args({"other": 1}) is None
    assert em_inf_config_from_extra_args({"em_inf": False}) is None
    assert em_inf_config_from_extra_args({"em_inf": True}) == EMInfConfig()
    assert em_inf_config_from_extra_args({"em_inf": {"steps": 7}}) == EMInfConfig(steps=7)
    with pytest.raises(ValueError, match="Unknown EM-INF setting"):
        em_inf_config_from_extra_args({"em_inf": {"stepz": 7}})
    with pytest.raises(ValueError, match="`lr`"):
        em_inf_config_from_extra_args({"em_inf": {"lr": -1}})
    with pytest.raises(ValueError, match="must be True, False or a dict"):
        em_inf_config_from_extra_args({"em_inf": "yes"})


def test_batch_level_apply_touches_only_enabled_rows():
    logits = lm_like_logits(6, 50, seed=15, scale=1.0)
    original = logits.clone()
    configs = {1: EMInfConfig(steps=2), 4: EMInfConfig(steps=2), 5: EMInfConfig(threshold=0.0, steps=6)}
    out = apply_em_inf_to_rows(logits, configs)
    assert out is logits
    for i in (0, 2, 3):
        assert torch.equal(out[i], original[i])
    for i, config in configs.items():
        torch.testing.assert_close(out[i], config.apply(original[i : i + 1]).logits[0])
    with pytest.raises(IndexError):
        apply_em_inf_to_rows(logits, {9: EMInfConfig()})


def test_vllm_class_is_import_guarded():
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="vLLM"):
            inference.make_vllm_logits_processor_class()
        with pytest.raises(ImportError, match="vLLM"):
            inference.EMInfVLLMLogitsProcessor  # noqa: B018
    else:  # pragma: no cover - only where vLLM is installed
        cls = inference.EMInfVLLMLogitsProcessor
        assert cls is inference.make_vllm_logits_processor_class()
        assert not cls(None, torch.device("cpu"), False).is_argmax_invariant()
    with pytest.raises(AttributeError):
        inference.not_a_name  # noqa: B018
