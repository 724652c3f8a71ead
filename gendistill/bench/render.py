"""Rendering of a bench result: the markdown table (prefill, decode, targets) and three plots."""
from __future__ import annotations

from pathlib import Path

GiB, MiB = 2**30, 2**20


def fmt_context(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB" if n >= MiB else f"{n / 1024:.1f} KiB"


def fmt_value(key: str, value) -> str:
    if value is None:
        return "-"
    if "bytes" in key:
        return fmt_bytes(value)
    return f"{value:.4g} ms" if key.endswith("ms") else f"{value:.4g}"


def _ratio(record: dict, top: str, bottom: str) -> str:
    a, b = record.get(top), record.get(bottom)
    return f"{a / b:.2f}x" if a and b else "-"


def format_table(result: dict) -> str:
    s = result["settings"]
    lines = [f"## Prefill (batch 1, {s['dtype']}, {s['attention']}, KDA {s['kda_backend']['prefill']}; median of "
             f"{s['repeats']} or more (calls under {s.get('prefill_min_timed_seconds', 0):g} s: repeated until that "
             f"long is timed, at most {s.get('prefill_max_repeats', s['repeats'])}); TTFT = prefill to the first "
             "token's logits)", "",
             "| context | model | TTFT no cache | TTFT with cache | TTFT CUDA graph | teacher/student | peak no cache "
             "| peak with cache | KV+state measured | KV+state analytic |", "|" + "---|" * 10]
    for row in result["prefill"]:
        for name in ("teacher", "student"):
            r = row[name]
            speedup = "-"
            if name == "student" and r.get("ttft_no_cache_ms") and row["teacher"].get("ttft_no_cache_ms"):
                speedup = f"{row['teacher']['ttft_no_cache_ms'] / r['ttft_no_cache_ms']:.2f}x"
                if r.get("ttft_cache_ms") and row["teacher"].get("ttft_cache_ms"):
                    speedup += f" ({row['teacher']['ttft_cache_ms'] / r['ttft_cache_ms']:.2f}x cached)"
                if r.get("ttft_graph_ms") and row["teacher"].get("ttft_graph_ms"):
                    speedup += f" ({row['teacher']['ttft_graph_ms'] / r['ttft_graph_ms']:.2f}x graph)"
            graph = r.get("error_graph") or fmt_value("ms", r.get("ttft_graph_ms"))
            lines.append(f"| {fmt_context(row['context'])} | {name} | {fmt_value('ms', r.get('ttft_no_cache_ms'))} "
                         f"| {fmt_value('ms', r.get('ttft_cache_ms'))} | {graph} | {speedup} "
                         f"| {fmt_bytes(r.get('peak_no_cache_bytes'))} | {fmt_bytes(r.get('peak_cache_bytes'))} "
                         f"| {fmt_bytes(r.get('cache_bytes_measured'))} | {fmt_bytes(r['cache_bytes_analytic'])} |")
    lines += ["", f"## Decode at {fmt_context(s['decode_context'])} context (greedy, {s['decode_steps_per_repeat']} "
              "steps per repeat, synthetic cache)", "",
              "| model | ms/token at batch 1 | largest batch | ms/step there | tokens/s there | points (batch: tokens/s) |",
              "|" + "---|" * 6]
    for name, d in result["decode"].items():
        if "error" in d:
            lines.append(f"| {name} | {d['error']} | | | | |")
            continue
        largest = next(p for p in d["points"] if p["batch"] == d["largest_batch"])
        points = ", ".join(f"{p['batch']}: {p['tokens_per_s']:.4g}" for p in d["points"])
        lines.append(f"| {name} | {fmt_value('ms', d['ms_per_token_batch_1'])} | {d['largest_batch']} "
                     f"| {largest['ms_per_step']:.4g} | {largest['tokens_per_s']:.4g} | {points} |")
    generated = [row for row in result["prefill"] if any("ttft_generate_ms" in row[n] or "error_generate" in row[n]
                                                         for n in ("teacher", "student"))]
    if generated:
        lines += ["", "## `model.generate(ids, max_new_tokens=1)` against the forward (batch 1)", "",
                  "| context | model | TTFT forward | TTFT generate() | ratio | peak forward | peak generate() "
                  "| ratio |",
                  "|" + "---|" * 8]
        for row in generated:
            for name in ("teacher", "student"):
                r = row[name]
                lines.append(f"| {fmt_context(row['context'])} | {name} | {fmt_value('ms', r.get('ttft_no_cache_ms'))} "
                             f"| {r.get('error_generate') or fmt_value('ms', r.get('ttft_generate_ms'))} "
                             f"| {_ratio(r, 'ttft_generate_ms', 'ttft_no_cache_ms')} "
                             f"| {fmt_bytes(r.get('peak_no_cache_bytes'))} | {fmt_bytes(r.get('peak_generate_bytes'))} "
                             f"| {_ratio(r, 'peak_generate_bytes', 'peak_no_cache_bytes')} |")
    lines += ["", "## Targets", "", "| target | bound | measured | pass | margin | detail |", "|" + "---|" * 6]
    for t in result["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["passed"]]
        margin = "-" if t["margin"] is None else f"{t['margin']:+.1%}"
        measured = "-" if t["measured"] is None else f"{t['measured']:.3g}"
        lines.append(f"| {t['name']} | {t['target']} | {measured} | {verdict} | {margin} | {t['detail']} |")
    return "\n".join(lines) + "\n"


def write_plots(result: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter, NullFormatter

    colors = {"teacher": "tab:blue", "student": "tab:orange"}
    contexts = [row["context"] for row in result["prefill"]]
    largest = max([r[n].get(k) or 0 for r in result["prefill"] for n in colors
                   for k in ("cache_bytes_analytic", "peak_cache_bytes", "peak_no_cache_bytes")] + [1])
    unit, unit_name = next((u, n) for u, n in ((GiB, "GiB"), (MiB, "MiB"), (1024, "KiB"), (1, "bytes")) if largest >= u)

    def series(name, key, scale=1.0):
        pairs = [(row["context"], row[name].get(key)) for row in result["prefill"] if row[name].get(key) is not None]
        return [c for c, _ in pairs], [v / scale for _, v in pairs]

    def plot(ax, xy, *style, **kw):
        if xy[0]:  # nothing measured (e.g. device memory on CPU): no line, no legend entry
            ax.plot(*xy, *style, **kw)

    def finish(ax, title, ylabel, ylog, xlabel="context (tokens)", xticks=None):
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xscale="log", yscale="log" if ylog else "linear")
        # LogFormatter: plain numbers, minor ticks labelled when the range is narrow, no mathtext (slow to typeset)
        for axis in (ax.xaxis, ax.yaxis) if ylog else (ax.xaxis,):
            axis.set_major_formatter(LogFormatter())
            axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ticks = contexts if xticks is None else xticks
        ax.set_xticks(ticks, [fmt_context(t) if xticks is None else str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)

    def save(fig, name):
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        return name

    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for name, color in colors.items():
        plot(ax, series(name, "ttft_no_cache_ms"), "o-", color=color, label=f"{name}, no cache")
        plot(ax, series(name, "ttft_cache_ms"), "s--", color=color, alpha=0.6, label=f"{name}, with cache")
    finish(ax, "Time to first token (batch 1)", "TTFT (ms)", ylog=True)
    files = [save(fig, "ttft_vs_context.png")]

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for name, color in colors.items():
        plot(left, series(name, "cache_bytes_measured", unit), "o-", color=color, label=f"{name}, measured")
        plot(left, series(name, "cache_bytes_analytic", unit), "k:", alpha=0.5)
        plot(right, series(name, "peak_no_cache_bytes", unit), "o-", color=color, label=f"{name}, no cache")
        plot(right, series(name, "peak_cache_bytes", unit), "s--", color=color, alpha=0.6, label=f"{name}, with cache")
    finish(left, "KV cache + KDA state after prefill (dotted: analytic)", unit_name, ylog=False)
    finish(right, "Peak device memory during prefill" + ("" if right.lines else " (CUDA only)"), unit_name,
           ylog=False)
    files.append(save(fig, "memory_vs_context.png"))

    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    batches = set()
    for name, color in colors.items():
        d = result["decode"][name]
        if "points" in d:
            batches.update(p["batch"] for p in d["points"])
            ax.plot([p["batch"] for p in d["points"]], [p["tokens_per_s"] for p in d["points"]], "o-", color=color,
                    label=f"{name} (largest batch {d['largest_batch']})")
    finish(ax, f"Decode throughput at {fmt_context(result['settings']['decode_context'])} context", "tokens / s",
           ylog=True, xlabel="batch", xticks=sorted(b for b in batches if b & (b - 1) == 0))  # powers of two
    files.append(save(fig, "decode_throughput_vs_batch.png"))
    return files
