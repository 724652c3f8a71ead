"""gendistill.fused: the fused inference path (gendistill.norm's Triton RMSNorm and the KDA mixer's Triton head split,
run in Triton's interpreter; fla's rotary embedding on CUDA; MLPs in slices) against the transformers modules. CI has
no GPU, so fla's rotary kernel is replaced by its written definition (fla's semantics: fp32 inside, [B, T, H, D] with
half-width cos/sin) and the fused path is switched on; what is tested is everything around the kernels: which module
calls what, the residual wiring, the rotary's inputs, the MLP's slicing beyond the chunk."""
import copy

import pytest
import torch
from transformers import DynamicCache
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3MLP, Qwen3RMSNorm

import gendistill.fused as fused
import gendistill.kda as kda
import gendistill.modeling as modeling
from gendistill import convert, norm
from gendistill.fused import FusedMLP, FusedRMSNorm, fuse_modules
from gendistill.modeling import KDAMixer
from gendistill.testing import tiny_qwen3

CALLS = {"rms_norm": 0, "rotary": 0}


def counted_rms_norm(*args, **kwargs):
    CALLS["rms_norm"] += 1
    return norm.rms_norm(*args, **kwargs)


TUNED = set()


def fla_rotary(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None):
    """x [B, T, H, D]; cos, sin [T, D/2]: the two halves of each head rotated (GPT-NeoX style), in fp32. As fla's
    autotuned kernel, it runs several times on its arguments the first time it sees a (B, H, D) shape."""
    CALLS["rotary"] += 1
    assert cos.shape == (x.shape[1], x.shape[-1] // 2) and not interleaved
    key = (x.shape[0], *x.shape[2:])
    runs = 1 if key in TUNED else 3
    TUNED.add(key)
    y = x if inplace else torch.empty_like(x)
    for _ in range(runs):
        x0, x1 = x.float().chunk(2, dim=-1)
        c, s = (t.float()[None, :, None, :] for t in (cos, sin))
        y.copy_(torch.cat([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1))
    return y


@pytest.fixture
def fused_path(monkeypatch):
    """The fused path switched on for CPU tensors under no_grad: gendistill's Triton kernels in the interpreter,
    fla's rotary written out."""
    inference = lambda x, weight=None: not torch.is_grad_enabled()  # noqa: E731
    monkeypatch.setattr(fused, "fused_inference", inference)
    monkeypatch.setattr(fused, "kernel_inference", inference)
    monkeypatch.setattr(kda, "kernel_inference", inference)  # KDA's gated output norm
    # The KDA mixer as on the fla path: q/k/v from the Triton split (in Triton's interpreter), q/k normalised there
    monkeypatch.setattr(modeling, "resolve_backend", lambda x, n: "fla")
    monkeypatch.setattr(fused, "fla_rotary", lambda: fla_rotary)
    monkeypatch.setattr(fused, "rms_norm", counted_rms_norm)
    CALLS.update(rms_norm=0, rotary=0)
    TUNED.clear()
    return CALLS


def ids(B, T, seed=0):
    return torch.randint(3, 384, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def teacher():
    return tiny_qwen3(layers=4)


def test_off_the_gpu_the_fused_modules_are_the_transformers_modules(teacher):
    """Without CUDA (or with gradients on) nothing changes: bit-identical outputs."""
    x = torch.randn(2, 7, 64)
    norm, mlp = teacher.model.layers[0].post_attention_layernorm, teacher.model.layers[0].mlp
    fused_norm, fused_mlp = fuse_modules(copy.deepcopy(norm)), fuse_modules(copy.deepcopy(mlp))
    assert type(fused_norm) is FusedRMSNorm and type(fused_mlp) is FusedMLP
    with torch.no_grad():
        assert torch.equal(fused_norm(x), norm(x)) and torch.equal(fused_mlp(x), mlp(x))
        h, normed = fused_norm.add_and_norm(x, 2 * x)
        assert torch.equal(h, 3 * x) and torch.equal(normed, norm(3 * x))


@torch.no_grad()
def test_student_fused_path_matches_reference(teacher, fused_path, monkeypatch):
    """The whole student: fused norms (with the residual add folded into the post-attention norm), MLPs sliced
    beyond kda_prefill_chunk, fla's rotary, KDA's q/k normalised in the head split, against the reference path;
    uncached and cached + decode (the cache gets the rotated keys)."""
    student = convert(teacher, attention_layers=[0, 2])
    x = ids(2, 40)
    with torch.enable_grad():  # gradients on: the reference path
        reference = student(x).logits.detach()
    assert fused_path["rms_norm"] == 0
    student.config.kda_prefill_chunk = 16  # 40 tokens: three MLP slices; KDA layers in three segments too
    for mixer in student.modules():
        if isinstance(mixer, KDAMixer):
            mixer.prefill_chunk = 16
    slices, swiglu = [], fused.swiglu
    monkeypatch.setattr(fused, "swiglu", lambda gate_up: slices.append(gate_up.shape[-2]) or swiglu(gate_up))
    out = student(x).logits
    monkeypatch.setattr(fused, "swiglu", swiglu)
    # 4 layers x 2 norms + final + 2 attention layers x (q, k) norms; 4 MLPs x 3 slices; q and k rotated in 2 layers
    assert fused_path["rms_norm"] == 4 * 2 + 1 + 2 * 2 and fused_path["rotary"] == 2 * 2
    assert slices == [16, 16, 8] * 4
    torch.testing.assert_close(out, reference, atol=2e-5, rtol=0)
    cache = DynamicCache(config=student.config)
    pieces = [student(x[:, :30], past_key_values=cache, use_cache=True).logits]
    pieces += [student(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(30, 40)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), reference, atol=2e-5, rtol=0)


@torch.no_grad()
def test_one_segment_prefill_takes_the_stages_path(teacher, fused_path, monkeypatch):
    """GPU inference beyond a decode step's 64 tokens runs KDA through SegmentedKDA in one segment (fla's stages
    without its autograd wrapper; on CPU the same schedule over kda_gated): same logits as the reference, uncached and
    cached (the conv context is kept only for a cache) + decode steps."""
    student = convert(teacher, attention_layers=[0, 2])
    x = ids(2, modeling.RECURRENT_MAX_STEPS + 6)
    with torch.enable_grad():
        reference = student(x).logits.detach()
    added = []
    add = modeling.SegmentedKDA.add
    monkeypatch.setattr(modeling.SegmentedKDA, "add", lambda self, inputs, tag: added.append(1) or add(self, inputs, tag))
    torch.testing.assert_close(student(x).logits, reference, atol=2e-5, rtol=0)
    assert len(added) == 2  # one segment in each of the two KDA layers
    cache = DynamicCache(config=student.config)
    split = x.shape[1] - 3
    pieces = [student(x[:, :split], past_key_values=cache, use_cache=True).logits]
    pieces += [student(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(split, x.shape[1])]
    torch.testing.assert_close(torch.cat(pieces, dim=1), reference, atol=2e-5, rtol=0)
    assert len(added) == 2 + 2  # the cached prefill too; decode steps take fla's recurrent kernel


def test_fused_inference_needs_long_inputs():
    """Decoding and short prefills stay on the few-calls path (the GPU waits on the host there)."""
    from gendistill import kda

    def hidden(batch, tokens, width=1024):  # bf16 activations of the Qwen3-0.6B width
        return torch.empty(batch, tokens, width, dtype=torch.bfloat16)

    assert kda.bytes_bound(hidden(1, 8192)) and kda.bytes_bound(hidden(4, 2048))  # batch x tokens
    assert not kda.bytes_bound(hidden(1, 4096)) and not kda.bytes_bound(hidden(128, 1))  # short prefill, decode
    assert not kda.bytes_bound(hidden(1, 8192, width=256))  # a narrow model's 8K tokens are still few bytes
    assert not kda.fused_inference(hidden(1, 8192))  # never off the GPU


@torch.no_grad()
def test_fuse_modules_on_a_stock_qwen3(teacher, fused_path):
    """The swap keeps parameter names and values (checkpoints load either way) and the outputs."""
    fast = fuse_modules(copy.deepcopy(teacher))
    assert fast.state_dict().keys() == teacher.state_dict().keys()
    assert not any(type(m) in (Qwen3RMSNorm, Qwen3MLP, Qwen3Attention) for m in fast.modules())
    x = ids(2, 19)
    torch.testing.assert_close(fast(x).logits, teacher(x).logits, atol=2e-5, rtol=0)
    assert fused_path["rms_norm"] > 0 and fused_path["rotary"] == 2 * 4


@torch.no_grad()
@pytest.mark.parametrize("batch", [1, 3])  # slices of one row are contiguous (the GEMM writes them); of 3, copied
def test_sliced_mlp_equals_whole(teacher, fused_path, batch):
    """MLP slices written into one output (gate and up from one GEMM) equal the whole transformers MLP."""
    mlp = fuse_modules(copy.deepcopy(teacher.model.layers[1].mlp))
    x = torch.randn(batch, 50, 64)
    with torch.enable_grad():  # the reference path
        whole = mlp(x).detach()
    mlp.config = copy.copy(mlp.config)
    mlp.config.kda_prefill_chunk = 7
    torch.testing.assert_close(mlp(x), whole, atol=1e-6, rtol=0)


def test_bench_checks_the_fused_modules_and_refuses_a_wrong_kernel(teacher, monkeypatch):
    """gendistill bench compares every fused module with transformers' on the inputs of one forward; a kernel that
    forgets the norm's weight must fail exactly those checks."""
    from gendistill import bench
    from gendistill.kda import _backend

    student = convert(teacher, attention_layers=[0, 2])
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, Qwen3RMSNorm):
                m.weight.normal_(1.0, 0.3)
    inference = lambda x, weight=None: not torch.is_grad_enabled() and _backend.get() != "recurrent"  # noqa: E731
    monkeypatch.setattr(fused, "fused_inference", inference)
    monkeypatch.setattr(fused, "kernel_inference", inference)
    monkeypatch.setattr(fused, "fla_rotary", lambda: fla_rotary)
    with torch.no_grad():
        good = bench.check_correctness(teacher, student)
    assert good["passed"]
    assert {c["name"] for c in good["checks"]} >= {"student RMSNorm, fused path vs transformers",
                                                   "student MLP in slices of 64 tokens, fused path vs transformers",
                                                   "student attention (fla's rotary), fused path vs transformers"}

    def no_weight(x, weight, eps, **kw):
        return norm.rms_norm(x, torch.ones_like(weight), eps, **kw)

    monkeypatch.setattr(fused, "rms_norm", no_weight)
    with torch.no_grad():
        bad = bench.check_correctness(teacher, student)
    failed = sorted(c["name"] for c in bad["checks"] if not c["passed"])
    assert failed == ["student RMSNorm with the residual add, fused path vs transformers",
                      "student RMSNorm, fused path vs transformers",
                      "student attention (fla's rotary), fused path vs transformers"]  # its q/k norms

    def swapped_halves(x, cos, sin, **kw):  # a plausible rotary bug: the sine applied with the wrong sign
        return fla_rotary(x, cos, -sin, **kw)

    monkeypatch.setattr(fused, "rms_norm", norm.rms_norm)
    monkeypatch.setattr(fused, "fla_rotary", lambda: swapped_halves)
    with torch.no_grad():
        bad = bench.check_correctness(teacher, student)
    assert [c["name"] for c in bad["checks"] if not c["passed"]] == [
        "student attention (fla's rotary), fused path vs transformers"]


@pytest.mark.parametrize("shape,dtype", [((3, 5000), torch.float32), ((2, 7, 96), torch.bfloat16)])
def test_swiglu_kernel_matches_the_eager_form(shape, dtype):
    """The Triton SwiGLU (in Triton's interpreter) against SiLU(gate) * up, over sizes that are no multiple of its
    block; bf16 within one rounding of the eager form, which rounds SiLU's output first."""
    gate, up = (torch.randn(*shape, generator=torch.Generator().manual_seed(i)).to(dtype) for i in (1, 2))
    got = fused.swiglu(torch.cat([gate, up], dim=-1))
    assert got.dtype == dtype and got.shape == gate.shape
    once = (torch.nn.functional.silu(gate.float()) * up.float()).to(dtype)  # rounded once, as the kernel
    # one bf16 ulp: Triton's interpreter rounds fp32 -> bf16 toward zero (the GPU rounds to nearest)
    torch.testing.assert_close(got, once, atol=1e-6, rtol=2**-7 if dtype == torch.bfloat16 else 1e-6)
    eager = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(got, eager, atol=1e-6, rtol=2**-6 if dtype == torch.bfloat16 else 1e-6)  # two ulps
