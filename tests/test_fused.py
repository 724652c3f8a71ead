"""gendistill.kernels: the fused inference path (kernels.norm's Triton RMSNorm and q/k norm + rotary kernel, the
SwiGLU kernel and the KDA mixer's Triton head split, run in Triton's interpreter; MLPs in slices) against the
transformers modules. CI has no GPU, so the path is switched on for CPU tensors; what is tested is the kernels'
numerics and everything around them: which module calls what, the residual wiring, the MLP's slicing beyond the
chunk."""
import copy

import pytest
import torch
from transformers import DynamicCache
from transformers.models.qwen3.modeling_qwen3 import (Qwen3Attention, Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding,
                                                      apply_rotary_pos_emb)

import gendistill.kda as kda
from gendistill import convert
from gendistill.kernels import fuse as fuse_modules
from gendistill.kernels import hybrid, norm, policy, qwen3
from gendistill.kernels.hybrid import FusedKDAMixer
from gendistill.kernels.qwen3 import FusedMLP, FusedRMSNorm
from gendistill.testing import tiny_qwen3

CALLS = {"rms_norm": 0, "qk_norm_rotary": 0}


def counted(name, fn):
    def call(*args, **kwargs):
        CALLS[name] += 1
        return fn(*args, **kwargs)
    return call


@pytest.fixture
def fused_path(monkeypatch):
    """The fused path switched on for CPU tensors under no_grad: gendistill's Triton kernels in the interpreter."""
    inference = lambda x, weight=None: not torch.is_grad_enabled()  # noqa: E731
    monkeypatch.setattr(policy, "enabled", inference)  # the one switch every fused module asks
    # The KDA mixer as on the fla path: q/k/v from the Triton split (in Triton's interpreter), q/k normalised there
    monkeypatch.setattr(hybrid, "resolve_backend", lambda x, n: "fla")
    rms = counted("rms_norm", norm.rms_norm)
    monkeypatch.setattr(qwen3, "rms_norm", rms)
    monkeypatch.setattr(hybrid, "rms_norm", rms)  # KDA's gated output norm
    monkeypatch.setattr(hybrid, "qk_norm_rotary", counted("qk_norm_rotary", norm.qk_norm_rotary))
    CALLS.update(rms_norm=0, qk_norm_rotary=0)
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
    beyond kda_prefill_chunk, attention's q/k norm + rotary kernel, KDA's q/k normalised in the head split, against
    the reference path;
    uncached and cached + decode (the cache gets the rotated keys)."""
    student = convert(teacher, attention_layers=[0, 2])
    x = ids(2, 40)
    with torch.enable_grad():  # gradients on: the reference path
        reference = student(x).logits.detach()
    assert fused_path["rms_norm"] == 0
    student.config.kda_prefill_chunk = 16  # 40 tokens: three MLP slices; KDA layers in three segments too
    for mixer in student.modules():
        if isinstance(mixer, FusedKDAMixer):
            mixer.prefill_chunk = 16
    slices, swiglu = [], qwen3.swiglu
    monkeypatch.setattr(qwen3, "swiglu", lambda gate, up: slices.append(gate.shape[-2]) or swiglu(gate, up))
    out = student(x).logits
    monkeypatch.setattr(qwen3, "swiglu", swiglu)
    # 4 layers x 2 norms + final, and the gated output norm of 2 KDA layers x 3 segments; q/k norms and rotary in the
    # 2 attention layers; 4 MLPs x 3 slices
    assert fused_path["rms_norm"] == 4 * 2 + 1 + 2 * 3 and fused_path["qk_norm_rotary"] == 2
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
    x = ids(2, hybrid.RECURRENT_MAX_STEPS + 6)
    with torch.enable_grad():
        reference = student(x).logits.detach()
    added = []
    add = hybrid.SegmentedKDA.add
    monkeypatch.setattr(hybrid.SegmentedKDA, "add", lambda self, inputs, tag: added.append(1) or add(self, inputs, tag))
    torch.testing.assert_close(student(x).logits, reference, atol=2e-5, rtol=0)
    assert len(added) == 2  # one segment in each of the two KDA layers
    cache = DynamicCache(config=student.config)
    split = x.shape[1] - 3
    pieces = [student(x[:, :split], past_key_values=cache, use_cache=True).logits]
    pieces += [student(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(split, x.shape[1])]
    torch.testing.assert_close(torch.cat(pieces, dim=1), reference, atol=2e-5, rtol=0)
    assert len(added) == 2 + 2  # the cached prefill too; decode steps take fla's recurrent kernel


@torch.no_grad()
def test_fuse_modules_on_a_stock_qwen3(teacher, fused_path):
    """The swap keeps parameter names and values (checkpoints load either way) and the outputs. Qwen3's own attention
    stays as it is (its q/k norm + rotary step is fused in the Hybrid-KDA attention only, which names that step)."""
    fast = fuse_modules(copy.deepcopy(teacher))
    assert fast.state_dict().keys() == teacher.state_dict().keys()
    assert not any(type(m) in (Qwen3RMSNorm, Qwen3MLP) for m in fast.modules())
    assert sum(type(m) is Qwen3Attention for m in fast.modules()) == 4
    x = ids(2, 19)
    torch.testing.assert_close(fast(x).logits, teacher(x).logits, atol=2e-5, rtol=0)
    assert fused_path["rms_norm"] > 0 and fused_path["qk_norm_rotary"] == 0


@torch.no_grad()
@pytest.mark.parametrize("batch", [1, 3])  # slices of one row are contiguous (the GEMM writes them); of 3, copied
def test_sliced_mlp_equals_whole(teacher, fused_path, batch):
    """MLP slices written into one output equal the whole transformers MLP."""
    mlp = fuse_modules(copy.deepcopy(teacher.model.layers[1].mlp))
    x = torch.randn(batch, 50, 64)
    with torch.enable_grad():  # the reference path
        whole = mlp(x).detach()
    mlp.config = copy.copy(mlp.config)
    mlp.config.kda_prefill_chunk = 7
    torch.testing.assert_close(mlp(x), whole, atol=1e-6, rtol=0)


def test_bench_checks_the_fused_modules_and_refuses_a_wrong_kernel(teacher, monkeypatch):
    """gendistill bench compares every fused module with transformers' on the inputs of one forward; a kernel that
    forgets the norm's weight, or rotates the wrong way, must fail exactly the checks of the modules it serves."""
    from gendistill.bench import checks
    from gendistill.kda import current_backend

    student = convert(teacher, attention_layers=[0, 2])
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, Qwen3RMSNorm):
                m.weight.normal_(1.0, 0.3)
    inference = lambda x, weight=None: not torch.is_grad_enabled() and current_backend() != "recurrent"  # noqa: E731
    monkeypatch.setattr(policy, "enabled", inference)
    with torch.no_grad():
        good = checks.check_correctness(teacher, student)
    assert good["passed"]
    attention = "student attention (q/k norms and rotary in one kernel), fused path vs transformers"
    assert {c["name"] for c in good["checks"]} >= {"student RMSNorm, fused path vs transformers",
                                                   "student MLP in slices of 64 tokens, fused path vs transformers",
                                                   attention}

    def no_weight(x, weight, eps, **kw):
        return norm.rms_norm(x, torch.ones_like(weight), eps, **kw)

    monkeypatch.setattr(qwen3, "rms_norm", no_weight)
    with torch.no_grad():
        bad = checks.check_correctness(teacher, student)
    failed = sorted(c["name"] for c in bad["checks"] if not c["passed"])
    assert failed == ["student RMSNorm with the residual add, fused path vs transformers",
                      "student RMSNorm, fused path vs transformers"]

    def backwards(q, k, q_weight, k_weight, eps, cos, sin):  # a plausible rotary bug: the sine's sign
        return norm.qk_norm_rotary(q, k, q_weight, k_weight, eps, cos, -sin)

    monkeypatch.setattr(qwen3, "rms_norm", norm.rms_norm)
    monkeypatch.setattr(hybrid, "qk_norm_rotary", backwards)
    with torch.no_grad():
        bad = checks.check_correctness(teacher, student)
    assert [c["name"] for c in bad["checks"] if not c["passed"]] == [attention]


@pytest.mark.parametrize("shape,dtype", [((3, 5000), torch.float32), ((2, 7, 96), torch.bfloat16)])
def test_swiglu_kernel_matches_the_eager_form(shape, dtype):
    """The Triton SwiGLU (in Triton's interpreter) against SiLU(gate) * up, over sizes that are no multiple of its
    blocks; bf16 within one rounding of the eager form, which rounds SiLU's output first."""
    gate, up = (torch.randn(*shape, generator=torch.Generator().manual_seed(i)).to(dtype) for i in (1, 2))
    got = qwen3.swiglu(gate, up)
    assert got.dtype == dtype and got.shape == gate.shape
    once = (torch.nn.functional.silu(gate.float()) * up.float()).to(dtype)  # rounded once, as the kernel
    # one bf16 ulp: Triton's interpreter rounds fp32 -> bf16 toward zero (the GPU rounds to nearest)
    torch.testing.assert_close(got, once, atol=1e-6, rtol=2**-7 if dtype == torch.bfloat16 else 1e-6)
    eager = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(got, eager, atol=1e-6, rtol=2**-6 if dtype == torch.bfloat16 else 1e-6)  # two ulps


@pytest.mark.parametrize("B,T,HQ,HK,D,dtype,per_row", [
    (2, 21, 4, 2, 16, torch.float32, False),   # steps no multiple of the kernel's row block; positions shared
    (2, 9, 4, 2, 16, torch.float32, True),     # a position row per sequence (left-padded generation)
    (1, 17, 16, 8, 128, torch.bfloat16, False),  # the Qwen3-0.6B head layout
])
def test_qk_norm_rotary_kernel_is_transformers_q_norm_k_norm_and_rotary(B, T, HQ, HK, D, dtype, per_row):
    """The Triton pass (in Triton's interpreter) against Qwen3RMSNorm then apply_rotary_pos_emb, with transformers'
    own cos/sin. In bf16 it rotates in fp32 and rounds once: within a few ulps (at the outputs' magnitude) of that
    rotation of transformers' normalised q/k and of transformers' bf16 rotation, which rounds each product and the
    sum; a wrong sign or weight is off by O(1)."""
    from transformers import Qwen3Config

    config = Qwen3Config(head_dim=D, hidden_size=HQ * D, num_attention_heads=HQ, num_key_value_heads=HK)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, T, HQ, D, generator=g).to(dtype), torch.randn(B, T, HK, D, generator=g).to(dtype)
    q_norm, k_norm = Qwen3RMSNorm(D, eps=1e-6).to(dtype), Qwen3RMSNorm(D, eps=1e-6).to(dtype)
    with torch.no_grad():
        q_norm.weight.normal_(1.0, 0.3, generator=g)
        k_norm.weight.normal_(1.0, 0.3, generator=g)
    positions = torch.arange(T)[None] + (torch.tensor([[0], [5]]) if per_row else 0)
    cos, sin = Qwen3RotaryEmbedding(config)(q, positions)
    assert cos.shape == ((B if per_row else 1), T, D)
    got = norm.qk_norm_rotary(q, k, q_norm.weight, k_norm.weight, 1e-6, cos, sin)
    with torch.no_grad():
        normed = q_norm(q), k_norm(k)
        want = apply_rotary_pos_emb(*normed, cos, sin, unsqueeze_dim=2)
        once = apply_rotary_pos_emb(*(t.float() for t in normed), cos.float(), sin.float(), unsqueeze_dim=2)
    for got_, want_, once_ in zip(got, want, once):
        assert got_.dtype == dtype and got_.shape == want_.shape
        if dtype == torch.float32:
            torch.testing.assert_close(got_, want_, atol=1e-5, rtol=1e-5)
        else:
            # in bf16 ulps at the largest output: the interpreter rounds toward zero (the GPU to nearest), and the
            # normalised input's two roundings, a bf16 ulp each, reach the output through cos and sin
            ulp = 2.0 ** (once_.abs().max().log2().floor().item() - 7)
            assert (got_.float() - once_).abs().max() <= 4 * ulp
            assert (got_.float() - want_.float()).abs().max() <= 6 * ulp
