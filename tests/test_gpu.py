"""GPU suite (`pytest -m gpu` on a CUDA machine with fla installed; skipped elsewhere): every fast path against its
reference, as the benchmark's correctness gate checks before it times anything, and the numerical fidelity of the
fast bf16 path on *trained* weights.

Why trained weights for fidelity: on random 0.6B weights rounding is amplified ~20x per layer (the teacher's own
bf16 logits move 1.5 % against fp32 there), so a logits bound on random weights is either loose or flaky. A trained
student is what users run: its fast bf16 path must stay within 2x the teacher's own bf16-vs-fp32 KL per token.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def pair():
    from gendistill.testing import random_teacher_and_student

    teacher, student = random_teacher_and_student("tiny", seed=0)
    return teacher.cuda(), student.cuda()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_correctness_gate(pair, dtype):
    """The bench's gate as a test: KDA layers (fla vs recurrent: uncached, segmented, cached + decode, padded),
    fused modules vs transformers', direct launches vs Triton's, cached decode vs forward, CUDA-graph replays."""
    from gendistill.bench.checks import check_correctness

    teacher, student = (m.to(dtype).eval() for m in pair)
    # graphs in fp32 only: the bf16 run with graph checks did not finish within 270 s on a cold H200 (2026-12-04)
    graphs = dtype == torch.float32
    result = check_correctness(teacher, student, graphs=graphs, decode_graphs=graphs)
    failed = [f"{c['name']}: {c['rel_err']:.3g} > {c['rtol']:.3g}" for c in result["checks"] if not c["passed"]]
    assert not failed, "\n".join(failed)
    assert len(result["checks"]) >= 6


def test_the_fast_paths_are_on_here():
    """The GPU machine runs the verified Triton and fla: direct launches and fla's kernels called directly are on, so
    the gate above exercised them (not a silent fallback)."""
    from gendistill.kernels import policy, segments

    assert policy.direct_launch() and policy.fla_kernels()
    x = torch.zeros(1, 1, device="cuda")
    assert isinstance(segments.SegmentedKDA(None, None, None, True, like=x).stages, segments.FlaKernels)


def _demo_models():
    run = os.environ.get("GENDISTILL_TRAINED_RUN")
    if not run:
        pytest.fail("set GENDISTILL_TRAINED_RUN to a `gendistill demo` output directory (bench/gpu.sh does): "
                    "fidelity is measured on trained weights")
    manifest = json.loads((Path(run) / "eval" / "manifest.json").read_text())
    dirs = {info["role"]: info["source"] for info in manifest["models"].values()}
    texts = [json.loads(line)["text"] for line in (Path(run) / "world" / "pretrain.jsonl").open()][:64]
    return dirs["teacher"], dirs["student"], texts


def _kl_per_token(model_dir: str, texts: list[str]) -> tuple[float, float]:
    """Mean per-token KL(fp32 reference || bf16 fast) over real text, and the argmax agreement."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import gendistill.modeling  # noqa: F401  (registers the student)
    from gendistill.kda import use_backend

    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = tok(texts, return_tensors="pt", padding=True).to("cuda")
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        with use_backend("recurrent"):  # the whole reference model (PyTorch KDA, no gendistill kernels), fp32
            ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
            ref = ref_model(**batch).logits.float()
        del ref_model
        fast_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
        fast = fast_model(**batch).logits.float()
    kl = F.kl_div(F.log_softmax(fast, -1), F.log_softmax(ref, -1), log_target=True, reduction="none").sum(-1)
    agree = (fast.argmax(-1) == ref.argmax(-1)).float()
    return kl[mask].mean().item(), agree[mask].mean().item()


def test_fast_bf16_fidelity_on_trained_weights():
    teacher_dir, student_dir, texts = _demo_models()
    teacher_kl, teacher_agree = _kl_per_token(teacher_dir, texts)
    student_kl, student_agree = _kl_per_token(student_dir, texts)
    print(f"per-token KL(fp32 || bf16): teacher {teacher_kl:.3g} (argmax agreement {teacher_agree:.2%}), "
          f"student fast path {student_kl:.3g} ({student_agree:.2%})")
    assert student_kl <= 2 * teacher_kl, (student_kl, teacher_kl)
