"""chunk_kda (fast path) against recurrent_kda (the specification): outputs, final state and gradients."""
import pytest
import torch
import torch.nn.functional as F

from gendistill import kda
from gendistill.kda import chunk_kda, kda_gate, kda_gated, l2norm, recurrent_kda, resolve_backend, use_backend
from gendistill.kernels.heads import Conv, kda_heads, kda_heads_fused


def make_inputs(B, T, H, HV, K, V, strong_decay=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, HV, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, HV, K, generator=gen)) * (8.0 if strong_decay else 1.0)
    beta = torch.rand(B, T, HV, generator=gen)
    return q, k, v, g, beta


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def run_with_grads(fn, inputs, h0, **kw):
    """[o, final state, grad q, k, v, g, beta, h0] of `fn` under a loss touching every output channel and the state."""
    leaves = [x.clone().requires_grad_() for x in (*inputs, h0)]
    o, s = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True, **kw)
    ((o * torch.linspace(-1, 1, o.shape[-1])).sum() + s.square().sum()).backward()
    return [o, s, *(x.grad for x in leaves)]


@pytest.mark.parametrize("B,T,H,HV,K,V,chunk", [
    (2, 64, 2, 2, 16, 16, 32),   # T a multiple of the chunk
    (2, 77, 2, 4, 16, 8, 32),    # HV > H (GVA), T not a multiple, V != K
    (1, 5, 1, 1, 8, 8, 16),      # shorter than one chunk
    (1, 130, 2, 2, 32, 16, 64),  # fla's chunk size
])
def test_chunk_matches_recurrent_with_initial_state(B, T, H, HV, K, V, chunk):
    q, k, v, g, beta = make_inputs(B, T, H, HV, K, V)
    h0 = torch.randn(B, HV, K, V)
    o_ref, s_ref = recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o, s = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=chunk)
    assert o.shape == (B, T, HV, V) and s.shape == (B, HV, K, V) and s.dtype == torch.float32
    assert rel_err(o, o_ref) < 1e-4
    assert rel_err(s, s_ref) < 1e-4


@pytest.mark.parametrize("chunk,sub", [(16, 16), (16, 2), (32, 8), (8, 1)])
def test_sub_chunks_are_the_same_function(chunk, sub):
    """Any sub-block size gives the same outputs, states and gradients (1: no pairwise decays off the diagonal's
    single steps; = chunk: all pairwise), also with strong decays."""
    inputs = make_inputs(2, 45, 2, 2, 16, 8, strong_decay=True)
    h0 = torch.randn(2, 2, 16, 8)
    results = [run_with_grads(chunk_kda, inputs, h0, **kw) for kw in ({}, {"chunk_size": chunk, "sub_chunk": sub})]
    for ref, got in zip(*results):
        assert torch.isfinite(got).all() and rel_err(got, ref) < 1e-4


def test_sub_chunk_must_divide_the_chunk():
    with pytest.raises(ValueError, match="sub_chunk"):
        chunk_kda(*make_inputs(1, 8, 1, 1, 4, 4), chunk_size=16, sub_chunk=6)


def test_strong_decay_does_not_overflow():
    q, k, v, g, beta = make_inputs(1, 96, 1, 1, 16, 16, strong_decay=True)
    assert g.sum(1).min() < -300  # cumulative log-decay far below what exp() could invert in fp32
    o_ref, s_ref = recurrent_kda(q, k, v, g, beta, output_final_state=True)
    o, s = chunk_kda(q, k, v, g, beta, output_final_state=True)
    assert torch.isfinite(o).all() and rel_err(o, o_ref) < 1e-4 and rel_err(s, s_ref) < 1e-4


def test_gradients_match():
    inputs = make_inputs(2, 45, 2, 4, 16, 8)
    h0 = torch.randn(2, 4, 16, 8)
    grads = [run_with_grads(fn, inputs, h0)[2:] for fn in (recurrent_kda, chunk_kda)]
    for name, g_ref, g_chunk in zip(("q", "k", "v", "g", "beta", "h0"), *grads):
        assert rel_err(g_chunk, g_ref) < 1e-4, name


def test_cu_seqlens_resets_state_at_boundaries():
    lengths = [7, 40, 1, 33]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    q, k, v, g, beta = make_inputs(1, sum(lengths), 2, 2, 16, 16)
    h0 = torch.randn(len(lengths), 2, 16, 16)
    for fn in (recurrent_kda, chunk_kda):
        o, s = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            o_i, s_i = recurrent_kda(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b],
                                     initial_state=h0[i:i + 1], output_final_state=True)
            assert rel_err(o[:, a:b], o_i) < 1e-4 and rel_err(s[i:i + 1], s_i) < 1e-4


def test_packed_sequences_batched_by_length_match_each_sequence_alone_with_gradients():
    """chunk_kda groups packed sequences by padded length into batched calls (here widths 16, 64 and 128, and an
    empty sequence): outputs, final states and every gradient equal the recurrent reference run per sequence."""
    lengths = [7, 0, 40, 1, 100, 33, 16]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    inputs = make_inputs(1, sum(lengths), 2, 4, 16, 8)
    h0 = torch.randn(len(lengths), 4, 16, 8)
    results = [run_with_grads(fn, inputs, h0, cu_seqlens=cu) for fn in (recurrent_kda, chunk_kda)]
    for name, ref, got in zip(("o", "state", "q", "k", "v", "g", "beta", "h0"), *results):
        assert got.shape == ref.shape and rel_err(got, ref) < 1e-4, name
    assert torch.equal(results[1][1][1], h0[1])  # the empty sequence hands its initial state on untouched


def test_recurrent_matches_hand_computed_two_steps():
    # One head, K = V = 2, hand-checkable values (scale = 1).
    q = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    k = torch.tensor([[[[1.0, 0.0]], [[0.6, 0.8]]]])
    v = torch.tensor([[[[2.0, 1.0]], [[0.0, 3.0]]]])
    g = torch.log(torch.tensor([[[[0.5, 1.0]], [[1.0, 0.25]]]]))
    beta = torch.tensor([[[1.0], [0.5]]])
    S = torch.zeros(2, 2)
    outs = []
    for t in range(2):
        S = g[0, t, 0].exp()[:, None] * S
        S = S + beta[0, t, 0] * torch.outer(k[0, t, 0], v[0, t, 0] - S.T @ k[0, t, 0])
        outs.append(S.T @ q[0, t, 0])
    o, s = recurrent_kda(q, k, v, g, beta, scale=1.0, output_final_state=True)
    torch.testing.assert_close(o[0, :, 0], torch.stack(outs))
    torch.testing.assert_close(s[0, 0], S)


def test_gated_entry_point_and_masked_steps():
    B, T, H, K = 2, 20, 2, 8
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    v, f = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    b = torch.randn(B, T, H, generator=gen)
    A_log, dt_bias = torch.rand(H).log(), torch.randn(H * K)
    o, s = kda_gated(q, k, v, f, b, A_log, dt_bias, output_final_state=True)
    o_ref, s_ref = recurrent_kda(l2norm(q), l2norm(k), v, kda_gate(f, A_log, dt_bias), b.sigmoid(),
                                 output_final_state=True)
    assert rel_err(o, o_ref) < 1e-4 and rel_err(s, s_ref) < 1e-4
    # Steps carrying f = b = -1e4 leave the state exactly untouched (that is how padding is skipped).
    f2, b2 = f.clone(), b.clone()
    f2[:, 5:9], b2[:, 5:9] = -1e4, -1e4
    _, s_skip = kda_gated(q, k, v, f2, b2, A_log, dt_bias, output_final_state=True)
    keep = [t for t in range(T) if not 5 <= t < 9]
    _, s_drop = kda_gated(q[:, keep], k[:, keep], v[:, keep], f[:, keep], b[:, keep], A_log, dt_bias,
                          output_final_state=True)
    assert rel_err(s_skip, s_drop) < 1e-5


def test_kda_heads_repeat_kv_heads_as_gqa_and_normalise_on_request():
    """KDA head h reads kv head h // (H / Hkv) (transformers' repeat_kv order); the normalised split is the plain
    split with q and k L2-normalised, and kda_gated given pre-normalised q/k computes what it computes from raw ones."""
    B, T, H, Hkv, D = 2, 9, 4, 2, 8
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=torch.Generator().manual_seed(5))
    q, k, v = kda_heads(qkv, H, Hkv, D, normalize_qk=False)
    kv = qkv[..., H * D:].reshape(B, T, 2, Hkv, D)
    assert torch.equal(q, qkv[..., :H * D].reshape(B, T, H, D))
    for h in range(H):
        assert torch.equal(k[:, :, h], kv[:, :, 0, h // (H // Hkv)]) and torch.equal(v[:, :, h], kv[:, :, 1, h * Hkv // H])
    qn, kn, vn = kda_heads(qkv, H, Hkv, D, normalize_qk=True)
    torch.testing.assert_close(qn, l2norm(q))
    torch.testing.assert_close(kn, l2norm(k))
    assert torch.equal(vn, v)
    f, b = torch.randn(B, T, H, D), torch.randn(B, T, H)
    A_log, dt_bias = torch.rand(H).log(), torch.randn(H * D)
    raw = kda_gated(q, k, v, f, b, A_log, dt_bias, output_final_state=True)
    prenormed = kda_gated(qn, kn, vn, f, b, A_log, dt_bias, output_final_state=True, qk_normalized=True)
    for a, r in zip(prenormed, raw):
        torch.testing.assert_close(a, r)
    unnormalised = kda_gated(q, k, v, f, b, A_log, dt_bias, qk_normalized=True)[0]  # the flag is not ignored
    assert rel_err(unnormalised, raw[0]) > 0.1


@pytest.mark.parametrize("B,T,H,Hkv,D,dtype,normalize", [
    (2, 45, 4, 2, 16, torch.float32, True),    # rows not a multiple of the kernel's row block
    (1, 33, 16, 8, 128, torch.bfloat16, True),  # the Qwen3-0.6B head layout, bf16
    (3, 7, 6, 2, 8, torch.float32, False),     # three KDA heads per kv head, split only
    (2, 20, 4, 4, 32, torch.float32, True),    # no repetition
])
def test_fused_kda_heads_kernel_matches_the_definition(B, T, H, Hkv, D, dtype, normalize):
    """The Triton pass (in Triton's interpreter on CPU) against kda_heads, also from strided inputs (which it reads
    from a contiguous copy); its outputs are contiguous, as fla needs them."""
    C = (H + 2 * Hkv) * D
    wide = torch.randn(B, T, C + 5, generator=torch.Generator().manual_seed(1)).to(dtype)
    time_minor = torch.randn(B, C, 1, generator=torch.Generator().manual_seed(2)).to(dtype)
    # rows strided by a wider tensor; a decode step as the PyTorch conv returns it ([B, C, 1] transposed)
    for qkv in (wide[..., 5:], time_minor.transpose(1, 2)):
        fused = kda_heads_fused(qkv, H, Hkv, D, normalize)
        reference = kda_heads(qkv, H, Hkv, D, normalize)
        for got, want in zip(fused, reference):
            assert got.is_contiguous() and got.dtype == dtype and got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=0)


@pytest.mark.parametrize("T", [1, 2, 70])  # a decode step, fewer steps than the conv's reach, two row blocks + part
@pytest.mark.parametrize("with_context,bias,activation,dtype", [
    (False, True, "identity", torch.float32),
    (True, True, "silu", torch.float32),
    (True, False, "identity", torch.bfloat16),
])
def test_fused_kda_heads_with_the_conv_folded_in(T, with_context, bias, activation, dtype):
    """The conv folded into the Triton pass equals short_conv (the definition) then kda_heads, from a strided input,
    with and without the previous steps' context (which T < W-1 steps reach past)."""
    B, H, Hkv, D, W = 2, 4, 2, 16, 4
    C = (H + 2 * Hkv) * D
    gen = torch.Generator().manual_seed(T)
    qkv = torch.randn(B, T, C + 3, generator=gen).to(dtype)[..., 3:]
    weight = torch.randn(C, 1, W, generator=gen).to(dtype)
    conv_bias = torch.randn(C, generator=gen).to(dtype) if bias else None
    context = torch.randn(B, C, W - 1, generator=gen) if with_context else None  # fp32, as a cache may hold it
    conv_out, _ = kda.short_conv(qkv, weight, conv_bias, context, activation)
    reference = kda_heads(conv_out, H, Hkv, D, True)
    fused = kda_heads_fused(qkv, H, Hkv, D, True, Conv(weight, conv_bias, context, activation))
    for got, want in zip(fused, reference):
        assert got.is_contiguous() and got.shape == want.shape
        # bf16: the reference rounds inside F.conv1d, the kernel once after its fp32 sum (one ulp apart at most)
        torch.testing.assert_close(got, want, **(dict(atol=2e-2, rtol=1e-2) if dtype == torch.bfloat16
                                                 else dict(atol=1e-5, rtol=0)))
    unconvolved = kda_heads_fused(qkv, H, Hkv, D, True)  # the conv is not ignored
    assert (unconvolved[2] - reference[2]).abs().max() > 0.1


def test_next_conv_context_reaches_into_the_old_one():
    context = torch.arange(6.0).reshape(1, 2, 3)
    x = torch.tensor([[[10.0, 20.0]]])  # one step, two channels
    torch.testing.assert_close(kda.next_conv_context(context, x, 4), torch.tensor([[[1.0, 2.0, 10.0],
                                                                                    [4.0, 5.0, 20.0]]]))
    torch.testing.assert_close(kda.next_conv_context(None, x, 4), torch.tensor([[[0.0, 0.0, 10.0],
                                                                                 [0.0, 0.0, 20.0]]]))
    long = torch.arange(10.0).reshape(1, 5, 2)  # five steps: the context is the last three, whatever came before
    for before in (context, None):
        torch.testing.assert_close(kda.next_conv_context(before, long, 4), long[0, -3:].T[None])


def test_fused_kda_heads_rejects_a_layout_it_cannot_split():
    with pytest.raises(ValueError, match=r"\(H \+ 2 Hkv\) \* D"):
        kda_heads_fused(torch.zeros(1, 3, 100), 4, 2, 16, True)


def test_backend_selection():
    x = torch.zeros(1)
    assert resolve_backend(x, 1) == "recurrent" and resolve_backend(x, 100) == "chunk"  # training
    with torch.no_grad():
        assert resolve_backend(x, 100) == "recurrent"  # CPU inference
    with use_backend("recurrent"):
        assert resolve_backend(x, 100) == "recurrent"
    with pytest.raises(RuntimeError, match="CUDA"), use_backend("fla"):
        resolve_backend(x, 100)
    with pytest.raises(ValueError, match="unknown KDA backend"), use_backend("triton"):
        pass


def test_shape_errors_are_clear():
    q, k, v, g, beta = make_inputs(1, 8, 2, 3, 8, 8)
    with pytest.raises(ValueError, match="multiple of H"):
        chunk_kda(q, k, v, g, beta)


def fake_fla_causal_conv1d(x, weight, bias=None, activation=None, initial_state=None, cu_seqlens=None, **_):
    """fla's documented causal_conv1d semantics, step by step: x [B,T,D], weight [D,W], state [N,D,W] whose last W-1
    columns are the inputs before step 0; `cu_seqlens` (B = 1) restarts at each boundary."""
    B, T, D = x.shape
    W = weight.shape[1]
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else None
    y = torch.empty_like(x)
    for n in range(B):
        starts = [0] if bounds is None else bounds[:-1]
        for t in range(T):
            start = max(s for s in starts if s <= t)
            acc = torch.zeros(D) if bias is None else bias.clone()
            for j in range(W):  # tap j looks W-1-j steps back
                src = t - (W - 1 - j)
                if src >= start:
                    acc = acc + weight[:, j] * x[n, src]
                elif initial_state is not None and bounds is None:
                    acc = acc + weight[:, j] * initial_state[n, :, W + src]
            y[n, t] = acc * torch.sigmoid(acc) if activation == "silu" else acc
    return y, None


@pytest.mark.parametrize("activation", ["identity", "silu"])
def test_short_conv_fla_adapter_matches_the_pytorch_conv(monkeypatch, activation):
    """The CUDA path's glue (context [B,D,W-1] -> fla's [N,D,W] state, weight layout, new context, packed rows) checked
    on CPU against the F.conv1d path, with fla's kernel replaced by its definition."""
    import gendistill.kda as kda

    gen = torch.Generator().manual_seed(0)
    B, T, D, W = 2, 7, 6, 4
    x, weight, bias = torch.randn(B, T, D, generator=gen), torch.randn(D, 1, W, generator=gen), torch.randn(D, generator=gen)
    context = torch.randn(B, D, W - 1, generator=gen)
    doc_start = torch.zeros(B, T, dtype=torch.bool)
    doc_start[0, 3] = doc_start[1, 5] = True
    starts = doc_start.clone()
    starts[:, 0] = True
    cu_seqlens = torch.cat([starts.reshape(-1).nonzero().squeeze(-1), torch.tensor([B * T])])
    idx = torch.arange(T).expand(B, T)
    pos_in_doc = idx - torch.where(doc_start, idx, 0).cummax(-1).values

    cases = [dict(context=None), dict(context=context), dict(context=context, T=2),
             dict(context=None, cu_seqlens=cu_seqlens, pos_in_doc=pos_in_doc)]
    for case in cases:
        xs = x[:, : case.pop("T", T)]
        with use_backend("chunk"):
            ref_y, ref_ctx = kda.short_conv(xs, weight, bias, activation=activation, **case)
        monkeypatch.setattr(kda, "_fla_conv", lambda: fake_fla_causal_conv1d)
        monkeypatch.setattr(kda, "resolve_backend", lambda *a: "fla")
        y, ctx = kda.short_conv(xs, weight, bias, activation=activation, **case)
        monkeypatch.undo()
        assert y.shape == xs.shape and ctx.shape == (B, D, W - 1)
        torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ctx, ref_ctx)
