"""KDA over the consecutive segments of one long prefill, each segment's state scan beside the next one's parallel work.

fla's chunked KDA runs in three stages:
- prepare: beta's sigmoid, the gate and its chunk-local cumsum, the intra-chunk solve (w, u, A_qk): parallel over
  chunks, thousands of thread blocks;
- scan: the state handed from chunk to chunk, sequential; at batch 1 one thread block per head and 64 values, so 32
  of an H200's 132 SMs, 64 tokens per step;
- output: parallel again.
On CUDA, `SegmentedKDA` issues segment s's scan on a high-priority side stream only once the main stream has issued
segment s+1's projections (the GEMMs take every SM: a scan issued before them waits for them), so the scan shares the
GPU with s+1's head split and prepare kernels; the main stream then waits for the scan and runs s's output (the 128K
prefill ~2.5 % faster than the stages in order on one stream: docs/PERF_LOG.md). Elsewhere (CPU, the PyTorch paths) the stages run in order on one stream and the scan stage is the whole of
`kda_gated`: same results; tests/test_kda_segments.py checks the CUDA schedule with logging fake streams.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from gendistill.kda import fla_import, kda_gated
from gendistill.kernels import policy
from gendistill.kernels.launch import Launcher

CHUNK = 64  # fla's KDA chunk size (its default; 32 was slower on the H200)


@functools.cache
def _fla_stages():
    try:
        with fla_import():
            from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h
            from fla.ops.gla.chunk import chunk_gla_fwd_o_gk
            from fla.ops.kda.chunk_intra import chunk_kda_fwd_intra
            from fla.ops.kda.gate import kda_gate_chunk_cumsum
            from fla.ops.utils.constant import RCP_LN2
    except Exception:  # ImportError, or triton failing to initialise
        return None
    return chunk_gated_delta_rule_fwd_h, chunk_gla_fwd_o_gk, chunk_kda_fwd_intra, kda_gate_chunk_cumsum, RCP_LN2


def _beta(b: torch.Tensor) -> torch.Tensor:
    """sigmoid(b) in fp32, as fla's fused_beta_sigmoid (whose wrapper costs the host more than these two launches)."""
    return b.to(torch.float32, copy=True).sigmoid_()


class FlaStages:
    """fla's `chunk_kda_fwd` (fla/ops/kda/chunk_fwd.py, 0.6.0) cut at its scan, for inference on q/k already
    L2-normalised, gates and beta from raw pre-activations (as `kda_gated` calls fla: use_gate_in_kernel,
    use_beta_sigmoid_in_kernel), equal-length rows."""

    def __init__(self, A_log, dt_bias):
        self.A_log, self.dt_bias = A_log, dt_bias
        self.scan_fn, self.output_fn, self.intra, self.gate_cumsum, self.rcp_ln2 = _fla_stages()

    def prepare(self, q, k, v, f, b):
        scale = q.shape[-1] ** -0.5
        beta = _beta(b)
        g = self.gate_cumsum(g=f.contiguous(), A_log=self.A_log, dt_bias=self.dt_bias, scale=self.rcp_ln2,
                             chunk_size=CHUNK)
        w, u, _, kg, Aqk, _ = self.intra(q=q, k=k, v=v.contiguous(), gk=g, beta=beta, scale=scale, chunk_size=CHUNK)
        return q, g, Aqk, w, u, kg

    def scan(self, prepared, state):
        q, g, Aqk, w, u, kg = prepared
        h, v_new, final_state = self.scan_fn(k=kg, w=w, u=u, gk=g, initial_state=state, output_final_state=True,
                                             chunk_size=CHUNK)
        return (q, g, Aqk, h, v_new), final_state

    def output(self, scanned):
        q, g, Aqk, h, v_new = scanned
        return self.output_fn(q=q, v=v_new, g=g, A=Aqk, h=h, scale=q.shape[-1] ** -0.5,
                              chunk_size=CHUNK).type_as(q)


@functools.cache
def _fla_kernels():
    """fla's kernels behind the stages, each behind a kernels.launch.Launcher; None without fla. Called only where
    `policy.fla_kernels()` holds (fla 0.6.0: its kernels take other arguments in other releases)."""
    try:
        with fla_import():
            from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_kernel_h_blockdim64 as scan
            from fla.ops.gla.chunk import chunk_gla_fwd_kernel_o as output
            from fla.ops.kda.chunk_intra import chunk_kda_fwd_kernel_inter_solve_fused as inter_solve
            from fla.ops.kda.chunk_intra_token_parallel import chunk_kda_fwd_kernel_intra_token_parallel as intra
            from fla.ops.kda.gate import kda_gate_chunk_cumsum_vector_kernel as gate
            from fla.ops.kda.wy_fast import recompute_w_u_fwd_kda_kernel as w_u
    except Exception:  # ImportError, or triton failing to initialise
        return None
    return SimpleNamespace(gate=Launcher(gate), intra=Launcher(intra), inter_solve=Launcher(inter_solve),
                           w_u=Launcher(w_u), scan=Launcher(scan), output=Launcher(output))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class FlaKernels(FlaStages):
    """FlaStages with fla's wrappers unrolled: the kernels, arguments and buffers fla 0.6.0's `kda_gate_chunk_cumsum`,
    `chunk_kda_fwd_intra` (its default, token-parallel path), `chunk_gated_delta_rule_fwd_h` and `chunk_gla_fwd_o_gk`
    launch, each kernel through kernels.launch (a 4K prefill's KDA layer: ~0.3 ms less host time). Two buffers
    that fla zero-fills are left empty where the kernel writes every element: the output, the final state."""

    BC = 16  # fla's sub-chunk in the intra-chunk solve

    def __init__(self, A_log, dt_bias):
        super().__init__(A_log, dt_bias)
        self.kernels = _fla_kernels()

    def prepare(self, q, k, v, f, b):
        B, T, H, K = q.shape
        V, NT, BT, BC = v.shape[-1], _cdiv(T, CHUNK), CHUNK, self.BC
        run, scale = self.kernels, K ** -0.5
        beta = _beta(b)
        f, v = f.contiguous(), v.contiguous()
        g = torch.empty_like(f, dtype=torch.float32)
        run.gate(lambda m: (_cdiv(K, m["BS"]) * NT, B * H), s=f, A_log=self.A_log, dt_bias=self.dt_bias, o=g,
                 scale=self.rcp_ln2, cu_seqlens=None, chunk_indices=None, lower_bound=None, T=T, H=H, S=K, BT=BT,
                 REVERSE=False, USE_GRAPH=False)
        Aqk = q.new_empty(B, T, H, BT)
        Akk = q.new_zeros(B, T, H, BT)  # the solve writes its lower triangle only
        Akkd = q.new_empty(B, T, H, BC, dtype=torch.float32)
        run.intra(lambda m: (B * T, _cdiv(H, m["BH"])), q=q, k=k, g=g, beta=beta, Aqk=Aqk, Akk=Akkd, scale=scale,
                  cu_seqlens=None, N=B, T=T, H=H, HV=H, K=K, BK=1 << (K - 1).bit_length(), BT=BT, BC=BC,
                  USE_GRAPH=False)
        run.inter_solve((NT, B * H), q=q, k=k, g=g, beta=beta, Aqk=Aqk, Akkd=Akkd, Akk=Akk, scale=scale,
                        cu_seqlens=None, chunk_indices=None, T=T, H=H, HV=H, K=K, BT=BT, BC=BC, NC=_cdiv(BT, BC),
                        USE_SAFE_GATE=False, USE_GRAPH=False)
        w, kg, u = q.new_empty(B, T, H, K), q.new_empty(B, T, H, K), torch.empty_like(v)
        run.w_u((NT, B * H), q=None, k=k, qg=None, kg=kg, v=v, beta=beta, w=w, u=u, A=Akk, gk=g, cu_seqlens=None,
                chunk_indices=None, T=T, H=H, HV=H, K=K, V=V, BT=BT, BK=64, BV=64, USE_GRAPH=False)
        return q, g, Aqk, w, u, kg

    def scan(self, prepared, state):
        q, g, Aqk, w, u, kg = prepared
        B, T, H, K = kg.shape
        V = u.shape[-1]
        h = kg.new_empty(B, _cdiv(T, CHUNK), H, K, V)
        v_new = torch.empty_like(u)
        final_state = kg.new_empty(B, H, K, V, dtype=torch.float32)
        self.kernels.scan(lambda m: (_cdiv(V, m["BV"]) * B * H,), k=kg, v=u, w=w, v_new=v_new, g=None, gk=g, h=h,
                          h0=None if state is None else state.contiguous(), ht=final_state, cu_seqlens=None,
                          chunk_offsets=None, T=T, H=H, HV=H, K=K, V=V, BT=CHUNK, STATE_V_FIRST=False)
        return (q, g, Aqk, h, v_new), final_state

    def output(self, scanned):
        q, g, Aqk, h, v_new = scanned
        B, T, H, K = q.shape
        V = v_new.shape[-1]
        o = torch.empty_like(v_new)
        self.kernels.output(lambda m: (_cdiv(V, m["BV"]) * _cdiv(T, CHUNK), B * H), q=q, v=v_new, g=g, h=h, o=o,
                            A=Aqk, cu_seqlens=None, chunk_indices=None, scale=K ** -0.5, T=T, H=H, HV=H, K=K, V=V,
                            BT=CHUNK, STATE_V_FIRST=False, USE_GRAPH=False)
        return o


class WholeStages:
    """The PyTorch paths: no stages of their own, so the scan stage is all of `kda_gated`."""

    def __init__(self, A_log, dt_bias, qk_normalized):
        self.A_log, self.dt_bias, self.qk_normalized = A_log, dt_bias, qk_normalized

    def prepare(self, q, k, v, f, b):
        return q, k, v, f, b

    def scan(self, prepared, state):
        o, state = kda_gated(*prepared, self.A_log, self.dt_bias, initial_state=state, output_final_state=True,
                             qk_normalized=self.qk_normalized)
        return (o,), state

    def output(self, scanned):
        return scanned[0]


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device, priority=-1)  # its blocks are dispatched first when SMs free up


class SegmentedKDA:
    """KDA over consecutive segments of one batch of sequences, the state carried from each to the next:

        kda = SegmentedKDA(A_log, dt_bias, state, qk_normalized, like=x)
        for each segment:  (its projections issued first)
            for o, tag in kda.add([q, k, v, f, b], tag): ...  # the previous segment's output
        for o, tag in kda.finish(): ...                       # the last one's
        kda.state                                             # after the last segment, fp32

    `tag` rides along with its segment (the caller's output slice and gate). Outputs come back in segment order, one
    segment late. One segment is a whole prefill on fla's kernels without fla's autograd wrapper and stage functions
    (`FlaKernels`; their Python costs the host more than the kernels take the GPU at a few thousand tokens);
    `policy.use(direct_launch=False)`, or an fla release other than 0.6.0, takes fla's stage functions (`FlaStages`)."""

    def __init__(self, A_log, dt_bias, state, qk_normalized: bool, like: torch.Tensor):
        fla = qk_normalized and like.is_cuda and _fla_stages() is not None  # q/k normalised: fla inference
        if not fla:
            self.stages = WholeStages(A_log, dt_bias, qk_normalized)
        else:
            direct = policy.fla_kernels() and _fla_kernels() is not None
            self.stages = (FlaKernels if direct else FlaStages)(A_log, dt_bias)
        self.side = _side_stream(like.device) if fla else None
        self.state = None if state is None else state.float()
        self.pending = None  # (prepared, tag) of the segment whose scan is not issued yet

    def add(self, inputs: list, tag) -> list:
        """Segment s's [q, k, v, f, b] (emptied here, so that they are freed once prepared); returns what is done."""
        scanned = self._scan_pending()  # segment s-1's scan, issued after segment s's projections
        q, k, v, f, b = inputs
        inputs.clear()
        self.pending = (self.stages.prepare(q, k, v, f, b), tag)  # s's prepare shares the GPU with that scan
        del q, k, v, f, b
        return self._output(scanned)

    def finish(self) -> list:
        """The last segment's output; its scan has nothing left to run beside, so it runs on the main stream (the
        only one when there is a single segment)."""
        self.side = None
        return self._output(self._scan_pending())

    def _scan_pending(self):
        if self.pending is None:
            return None
        (prepared, tag), self.pending = self.pending, None
        if self.side is None:
            scanned, self.state = self.stages.scan(prepared, self.state)
            return scanned, tag, None
        self.side.wait_stream(torch.cuda.current_stream())  # the scan reads what the main stream prepared
        with torch.cuda.stream(self.side):
            scanned, self.state = self.stages.scan(prepared, self.state)
        for t in prepared:  # freed below: not reused before the scan has read them
            t.record_stream(self.side)
        self.state.record_stream(torch.cuda.current_stream())  # read by the main stream's last scan, or the caller
        return scanned, tag, self.side.record_event()

    def _output(self, pending) -> list:
        if pending is None:
            return []
        scanned, tag, scan_done = pending
        if scan_done is not None:
            main = torch.cuda.current_stream()
            main.wait_event(scan_done)
            for t in scanned:  # some were made on the side stream: not reused there before this read
                t.record_stream(main)
        return [(self.stages.output(scanned), tag)]
