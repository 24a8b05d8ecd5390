"""Pure tensor maths of trl-entropy: token entropy, confidence scores, token masks and sequence reductions, the kernels
every wing uses. The inference-time logit adjustments (EM-INF, adaptive temperature) live in
:mod:`trl_entropy.decoding.em_inf`, the Think-Just-Enough thresholds in :mod:`trl_entropy.confidence.thresholds` and
Cohen's d in :mod:`trl_entropy.stats`; their old names here still resolve, with a deprecation warning.

Every function here is stateless and free of trainer code, so it can be tested on its own against a float64
brute-force reference. Trainers, callbacks and logits processors call into this module and stay thin.

Conventions:
    * entropies are in nats unless a ``base`` argument says otherwise;
    * a ``mask`` is 1/True on valid (completion) tokens and 0/False on padding;
    * reductions over an empty set return NaN, never 0, so an empty completion can not pass for a confident one.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = [
    "entropy_backend",
    "token_entropy",
    "entropy_from_topk_logprobs",
    "self_certainty",
    "high_entropy_mask",
    "selected_token_count",
    "masked_sequence_reduce",
    "entropy_gradient",
]

# Float32 elements processed at once on CPU: about 4 MiB, small enough for the few passes of the entropy to stay in
# cache, which makes the chunked loop faster than one pass over the whole tensor, not only lighter.
_DEFAULT_CHUNK_ELEMENTS = 1 << 20
# On an accelerator the chunked loop is bound by kernel launches, not by caches: 2**22 elements (16 MiB per float32
# buffer, at most ~64 MiB of temporaries) is 16x fewer launches at a still bounded memory.
_DEVICE_CHUNK_ELEMENTS = 1 << 22
_FLOAT32_MIN = torch.finfo(torch.float32).min
# Logit dtypes TRL's fused Triton kernel reads (it accumulates in float32 whatever the input).
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

EntropyBackend = Literal["trl_fused", "torch_chunked"]


def _rows_per_chunk(vocab_size: int, chunk_elements: int | None, device: torch.device | None = None) -> int:
    if chunk_elements is None:
        on_cpu = device is None or device.type == "cpu"
        chunk_elements = _DEFAULT_CHUNK_ELEMENTS if on_cpu else _DEVICE_CHUNK_ELEMENTS
    return max(1, chunk_elements // max(1, vocab_size))


def _triton_available() -> bool:
    from transformers.utils import is_triton_available

    return is_triton_available()


def entropy_backend(
    device: torch.device | str, dtype: torch.dtype, triton_available: bool | None = None
) -> EntropyBackend:
    """Which implementation :func:`token_entropy` and :func:`self_certainty` use for logits on ``device``/``dtype``.

    * ``"trl_fused"``: on CUDA, for float16/bfloat16/float32 logits, when Triton is installed: TRL 1.16's fused
      Triton kernel (``trl.trainer.utils.selective_log_softmax_and_entropy``), one pass over the logits with float32
      accumulation and an analytic backward, and no ``[N, V]`` temporaries. Its semantics match on finite rows;
      rows it returns as NaN (a ``-inf``, ``+inf`` or NaN logit) are recomputed by the chunked path.
    * ``"torch_chunked"``: everywhere else (CPU, float64, no Triton): the chunked PyTorch path.

    Args:
        device: the logits' device.
        dtype: the logits' dtype.
        triton_available: whether Triton can be imported; looked up when ``None``.

    Returns:
        ``"trl_fused"`` or ``"torch_chunked"``.
    """
    if torch.device(device).type != "cuda" or dtype not in _FUSED_DTYPES:
        return "torch_chunked"
    if triton_available is None:
        triton_available = _triton_available()
    return "trl_fused" if triton_available else "torch_chunked"


def _fused_layout(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` in a layout TRL's kernel reads in place: at most 3-D, unit stride on the vocabulary. A batch slice
    such as ``logits[:, :-1]`` already is one, so the usual call copies nothing."""
    if logits.dim() > 3:
        logits = logits.reshape(-1, logits.size(-1))
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def _fused_log_normalizer_and_entropy(
    logits: torch.Tensor, temperature: float, row_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logsumexp(z / T), H)`` per row from one call of TRL's fused log-prob + entropy op (differentiable).

    The op returns the log-probability of a chosen token; choosing token 0 gives
    ``logsumexp(z / T) = z_0 / T - log p_0``. Rows where ``row_mask`` is False return zeros with a zero gradient.
    """
    from trl.trainer.utils import selective_log_softmax_and_entropy

    index = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    log_p0, entropy = selective_log_softmax_and_entropy(logits, index, temperature=temperature, row_mask=row_mask)
    log_normalizer = logits[..., 0].float() / temperature - log_p0
    if row_mask is not None:
        log_normalizer = log_normalizer.masked_fill(~row_mask, 0.0)
    return log_normalizer, entropy


def _replace_undefined_rows(
    fused: torch.Tensor,
    logits: torch.Tensor,
    temperature: float,
    chunked,
    fused_on_rows,
) -> torch.Tensor:
    """Keep the fused result on its finite rows; recompute the others (NaN or infinite: rows holding a non-finite
    logit, which the kernel does not handle as the chunked path does) with ``chunked``. One host sync on ``[N]``.

    ``fused_on_rows(row_mask)`` reruns the fused op with the undefined rows masked out, so that their NaN does not
    reach the gradient; it runs only when such rows exist.
    """
    undefined = ~torch.isfinite(fused.detach())
    if not bool(undefined.any()):
        return fused
    rows = undefined.reshape(-1).nonzero().squeeze(-1)
    # Boolean indexing copies only the undefined rows (reshape(-1, V) would copy a whole non-contiguous slice).
    exact = chunked(logits[undefined.reshape(logits.shape[:-1])], temperature)
    kept = fused_on_rows(~undefined).reshape(-1)
    return kept.index_put((rows,), exact).view(fused.shape)


def _check_temperature(temperature: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"`temperature` must be a finite number > 0, got {temperature}.")


def _scaled_float(chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    chunk = chunk.float()
    return chunk if temperature == 1.0 else chunk / temperature


def _entropy_chunk(scaled: torch.Tensor) -> torch.Tensor:
    """Entropy of float32 rows ``scaled`` (already divided by the temperature).

    Entries at ``-inf`` carry zero probability and contribute nothing. A row with ``+inf`` entries is a point mass
    spread uniformly over those entries (entropy ``log(count)``), the limit of the softmax. A row with a NaN is NaN.
    """
    log_p = torch.log_softmax(scaled, dim=-1)
    p = log_p.exp()
    # -inf log-probs (p == 0) become the most negative float, so p * log p is -0 instead of 0 * -inf = NaN.
    entropy = -torch.linalg.vecdot(p, log_p.clamp_(min=_FLOAT32_MIN))
    undefined = torch.isnan(entropy)
    if undefined.any():
        rows = scaled[undefined]
        pos_inf = torch.isposinf(rows)
        count = pos_inf.sum(dim=-1)
        # Rows without +inf stay NaN (a NaN logit, or no finite logit at all).
        limit = torch.where(
            count > 0, torch.log(count.float()), torch.full_like(count, float("nan"), dtype=torch.float32)
        )
        nan_logit = torch.isnan(rows).any(dim=-1)
        entropy[undefined] = torch.where(nan_logit, torch.full_like(limit, float("nan")), limit)
    return entropy.clamp_min_(0.0)


class _TokenEntropyFunction(torch.autograd.Function):
    """Chunked entropy with the closed-form gradient dH/dz_i = -p_i (log p_i + H) / T.

    Saves only the input and one float per row, so neither the forward nor the backward holds a second full
    float32 ``[N, V]`` tensor.
    """

    @staticmethod
    def forward(ctx, logits2d: torch.Tensor, temperature: float, rows: int) -> torch.Tensor:
        entropy = torch.empty(logits2d.size(0), dtype=torch.float32, device=logits2d.device)
        for start in range(0, logits2d.size(0), rows):
            entropy[start : start + rows] = _entropy_chunk(_scaled_float(logits2d[start : start + rows], temperature))
        ctx.save_for_backward(logits2d, entropy)
        ctx.temperature = temperature
        ctx.rows = rows
        return entropy

    @staticmethod
    def backward(ctx, grad_entropy: torch.Tensor):
        logits2d, entropy = ctx.saved_tensors
        grad = torch.empty_like(logits2d)
        for start in range(0, logits2d.size(0), ctx.rows):
            stop = start + ctx.rows
            scaled = _scaled_float(logits2d[start:stop], ctx.temperature)
            grad[start:stop] = (
                entropy_gradient(scaled, entropy[start:stop])
                * (grad_entropy[start:stop] / ctx.temperature).unsqueeze(-1)
            ).to(grad.dtype)
        return grad, None, None


def entropy_gradient(scaled_logits: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """Closed-form gradient of the softmax entropy with respect to the (temperature-scaled) logits.

    ``dH/dz_i = -p_i (log p_i + H)``; entries with ``p_i = 0`` (``-inf`` logits) get a zero gradient.

    Args:
        scaled_logits: float32 logits ``[..., V]`` already divided by the temperature.
        entropy: their entropy ``[...]`` in nats.

    Returns:
        The gradient, same shape as ``scaled_logits``.
    """
    log_p = torch.log_softmax(scaled_logits, dim=-1)
    p = log_p.exp()
    return torch.where(p == 0, torch.zeros_like(p), -p * (log_p + entropy.unsqueeze(-1)))


def token_entropy(logits: torch.Tensor, temperature: float = 1.0, chunk_elements: int | None = None) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` over the last dimension, in nats.

    ``H = logsumexp(z') - sum_i p_i z'_i`` with ``z' = z / T`` (Agarwal et al., 2025, Eq. 1). Accumulates in
    float32 whatever the input dtype and streams over chunks of rows, so the extra memory is bounded by
    ``chunk_elements`` float32 values instead of a full ``[B, T, V]`` copy. Differentiable, with the closed-form
    gradient ``dH/dz_i = -p_i (log p_i + H) / T``.

    Args:
        logits: ``[..., V]`` logits of any floating dtype. ``-inf`` entries (a masked vocabulary) get zero
            probability; a row whose maximum is ``+inf`` is the uniform point mass over its ``+inf`` entries; a row
            containing NaN gives NaN.
        temperature: sampling temperature ``T > 0``.
        chunk_elements: float32 elements processed at once by the chunked path (default ``2**20``, about 4 MiB, on
            CPU; ``2**22`` on other devices). The fused path streams the vocabulary and ignores it.

    Returns:
        float32 tensor of shape ``logits.shape[:-1]``.

    On CUDA (see :func:`entropy_backend`) it runs TRL's fused Triton kernel: one read of the logits, no ``[N, V]``
    temporary, and the same values (float32 accumulation, temperature, gradient) as the chunked path.
    """
    _check_temperature(temperature)
    if not logits.is_floating_point():
        raise TypeError(f"`logits` must be a floating-point tensor, got {logits.dtype}.")
    if logits.dim() == 0 or logits.size(-1) == 0:
        raise ValueError(
            f"`logits` must have a vocabulary dimension of size >= 1 ([..., V]), got shape {tuple(logits.shape)}."
        )
    if logits.numel() > 0 and entropy_backend(logits.device, logits.dtype) == "trl_fused":
        return _fused_token_entropy(logits, float(temperature))
    return _chunked_token_entropy(logits, float(temperature), chunk_elements)


def _chunked_token_entropy(
    logits: torch.Tensor, temperature: float, chunk_elements: int | None = None
) -> torch.Tensor:
    """The ``"torch_chunked"`` path of :func:`token_entropy` (any device and dtype)."""
    vocab_size = logits.size(-1)
    logits2d = logits.reshape(-1, vocab_size)
    rows = _rows_per_chunk(vocab_size, chunk_elements, logits.device)
    entropy = _TokenEntropyFunction.apply(logits2d, temperature, rows)
    return entropy.view(logits.shape[:-1])


def _fused_token_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The ``"trl_fused"`` path of :func:`token_entropy`: TRL's fused kernel (on CUDA; elsewhere TRL's own PyTorch
    fallback runs, which is what the CPU tests exercise), the chunked path for rows with a non-finite logit."""
    fused_input = _fused_layout(logits)
    entropy = _fused_log_normalizer_and_entropy(fused_input, temperature)[1]
    entropy = _replace_undefined_rows(
        entropy,
        logits,
        temperature,
        _chunked_token_entropy,
        lambda row_mask: _fused_log_normalizer_and_entropy(fused_input, temperature, row_mask)[1],
    )
    # Rounding can leave a point mass at -1e-7 nats; the chunked path clamps the same way.
    return entropy.clamp_min(0.0).view(logits.shape[:-1])


def entropy_from_topk_logprobs(logprobs: torch.Tensor, base: float = 2.0) -> torch.Tensor:
    """Think-Just-Enough token entropy from the top-k log-probabilities (Sharma & Chopra, 2025).

    The k log-probs are renormalised to a distribution over those k tokens, ``p_i = exp(l_i) / sum_j exp(l_j)``,
    and ``H = -sum_i p_i log_base p_i``. ``-inf`` entries (fewer than k alternatives returned) are ignored.

    Args:
        logprobs: ``[..., k]`` log-probabilities of the k most likely tokens.
        base: logarithm base, 2 in the paper (bits); ``math.e`` gives nats.

    Returns:
        float32 tensor of shape ``logprobs.shape[:-1]``; NaN for a row that holds a NaN or only ``-inf`` entries
        (undefined, not "fully confident").
    """
    if not (base > 0 and base != 1):
        raise ValueError(f"`base` must be > 0 and != 1, got {base}.")
    logp = torch.log_softmax(logprobs.float(), dim=-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    entropy = (-plogp.sum(dim=-1) / math.log(base)).clamp_min(0.0)
    # `p > 0` is False for NaN, which would turn a NaN row into entropy 0, the most confident value.
    undefined = torch.isnan(logprobs).any(dim=-1) | torch.isneginf(logprobs).all(dim=-1)
    return entropy.masked_fill(undefined, float("nan"))


def self_certainty(logits: torch.Tensor, temperature: float = 1.0, chunk_elements: int | None = None) -> torch.Tensor:
    """Intuitor self-certainty: ``KL(U || p) = -log V - (1/V) sum_j log p_j`` (Zhao et al., 2025).

    Zero for a uniform distribution and growing as the model concentrates its mass. ``-inf`` entries are outside
    the support and are excluded (``V`` counts the finite entries only), since ``KL(U || p)`` would otherwise be
    infinite for any masked vocabulary.

    Args:
        logits: ``[..., V]`` logits.
        temperature: sampling temperature ``T > 0``.
        chunk_elements: float32 elements processed at once.

    Returns:
        float32 tensor of shape ``logits.shape[:-1]``.
    """
    _check_temperature(temperature)
    temperature = float(temperature)
    if logits.numel() > 0 and entropy_backend(logits.device, logits.dtype) == "trl_fused":
        return _fused_self_certainty(logits, temperature)
    return _chunked_self_certainty(logits, temperature, chunk_elements)


def _chunked_self_certainty(
    logits: torch.Tensor, temperature: float, chunk_elements: int | None = None
) -> torch.Tensor:
    """The ``"torch_chunked"`` path of :func:`self_certainty` (any device and dtype)."""
    vocab_size = logits.size(-1)
    logits2d = logits.reshape(-1, vocab_size)
    rows = _rows_per_chunk(vocab_size, chunk_elements, logits.device)
    out = []
    for start in range(0, logits2d.size(0), rows):
        scaled = logits2d[start : start + rows].float() / temperature
        finite = torch.isfinite(scaled)
        n_finite = finite.sum(dim=-1).clamp_min(1)
        lse = torch.logsumexp(scaled, dim=-1)
        mean_logit = torch.where(finite, scaled, torch.zeros_like(scaled)).sum(dim=-1) / n_finite
        out.append(lse - mean_logit - torch.log(n_finite.float()))
    return torch.cat(out).view(logits.shape[:-1])


def _fused_self_certainty(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The ``"trl_fused"`` path of :func:`self_certainty`: ``logsumexp`` from TRL's fused kernel and the mean logit
    from one float32-accumulated sum (no ``[N, V]`` temporary); rows with a non-finite logit (where the result is
    NaN or infinite) are recomputed by the chunked path, which excludes ``-inf`` entries from the support."""
    fused_input = _fused_layout(logits)
    vocab_size = logits.size(-1)

    def fused(row_mask=None):
        log_normalizer = _fused_log_normalizer_and_entropy(fused_input, temperature, row_mask)[0]
        mean_logit = fused_input.sum(dim=-1, dtype=torch.float32) / (temperature * vocab_size)
        if row_mask is not None:  # a masked row's sum may be +-inf or NaN: keep it out of the gradient
            mean_logit = torch.where(row_mask, mean_logit, torch.zeros((), device=logits.device))
        return log_normalizer - mean_logit - math.log(vocab_size)

    certainty = _replace_undefined_rows(fused(), logits, temperature, _chunked_self_certainty, fused)
    return certainty.view(logits.shape[:-1])


def selected_token_count(n_valid: int, ratio: float) -> int:
    """Number of tokens the forking-token mask keeps: ``ceil(ratio * n_valid)``, at least 1 if any is valid.

    Rounded to 9 decimals first so that, e.g., ``0.7 * 10`` gives 7 and not 8 through float error.
    """
    if n_valid <= 0:
        return 0
    return max(1, math.ceil(round(ratio * n_valid, 9)))


def _check_ratio(ratio: float, name: str = "ratio") -> None:
    if not (0.0 < ratio <= 1.0):
        raise ValueError(f"`{name}` must be in (0, 1], got {ratio}.")


def high_entropy_mask(
    entropies: torch.Tensor,
    mask: torch.Tensor,
    ratio: float,
    mode: Literal["top", "bottom"] = "top",
) -> torch.Tensor:
    """Exact forking-token mask of Wang et al. (2025): the top ``ceil(ratio * n_valid)`` valid tokens by entropy.

    Selection is over all valid tokens of the tensor at once (one micro-batch), not per row. Ties are broken
    deterministically in favour of the earlier token in row-major order. Padding is never selected, nor are tokens
    whose entropy is NaN (they count as invalid).

    Args:
        entropies: ``[B, T]`` per-token entropies.
        mask: ``[B, T]`` 1 on valid tokens, 0 on padding.
        ratio: fraction ``rho`` in ``(0, 1]`` of valid tokens to keep; the paper uses 0.2.
        mode: ``"top"`` keeps the highest-entropy tokens; ``"bottom"`` keeps the complement among valid tokens (the
            paper's ablation, e.g. the lowest 80% for ``ratio=0.2``).

    Returns:
        Boolean tensor shaped like ``entropies``.
    """
    _check_ratio(ratio)
    if mode not in ("top", "bottom"):
        raise ValueError(f"`mode` must be 'top' or 'bottom', got {mode!r}.")
    if entropies.shape != mask.shape:
        raise ValueError(f"`entropies` {tuple(entropies.shape)} and `mask` {tuple(mask.shape)} must have one shape.")
    valid = mask.bool() & ~torch.isnan(entropies)
    flat_valid = valid.reshape(-1)
    # k = selected_token_count(n_valid, ratio), computed on the device so that a selection (the trainers' loss mask,
    # the statistics callback's forking tokens) never waits for the host; with no valid token nothing is selected.
    k = torch.ceil(torch.round(flat_valid.sum().double() * ratio, decimals=9)).long().clamp(min=1)
    # Invalid tokens sort last; a stable sort keeps row-major order among equal entropies.
    keys = torch.where(flat_valid, entropies.reshape(-1).float(), torch.tensor(float("-inf"), device=mask.device))
    order = torch.sort(keys, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    selected = flat_valid & (rank < k)
    if mode == "bottom":
        selected = flat_valid & ~selected
    return selected.view(entropies.shape)


def masked_sequence_reduce(
    values: torch.Tensor,
    mask: torch.Tensor,
    reduction: Literal["mean", "sum", "min_window_mean"] = "mean",
    window: int | None = None,
) -> torch.Tensor:
    """Reduce per-token values ``[B, T]`` to one value per sequence over the valid tokens.

    Args:
        values: ``[B, T]`` per-token values (entropy, log-prob, confidence).
        mask: ``[B, T]`` 1 on valid tokens.
        reduction: ``"mean"``; ``"sum"``; or ``"min_window_mean"``, the lowest mean over any ``window`` consecutive
            valid tokens (DeepConf's lowest group confidence, Fu et al., 2025). A sequence shorter than the window
            uses the mean of all its tokens.
        window: window length for ``"min_window_mean"`` (DeepConf uses 2048).

    Returns:
        float32 ``[B]``. Sequences with no valid token give NaN for ``"mean"`` and ``"min_window_mean"`` (there
        is nothing to average) and 0 for ``"sum"``.
    """
    if values.shape != mask.shape:
        raise ValueError(f"`values` {tuple(values.shape)} and `mask` {tuple(mask.shape)} must have one shape.")
    valid = mask.bool()
    vals = torch.where(valid, values.float(), torch.zeros((), device=values.device))
    count = valid.sum(dim=-1)
    total = vals.sum(dim=-1)
    if reduction == "sum":
        return total
    mean = torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))
    if reduction == "mean":
        return mean
    if reduction != "min_window_mean":
        raise ValueError(f"`reduction` must be 'mean', 'sum' or 'min_window_mean', got {reduction!r}.")
    if window is None or window < 1:
        raise ValueError(f"`window` must be an integer >= 1 for 'min_window_mean', got {window}.")
    # Compact each row's valid tokens to the left, then take window sums from a cumulative sum.
    order = torch.sort((~valid).int(), dim=-1, stable=True).indices
    compact = vals.gather(-1, order)
    cums = torch.nn.functional.pad(compact.cumsum(dim=-1), (1, 0))
    length = values.size(-1)
    if window > length:
        return mean
    window_sums = cums[:, window:] - cums[:, : length - window + 1]
    starts = torch.arange(length - window + 1, device=values.device)
    fits = (starts.unsqueeze(0) + window) <= count.unsqueeze(-1)
    window_means = torch.where(fits, window_sums / window, torch.full_like(window_sums, float("inf")))
    lowest = window_means.min(dim=-1).values
    return torch.where(count >= window, lowest, mean)


# Names that moved out of this module, still readable here (with a DeprecationWarning naming the new place).
_MOVED = {
    **dict.fromkeys(("EMInfResult", "em_inf_gradient", "em_inf_logits", "adaptive_temperature"), "decoding.em_inf"),
    **dict.fromkeys(
        ("threshold_mean", "threshold_info", "threshold_bayes", "threshold_universal"), "confidence.thresholds"
    ),
    "cohens_d": "stats",
}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import warnings
    from importlib import import_module

    new = f"trl_entropy.{_MOVED[name]}"
    warnings.warn(f"trl_entropy.ops.{name} is deprecated: import it from {new}", DeprecationWarning, stacklevel=2)
    return getattr(import_module(new), name)
