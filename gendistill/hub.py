"""Student directories that load without gendistill, and say what they are.

`write_student_files(directory, model)` makes a saved student directory self-contained, following the hub convention
for custom architectures: it copies gendistill's reference model files into it, unchanged (`SHIPPED`: the model,
its configuration, the KDA ops and the other linear mixers: pure PyTorch, fla's kernels on CUDA when fla is
installed; relative imports only), points `auto_map` in config.json at them, and writes a model card (README.md)
from the provenance kept in gendistill.json (teacher, layer set, stages run, tokens, evals). Then

    AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)

works where only torch and transformers are installed (the user opts in to running the shipped code; gendistill
never sets trust_remote_code). With gendistill imported, the same directory loads gendistill's own registered
classes (same weights, same outputs, plus the fast inference kernels) without trust_remote_code.
`convert` calls this for the directory it writes; the distill trainer for each stage's model.
"""
from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

from gendistill.io import atomic_write_json, atomic_write_text

# file in the student directory -> its source in the gendistill package (copied byte for byte)
SHIPPED = {
    "configuration_hybrid_kda.py": "configuration_hybrid_kda.py",
    "modeling_hybrid_kda.py": "modeling_hybrid_kda.py",
    "kda.py": "kda/__init__.py",
    "naive.py": "kda/naive.py",
    "chunk.py": "kda/chunk.py",
    "linear_mixers.py": "linear_mixers.py",
}
AUTO_MAP = {"AutoConfig": "configuration_hybrid_kda.HybridKDAConfig",
            "AutoModelForCausalLM": "modeling_hybrid_kda.HybridKDAForCausalLM"}
PROVENANCE = "gendistill.json"


def shipped_sources() -> dict[str, str]:
    """{file name in the student directory: its text}, read from the installed package."""
    package = resources.files("gendistill")
    return {name: package.joinpath(*source.split("/")).read_text(encoding="utf-8") for name, source in SHIPPED.items()}


def relative_imports(text: str) -> set[str]:
    """Sibling modules a shipped file imports (`from .name import ...`), as transformers' dynamic loader finds them."""
    return set(re.findall(r"^\s*from\s+\.(\w+)\s+import", text, flags=re.MULTILINE))


def write_remote_code(directory: str | Path) -> None:
    """Copy the shipped model files into `directory` and point config.json's auto_map at them."""
    directory = Path(directory)
    for name, text in shipped_sources().items():
        atomic_write_text(directory / name, text)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = dict(AUTO_MAP)
    atomic_write_json(config_path, config)


def read_provenance(directory: str | Path | None) -> dict:
    path = Path(directory) / PROVENANCE if directory else None
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_student_files(directory: str | Path, model, stage: dict | None = None) -> None:
    """Make the saved student in `directory` loadable without gendistill and describe it: shipped model files +
    auto_map, gendistill.json (the provenance: `directory`'s own, else that of the directory `model` was loaded from,
    plus `stage`, a distill stage's summary, when given) and README.md. Models of other architectures (a recipe may
    train a plain Qwen3, e.g. the demo's teacher) load without gendistill already: left as they are."""
    if getattr(model.config, "model_type", None) != "hybrid_kda":
        return
    directory = Path(directory)
    provenance = read_provenance(directory) or read_provenance(getattr(model, "name_or_path", None))
    if stage is not None:
        provenance = {**provenance, "stages": [*provenance.get("stages", []), stage]}
    atomic_write_json(directory / PROVENANCE, provenance)
    write_remote_code(directory)
    atomic_write_text(directory / "README.md", model_card(model.config, provenance))


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _eval_lines(result) -> list[str]:
    """A stage's eval result as Markdown: its top-level numbers as a list, the rest as JSON (shortened)."""
    if isinstance(result, dict):
        numbers = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers and len(numbers) == len(result):
            return [f"- {k}: {_number(v)}" for k, v in numbers.items()]
    text = json.dumps(result, indent=1, default=str)
    lines = text.splitlines()
    if len(lines) > 40:
        lines = lines[:40] + ["..."]
    return ["```json", *lines, "```"]


MIXER_NAMES = {"kda": "Kimi Delta Attention", "gdn": "Gated DeltaNet", "gla": "Gated Linear Attention",
               "mamba2": "Mamba2's SSD"}


def model_card(config, provenance: dict) -> str:
    """README.md of a student directory: base model, layer set, stages run and tokens, evals when there are any."""
    teacher = provenance.get("teacher")
    attention = [i for i, t in enumerate(config.layer_types) if t == "full_attention"]
    n = config.num_hidden_layers
    layer_mixers = getattr(config, "layer_mixers", None) or ["kda"] * n  # written by older gendistill: all KDA
    mixers = sorted({m for i, m in enumerate(layer_mixers) if i not in attention}, key=list(MIXER_NAMES).index)
    mixer_text = " or ".join(MIXER_NAMES[m] for m in mixers) or "Kimi Delta Attention"
    mixer_short = "/".join(m.upper() for m in mixers) or "KDA"
    mixer_tags = {"kda": "kimi-delta-attention", "gdn": "gated-deltanet", "gla": "gated-linear-attention",
                  "mamba2": "mamba2"}
    stages = provenance.get("stages", [])
    header = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    if teacher:
        header.append(f"base_model: {teacher}")
    header += ["tags:", "- gendistill", "- hybrid-kda", *(f"- {mixer_tags[m]}" for m in mixers), "- distillation",
               "---", ""]
    lines = [f"# Hybrid-KDA student{f' of {teacher}' if teacher else ''}", "",
             f"A Hybrid-KDA student{f' of `{teacher}`' if teacher else ''}, made with "
             "gendistill (GenDistill, arXiv 2603.26556): a Qwen3 decoder "
             f"of {n} layers in which {len(attention)} keep softmax attention (layers {attention}) and the other "
             f"{n - len(attention)} use {mixer_text}, a linear-attention mixer with a fixed-size state "
             "(no KV cache growing with the context).", "",
             "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             'path = "PATH/TO/THIS/DIRECTORY"  # or its hub id',
             "tokenizer = AutoTokenizer.from_pretrained(path)",
             "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)", "```", "",
             "`trust_remote_code=True` runs the model code shipped here (modeling_hybrid_kda.py and what it "
             "imports: kda.py, naive.py, chunk.py, linear_mixers.py; read them first). It needs only torch and "
             "transformers; on CUDA it uses flash-linear-attention's kernels when `fla` is installed. With "
             "`import gendistill` first, the directory loads gendistill's own classes instead (no "
             "`trust_remote_code`), with its inference kernels; the outputs are the same.", "",
             "## How it was made", ""]
    if teacher:
        lines.append(f"- converted from `{teacher}` (seed {provenance.get('seed', '?')}): attention layers "
                     f"{attention}, {mixer_short} q/k/v/o initialised from the "
                     "teacher's attention weights")
    else:
        lines.append(f"- attention layers {attention}; the other layers {mixer_short}")
    if stages:
        total = sum(int(s.get("tokens") or 0) for s in stages)
        lines += [f"- {len(stages)} distillation stage(s), {_number(total)} training tokens in all", "",
                  "| stage | steps | tokens | trained | final loss |", "|---|---|---|---|---|"]
        for s in stages:
            final = s.get("final") or {}
            loss = final.get("loss") if isinstance(final, dict) else None
            trained = ", ".join(s.get("trainable") or []) if isinstance(s.get("trainable"), (list, dict)) else ""
            lines.append(f"| {s.get('stage', '?')} | {_number(s.get('steps', '?'))} | {_number(s.get('tokens', '?'))} "
                         f"| {trained} | {_number(loss) if loss is not None else ''} |")
    else:
        lines.append("- not distilled yet: the converted initial student (run `gendistill distill` to train it)")
    evals = [(s.get("stage", "?"), s["eval"]) for s in stages if s.get("eval") is not None]
    if evals:
        lines += ["", "## Evaluation", ""]
        for stage, result in evals:
            lines += [f"After stage `{stage}`:", "", *_eval_lines(result), ""]
    return "\n".join(header + lines).rstrip() + "\n"
