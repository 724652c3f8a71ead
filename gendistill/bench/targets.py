"""Targets as data: what the student must achieve against its teacher, and the one function that scores a run.

Each entry of TARGETS has a name, where it is taken (`context`, in tokens; decode uses the run's `--decode-context`),
what is measured (`ratio` of two prefill figures, "model.key" over "model.key", or a named `measure`) and its bound
(`at_least` or `at_most`). `optional` rows appear only when their measure was taken (CUDA graphs are timed only with
`--cuda-graphs`); the others say "not measured" when a context was not run. The bounds are the project's inference
claims (README, "Results"): the student prefills a 128K prompt 3.1x as fast as its teacher and is no slower at 4K,
peaks no higher, holds at most 26 % of the teacher's cache at 128K, decodes 3x the teacher's tokens/s at the largest
batch each fits, and answers through `generate()` within 1.1x the time and 1.2x the peak memory of its own forward.
"""
from __future__ import annotations

from gendistill.bench.render import fmt_context, fmt_value

K = 1024
_GENERATE_CONTEXTS = (4 * K, 32 * K, 128 * K)
TARGETS: tuple[dict, ...] = (
    {"name": "TTFT teacher/student at {context} (no cache)", "context": 128 * K, "at_least": 3.1,
     "ratio": ("teacher.ttft_no_cache_ms", "student.ttft_no_cache_ms")},
    {"name": "TTFT teacher/student at {context} (student as a CUDA graph, teacher at its best)", "context": 128 * K,
     "at_least": 3.1, "measure": "graph_speedup", "optional": True},
    {"name": "TTFT teacher/student at {context} (no cache)", "context": 4 * K, "at_least": 1.0,
     "ratio": ("teacher.ttft_no_cache_ms", "student.ttft_no_cache_ms")},
    {"name": "TTFT teacher/student at {context} (student as a CUDA graph, teacher at its best)", "context": 4 * K,
     "at_least": 1.0, "measure": "graph_speedup", "optional": True},
    {"name": "prefill peak memory student/teacher at {context} (no cache)", "context": 128 * K, "at_most": 1.0,
     "ratio": ("student.peak_no_cache_bytes", "teacher.peak_no_cache_bytes")},
    {"name": "KV + state bytes student/teacher at {context} (measured)", "context": 128 * K, "at_most": 0.26,
     "ratio": ("student.cache_bytes_measured", "teacher.cache_bytes_measured")},
    {"name": "decode throughput student/teacher at {decode_context}, largest batch each ({decode_cache})",
     "at_least": 3.0, "measure": "decode_speedup"},
    *({"name": "student generate()/forward TTFT at {context}", "context": c, "at_most": 1.1,
       "ratio": ("student.ttft_generate_ms", "student.ttft_no_cache_ms")} for c in _GENERATE_CONTEXTS),
    *({"name": "student generate()/forward peak memory at {context}", "context": c, "at_most": 1.2,
       "ratio": ("student.peak_generate_bytes", "student.peak_no_cache_bytes")} for c in _GENERATE_CONTEXTS),
)


# ---- how a target's value is computed --------------------------------------------------------------------------------

LABELS = {"ttft_generate_ms": "generate()", "ttft_no_cache_ms": "forward", "peak_generate_bytes": "generate()",
          "peak_no_cache_bytes": "forward"}


def _ratio(row: dict | None, top: str, bottom: str):
    """'model.key' `top` over 'model.key' `bottom` in one prefill row, and the figures it came from."""
    (m1, k1), (m2, k2) = top.split("."), bottom.split(".")
    a, b = (None, None) if row is None else (row[m1].get(k1), row[m2].get(k2))
    if a is None or b is None:
        return None, ""
    first, second = (LABELS.get(k1, k1), LABELS.get(k2, k2)) if m1 == m2 else (m1, m2)
    return a / b, f"{first} {fmt_value(k1, a)} / {second} {fmt_value(k2, b)}"


def _graph_speedup(row: dict | None):
    """The student replayed as a graph against the teacher's faster way (eager or graph): SDPA inside a graph can be
    slower than eagerly, and a teacher slowed down would flatter the ratio."""
    if row is None or not row["student"].get("ttft_graph_ms"):
        return None, ""
    student_ms = row["student"]["ttft_graph_ms"]
    teacher_ms, how = min((row["teacher"].get(k) or float("inf"), k) for k in ("ttft_no_cache_ms", "ttft_graph_ms"))
    return teacher_ms / student_ms, (f"teacher {fmt_value('ms', teacher_ms)} "
                                     f"({'graph' if how == 'ttft_graph_ms' else 'eager'}) / student "
                                     f"{fmt_value('ms', student_ms)} (graph)")


def _decode_speedup(decode: dict):
    teacher = decode["teacher"].get("tokens_per_s_at_largest")
    student = decode["student"].get("tokens_per_s_at_largest")
    if not (teacher and student):
        return None, ""
    return student / teacher, (f"student {student:.4g} tok/s at batch {decode['student']['largest_batch']} / teacher "
                               f"{teacher:.4g} tok/s at batch {decode['teacher']['largest_batch']}")


def score(name: str, measured: float | None, target: dict, detail: str) -> dict:
    op, bound = (">=", target["at_least"]) if "at_least" in target else ("<=", target["at_most"])
    if measured is None:
        return {"name": name, "target": f"{op} {bound:g}", "measured": None, "passed": None, "margin": None,
                "detail": "not measured (context not run, out of memory, or on CPU where there is no device memory)"}
    passed = measured >= bound if op == ">=" else measured <= bound
    # margin > 0: better than the target by that fraction; < 0: missed by that fraction
    margin = measured / bound - 1 if op == ">=" else 1 - measured / bound
    return {"name": name, "target": f"{op} {bound:g}", "measured": measured, "passed": bool(passed),
            "margin": margin, "detail": detail}


def compare_with_targets(prefill: list[dict], decode: dict, targets=TARGETS) -> list[dict]:
    """One row per target: measured value, pass/fail (None: not measured), margin, and what it was computed from."""
    rows = {r["context"]: r for r in prefill}
    scored = []
    for target in targets:
        row = rows.get(target.get("context"))
        if "ratio" in target:
            value, detail = _ratio(row, *target["ratio"])
        elif target["measure"] == "graph_speedup":
            value, detail = _graph_speedup(row)
        else:
            value, detail = _decode_speedup(decode)
        if value is None and target.get("optional"):
            continue
        name = target["name"].format(context=fmt_context(target.get("context") or 0),
                                     decode_context=fmt_context(decode["teacher"]["context"]),
                                     decode_cache=decode["teacher"].get("cache") or "-")
        scored.append(score(name, value, target, detail))
    return scored
