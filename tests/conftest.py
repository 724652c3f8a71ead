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
                       A_log=None, dt_bias=None, cu_seqlens=None, cu_seqlens_cpu=None):
    """fla's chunk_kda contract, computed by the reference; records what fla's split-scan backend would see."""
    from gendistill.kda import kda_gate, l2norm, recurrent_kda

    FLA_CALLS.append({"inference": torch.is_inference_mode_enabled(), "env": os.environ.get("FLA_INTRACARD_CP"),
                      "cu_seqlens": None if cu_seqlens is None else cu_seqlens.tolist(),
                      "cu_seqlens_cpu": None if cu_seqlens_cpu is None else (cu_seqlens_cpu.device.type,
                                                                             cu_seqlens_cpu.tolist())})
    assert use_gate_in_kernel and use_beta_sigmoid_in_kernel and (cu_seqlens is None or q.shape[0] == 1)
    q, k = (l2norm(q), l2norm(k)) if use_qk_l2norm_in_kernel else (q, k)
    return recurrent_kda(q, k, v, kda_gate(g, A_log, dt_bias), beta.sigmoid(), scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens)


@pytest.fixture
def fake_fla(monkeypatch):
    """kda_gated's fla path on CPU, fla's chunk and decoding kernels replaced by the reference (a forced PyTorch
    backend still gets PyTorch); inputs of >= 12 tokens take the split scan. Returns the list of fla calls."""
    import gendistill.kda as kda

    monkeypatch.setattr(kda, "_fla_ops", lambda: (fake_fla_chunk_kda, fake_fla_chunk_kda))
    monkeypatch.setattr(kda, "resolve_backend",
                        lambda *a: "fla" if kda._backend.get() in ("auto", "fla") else kda._backend.get())
    monkeypatch.setattr(kda, "SPLIT_SCAN_MIN_TOKENS", 12)
    monkeypatch.delenv("FLA_INTRACARD_CP", raising=False)
    FLA_CALLS.clear()
    return FLA_CALLS
