"""EM-INF: inference-time entropy minimisation of the next-token logits (Agarwal et al., 2025, arXiv 2505.15134,
Sec. 3.3), and the paper's adaptive-temperature baseline. Pure functions over ``[..., V]`` logits; the logits
processors and the vLLM adapter of :mod:`trl_entropy.decoding.processors` are thin wrappers around them.
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal, NamedTuple

import torch

__all__ = ["EMInfResult", "em_inf_gradient", "em_inf_logits", "adaptive_temperature"]


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
          ``tests/decoding/test_inference.py``). The KL term pulls towards the original ordering. Greedy decoding after
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
