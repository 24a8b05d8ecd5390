"""Pure tensor maths of trl-entropy: token entropy, confidence scores, token masks, sequence reductions and
calibrated thresholds.

Every function here is stateless and free of trainer code, so it can be tested on its own against a float64
brute-force reference. Trainers, callbacks and logits processors call into this module and stay thin.

Conventions:
    * entropies are in nats unless a ``base`` argument says otherwise;
    * a ``mask`` is 1/True on valid (completion) tokens and 0/False on padding;
    * reductions over an empty set return NaN, never 0, so an empty completion can not pass for a confident one.
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal, NamedTuple

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
    "cohens_d",
    "threshold_mean",
    "threshold_info",
    "threshold_bayes",
    "threshold_universal",
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
    k = selected_token_count(int(flat_valid.sum()), ratio)
    selected = torch.zeros_like(flat_valid)
    if k > 0:
        # Invalid tokens sort last; a stable sort keeps row-major order among equal entropies.
        keys = torch.where(flat_valid, entropies.reshape(-1).float(), torch.tensor(float("-inf"), device=mask.device))
        order = torch.sort(keys, descending=True, stable=True).indices
        selected[order[:k]] = True
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


# ---------------------------------------------------------------------------------------------------------------------
# Calibrated confidence thresholds (Sharma & Chopra, 2025, "Think Just Enough").
# mu_c, sigma_c: mean and standard deviation of the sequence entropy of correct answers; mu_i, sigma_i: of incorrect.
# ---------------------------------------------------------------------------------------------------------------------


def cohens_d(mu_c: float, sigma_c: float, n_c: int, mu_i: float, sigma_i: float, n_i: int) -> float:
    """Cohen's d ``(mu_c - mu_i) / s_pooled`` with the pooled standard deviation of two groups.

    ``s_pooled = sqrt(((n_c - 1) sigma_c^2 + (n_i - 1) sigma_i^2) / (n_c + n_i - 2))``, with sample (ddof=1)
    standard deviations. Negative when correct answers have the lower entropy, as expected.
    """
    if n_c + n_i <= 2:
        raise ValueError("Cohen's d needs at least 3 examples in total.")
    pooled = math.sqrt(((n_c - 1) * sigma_c**2 + (n_i - 1) * sigma_i**2) / (n_c + n_i - 2))
    if pooled == 0:
        raise ValueError("Cohen's d is undefined: both groups have zero variance.")
    return (mu_c - mu_i) / pooled


def threshold_mean(mu_c: float) -> float:
    """``tau_mean = mu_c``: stop when the entropy is no higher than a typical correct answer's."""
    return mu_c


def threshold_info(mu_c: float, sigma_c: float, d: float) -> float:
    """``tau_info = mu_c + sigma_c * ln(1 + |d|)``: loosen the mean threshold as the groups separate more."""
    return mu_c + sigma_c * math.log1p(abs(d))


def threshold_bayes(mu_c: float, sigma_c: float, mu_i: float, sigma_i: float) -> float:
    """Equal-prior Gaussian decision boundary between the correct and incorrect groups.

    The root between ``mu_c`` and ``mu_i`` of ``a tau^2 + b tau + c = 0`` with ``a = 1/sigma_c^2 - 1/sigma_i^2``,
    ``b = 2 (mu_i/sigma_i^2 - mu_c/sigma_c^2)``, ``c = mu_c^2/sigma_c^2 - mu_i^2/sigma_i^2 - 2 ln(sigma_i/sigma_c)``;
    ``(mu_c + mu_i) / 2`` when the variances are equal. If no root lies between the means (heavily unequal
    variances), the root nearest their midpoint is returned.
    """
    if sigma_c <= 0 or sigma_i <= 0:
        raise ValueError(f"`sigma_c` and `sigma_i` must be > 0, got {sigma_c} and {sigma_i}.")
    a = 1.0 / sigma_c**2 - 1.0 / sigma_i**2
    b = 2.0 * (mu_i / sigma_i**2 - mu_c / sigma_c**2)
    c = mu_c**2 / sigma_c**2 - mu_i**2 / sigma_i**2 - 2.0 * math.log(sigma_i / sigma_c)
    midpoint = 0.5 * (mu_c + mu_i)
    if abs(a) < 1e-12 * max(1.0 / sigma_c**2, 1.0 / sigma_i**2):
        return midpoint if b == 0 else -c / b
    disc = b * b - 4 * a * c
    if disc < 0:
        return midpoint
    roots = [(-b + s * math.sqrt(disc)) / (2 * a) for s in (1.0, -1.0)]
    low, high = min(mu_c, mu_i), max(mu_c, mu_i)
    between = [r for r in roots if low <= r <= high]
    candidates = between or roots
    return min(candidates, key=lambda r: abs(r - midpoint))


def threshold_universal(mu_c: float, sigma_c: float, mu_i: float, d: float) -> float:
    """``tau_universal = mu_c + |d|/(1+|d|) * (mu_i - mu_c) * max(0, 1 - sigma_c/mu_c)``."""
    if mu_c == 0:
        return mu_c
    return mu_c + abs(d) / (1 + abs(d)) * (mu_i - mu_c) * max(0.0, 1.0 - sigma_c / mu_c)


# ---------------------------------------------------------------------------------------------------------------------
# EM-INF: inference-time entropy minimisation of the next-token logits (Agarwal et al., 2025, Sec. 3.3), and the
# paper's adaptive-temperature baseline. Pure functions over [..., V] logits; the logits processors and the vLLM
# adapter in trl_entropy/inference.py are thin wrappers around them.
# ---------------------------------------------------------------------------------------------------------------------


class EMInfResult(NamedTuple):
    """Output of :func:`em_inf_logits`.

    Attributes:
        logits: the optimised logits, same shape and dtype as the input.
        entropy_before: ``[...]`` float32 entropy (nats) of the input logits.
        entropy_after: ``[...]`` float32 entropy (nats) of the returned logits (computed in float32 on them).
        steps_taken: ``[...]`` int64 number of optimiser steps applied to each row.
    """

    logits: torch.Tensor
    entropy_before: torch.Tensor
    entropy_after: torch.Tensor
    steps_taken: torch.Tensor


def _check_em_inf_args(threshold: float, steps: int, lr: float, kl_weight: float, optimizer: str, betas, eps) -> None:
    if not (threshold >= 0 and math.isfinite(threshold)):
        raise ValueError(f"`threshold` must be a finite number >= 0 (nats), got {threshold}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"`steps` must be an integer >= 0, got {steps!r}.")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"`lr` must be a finite number > 0, got {lr}.")
    if not (kl_weight >= 0 and math.isfinite(kl_weight)):
        raise ValueError(f"`kl_weight` must be a finite number >= 0, got {kl_weight}.")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"`optimizer` must be 'adam' or 'sgd', got {optimizer!r}.")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"`betas` must be two numbers in [0, 1), got {betas}.")
    if not eps > 0:
        raise ValueError(f"`eps` must be > 0, got {eps}.")


def _softmax_terms(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log p, p, H)`` of rows ``z`` that are finite everywhere (masked entries hold the most negative float, whose
    probability underflows to exactly 0, so ``p * log p`` is 0 there and never ``0 * -inf = NaN``)."""
    log_p = torch.log_softmax(z, dim=-1)
    # softmax rather than log_p.exp(): the vectorised exp of very negative inputs (masked or improbable tokens) takes
    # a slow underflow path on CPU, about ten times slower than the softmax kernel.
    p = torch.softmax(z, dim=-1)
    entropy = -(p * log_p).sum(dim=-1)
    return log_p, p, entropy.clamp_min_(0.0)


def _em_inf_gradient_from_terms(
    log_p: torch.Tensor,
    p: torch.Tensor,
    entropy: torch.Tensor,
    kl_weight: float,
    scaled_reference: torch.Tensor | None,
) -> torch.Tensor:
    # d/dz [H(softmax z) + w KL(p0 || softmax z)] = -p (log p + H) + w (p - p0) = -p (log p + H - w) - w p0,
    # with ``scaled_reference = w * p0``: two passes over [N, V].
    shift = (entropy - kl_weight if scaled_reference is not None else entropy).unsqueeze(-1)
    if scaled_reference is None:
        return (log_p + shift).mul_(p).neg_()
    return torch.addcmul(scaled_reference, p, log_p + shift).neg_()


def _finite_working_copy(logits2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 copy of ``logits2d`` with ``-inf`` replaced by the most negative float and rows whose maximum is not
    finite (NaN, ``+inf``, all ``-inf``) replaced by zeros; also returns the ``-inf`` mask and the valid-row mask."""
    if logits2d.size(-1) == 0:  # an empty vocabulary has no distribution: nothing to optimise
        valid = torch.zeros(logits2d.size(0), dtype=torch.bool, device=logits2d.device)
    else:
        valid = torch.isfinite(logits2d.amax(dim=-1))
    neg_inf = torch.isneginf(logits2d)
    z = logits2d.to(torch.float32, copy=True)
    if bool(neg_inf.any()):
        z.masked_fill_(neg_inf, torch.finfo(torch.float32).min)
    if not bool(valid.all()):
        z.masked_fill_(~valid.unsqueeze(-1), 0.0)
    return z, neg_inf, valid


def em_inf_gradient(
    logits: torch.Tensor, reference_probs: torch.Tensor | None = None, kl_weight: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form gradient of the EM-INF objective ``H(softmax(z)) + kl_weight * KL(p0 || softmax(z))``.

    ``dH/dz_i = -p_i (log p_i + H)`` and ``dKL(p0 || softmax(z))/dz_i = p_i - p0_i`` (the softmax Jacobian applied to
    ``-p0 / p``), so no autograd graph is needed. Entries at ``-inf`` get a zero gradient.

    Args:
        logits: ``[..., V]`` logits ``z`` with a finite maximum per row; computed in float32 unless float64.
        reference_probs: ``[..., V]`` the original distribution ``p0`` (needed when ``kl_weight > 0``).
        kl_weight: weight of the KL term, ``>= 0``.

    Returns:
        ``(gradient, entropy)``: the gradient shaped like ``logits`` and the entropy ``H(softmax(z))`` in nats.
    """
    if kl_weight > 0 and reference_probs is None:
        raise ValueError("`reference_probs` is required when `kl_weight` > 0.")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(dtype).masked_fill(torch.isneginf(logits), torch.finfo(dtype).min)
    log_p, p, entropy = _softmax_terms(z)
    scaled_reference = None if kl_weight == 0 else reference_probs.to(dtype) * kl_weight
    return _em_inf_gradient_from_terms(log_p, p, entropy, kl_weight, scaled_reference), entropy


# Rows of the [N, V] logits EM-INF optimises at once on CPU: its ~7 float32 work buffers then stay in the CPU caches
# (measured ~2x faster than whole-batch passes at V = 49152). Accelerators want few, large kernels: 2**25 elements
# (128 MiB per buffer) covers a batch of 256 rows of a 128k vocabulary in one chunk.
_EM_INF_CPU_CHUNK_ELEMENTS = 1 << 17
_EM_INF_DEVICE_CHUNK_ELEMENTS = 1 << 25


def _denormals_flushed() -> bool:
    # The smallest normal float32 divided by 4 is a denormal, or 0 when this thread flushes denormals to zero.
    return bool(torch.tensor([torch.finfo(torch.float32).tiny]) / 4 == 0)


@contextlib.contextmanager
def _flush_denormals(device: torch.device):
    """Flush denormal floats to zero on this CPU thread for the duration, then restore the previous mode.

    The probabilities of improbable tokens (below ~1e-19) make Adam's second moment denormal, and x86 CPUs process
    denormals tens of times slower: flushing them halves EM-INF's time on language-model logits while changing only
    values below 1.2e-38.
    """
    if device.type != "cpu" or _denormals_flushed():
        yield
        return
    changed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(False)


def _em_inf_chunk(
    z: torch.Tensor,
    active: torch.Tensor,
    buffers: list[torch.Tensor],
    threshold: float,
    steps: int,
    lr: float,
    kl_weight: float,
    optimizer: str,
    betas: tuple[float, float],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimise the float32 rows ``z`` in place (``active`` marks the rows allowed to move); returns the entropy
    before, the entropy after and the steps taken per row. ``buffers`` are scratch ``[>= len(z), V]`` tensors (None
    for those the optimiser or a zero KL weight does not need)."""
    n = z.size(0)
    log_p, p, descent, exp_avg, exp_avg_sq, denom, scaled_reference = (None if b is None else b[:n] for b in buffers)
    torch.log_softmax(z, dim=-1, out=log_p)
    torch.softmax(z, dim=-1, out=p)  # not log_p.exp(): exp of very negative inputs takes a slow path on CPU
    entropy = torch.linalg.vecdot(p, log_p).neg_().clamp_min_(0.0)
    entropy_before = entropy.clone()
    if kl_weight > 0:
        torch.mul(p, kl_weight, out=scaled_reference)
    active = active & (entropy >= threshold)
    steps_taken = torch.zeros(n, dtype=torch.int64, device=z.device)
    beta1, beta2 = betas
    if optimizer == "adam":
        exp_avg.zero_()
        exp_avg_sq.zero_()
    for step in range(steps):
        n_active = int(active.sum())
        if n_active == 0:
            break
        # Minus the gradient of H + w KL(p0 || p): p (log p + H - w) + w p0 (see em_inf_gradient).
        torch.add(log_p, (entropy - kl_weight).unsqueeze(-1), out=descent).mul_(p)
        if kl_weight > 0:
            descent.add_(scaled_reference)
        frozen = None if n_active == n else ~active.unsqueeze(-1)
        if optimizer == "adam":
            exp_avg.lerp_(descent, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(descent, descent, value=1 - beta2)
            # Every active row has been active since step 0 (freezing is final), so all share one bias correction;
            # lr * m_hat / (sqrt(v_hat) + eps) == step_size * m / (sqrt(v) + eps * sqrt(bc2)).
            bias_correction2_sqrt = math.sqrt(1 - beta2 ** (step + 1))
            step_size = lr * bias_correction2_sqrt / (1 - beta1 ** (step + 1))
            torch.sqrt(exp_avg_sq, out=denom).add_(eps * bias_correction2_sqrt)
            if frozen is not None:
                denom.masked_fill_(frozen, float("inf"))  # m / inf == 0: frozen rows do not move
            z.addcdiv_(exp_avg, denom, value=step_size)
        else:
            if frozen is not None:
                descent.masked_fill_(frozen, 0.0)
            z.add_(descent, alpha=lr)
        steps_taken += active
        torch.log_softmax(z, dim=-1, out=log_p)
        torch.softmax(z, dim=-1, out=p)
        entropy = torch.linalg.vecdot(p, log_p).neg_().clamp_min_(0.0)
        active &= entropy >= threshold
    return entropy_before, entropy, steps_taken


@torch.no_grad()
def em_inf_logits(
    logits: torch.Tensor,
    threshold: float = 0.3,
    steps: int = 3,
    lr: float = 0.1,
    kl_weight: float = 0.05,
    optimizer: Literal["adam", "sgd"] = "adam",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    chunk_elements: int | None = None,
) -> EMInfResult:
    """EM-INF: sharpen each row of next-token logits by a few optimiser steps on its own entropy.

    For every row ``z`` independently, in float32: while ``H(softmax(z)) >= threshold`` and fewer than ``steps``
    steps were taken, take one Adam (or SGD) step on ``H(softmax(z)) + kl_weight * KL(p0 || softmax(z))`` with
    ``p0 = softmax(z_input)``. A row stops for good the first time its entropy is below ``threshold`` (per-row
    freezing), so a row's result never depends on the other rows. Settings of the released script: ``threshold=0.3,
    kl_weight=0.05, lr=0.1, steps=3`` (then sampling at temperature 0.1); the paper finds ``0.1 < threshold < 0.5`` and
    5-15 steps work best. Unlike the released script, the KL term is per row (not averaged over the batch) and the
    stopping test is per row (not on the batch's summed entropy).

    Guarantees:
        * the entropy of a returned row never exceeds that of the input row: a row whose final entropy (computed
          after the cast back to the input dtype) is higher than at the start is returned unchanged;
        * ``-inf`` entries (a masked vocabulary, top-k/top-p filtering) stay ``-inf`` and keep zero probability;
        * rows whose maximum is not finite (NaN anywhere, ``+inf``, or all ``-inf``) are returned unchanged;
        * argmax: with ``kl_weight = 0`` the top token's gradient ``-p (log p + H)`` is never positive (its
          log-probability is at least ``-H``), so its logit never decreases while it is the top, and plain SGD keeps
          it on top (no other token's gradient is more negative). Adam, however, scales each coordinate by its own
          gradient history, so a near-tied token can overtake it; the overtaking token must start within Adam's
          largest possible travel, about ``lr * steps`` (in practice only ties closer than ~1e-3 flip; see
          ``tests/test_inference.py``). The KL term pulls towards the original ordering. Greedy decoding after
          EM-INF therefore picks the same token as without it except, occasionally, among near-tied tokens.

    Args:
        logits: ``[..., V]`` logits of any floating dtype.
        threshold: entropy (nats) below which a row is left alone / stops being optimised, ``>= 0``.
        steps: maximum optimiser steps per row, ``>= 0``.
        lr: optimiser learning rate, ``> 0``.
        kl_weight: weight of ``KL(p0 || softmax(z))`` that keeps the result near the original distribution, ``>= 0``.
        optimizer: ``"adam"`` (the paper's) or ``"sgd"``.
        betas: Adam's moment decay rates, each in ``[0, 1)``.
        eps: Adam's denominator term, ``> 0``.
        chunk_elements: rows are optimised in chunks of about this many elements (rows are independent, so this
            only changes speed and memory); default ``2**17`` on CPU (cache-sized), ``2**25`` on other devices.

    Returns:
        An :class:`EMInfResult`.
    """
    _check_em_inf_args(threshold, steps, lr, kl_weight, optimizer, betas, eps)
    if not logits.is_floating_point():
        raise TypeError(f"`logits` must be a floating-point tensor, got {logits.dtype}.")
    shape, in_dtype = logits.shape, logits.dtype
    z_in = logits.reshape(math.prod(shape[:-1]), shape[-1])
    z, neg_inf, valid = _finite_working_copy(z_in)
    n_rows, vocab_size = z.shape
    if chunk_elements is None:
        chunk_elements = _EM_INF_CPU_CHUNK_ELEMENTS if z.device.type == "cpu" else _EM_INF_DEVICE_CHUNK_ELEMENTS
    rows = max(1, min(n_rows, chunk_elements // max(1, vocab_size)))
    # log p, p, descent direction, Adam's two moments and denominator, w * p0: only the ones this run uses.
    needed = [True, True, True, optimizer == "adam", optimizer == "adam", optimizer == "adam", kl_weight > 0]
    buffers = [torch.empty(rows, vocab_size, dtype=z.dtype, device=z.device) if use else None for use in needed]
    entropy_before = torch.full((n_rows,), float("nan"), device=z.device)
    entropy = torch.full((n_rows,), float("nan"), device=z.device)
    steps_taken = torch.zeros(n_rows, dtype=torch.int64, device=z.device)
    with _flush_denormals(z.device):
        for start in range(0, n_rows, rows):
            stop = start + rows
            before, after, taken = _em_inf_chunk(
                z[start:stop], valid[start:stop], buffers, threshold, steps, lr, kl_weight, optimizer, betas, eps
            )
            entropy_before[start:stop], entropy[start:stop], steps_taken[start:stop] = before, after, taken
    entropy_before.masked_fill_(~valid, float("nan"))

    untouched = ~valid | (steps_taken == 0)
    out = z.to(in_dtype)
    if in_dtype != torch.float32 and not bool(untouched.all()):
        # Rounding to a half-precision dtype can undo part of a small step: judge the row on what is returned.
        entropy = _softmax_terms(out.float().masked_fill_(neg_inf | ~valid.unsqueeze(-1), torch.finfo().min))[2]
    keep_input = untouched | (entropy > entropy_before)
    out = torch.where(keep_input.unsqueeze(-1) | neg_inf, z_in, out)
    entropy_after = torch.where(keep_input, entropy_before, entropy)
    steps_taken.masked_fill_(keep_input, 0)
    lead = shape[:-1]
    return EMInfResult(out.view(shape), entropy_before.view(lead), entropy_after.view(lead), steps_taken.view(lead))


def _check_adaptive_temperature_args(threshold, alpha, t_min, t_max, tol, max_iter) -> None:
    if not (threshold >= 0 and math.isfinite(threshold)):
        raise ValueError(f"`threshold` must be a finite number >= 0 (nats), got {threshold}.")
    if not (0.0 < alpha <= 1.0):
        raise ValueError(f"`alpha` must be in (0, 1], got {alpha}.")
    if not (0.0 < t_min < t_max and math.isfinite(t_max)):
        raise ValueError(f"`t_min` and `t_max` must satisfy 0 < t_min < t_max < inf, got {t_min} and {t_max}.")
    if not tol > 0:
        raise ValueError(f"`tol` must be > 0, got {tol}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"`max_iter` must be an integer >= 1, got {max_iter!r}.")


@torch.no_grad()
def adaptive_temperature(
    logits: torch.Tensor,
    threshold: float = 0.3,
    alpha: float = 0.5,
    t_min: float = 0.01,
    t_max: float = 1.0,
    tol: float = 0.1,
    max_iter: int = 30,
) -> torch.Tensor:
    """Per-row temperature of the adaptive-temperature baseline of Agarwal et al. (2025), by vectorised bisection.

    With ``H_0`` the entropy of ``softmax(z)`` and target ``H* = max(threshold, alpha * H_0)``: rows with
    ``H_0 <= H*`` get ``T = 1``; the others bisect ``T`` in ``[t_min, t_max]`` until
    ``|H(softmax(z / T)) - H*| < tol`` (``H`` grows monotonically with ``T``: ``dH/dT = Var_p(z) / T^3``) or
    ``max_iter`` halvings are spent, in which case the last midpoint is returned (close to ``t_min`` when even
    ``t_min`` cannot bring the entropy down to ``H*``, e.g. two tied top tokens). Paper: ``alpha`` in 0.4-0.6,
    ``tol = 0.1``.

    Args:
        logits: ``[..., V]`` logits. Rows whose maximum is not finite get ``T = 1``.
        threshold: entropy floor ``delta`` of the target (nats), ``>= 0``.
        alpha: target fraction of the initial entropy, in ``(0, 1]``.
        t_min: lowest temperature searched, ``> 0``.
        t_max: highest temperature searched, ``> t_min``.
        tol: accepted distance (nats) between the reached entropy and the target, ``> 0``.
        max_iter: maximum bisection steps, ``>= 1``.

    Returns:
        float32 temperatures of shape ``logits.shape[:-1]``; divide the logits by ``T.unsqueeze(-1)``.
    """
    _check_adaptive_temperature_args(threshold, alpha, t_min, t_max, tol, max_iter)
    lead = logits.shape[:-1]
    z, _, valid = _finite_working_copy(logits.reshape(math.prod(lead), logits.size(-1)))
    lowest = torch.finfo(z.dtype).min
    entropy0 = _softmax_terms(z)[2]
    target = torch.clamp_min(alpha * entropy0, threshold)
    searching = valid & (entropy0 > target)
    temperature = torch.ones_like(entropy0)
    low = torch.full_like(entropy0, t_min)
    high = torch.full_like(entropy0, t_max)
    for _ in range(max_iter):
        if not bool(searching.any()):
            break
        mid = (low + high) / 2
        temperature = torch.where(searching, mid, temperature)
        # Masked entries (the most negative float) overflow to -inf when divided by T < 1: clamp them back.
        entropy = _softmax_terms((z / temperature.unsqueeze(-1)).clamp_min_(lowest))[2]
        searching &= (entropy - target).abs() >= tol
        too_sharp = entropy < target
        low = torch.where(searching & too_sharp, mid, low)
        high = torch.where(searching & ~too_sharp, mid, high)
    return temperature.view(lead)


__all__ += ["EMInfResult", "em_inf_gradient", "em_inf_logits", "adaptive_temperature"]
