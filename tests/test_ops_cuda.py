"""Device dispatch of the full-vocabulary reductions (token_entropy, self_certainty): TRL's fused kernel on CUDA, the
chunked PyTorch path elsewhere. The CUDA tests compare the fused path with the CPU path and a float64 reference and
are skipped without CUDA; the others run the dispatch logic and the fused wrapper on CPU, where TRL's public op runs
its own PyTorch reference instead of the Triton kernel."""

import math

import pytest
import torch

from trl_entropy import ops

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def brute_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Float64 reference: -sum p log p with p = softmax(z / T), 0 log 0 = 0."""
    z = logits.double() / temperature
    p = torch.softmax(z, dim=-1)
    logp = torch.log_softmax(z, dim=-1).masked_fill(p.detach() == 0, 0.0)
    return -(p * logp).sum(-1)


def brute_self_certainty(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Float64 reference: KL(U || p) over the finite entries."""
    z = logits.double() / temperature
    finite = torch.isfinite(z)
    n = finite.sum(-1).double()
    logp = torch.log_softmax(z, dim=-1)
    return -torch.log(n) - torch.where(finite, logp, torch.zeros_like(logp)).sum(-1) / n


def special_rows(vocab: int = 64) -> torch.Tensor:
    """Finite rows and rows with -inf (masked vocabulary), +inf and NaN entries, which TRL's kernel returns as NaN."""
    torch.manual_seed(0)
    logits = torch.randn(6, vocab) * 3
    logits[1, ::3] = float("-inf")
    logits[2, 1:] = float("-inf")  # a single finite entry: a point mass
    logits[3, [2, 7]] = float("inf")
    logits[4, 5] = float("nan")
    return logits


@pytest.mark.parametrize(
    ("device", "dtype", "triton", "expected"),
    [
        ("cuda", torch.bfloat16, True, "trl_fused"),
        ("cuda", torch.float16, True, "trl_fused"),
        ("cuda:0", torch.float32, True, "trl_fused"),
        ("cuda", torch.float64, True, "torch_chunked"),  # the kernel reads float64 as float32: keep the precision
        ("cuda", torch.bfloat16, False, "torch_chunked"),  # no Triton, no kernel
        ("cpu", torch.bfloat16, True, "torch_chunked"),
        ("cpu", torch.float32, False, "torch_chunked"),
        ("meta", torch.float32, True, "torch_chunked"),
    ],
)
def test_entropy_backend_is_chosen_by_device_and_dtype(device, dtype, triton, expected):
    assert ops.entropy_backend(device, dtype, triton_available=triton) == expected


def test_cpu_tensors_take_the_chunked_path():
    logits = torch.randn(2, 3, 10)
    assert ops.entropy_backend(logits.device, logits.dtype) == "torch_chunked"


@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_fused_wrapper_recomputes_non_finite_rows(temperature):
    # TRL's op alone gives NaN on rows with a -inf or +inf entry; the wrapper must give the chunked path's values.
    from trl.trainer.utils import selective_log_softmax_and_entropy

    logits = special_rows()
    trl_entropy = selective_log_softmax_and_entropy(logits, torch.zeros(6, dtype=torch.long), temperature=temperature)
    assert torch.isnan(trl_entropy[1][[1, 2, 3]]).all()

    got = ops._fused_token_entropy(logits, temperature)
    chunked = ops._chunked_token_entropy(logits, temperature)
    torch.testing.assert_close(got, chunked, atol=1e-5, rtol=1e-5, equal_nan=True)
    finite_rows = [0, 1, 2, 5]
    torch.testing.assert_close(
        got[finite_rows].double(), brute_entropy(logits[finite_rows], temperature), atol=1e-5, rtol=1e-5
    )
    assert got[3].item() == pytest.approx(math.log(2), abs=1e-6) and torch.isnan(got[4])

    certainty = ops._fused_self_certainty(logits, temperature)
    torch.testing.assert_close(
        certainty, ops._chunked_self_certainty(logits, temperature), atol=1e-5, rtol=1e-5, equal_nan=True
    )
    torch.testing.assert_close(
        certainty[finite_rows].double(), brute_self_certainty(logits[finite_rows], temperature), atol=1e-5, rtol=1e-5
    )


def test_fused_wrapper_keeps_shape_slices_and_gradient():
    torch.manual_seed(1)
    full = (torch.randn(2, 5, 4, 40) * 2).requires_grad_(True)
    logits = full[:, :, :-1]  # a non-contiguous slice, 4-D: reshaped for the kernel's layout
    weights = torch.randn(2, 5, 3)
    got = ops._fused_token_entropy(logits, 0.8)
    assert got.shape == (2, 5, 3)
    (got * weights).sum().backward()
    ref = full.detach().double().requires_grad_(True)
    (brute_entropy(ref[:, :, :-1], 0.8) * weights.double()).sum().backward()
    torch.testing.assert_close(got.double(), brute_entropy(full.detach()[:, :, :-1], 0.8), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.grad.double(), ref.grad, atol=1e-6, rtol=1e-5)


def test_fused_wrapper_recomputes_non_finite_rows_of_a_slice():
    # The undefined rows are gathered from a non-contiguous 4-D slice, and put back in place.
    torch.manual_seed(5)
    full = torch.randn(2, 5, 4, 40) * 2
    full[1, 2, 0, :7] = float("-inf")
    full[0, 4, 2, 3] = float("inf")
    logits = full[:, :, :-1]
    got = ops._fused_token_entropy(logits, 0.8)
    torch.testing.assert_close(got, ops._chunked_token_entropy(logits, 0.8), atol=1e-5, rtol=1e-5)
    assert got[0, 4, 2].item() == pytest.approx(0.0, abs=1e-6)  # a single +inf entry: a point mass
    torch.testing.assert_close(
        ops._fused_self_certainty(logits, 0.8), ops._chunked_self_certainty(logits, 0.8), atol=1e-5, rtol=1e-5
    )


# ---------------------------------------------------------------------------------------------------------------------
# CUDA: the fused kernel against the CPU path and float64
# ---------------------------------------------------------------------------------------------------------------------


@requires_cuda
def test_cuda_logits_take_the_fused_path_when_triton_is_installed():
    pytest.importorskip("triton")
    logits = torch.randn(2, 8, device="cuda", dtype=torch.bfloat16)
    assert ops.entropy_backend(logits.device, logits.dtype) == "trl_fused"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_cuda_token_entropy_equals_cpu_and_float64(dtype, temperature):
    torch.manual_seed(2)
    logits = (torch.randn(3, 17, 1000) * 4).to(dtype)
    logits[0, 3, ::7] = float("-inf")
    logits[1, 2, [5, 9]] = float("inf")
    logits[2, 0, 1] = float("nan")
    got = ops.token_entropy(logits.cuda(), temperature).cpu()
    cpu = ops.token_entropy(logits, temperature)
    assert got.dtype == torch.float32 and got.shape == (3, 17)
    torch.testing.assert_close(got, cpu, atol=2e-5, rtol=2e-5, equal_nan=True)
    defined = ~(torch.isposinf(logits) | torch.isnan(logits)).any(-1)  # the float64 softmax is NaN on the others
    torch.testing.assert_close(
        got[defined].double(), brute_entropy(logits[defined].double(), temperature), atol=2e-5, rtol=2e-5
    )
    assert got[1, 2].item() == pytest.approx(math.log(2), abs=1e-6) and torch.isnan(got[2, 0])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_token_entropy_gradient_equals_cpu_path(dtype):
    torch.manual_seed(3)
    base = (torch.randn(2, 9, 3000) * 3).to(dtype)
    base[0, 1, :100] = float("-inf")  # a row the fused kernel can not take: recomputed, zero gradient there
    weights = torch.randn(2, 8)
    grads = []
    for device in ("cuda", "cpu"):
        logits = base.to(device).requires_grad_(True)
        (ops.token_entropy(logits[:, :-1], 0.9) * weights.to(device)).sum().backward()
        grads.append(logits.grad.cpu().float())
    assert torch.isfinite(grads[0]).all() and (grads[0][0, 1, :100] == 0).all()
    # Both paths compute in float32 and round the gradient to the logits' dtype: at most an ulp apart.
    rtol = 1e-4 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=rtol)
    ref = base.double().requires_grad_(True)
    (brute_entropy(ref[:, :-1], 0.9) * weights.double()).sum().backward()
    torch.testing.assert_close(grads[0].double(), ref.grad, atol=1e-6, rtol=rtol)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_self_certainty_equals_cpu_and_float64(dtype):
    torch.manual_seed(4)
    logits = (torch.randn(4, 11, 2000) * 3).to(dtype)
    logits[1, 4, ::5] = float("-inf")
    got = ops.self_certainty(logits.cuda(), 0.8).cpu()
    torch.testing.assert_close(got, ops.self_certainty(logits, 0.8), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got.double(), brute_self_certainty(logits.double(), 0.8), atol=1e-4, rtol=1e-5)
