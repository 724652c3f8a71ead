import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, gendistill's own Triton kernels run in Triton's interpreter (on CPU tensors) against their references.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models: one thread avoids OpenMP spin contention (measured 10x faster on a busy 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)



FLA_CALLS = []


def fake_fla_chunk_kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                       use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False,
                       A_log=None, dt_bias=None, cu_seqlens=None):
    """fla's chunk_kda contract, computed by the reference; records how many pieces its chunk-state scan would run in
    (gendistill.kda.split_scan.pieces)."""
    from gendistill.kda import kda_gate, l2norm, recurrent_kda, split_scan

    FLA_CALLS.append({"tokens": q.shape[1], "pieces": split_scan._pieces.get()})
    assert use_gate_in_kernel and use_beta_sigmoid_in_kernel
    q, k = (l2norm(q), l2norm(k)) if use_qk_l2norm_in_kernel else (q, k)
    return recurrent_kda(q, k, v, kda_gate(g, A_log, dt_bias), beta.sigmoid(), scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens)


@pytest.fixture
def fake_fla(monkeypatch):
    """kda_gated's fla path on CPU, fla's chunk and decoding kernels replaced by the reference (a forced PyTorch
    backend still gets PyTorch); batch-1 inputs of >= 100 tokens have their scan split in 4 (on CUDA: >= 8192 tokens,
    about one scan block per SM). Returns the list of fla calls."""
    import gendistill.kda as kda

    monkeypatch.setattr(kda, "_fla_ops", lambda: (fake_fla_chunk_kda, fake_fla_chunk_kda))
    monkeypatch.setattr(kda, "resolve_backend",
                        lambda *a: "fla" if kda._backend.get() in ("auto", "fla") else kda._backend.get())
    monkeypatch.setattr(kda, "split_scan_pieces", lambda v: 4 if v.shape[0] == 1 and v.shape[1] >= 100 else 1)
    FLA_CALLS.clear()
    return FLA_CALLS
