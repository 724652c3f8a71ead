"""Served teacher vs served student: time to first token and decode speed through `gendistill serve`'s HTTP API.

    python bench/serve_bench.py --shape qwen3-0.6b --out bench/results/h200/serve/serve_bench.json   # GPU
    python bench/serve_bench.py --teacher DIR --student DIR --out serve_bench.json                   # your models
    python bench/serve_bench.py --tiny --out /tmp/serve_bench_tiny.json                              # CPU smoke run

Each model runs in its own `gendistill serve` process on 127.0.0.1 (both up at once, one request at a time, the two
models' requests alternating so slow phases of the host meet both). Each request is a streamed chat completion of a
prompt of about `--contexts` tokens (the server reports the exact count), greedy, exactly `--max-tokens` new tokens
(`min_new_tokens` keeps end-of-turn away). Measured at the client, as a user sees it:
- TTFT: request sent -> first streamed chunk with content (the prefill, the first token and its way through
  detokenization and SSE; the role-only chunk the server sends before generating is not counted);
- decode tokens/s: (new tokens - 1) / (last content chunk - first content chunk).
Median over `--repeats` requests after `--warmup` untimed ones per model and context (Triton compiles and autotunes on
first calls), with min-max. --shape builds random weights in that shape (and the student by `convert`) with the tiny
local tokenizer; their output rows outside its printable tokens are zeroed (gendistill.testing.printable_outputs_only)
so every generated token streams as text.
"""
from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import environment, print_table, write_result  # noqa: E402
from gendistill.io import parse_size  # noqa: E402
from gendistill.testing import random_teacher_and_student  # noqa: E402
from gendistill.io import UserError  # noqa: E402

WORDS = ("Alice Moreau was born on 3 May 1971 in Lyon . She studied physics at the University of Geneva . Bruno Keller "
         "works for Helix Labs in Zurich ; he was born in Basel and studied chemistry . The key is 7351 and the "
         "answer is ( B ) .").split()


def build_models(shape: str, seed: int, dtype: torch.dtype, out: Path) -> dict[str, str]:
    from gendistill.convert import convert
    from gendistill.testing import printable_outputs_only, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    teacher, _ = random_teacher_and_student(shape, seed)
    printable_outputs_only(teacher, tokenizer)
    student = convert(teacher, seed=seed)
    dirs = {}
    for name, model in (("teacher", teacher), ("student", student)):
        dirs[name] = str(out / name)
        model.to(dtype).save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    return dirs


def prompt_of(tokenizer, tokens: int, seed: int) -> str:
    """Random words cut to `tokens` tokens (the chat template adds a few)."""
    rng = random.Random(seed)
    text, ids = "", []
    while len(ids) < tokens:
        text += " " + " ".join(rng.choices(WORDS, k=max(64, tokens // 2)))
        ids = tokenizer(text)["input_ids"]
    return tokenizer.decode(ids[:tokens])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`gendistill serve MODEL_DIR` in a subprocess on 127.0.0.1, its log in a file."""

    def __init__(self, model_dir: str, device: str, dtype: str, log: Path, startup_s: float):
        self.port, self.log = free_port(), log
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        with open(log, "w") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gendistill", "serve", model_dir, "--host", "127.0.0.1", "--port",
                 str(self.port), "--device", device, "--dtype", dtype, "--attn-implementation", "sdpa",
                 "--log-level", "warning"], stdout=f, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + startup_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server for {model_dir} exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"server for {model_dir} not up after {startup_s} s:\n{log.read_text()}")
                time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def timed_request(client, model_id: str, prompt: str, max_tokens: int) -> dict:
    """One streamed chat completion: TTFT, decode tokens/s and the server's token counts."""
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, extra_body={"generation_config": f'{{"min_new_tokens": {max_tokens}}}'})
    first = last = None
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
        usage = chunk.usage or usage
    if first is None or usage is None:
        raise RuntimeError(f"{model_id}: the stream had no content or no usage")
    new = usage.completion_tokens
    return {"prompt_tokens": usage.prompt_tokens, "new_tokens": new, "ttft_ms": (first - start) * 1e3,
            "decode_tok_s": (new - 1) / (last - first) if new > 1 and last > first else None}


def summary(samples: list[float | None]) -> dict:
    values = [v for v in samples if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def run(dirs: dict[str, str], contexts: list[int], max_tokens: int, repeats: int, warmup: int, device: str,
        dtype: str, logs: Path, startup_s: float, seed: int) -> dict:
    import openai
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(dirs["student"])
    servers = {}
    try:
        for name, path in dirs.items():
            servers[name] = Server(path, device, dtype, logs / f"server_{name}.log", startup_s)
        clients = {name: openai.OpenAI(base_url=s.url + "/v1", api_key="unused", timeout=1800, max_retries=0)
                   for name, s in servers.items()}
        rows = []
        for context in contexts:
            prompt = prompt_of(tokenizer, context, seed)
            samples = {name: [] for name in dirs}
            for i in range(warmup + repeats):
                for name in (dirs if i % 2 == 0 else reversed(list(dirs))):  # alternate who goes first
                    sample = timed_request(clients[name], dirs[name], prompt, max_tokens)
                    if i >= warmup:
                        samples[name].append(sample)
            for name, got in samples.items():
                ttft, tok_s = summary([s["ttft_ms"] for s in got]), summary([s["decode_tok_s"] for s in got])
                rows.append({"model": name, "context": context, "prompt_tokens": got[0]["prompt_tokens"],
                             "new_tokens": got[0]["new_tokens"], "ttft_ms": ttft["median"],
                             "ttft_ms_min": ttft["min"], "ttft_ms_max": ttft["max"], "decode_tok_s": tok_s["median"],
                             "decode_tok_s_min": tok_s["min"], "decode_tok_s_max": tok_s["max"], "requests": len(got)})
                print(f"{name} @ {context}: TTFT {ttft['median']:.1f} ms, decode {tok_s['median'] or 0:.1f} tok/s",
                      flush=True)
    finally:
        for server in servers.values():
            server.stop()
    ratios = []
    for context in contexts:
        t, s = ({r["model"]: r for r in rows if r["context"] == context}[m] for m in ("teacher", "student"))
        ratios.append({"context": context, "ttft_teacher_over_student": t["ttft_ms"] / s["ttft_ms"],
                       "decode_student_over_teacher": (s["decode_tok_s"] / t["decode_tok_s"]
                                                       if s["decode_tok_s"] and t["decode_tok_s"] else None)})
    return {"rows": rows, "ratios": ratios}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--shape", choices=["qwen3-0.6b", "tiny"], help="random weights in this shape (default "
                        "qwen3-0.6b unless --teacher/--student or --tiny)")
    source.add_argument("--tiny", action="store_true", help="tiny shape, short prompts: a CPU smoke run")
    source.add_argument("--teacher", help="teacher directory (with its tokenizer), with --student")
    p.add_argument("--student", help="student directory (with its tokenizer), with --teacher")
    p.add_argument("--contexts", help="prompt lengths in tokens (default 4k,32k; --tiny: 256,1k)")
    p.add_argument("--max-tokens", type=int, help="new tokens per request (default 128; --tiny: 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed requests per model and context")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests per model and context first")
    p.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--startup-s", type=float, default=600, help="how long a server may take to come up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="result JSON (server logs go beside it)")
    args = p.parse_args()
    try:
        if (args.teacher is None) != (args.student is None):
            raise UserError("--teacher and --student go together")
        shape = "tiny" if args.tiny else args.shape or (None if args.teacher else "qwen3-0.6b")
        contexts = [parse_size(c, "--contexts") for c in (args.contexts or ("256,1k" if shape == "tiny" else "4k,32k")).split(",")]
        max_tokens = args.max_tokens or (16 if shape == "tiny" else 128)
        if max_tokens < 2 or args.repeats < 1 or args.warmup < 0:
            raise UserError("--max-tokens must be >= 2, --repeats >= 1, --warmup >= 0")
    except UserError as err:
        print(f"serve_bench: error: {err}", file=sys.stderr)
        return 2
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if device.startswith("cuda") else "float32"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="serve_bench.") as tmp:
        if shape:
            print(f"building the {shape} teacher and its student", flush=True)
            dirs = build_models(shape, args.seed, getattr(torch, dtype), Path(tmp))
        else:
            dirs = {"teacher": args.teacher, "student": args.student}
        from transformers import AutoConfig

        import gendistill  # noqa: F401  (registers the student's config class)

        models = {name: {"dir": path if not shape else f"{shape} ({name}, random weights)",
                         "layer_types": sorted(set(AutoConfig.from_pretrained(path).layer_types or []))}
                  for name, path in dirs.items()}
        measured = run(dirs, contexts, max_tokens, args.repeats, args.warmup, device, dtype, out.parent,
                       args.startup_s, args.seed)
    result = {"environment": environment(), "arguments": vars(args), "shape": shape, "device": device,
              "dtype": dtype, "models": models, "max_tokens": max_tokens, "engine": (
                  "gendistill serve (transformers serve's app; sequential model.generate, no continuous batching), "
                  "streamed chat completions, greedy"), **measured}
    print_table(measured["rows"], ["model", "context", "prompt_tokens", "new_tokens", "ttft_ms", "ttft_ms_min",
                                   "ttft_ms_max", "decode_tok_s", "decode_tok_s_min", "decode_tok_s_max"])
    print_table(measured["ratios"], ["context", "ttft_teacher_over_student", "decode_student_over_teacher"])
    write_result(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
