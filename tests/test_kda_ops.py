"""chunk_kda (fast path) against recurrent_kda (the specification): outputs, final state and gradients."""
import pytest
import torch
import torch.nn.functional as F

from gendistill.kda import chunk_kda, kda_gate, kda_gated, l2norm, recurrent_kda, resolve_backend, use_backend


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


def test_strong_decay_does_not_overflow():
    q, k, v, g, beta = make_inputs(1, 96, 1, 1, 16, 16, strong_decay=True)
    assert g.sum(1).min() < -300  # cumulative log-decay far below what exp() could invert in fp32
    o_ref, s_ref = recurrent_kda(q, k, v, g, beta, output_final_state=True)
    o, s = chunk_kda(q, k, v, g, beta, output_final_state=True)
    assert torch.isfinite(o).all() and rel_err(o, o_ref) < 1e-4 and rel_err(s, s_ref) < 1e-4


def test_gradients_match():
    inputs = make_inputs(2, 45, 2, 4, 16, 8)
    h0 = torch.randn(2, 4, 16, 8)
    grads = []
    for fn in (recurrent_kda, chunk_kda):
        leaves = [x.clone().requires_grad_() for x in (*inputs, h0)]
        o, s = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True)
        ((o * torch.linspace(-1, 1, o.shape[-1])).sum() + s.square().sum()).backward()
        grads.append([x.grad for x in leaves])
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
