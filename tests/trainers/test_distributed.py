"""Two real CPU processes (torchrun + gloo) against single-process references on the same data.

One launch of ``tests/dist_scripts/distributed_checks.py`` runs every check; each rank saves what it saw and the tests
below recompute it in this process: the global forking-token selection (direct calls with ragged, tied, NaN and empty
micro-batches, and inside the GRPO/RLOO losses), the loss gradient averaged over ranks, the entropy reward, the stats
callback's quantiles and histograms, and a real step where one rank has no valid completion token.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from dist_scripts.launcher import LaunchError, launch
from dist_scripts.references import brute_force_forking
from trainer_utils import TINY_KWARGS, brute_force_rewards, tiny_setup

from trl_entropy.callbacks import STATE_FILE_NAME
from trl_entropy.distribution import EntropyDistribution
from trl_entropy.testing import make_tiny_model_and_tokenizer
from trl_entropy.trainers import EntropyGRPOConfig, EntropyGRPOTrainer, EntropyRLOOConfig, EntropyRLOOTrainer

pytestmark = pytest.mark.multiprocess


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tiny model's matmuls are too small to gain from threads, and on a busy 2-core machine two OpenMP threads
    per process slow each step down several times over."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


CASE_NAMES = [
    "continuous",
    "ties",
    "bottom",
    "rank1_empty",
    "rank0_empty_narrow",
    "all_empty",
    "nan_tokens",
    "local",
]


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    try:
        launch("distributed_checks.py", str(out), timeout=420)
    except LaunchError as err:
        pytest.fail(str(err))

    def load(name: str) -> list[dict]:
        return [torch.load(out / f"rank{r}_{name}.pt", weights_only=False) for r in range(2)]

    return out, load


# ---------------------------------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------------------------------


def pad_right(tensors: list[torch.Tensor], value=0) -> torch.Tensor:
    width = max(t.size(1) for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.size(1)), value=value) for t in tensors])


def single_process_grpo(tmp_path, **config):
    model, tokenizer, dataset = tiny_setup()
    args = EntropyGRPOConfig(output_dir=str(tmp_path), entropy_reward="token", **{**TINY_KWARGS, **config})
    trainer = EntropyGRPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
    assert trainer.accelerator.num_processes == 1
    trainer.model.train()
    return trainer


# ---------------------------------------------------------------------------------------------------------------------
# Direct calls of forking_token_weights
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_global_forking_selection_equals_single_process(dist_results, tmp_path, name):
    _, load = dist_results
    results = load("forking_direct")
    assert sorted(results[0]) == sorted(CASE_NAMES)
    ranks = [r[name] for r in results]
    settings = ranks[0]["settings"]
    ratio, mode, normalization, scope = (settings[k] for k in ("ratio", "mode", "norm", "scope"))
    entropies = [r["entropies"] for r in ranks]
    masks = [r["mask"] for r in ranks]

    if scope == "local":
        groups = [([e], [m]) for e, m in zip(entropies, masks)]  # each rank on its own
    else:
        groups = [(entropies, masks)]
    reference = []
    for group_entropies, group_masks in groups:
        weights, fraction, smallest = brute_force_forking(group_entropies, group_masks, ratio, mode, normalization)
        reference.append((weights, fraction, smallest))
        # The same data through the trainer in one process: concatenate the ranks' micro-batches.
        trainer = single_process_grpo(
            tmp_path,
            forking_token_ratio=ratio,
            forking_token_mode=mode,
            forking_token_normalization=normalization,
            forking_token_scope=scope,
        )
        single = trainer.forking_token_weights(pad_right(group_entropies), pad_right(group_masks))
        widths = [e.size(1) for e in group_entropies]
        rows = [e.size(0) for e in group_entropies]
        for part, expected, width in zip(single.split(rows), weights, widths):
            assert torch.equal(part[:, width:], torch.zeros_like(part[:, width:]))
            assert torch.allclose(part[:, :width].double(), expected, rtol=1e-6, atol=0)
        assert trainer._metrics["train"]["forking/selected_fraction"][-1] == pytest.approx(fraction)

    for rank, result in enumerate(ranks):
        weights, fraction, smallest = reference[rank if scope == "local" else 0]
        expected = weights[0] if scope == "local" else weights[rank]
        assert result["weights"].shape == expected.shape
        assert torch.allclose(result["weights"].double(), expected, rtol=1e-6, atol=0), (name, rank)
        assert result["selected_fraction"] == pytest.approx(fraction)
        if scope == "global":  # the logged minimum is reduced over ranks: every rank logs the global one
            if smallest is None:
                assert result["min_selected_entropy"] is None
            else:
                assert result["min_selected_entropy"] == pytest.approx(smallest, rel=1e-6)

    if name == "continuous":
        # The two scopes really differ on this data, so the equality above is not vacuous.
        local = [brute_force_forking([e], [m], ratio, mode, normalization)[0][0] for e, m in zip(entropies, masks)]
        assert any(not torch.equal(a > 0, b > 0) for a, b in zip(local, reference[0][0]))
    if name in ("rank1_empty", "rank0_empty_narrow"):
        empty_rank = 1 if name == "rank1_empty" else 0
        assert not ranks[empty_rank]["weights"].any()
        assert ranks[1 - empty_rank]["weights"].any()
    if name == "all_empty":
        assert not any(r["weights"].any() for r in ranks)
        assert all(r["selected_fraction"] == 0.0 for r in ranks)


# ---------------------------------------------------------------------------------------------------------------------
# The loss: forking weights inside GRPO / RLOO and the gradient DDP would apply
# ---------------------------------------------------------------------------------------------------------------------


def concatenated_batch(batches: list[dict]) -> dict:
    prompt_widths = {b["prompt_ids"].size(1) for b in batches}
    assert len(prompt_widths) == 1  # equal prompt lengths: no extra left padding that would shift positions
    out = {
        "prompt_ids": torch.cat([b["prompt_ids"] for b in batches]),
        "prompt_mask": torch.cat([b["prompt_mask"] for b in batches]),
        "completion_ids": pad_right([b["completion_ids"] for b in batches]),
        "completion_mask": pad_right([b["completion_mask"] for b in batches]),
        "advantages": torch.cat([b["advantages"] for b in batches]),
    }
    if "num_items_in_batch" in batches[0]:
        out["num_items_in_batch"] = batches[0]["num_items_in_batch"]  # already the global count
        assert int(out["num_items_in_batch"]) == int(out["completion_mask"].sum())
    if "old_per_token_logps" in batches[0]:
        out["old_per_token_logps"] = pad_right([b["old_per_token_logps"] for b in batches])
    if "old_logps" in batches[0]:
        out["old_logps"] = torch.cat([b["old_logps"] for b in batches])
    return out


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
@pytest.mark.parametrize("empty_rank1", [False, True], ids=["both-ranks", "rank1-no-valid-token"])
def test_loss_gradient_equals_single_process(dist_results, tmp_path, kind, empty_rank1):
    """Mean over ranks of the per-rank loss gradient (what DDP applies) equals the single-process gradient on the
    concatenated micro-batches, including when rank 1 has no valid completion token (loss 0, zero gradient)."""
    _, load = dist_results
    ranks = [r[(kind, empty_rank1)] for r in load("scored_loss")]
    batch = concatenated_batch([r["batch"] for r in ranks])

    model, tokenizer, dataset = tiny_setup()
    model.double()  # as in the launch: float64 makes the gradients comparable to 1e-6
    common = dict(entropy_reward="token", forking_token_ratio=0.2)
    if kind == "grpo":
        args = EntropyGRPOConfig(output_dir=str(tmp_path), **common, **TINY_KWARGS)
        trainer = EntropyGRPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
    else:
        args = EntropyRLOOConfig(output_dir=str(tmp_path), **common, **{**TINY_KWARGS, "beta": 0.0})
        trainer = EntropyRLOOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grad = torch.cat([p.grad.reshape(-1).double() for p in trainer.model.parameters()])

    assert grad.abs().max() > 0
    for r in ranks:
        assert torch.equal(r["mean_grad"], ranks[0]["mean_grad"])
    torch.testing.assert_close(ranks[0]["mean_grad"], grad, rtol=1e-6, atol=1e-9)
    assert sum(r["loss"] for r in ranks) / 2 == pytest.approx(loss.item(), rel=1e-6, abs=1e-12)

    # The forking selection inside the loss was the global one (RLOO records the 0/1 selection: "all").
    (e0, m0, w0), (e1, m1, w1) = (r["forking_calls"][0] for r in ranks)
    expected, _, _ = brute_force_forking([e0, e1], [m0, m1], 0.2, "top", "selected" if kind == "grpo" else "all")
    assert torch.allclose(w0.double(), expected[0], rtol=1e-6) and torch.allclose(w1.double(), expected[1], rtol=1e-6)
    if empty_rank1:
        # GRPO: no token, loss 0. RLOO: every ratio is exp(0) = 1, so the loss is -mean(A) with no gradient.
        rank1_loss = 0.0 if kind == "grpo" else -ranks[1]["batch"]["advantages"].mean().item()
        assert ranks[1]["loss"] == pytest.approx(rank1_loss, abs=1e-12)
        assert not ranks[1]["local_grad"].any()
        assert not w1.any()


# ---------------------------------------------------------------------------------------------------------------------
# A real two-step training run
# ---------------------------------------------------------------------------------------------------------------------


def test_entropy_reward_equals_single_process_brute_force(dist_results):
    _, load = dist_results
    ranks = load("train_run")
    prompts = [p for r in ranks for p in r["prompts"][:4]]  # step 1: four completions per rank, rank order
    completions = [c for r in ranks for c in r["completion_ids"][:4]]
    model, tokenizer = make_tiny_model_and_tokenizer(seed=0)  # the weights that generated step 1
    expected = brute_force_rewards(model, tokenizer, prompts, completions, 0.7, "token")
    for r in ranks:
        got = r["first_rewards"]["entropy_token"]
        assert len(got) == 8
        assert got == pytest.approx(expected, abs=1e-4)
        assert r["log_history"][0]["rewards/entropy_token/mean"] == pytest.approx(np.mean(expected), abs=1e-4)


def test_training_ranks_select_globally_and_stay_in_sync(dist_results):
    _, load = dist_results
    ranks = load("train_run")
    assert torch.equal(ranks[0]["final_params"], ranks[1]["final_params"])
    assert not torch.equal(ranks[0]["final_params"], ranks[0]["initial_params"])
    assert len(ranks[0]["forking_calls"]) == len(ranks[1]["forking_calls"]) == 2
    for (e0, m0, w0), (e1, m1, w1) in zip(ranks[0]["forking_calls"], ranks[1]["forking_calls"]):
        expected, fraction, _ = brute_force_forking([e0, e1], [m0, m1], 0.2, "top", "selected")
        assert torch.allclose(w0.double(), expected[0], rtol=1e-6)
        assert torch.allclose(w1.double(), expected[1], rtol=1e-6)
    for step, logged in enumerate(h for h in ranks[0]["log_history"] if "loss" in h):
        e0, m0, _ = ranks[0]["forking_calls"][step]
        e1, m1, _ = ranks[1]["forking_calls"][step]
        _, fraction, smallest = brute_force_forking([e0, e1], [m0, m1], 0.2, "top", "selected")
        assert logged["forking/selected_fraction"] == pytest.approx(fraction)
        assert logged["forking/min_selected_entropy"] == pytest.approx(smallest, rel=1e-6)


def test_stats_callback_equals_single_process(dist_results):
    """Rank 0's JSONL holds, per step, the statistics of both ranks' generation-batch entropies (the signals the
    trainer passed its observers): the same as one process's distribution fed the same batches, and as torch.quantile
    / a float64 histogram over those tokens."""
    out, load = dist_results
    ranks = load("train_run")
    records = [json.loads(line) for line in (out / "train_run" / "entropy_stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    quantiles = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
    for step, record in enumerate(records):
        passes = [r["observed_signals"][step] for r in ranks]
        sketch = EntropyDistribution(math.log(57), bins=100)
        for entropies, mask, _ in passes:
            sketch.update(entropies, mask)
        values = torch.cat([e[m.bool()] for e, m, _ in passes]).double()

        assert record["num_tokens"] == sketch.count == values.numel()
        counts, edges = sketch.histogram()
        assert record["histogram"]["counts"] == counts.tolist()
        assert record["histogram"]["edges"] == edges.tolist()
        reference_counts = np.histogram(np.clip(values.numpy(), 0, math.log(57)), bins=edges)[0]
        assert counts.tolist() == reference_counts.tolist()
        metrics = record["metrics"]
        for q, expected in zip(quantiles, sketch.quantiles(quantiles)):
            name = f"sampling_entropy/p{100 * q:g}"
            assert metrics[name] == pytest.approx(expected, abs=1e-9)
            assert metrics[name] == pytest.approx(torch.quantile(values, q).item(), abs=1e-6)
        assert metrics["sampling_entropy/mean"] == pytest.approx(values.mean().item(), rel=1e-9)
        assert metrics["sampling_entropy/std"] == pytest.approx(values.std(unbiased=False).item(), rel=1e-3, abs=1e-9)
        assert record["forking"]["threshold"] == pytest.approx(torch.quantile(values, 0.8).item(), abs=1e-6)
    state = json.loads((out / "train_run" / "checkpoint-2" / STATE_FILE_NAME).read_text())
    assert state["global_step"] == 2
    assert state["history"] == [[r["step"], r["metrics"]["sampling_entropy/mean"]] for r in records]


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_real_step_with_a_rank_whose_completions_are_all_masked(dist_results, kind):
    """`mask_truncated_completions=True` and rank 1 never samples EOS: its whole micro-batch is masked out. The step
    finishes (no hang, no crash), the loss is finite, the ranks agree, and the selection is rank 0's top-k."""
    _, load = dist_results
    ranks = [r[kind] for r in load("truncated_rank")]
    (e0, m0, w0), (e1, m1, w1) = (r["forking_calls"][0] for r in ranks)
    assert m0.sum() > 0 and m1.sum() == 0
    normalization = "selected" if kind == "grpo" else "all"  # RLOO records its 0/1 selection
    expected, fraction, _ = brute_force_forking([e0, e1], [m0, m1], 0.2, "top", normalization)
    assert torch.allclose(w0.double(), expected[0], rtol=1e-6) and not w1.any()
    for r in ranks:
        logged = r["log_history"][0]
        assert math.isfinite(logged["loss"]) and math.isfinite(logged["grad_norm"])
        assert logged["forking/selected_fraction"] == pytest.approx(fraction)
    assert torch.equal(ranks[0]["final_params"], ranks[1]["final_params"])
    assert not torch.equal(ranks[0]["final_params"], ranks[0]["initial_params"])
