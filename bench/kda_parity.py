"""fla's Triton KDA kernels vs gendistill's PyTorch paths on the same inputs (fp32 and bf16), op and layer level.

    python bench/kda_parity.py --out bench/results/h200/kda_parity.json     (needs CUDA + fla)
Reports max abs / relative errors of outputs, final states and gradients against the recurrent reference.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import environment, print_table, write_result  # noqa: E402
from gendistill.kda import kda_gated, use_backend  # noqa: E402


def errors(a, b) -> tuple[float, float]:
    a, b = a.float(), b.float()
    err = (a - b).abs().max().item()
    return err, err / max(b.abs().max().item(), 1e-6)


def inputs(B, T, H, D, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, device=device)
    q, k, v = r(B, T, H, D).to(dtype), r(B, T, H, D).to(dtype), r(B, T, H, D).to(dtype)
    f, b = r(B, T, H, D).to(dtype), r(B, T, H).to(dtype)
    A_log = torch.empty(H, device=device).uniform_(1, 16, generator=gen).log()
    dt = torch.exp(torch.empty(H * D, device=device).uniform_(-6.9, -2.3, generator=gen))
    dt_bias = dt + torch.log(-torch.expm1(-dt))
    h0 = r(B, H, D, D) * 0.1
    return q, k, v, f, b, A_log, dt_bias, h0


def run(backend, args, grad=False):
    q, k, v, f, b, A_log, dt_bias, h0 = args
    leaves = [x.detach().clone().requires_grad_(grad) for x in (q, k, v, f, b)]
    with use_backend(backend), torch.set_grad_enabled(grad):
        o, s = kda_gated(*leaves, A_log, dt_bias, initial_state=h0.clone(), output_final_state=True)
        grads = None
        if grad:
            (o.float().square().sum() + s.square().sum()).backward()
            grads = [x.grad for x in leaves]
    return o.detach(), s.detach(), grads


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/kda_parity.json")
    p.add_argument("--seq", type=int, default=2048)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA and flash-linear-attention", file=sys.stderr)
        return 2
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        cases = ((args.seq, "chunk"), (1, "decode"), (64, "short")) if dtype == torch.bfloat16 else ((args.seq, "chunk"),)
        for T, mode in cases:
            x = inputs(1, T, 16, 128, dtype, "cuda")
            ref_o, ref_s, _ = run("recurrent", x)
            for backend in ("fla", "chunk"):
                o, s, _ = run(backend, x)
                eo, ro = errors(o, ref_o)
                es, rs = errors(s, ref_s)
                rows.append({"dtype": str(dtype).split(".")[-1], "T": T, "case": mode, "path": backend,
                             "out_abs": eo, "out_rel": ro, "state_abs": es, "state_rel": rs})
        if dtype == torch.float32:
            continue  # gradients are compared in bf16, the training precision (fp32 Triton autotuning costs minutes)
        x = inputs(1, 512, 16, 128, dtype, "cuda", seed=1)
        _, _, g_ref = run("chunk", x, grad=True)
        _, _, g_fla = run("fla", x, grad=True)
        for name, a, b in zip(("dq", "dk", "dv", "df", "dbeta"), g_fla, g_ref):
            ea, ra = errors(a, b)
            rows.append({"dtype": str(dtype).split(".")[-1], "T": 512, "case": f"grad {name}", "path": "fla vs chunk",
                         "out_abs": ea, "out_rel": ra})
    print_table(rows, ["dtype", "T", "case", "path", "out_abs", "out_rel", "state_abs", "state_rel"])
    write_result(args.out, {"benchmark": "kda_parity", "env": environment(), "reference": "recurrent_kda (fp32 loop)",
                            "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
