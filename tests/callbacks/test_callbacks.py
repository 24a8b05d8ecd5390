"""EntropyStatsCallback: pure helpers against brute force, the observer interface, and real tiny GRPO/RLOO runs checked
against TRL's own logged metrics, the observed signals, TensorBoard event files and the checkpoint state."""

import json
import math
import os
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from trl_entropy import EntropyGRPOConfig, EntropyGRPOTrainer, EntropyRLOOConfig, EntropyRLOOTrainer
from trl_entropy.callbacks import (
    STATE_FILE_NAME,
    EntropyStatsCallback,
    EntropyStatsConfig,
    append_jsonl_record,
    linear_trend_slope,
    merge_window_states,
    pearson_correlation,
    repeated_ngram_counts,
    truncate_jsonl,
)
from trl_entropy.ops import high_entropy_mask
from trl_entropy.testing import make_tiny_model_and_tokenizer, tiny_prompts

# ---- pure helpers ----------------------------------------------------------------------------------------------


def brute_force_repeats(ids: torch.Tensor, mask: torch.Tensor, n: int) -> tuple[int, int]:
    repeated = total = 0
    for row, row_mask in zip(ids.tolist(), mask.tolist()):
        grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1) if all(row_mask[i : i + n])]
        repeated += len(grams) - len(set(grams))
        total += len(grams)
    return repeated, total


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_repeated_ngram_counts_match_brute_force(n):
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, 4, (6, 20), generator=g)  # a 4-token vocabulary repeats a lot
    ids[0] = 123_456_789  # one constant row
    mask = torch.rand(6, 20, generator=g) > 0.15  # holes break n-grams
    mask[1] = False
    repeated, total = repeated_ngram_counts(ids, mask, n)
    assert (int(repeated), int(total)) == brute_force_repeats(ids, mask, n)


def test_repeated_ngram_counts_edge_cases():
    assert [int(v) for v in repeated_ngram_counts(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3), 5)] == [0, 0]
    with pytest.raises(ValueError, match="`n`"):
        repeated_ngram_counts(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3), 0)
    with pytest.raises(ValueError, match="mask"):
        repeated_ngram_counts(torch.ones(2, 3, dtype=torch.long), torch.ones(3, 2), 2)


def test_linear_trend_slope_matches_polyfit():
    g = np.random.default_rng(0)
    steps = np.arange(10) * 5.0
    values = 3.0 - 0.02 * steps + g.normal(0, 0.01, 10)
    assert linear_trend_slope(steps, values) == pytest.approx(np.polyfit(steps, values, 1)[0], rel=1e-10)
    assert linear_trend_slope([1], [2.0]) is None
    assert linear_trend_slope([3, 3], [1.0, 2.0]) is None
    assert linear_trend_slope([1, 2, 3], [1.0, None, 3.0]) == pytest.approx(1.0)


def test_pearson_correlation_matches_numpy():
    g = np.random.default_rng(1)
    x, y = g.normal(size=50), g.normal(size=50)
    assert pearson_correlation(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-10)
    assert pearson_correlation([1.0, 2.0, None, 4.0, math.nan], [2.0, 4.0, 1.0, 8.0, 1.0]) == pytest.approx(1.0)
    assert pearson_correlation([1.0, 2.0], [1.0, 2.0]) is None  # too few pairs
    assert pearson_correlation([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]) is None  # constant: undefined


def test_forking_selection_keeps_the_closed_form_count_of_the_highest_entropies():
    # The callback's forking tokens are ops.high_entropy_mask's: ceil(ratio * n_valid) tokens (at least one), the
    # highest entropies among valid ones, earlier token first on ties; checked against a Python brute force.
    g = torch.Generator().manual_seed(2)
    for ratio in (0.2, 0.5, 1.0, 0.01, 0.7):
        entropies = torch.randint(0, 5, (7, 13), generator=g).float()  # many ties
        mask = torch.rand(7, 13, generator=g) > 0.3
        flat = [(float(e), i) for i, (e, m) in enumerate(zip(entropies.flatten(), mask.flatten(), strict=True)) if m]
        k = max(1, math.ceil(round(ratio * len(flat), 9)))
        expected = torch.zeros(7 * 13, dtype=torch.bool)
        expected[[i for _, i in sorted(flat, key=lambda t: (-t[0], t[1]))[:k]]] = True
        assert torch.equal(high_entropy_mask(entropies, mask, ratio), expected.view(7, 13))
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert not high_entropy_mask(torch.rand(2, 3), empty, 0.2).any()


def test_jsonl_append_and_truncate(tmp_path):
    path = tmp_path / "stats.jsonl"
    assert truncate_jsonl(path, 10) == 0 and not path.exists()
    for step in range(1, 6):
        append_jsonl_record(path, {"step": step, "value": math.nan if step == 2 else step / 2})
    with open(path, "ab") as handle:
        handle.write(b'{"step": 6, "val')  # a torn last line, as after a crash mid-write
    lines = path.read_text().splitlines()
    assert json.loads(lines[1]) == {"step": 2, "value": None}  # NaN is written as null, the JSON stays valid
    assert truncate_jsonl(path, 3) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert truncate_jsonl(path, 0) == 0 and path.read_text() == ""


def test_merge_window_states_equals_single_window():
    """Per-rank windows merged = one window that saw every micro-batch (the multi-rank aggregation path)."""
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(6):
        entropies = torch.rand(4, 300, generator=g) ** 3 * 3
        mask = torch.rand(4, 300, generator=g) > 0.2
        ids = torch.randint(0, 40, (4, 300), generator=g)
        batches.append((entropies, mask, ids))
    single = EntropyStatsCallback(vocab_size=64)
    ranks = [EntropyStatsCallback(vocab_size=64) for _ in range(2)]
    for index, batch in enumerate(batches):
        single.observe(*batch)
        ranks[index % 2].observe(*batch)
    whole = merge_window_states([single._window.state_dict()])
    merged = merge_window_states([json.loads(json.dumps(r._window.state_dict())) for r in ranks])
    np.testing.assert_array_equal(merged["distribution"].histogram()[0], whole["distribution"].histogram()[0])
    qs = [0.1, 0.5, 0.9, 0.99]
    np.testing.assert_allclose(merged["distribution"].quantiles(qs), whole["distribution"].quantiles(qs), rtol=1e-12)
    values = torch.cat([e[m] for e, m, _ in batches]).double()
    np.testing.assert_allclose(
        whole["distribution"].quantiles(qs), torch.quantile(values, torch.tensor(qs, dtype=torch.float64))
    )
    merged_top, whole_top = merged["tokens"].top(64), whole["tokens"].top(64)
    assert [row[:2] for row in merged_top] == [row[:2] for row in whole_top]
    np.testing.assert_allclose([row[2] for row in merged_top], [row[2] for row in whole_top], rtol=1e-12)
    for key in ("repeated_ngrams", "total_ngrams", "completion_tokens", "completions"):
        assert merged[key] == whole[key]
    # And the window itself against brute force.
    all_mask = torch.cat([b[1] for b in batches])
    assert whole["completion_tokens"] == int(all_mask.sum()) and whole["completions"] == 24
    repeats = [brute_force_repeats(b[2], b[1], 4) for b in batches]
    assert whole["repeated_ngrams"] == sum(r for r, _ in repeats)
    forking = Counter()
    for entropies, mask, ids in batches:
        forking.update(ids[high_entropy_mask(entropies, mask, 0.2)].tolist())
    assert {i: c for i, c, _ in whole["tokens"].top(64)} == dict(forking)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"quantiles": (0.5, 1.0)}, "quantiles"),
        ({"bins": 0}, "bins"),
        ({"top_tokens": -1}, "top_tokens"),
        ({"forking_token_ratio": 0.0}, "forking_token_ratio"),
        ({"forking_threshold": -1.0}, "forking_threshold"),
        ({"trend_window": 1}, "trend_window"),
        ({"repetition_ngram": 0}, "repetition_ngram"),
        ({"vocab_size": 1}, "vocab_size"),
    ],
)
def test_config_errors_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EntropyStatsConfig(**kwargs)
    with pytest.raises(ValueError, match=name):
        EntropyStatsCallback(**kwargs)


def test_unknown_option_and_unbound_observe_raise():
    with pytest.raises(ValueError, match="quantile_list"):
        EntropyStatsCallback(quantile_list=(0.5,))
    with pytest.raises(RuntimeError, match="vocab_size"):
        EntropyStatsCallback().observe(torch.rand(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="completion_mask"):
        EntropyStatsCallback(vocab_size=10).observe(torch.rand(2, 3), torch.ones(3, 2))


# ---- the observer interface and real training runs ---------------------------------------------------------------


def accuracy_reward(completions, **kwargs):
    """A stand-in accuracy-type reward: 1 when the completion mentions a 3."""
    return [float("3" in c) for c in completions]


def entropy_proxy(completions, **kwargs):
    """A stand-in entropy-type reward (detected by name), varying with the completion."""
    return [-float(len(set(c.split()))) for c in completions]


def grpo_args(output_dir, config_class=EntropyGRPOConfig, **overrides):
    kwargs = dict(
        output_dir=str(output_dir),
        report_to=["tensorboard"],
        max_steps=4,
        logging_steps=1,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        use_cpu=True,
        save_steps=2,
        learning_rate=1e-2,
        seed=0,
    )
    kwargs.update(overrides)
    return config_class(**kwargs)


def tiny_dataset(n=16):
    return Dataset.from_dict({"prompt": tiny_prompts(n)})


class SignalRecorder(TrainerCallback):
    """A second observer (a callback with `on_signals` and `requested_signals`) that keeps what the trainer passed."""

    requested_signals = ("token_entropy",)

    def __init__(self):
        self.batches = []

    def on_signals(self, signals, trainer):
        if trainer.model.training:
            self.batches.append((torch.cat(signals.token_entropy), torch.cat(signals.token_mask)))


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    """EntropyGRPOTrainer, callback given to the constructor without the trainer (handed over with the signals)."""
    output_dir = tmp_path_factory.mktemp("grpo")
    model, tokenizer = make_tiny_model_and_tokenizer(seed=0)
    callback = EntropyStatsCallback(top_tokens=5)
    trainer = EntropyGRPOTrainer(
        model=model,
        reward_funcs=[accuracy_reward, entropy_proxy],
        args=grpo_args(output_dir),
        train_dataset=tiny_dataset(),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    return trainer, callback, output_dir


def test_grpo_run_writes_jsonl_matching_trl_metrics(grpo_run):
    trainer, callback, output_dir = grpo_run
    records = read_jsonl(output_dir / "entropy_stats.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    history = {h["step"]: h for h in trainer.state.log_history if "entropy" in h}
    for record in records:
        trl_logged = history[record["step"]]
        metrics = record["metrics"]
        # TRL's own "entropy" is the masked mean of the training pass's entropies over the same completions, under
        # the weights that sampled them (one generation batch per step): the callback's come from generation.
        assert metrics["sampling_entropy/mean"] == pytest.approx(trl_logged["entropy"], rel=1e-5)
        assert metrics["sampling_entropy/completion_length"] == pytest.approx(trl_logged["completions/mean_length"])
        assert record["num_tokens"] == round(trl_logged["completions/mean_length"] * 4)
        assert sum(record["histogram"]["counts"]) == record["num_tokens"]
        qs = [metrics[f"sampling_entropy/p{p}"] for p in (10, 25, 50, 75, 90, 99)]
        assert qs == sorted(qs) and record["min"] <= qs[0] and qs[-1] <= record["max"]
        # The scalars also reached the trainer's log history (the callback runs before the reporters).
        assert trl_logged["sampling_entropy/p50"] == metrics["sampling_entropy/p50"]
        assert 0 < len(record["top_tokens"]) <= 5
    assert records[0]["metrics"]["sampling_entropy/frac_above_forking_threshold"] == pytest.approx(0.2, abs=0.1)
    assert [r["trend_points"] for r in records] == [1, 2, 3, 4]
    slope = linear_trend_slope([1, 2, 3, 4], [r["metrics"]["sampling_entropy/mean"] for r in records])
    assert records[-1]["metrics"]["sampling_entropy/trend_slope"] == pytest.approx(slope)
    # The correlation of the last step is the one over the rewards TRL kept for its last generation batch.
    last = records[-1]["reward_correlation"]
    assert (last["entropy_key"], last["accuracy_key"]) == ("entropy_proxy", "accuracy_reward")
    expected = pearson_correlation(
        trainer._logs["rewards"]["entropy_proxy"], trainer._logs["rewards"]["accuracy_reward"]
    )
    assert last["pearson"] == (pytest.approx(expected) if expected is not None else None)


def test_grpo_run_binds_and_unbinds_cleanly(grpo_run):
    trainer, callback, _ = grpo_run
    assert callback.trainer is trainer
    assert trainer.callback_handler.callbacks[0] is callback
    assert not any(callable(v) for v in trainer.__dict__.values() if getattr(v, "__self__", None) is callback)


def test_grpo_run_writes_tensorboard_histograms(grpo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, _, output_dir = grpo_run
    records = {r["step"]: r for r in read_jsonl(output_dir / "entropy_stats.jsonl")}
    event_dirs = {os.path.dirname(os.path.join(root, f)) for root, _, files in os.walk(output_dir) for f in files}
    event_dirs = [d for d in event_dirs if any(f.startswith("events.out.tfevents") for f in os.listdir(d))]
    accumulator = EventAccumulator(event_dirs[0], size_guidance={"histograms": 0, "scalars": 0})
    accumulator.Reload()
    assert "train/sampling_entropy/histogram" in accumulator.Tags()["histograms"]
    events = accumulator.Histograms("train/sampling_entropy/histogram")
    assert [e.step for e in events] == [1, 2, 3, 4]
    for event in events:
        assert event.histogram_value.num == records[event.step]["num_tokens"]
        assert list(event.histogram_value.bucket) == records[event.step]["histogram"]["counts"]
    assert "train/sampling_entropy/p90" in accumulator.Tags()["scalars"]


def test_grpo_run_writes_pngs_and_checkpoint_state(grpo_run):
    _, _, output_dir = grpo_run
    for name in ("entropy_quantiles", "entropy_histograms", "entropy_signals", "entropy_top_tokens"):
        data = (output_dir / "entropy_plots" / f"{name}.png").read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    state = json.loads((output_dir / "checkpoint-2" / STATE_FILE_NAME).read_text())
    records = read_jsonl(output_dir / "entropy_stats.jsonl")
    assert state["global_step"] == 2
    assert state["history"] == [[r["step"], r["metrics"]["sampling_entropy/mean"]] for r in records[:2]]
    assert state["reference_threshold"] == records[0]["forking"]["threshold"]


def test_resume_truncates_jsonl_and_restores_state(grpo_run, tmp_path):
    _, _, original_dir = grpo_run
    output_dir = tmp_path / "resumed"
    shutil.copytree(original_dir, output_dir)
    original_lines = (output_dir / "entropy_stats.jsonl").read_text().splitlines()
    model, tokenizer = make_tiny_model_and_tokenizer(seed=0)
    trainer = EntropyGRPOTrainer(
        model=model,
        reward_funcs=[accuracy_reward, entropy_proxy],
        args=grpo_args(output_dir),
        train_dataset=tiny_dataset(),
        processing_class=tokenizer,
    )
    trainer.add_callback(EntropyStatsCallback(trainer, top_tokens=5))
    trainer.train(resume_from_checkpoint=str(output_dir / "checkpoint-2"))
    lines = (output_dir / "entropy_stats.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # nothing duplicated
    assert lines[:2] == original_lines[:2]  # the lines up to the checkpoint are kept byte for byte
    assert records[2]["trend_points"] == 3  # the trend history came back from the checkpoint
    assert records[2]["forking"]["reference_threshold"] == records[0]["forking"]["threshold"]


def test_observed_entropies_give_the_same_statistics(tmp_path):
    """Quantiles, mean and forking fraction against torch.quantile over the very tokens the trainer passed to its
    observers, with a two-step logging window (two generation batches merged) and a fixed forking threshold."""
    model, tokenizer = make_tiny_model_and_tokenizer(seed=1)
    recorder = SignalRecorder()
    trainer = EntropyGRPOTrainer(
        model=model,
        reward_funcs=accuracy_reward,
        args=grpo_args(tmp_path, max_steps=2, logging_steps=2, report_to=[], save_strategy="no"),
        train_dataset=tiny_dataset(),
        processing_class=tokenizer,
        callbacks=[recorder],
    )
    threshold = 4.03
    trainer.add_callback(EntropyStatsCallback(trainer, forking_threshold=threshold, plot_on_train_end=False))
    trainer.train()
    (record,) = read_jsonl(tmp_path / "entropy_stats.jsonl")
    values = torch.cat([e[m] for e, m in recorder.batches]).double()
    assert len(recorder.batches) == 2 and record["num_tokens"] == values.numel()
    for p in (10, 25, 50, 75, 90, 99):
        assert record["metrics"][f"sampling_entropy/p{p}"] == pytest.approx(
            torch.quantile(values, p / 100).item(), abs=1e-12
        )
    assert record["metrics"]["sampling_entropy/mean"] == pytest.approx(values.mean().item(), rel=1e-12)
    assert record["metrics"]["sampling_entropy/frac_above_forking_threshold"] == pytest.approx(
        (values > threshold).double().mean().item()
    )
    assert record["forking"]["threshold"] == pytest.approx(torch.quantile(values, 0.8).item(), abs=1e-12)


def test_callback_adds_no_forward_and_leaves_evaluation_out(tmp_path):
    """The same seeded run with and without the callback makes the same model forwards (it never runs the model; the
    entropies come from generation), and an evaluation log leaves the window alone."""
    counts = {}
    for with_callback in (False, True):
        model, tokenizer = make_tiny_model_and_tokenizer(seed=0)
        forwards = []
        model.register_forward_pre_hook(lambda module, args, seen=forwards: seen.append(torch.is_grad_enabled()))
        trainer = EntropyGRPOTrainer(
            model=model,
            reward_funcs=accuracy_reward,
            args=grpo_args(tmp_path / str(with_callback), max_steps=2, report_to=[], save_strategy="no"),
            train_dataset=tiny_dataset(),
            processing_class=tokenizer,
        )
        if with_callback:
            callback = EntropyStatsCallback(trainer, plot_on_train_end=False)
            trainer.add_callback(callback)
        trainer.train()
        counts[with_callback] = (forwards.count(True), forwards.count(False))
    assert counts[True] == counts[False]
    callback.observe(torch.rand(2, 3) + 1, torch.ones(2, 3, dtype=torch.bool))
    logs = {"eval_loss": 1.0}
    callback.on_log(trainer.args, trainer.state, trainer.control, logs=logs)
    assert callback._window.distribution.count == 6 and "sampling_entropy/mean" not in logs
    logs = {"loss": 0.0}
    callback.on_log(trainer.args, trainer.state, trainer.control, logs=logs)
    assert callback._window.distribution.count == 0 and logs["sampling_entropy/num_tokens"] == 6


def test_plain_trl_trainer_gets_a_one_line_error(tmp_path):
    model, tokenizer = make_tiny_model_and_tokenizer(seed=0)
    args = grpo_args(tmp_path, config_class=GRPOConfig, max_steps=1, report_to=[], save_strategy="no")
    trainer = GRPOTrainer(
        model=model, reward_funcs=accuracy_reward, args=args, train_dataset=tiny_dataset(), processing_class=tokenizer
    )
    with pytest.raises(TypeError, match="GRPOTrainer passes no per-token entropies.*EntropyGRPOTrainer"):
        EntropyStatsCallback(trainer)
    trainer.add_callback(EntropyStatsCallback(plot_on_train_end=False))
    with pytest.raises(RuntimeError, match="passes no per-token entropies.*EntropyGRPOTrainer"):
        trainer.train()


def test_rloo_trainer(tmp_path):
    model, tokenizer = make_tiny_model_and_tokenizer(seed=0)
    args = EntropyRLOOConfig(
        output_dir=str(tmp_path),
        report_to=[],
        max_steps=2,
        logging_steps=1,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        use_cpu=True,
        save_strategy="no",
        seed=0,
        beta=0.0,  # RLOO's default KL would load a reference model by name
    )
    trainer = EntropyRLOOTrainer(
        model=model, reward_funcs=accuracy_reward, args=args, train_dataset=tiny_dataset(), processing_class=tokenizer
    )
    trainer.add_callback(EntropyStatsCallback(trainer, plot_on_train_end=False))
    trainer.train()
    records = read_jsonl(tmp_path / "entropy_stats.jsonl")
    history = {h["step"]: h for h in trainer.state.log_history if "entropy" in h}
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert record["metrics"]["sampling_entropy/mean"] == pytest.approx(
            history[record["step"]]["entropy"], rel=1e-5
        )
        assert record["reward_correlation"] is None  # no entropy-type reward column


# ---- the trainers attach the callback themselves (config field `entropy_stats`) ----------------------------------


def _no_reward(completions, **kwargs):
    return [0.0] * len(completions)


def _stats_callbacks(trainer):
    return [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, EntropyStatsCallback)]


def _build(trainer_class, config_class, tmp_path, reward=True, **fields):
    from trl_entropy.trainers import EMFTConfig

    model, tokenizer = make_tiny_model_and_tokenizer(seed=0)
    kwargs = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=4, **fields)
    if config_class is not EMFTConfig:
        kwargs.update(num_generations=4, beta=0.0)
    extra = {"reward_funcs": _no_reward} if reward else {}
    return trainer_class(model, args=config_class(**kwargs), train_dataset=tiny_dataset(), processing_class=tokenizer,
                         **extra)  # fmt: skip


@pytest.mark.parametrize(
    "method, fields, attached",
    [
        ("grpo", {}, False),  # every entropy option off: TRL's trainer unchanged (the drop-in guarantee)
        ("grpo", {"entropy_reward": "token"}, True),
        ("grpo", {"forking_token_ratio": 0.2}, True),
        ("grpo", {"entropy_reward": "token", "entropy_stats": False}, False),
        ("grpo", {"entropy_stats": True}, True),  # opted in to watch a plain baseline
        ("grpo-trl", {}, False),  # TRL's own GRPOConfig
        ("rloo", {}, False),
        ("rloo", {"entropy_reward": "trajectory"}, True),
        ("rloo", {"entropy_stats": True}, True),
        ("emft", {}, True),  # EM-FT's loss is the entropy: auto means on
        ("emft", {"entropy_stats": False}, False),
    ],
)
def test_trainers_attach_the_stats_callback_as_the_config_says(method, fields, attached, tmp_path):
    from trl_entropy.trainers import EMFTConfig, EMFTTrainer

    trainer_class, config_class = {
        "grpo": (EntropyGRPOTrainer, EntropyGRPOConfig),
        "grpo-trl": (EntropyGRPOTrainer, GRPOConfig),
        "rloo": (EntropyRLOOTrainer, EntropyRLOOConfig),
        "emft": (EMFTTrainer, EMFTConfig),
    }[method]
    trainer = _build(trainer_class, config_class, tmp_path, reward=method != "emft", **fields)
    callbacks = _stats_callbacks(trainer)
    assert len(callbacks) == int(attached)
    if attached:
        assert callbacks[0].trainer is trainer and callbacks[0].config == EntropyStatsConfig()


def test_a_callback_of_your_own_replaces_the_default_one(tmp_path):
    # Given to the constructor: the trainer adds none.
    model, tokenizer = make_tiny_model_and_tokenizer(seed=0)
    mine = EntropyStatsCallback(bins=8)
    args = EntropyGRPOConfig(output_dir=str(tmp_path), entropy_reward="token", report_to=[], use_cpu=True,
                             per_device_train_batch_size=4, num_generations=4)  # fmt: skip
    trainer = EntropyGRPOTrainer(model, args=args, train_dataset=tiny_dataset(), processing_class=tokenizer,
                                 callbacks=[mine])  # fmt: skip
    assert _stats_callbacks(trainer) == [mine]
    # Added afterwards, as an instance or as a class (Trainer.add_callback builds it): it takes the default's place.
    trainer = _build(EntropyGRPOTrainer, EntropyGRPOConfig, tmp_path, entropy_reward="token")
    trainer.add_callback(mine)
    assert _stats_callbacks(trainer) == [mine]
    trainer = _build(EntropyGRPOTrainer, EntropyGRPOConfig, tmp_path, entropy_reward="token")
    trainer.add_callback(EntropyStatsCallback)
    (added,) = _stats_callbacks(trainer)
    assert added.trainer is None  # the one Trainer built from the class, not the default (bound to the trainer)
    trainer.remove_callback(EntropyStatsCallback)
    assert _stats_callbacks(trainer) == []


def test_entropy_stats_true_logs_a_plain_baseline(tmp_path):
    """With every entropy option off and `entropy_stats=True`, the trainer passes its observers the signals and the
    default callback writes the JSONL: the same statistics as the training pass's TRL `entropy` on-policy."""
    trainer = _build(EntropyGRPOTrainer, EntropyGRPOConfig, tmp_path, entropy_stats=True, max_steps=1,
                     logging_steps=1, max_completion_length=6, save_strategy="no", seed=0)  # fmt: skip
    trainer.train()
    (record,) = read_jsonl(tmp_path / "entropy_stats.jsonl")
    (logged,) = [h for h in trainer.state.log_history if "loss" in h]
    assert record["metrics"]["sampling_entropy/mean"] == pytest.approx(logged["entropy"], rel=1e-5)
    assert logged["sampling_entropy/mean"] == record["metrics"]["sampling_entropy/mean"]


@pytest.mark.parametrize("value", ["yes", 1, 0.0])
def test_entropy_stats_must_be_a_bool_or_none(value, tmp_path):
    with pytest.raises(TypeError, match="`entropy_stats` must be True, False or None"):
        EntropyGRPOConfig(output_dir=str(tmp_path), entropy_stats=value, use_cpu=True)


def test_plots_read_the_scalar_names_of_0_1_0_files(grpo_run, tmp_path):
    """A JSONL written under the 0.1.0 names (`entropy/mean`...) loads as the current file does (`sampling_entropy/`),
    so `trl-entropy plot` draws the same figures from it."""
    from trl_entropy.callbacks.plots import load_entropy_stats

    _, _, output_dir = grpo_run
    current = load_entropy_stats(output_dir / "entropy_stats.jsonl")
    old_file = tmp_path / "entropy_stats.jsonl"
    with open(old_file, "w") as handle:
        for record in read_jsonl(output_dir / "entropy_stats.jsonl"):
            old_names = {key.replace("sampling_entropy/", "entropy/", 1): v for key, v in record["metrics"].items()}
            handle.write(json.dumps({**record, "metrics": old_names}) + "\n")
    assert "entropy/mean" in old_file.read_text()
    assert load_entropy_stats(old_file) == current
