"""gendistill.kernels.norm: the one-launch Triton RMSNorm (in Triton's interpreter on CPU) against its definition, which is
transformers' Qwen3RMSNorm and the KDA reference path's gated norm."""
import pytest
import torch
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from gendistill import kda
from gendistill.kernels.norm import rms_norm, rms_norm_reference

ULP = {torch.float32: 1e-6, torch.bfloat16: 2**-7}  # Triton's interpreter rounds fp32 -> bf16 toward zero


def tensors(shape, dtype, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g) * (i + 1)).to(dtype) for i in range(n)]


def close(got, want, dtype, ulps=2):
    """Within `ulps` roundings (the kernel rounds after each step, as the reference; the interpreter the other way)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=ulps * ULP[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 37, 64), (1, 3, 96), (5, 1, 1024)])  # rows no multiple of a block; width no
def test_rms_norm_is_transformers_qwen3_norm(shape, dtype):  # power of two; decoding's one row per sequence
    x, w = tensors(shape, dtype, 1)[0], torch.randn(shape[-1]).to(dtype)
    module = Qwen3RMSNorm(shape[-1], eps=1e-6).to(dtype)
    module.weight.data.copy_(w)
    want = module(x)
    close(rms_norm(x, w, 1e-6), want, dtype)
    close(rms_norm_reference(x, w, 1e-6), want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_adds_the_residual_first_and_returns_the_sum(dtype):
    x, residual = tensors((3, 29, 64), dtype, 2)
    w = torch.randn(64).to(dtype)
    y, h = rms_norm(x, w, 1e-6, residual=residual)
    close(h, residual + x, dtype, ulps=1)  # rounded where transformers' add rounds
    close(y, rms_norm_reference(h, w, 1e-6), dtype)


@pytest.mark.parametrize("activation", ["sigmoid", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rms_norm_is_the_kda_reference(activation, dtype):
    """KDA's output norm: per head of D channels, shared weight, times act(gate); against the PyTorch path of
    kda.gated_rms_norm (its definition)."""
    x, gate = tensors((2, 19, 4, 32), dtype, 2)
    w = torch.randn(32).to(dtype)
    want = kda.gated_rms_norm(x, gate, w, 1e-6, activation)  # on CPU: the reference
    close(rms_norm(x, w, 1e-6, gate=gate, activation=activation), want, dtype, ulps=3)  # three roundings
    wrong = "silu" if activation == "sigmoid" else "sigmoid"
    assert not torch.allclose(rms_norm(x, w, 1e-6, gate=gate, activation=wrong).float(), want.float(), atol=1e-2)


def test_rms_norm_reads_strided_inputs_and_refuses_unknown_gates():
    x = torch.randn(2, 11, 128)[..., :64]  # a slice: not contiguous
    w = torch.randn(64)
    close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), torch.float32)
    with pytest.raises(ValueError, match="activation must be"):
        rms_norm(x, w, 1e-6, gate=x, activation="relu")
