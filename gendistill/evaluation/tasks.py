"""Eval tasks: a YAML spec plus a JSONL file of items (format in docs/DESIGN.md), loaded, checked and rendered.

Rendering is shared by every scoring path, so the log-likelihood context, the generation prompt and the lm-eval
export are the same text: with the chat template, the prompt is one user turn (few-shot examples are earlier
user/assistant turns, as lm-eval's `fewshot_as_multiturn`) and the LL continuation follows the generation prompt
directly; without it, examples are "prompt target" blocks joined by blank lines and the continuation is " target"
(lm-eval's defaults: `target_delimiter=" "`, `fewshot_delimiter="\n\n"`).
"""
from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gendistill.io import UserError, parse_size

LETTERS = string.ascii_uppercase
KINDS = ("multiple_choice", "open")
EXTRACTS = ("letter", "choice_text", "number", "regex", "first_line")
# Spec keys of docs/DESIGN.md plus two optional ones: `stop` (strings that end a generation besides EOS) and
# `ll_target` (what LL ranks: the choice letter, as lm-eval's MMLU, or the choice text, as its ARC/HellaSwag).
SPEC_KEYS = {"name", "kind", "data", "prompt", "chat_template", "num_fewshot", "fewshot_data", "max_new_tokens",
             "extract", "regex", "stop", "ll_target"}


@dataclass
class Task:
    name: str
    kind: str
    prompt: str
    items: list[dict]
    chat_template: bool = True
    num_fewshot: int = 0
    fewshot: list[dict] = field(default_factory=list)
    max_new_tokens: int = 16
    extract: str = "letter"
    regex: str | None = None
    stop: list[str] = field(default_factory=list)
    ll_target: str = "letter"
    source: str = ""  # where the task came from (a YAML path or a built-in generator)
    recall: dict | None = None  # built-in long-context tasks: {"family", "length", "depths"}
    # A task defined elsewhere that renders its own inputs and judges its own outputs (lm-eval tasks:
    # gendistill.evaluation.lmeval_tasks.LmEvalSource): `prompts(items, tokenizer)`, `ll_requests(items, tokenizer)`
    # and optionally `judge(item, text)`; None for gendistill's own YAML tasks.
    adapter: object | None = None
    lm_eval: dict | None = None  # an lm-eval task's origin (task, group, shots, paper label), kept in the manifest

    @property
    def is_mc(self) -> bool:
        return self.kind == "multiple_choice"


def load_task(path: str | Path) -> Task:
    """Load and validate one task YAML (and its JSONL items); every problem is a UserError naming file and item."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"cannot read task spec {path}: {err}") from None
    if not isinstance(spec, dict):
        raise UserError(f"task spec {path} must be a YAML mapping")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise UserError(f"task spec {path}: unknown keys {sorted(unknown)} (allowed: {sorted(SPEC_KEYS)})")
    for key in ("name", "kind", "data", "prompt"):
        if not spec.get(key):
            raise UserError(f"task spec {path}: missing required key {key!r}")
    if str(spec["name"]) in ("average", "average_open"):
        raise UserError(f"task spec {path}: the name {spec['name']!r} is reserved for the report's averages")
    if not re.match(r"^[\w.@-]+$", str(spec["name"])):
        raise UserError(f"task spec {path}: name {spec['name']!r} becomes a file name: use letters, digits and ._@- only")
    kind = spec["kind"]
    if kind not in KINDS:
        raise UserError(f"task spec {path}: kind must be one of {KINDS}, got {kind!r}")
    lists_choices = "{choices}" in spec["prompt"]
    # Defaults follow what the model is shown: lettered options -> a letter; bare options -> the option's text.
    extract = spec.get("extract") or ("first_line" if kind == "open" else "letter" if lists_choices else "choice_text")
    if extract not in EXTRACTS:
        raise UserError(f"task spec {path}: extract must be one of {EXTRACTS}, got {extract!r}")
    if extract == "regex":
        try:
            if re.compile(spec.get("regex") or "").groups < 1:
                raise UserError(f"task spec {path}: extract: regex needs `regex` with a capture group (group 1 = answer)")
        except re.error as err:
            raise UserError(f"task spec {path}: bad regex {spec.get('regex')!r}: {err}") from None
    ll_target = spec.get("ll_target") or ("letter" if lists_choices else "text")
    if ll_target not in ("letter", "text"):
        raise UserError(f"task spec {path}: ll_target must be 'letter' or 'text', got {ll_target!r}")
    stop = spec.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    task = Task(
        name=str(spec["name"]), kind=kind, prompt=spec["prompt"], items=_read_jsonl(path.parent / spec["data"], path),
        chat_template=bool(spec.get("chat_template", True)), num_fewshot=int(spec.get("num_fewshot") or 0),
        max_new_tokens=int(spec.get("max_new_tokens") or 16), extract=extract, regex=spec.get("regex"),
        stop=[str(s) for s in stop], ll_target=ll_target, source=str(path),
    )
    if spec.get("fewshot_data"):
        task.fewshot = _read_jsonl(path.parent / spec["fewshot_data"], path)
    if task.num_fewshot > len(task.fewshot):
        raise UserError(f"task spec {path}: num_fewshot={task.num_fewshot} but fewshot_data has "
                        f"{len(task.fewshot)} examples")
    validate(task)
    return task


def _read_jsonl(path: Path, spec_path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"task spec {spec_path}: data file {path} not found")
    items = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{lineno}: not valid JSON: {err}") from None
        if not isinstance(item, dict):
            raise UserError(f"{path}:{lineno}: each line must be a JSON object")
        items.append(item)
    if not items:
        raise UserError(f"{path}: no items")
    return items


def validate(task: Task) -> None:
    """Check every item (and few-shot example) against the task kind and render its prompt once."""
    seen = set()
    for where, items in (("item", task.items), ("few-shot example", task.fewshot)):
        for item in items:
            item_id = item.get("id")
            label = f"task {task.name}: {where} {item_id!r}"
            if not isinstance(item_id, str) or not item_id:
                raise UserError(f"task {task.name}: every {where} needs a non-empty string 'id' (got {item_id!r})")
            if where == "item":
                if item_id in seen:
                    raise UserError(f"{label}: duplicate id")
                seen.add(item_id)
            if "answer" not in item:
                raise UserError(f"{label}: missing 'answer'")
            if task.is_mc:
                choices = item.get("choices")
                if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                    raise UserError(f"{label}: multiple_choice items need 'choices', a list of at least 2 strings")
                if len(choices) > len(LETTERS):
                    raise UserError(f"{label}: at most {len(LETTERS)} choices")
                answer = item["answer"]
                if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
                    raise UserError(f"{label}: 'answer' must be an index into choices (0..{len(choices) - 1}), "
                                    f"got {answer!r}")
            elif not isinstance(item["answer"], (str, int, float)) or isinstance(item["answer"], bool):
                raise UserError(f"{label}: open items need a string (or number) 'answer'")
            user_text(task, item)


def format_choices(choices: list[str]) -> str:
    return "".join(f"{LETTERS[i]}. {choice}\n" for i, choice in enumerate(choices))


class _PromptFormatter(string.Formatter):
    """str.format limited to plain `{field}` placeholders: a task file is data, so `{question.__class__}`,
    `{choices[0]}`, conversions (`!r`) and format specs (a huge width) are errors, not evaluated."""

    def get_field(self, field_name, args, kwargs):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", field_name):
            raise ValueError(f"placeholder {{{field_name}}} is not a plain field name (attributes and indexes are "
                             "not allowed)")
        return kwargs[field_name], field_name

    def convert_field(self, value, conversion):
        if conversion:
            raise ValueError(f"conversion !{conversion} is not allowed in a prompt placeholder")
        return value

    def format_field(self, value, format_spec):
        if format_spec:
            raise ValueError(f"format spec {format_spec!r} is not allowed in a prompt placeholder")
        return format(value, "")


_PROMPT = _PromptFormatter()


def user_text(task: Task, item: dict) -> str:
    """The task prompt filled with the item's fields ({choices} is the lettered list)."""
    fields = dict(item)
    fields["choices"] = format_choices(item.get("choices") or [])
    try:
        return _PROMPT.vformat(task.prompt, (), fields)
    except (KeyError, IndexError, AttributeError) as err:
        raise UserError(f"task {task.name}: prompt placeholder {err} is not a field of item {item.get('id')!r}") from None
    except ValueError as err:
        raise UserError(f"task {task.name}: bad prompt template: {err} (write literal braces as {{{{ and }}}})") from None


def choice_targets(task: Task, item: dict) -> list[str]:
    """What LL ranks for each choice (without the delimiter), as lm-eval's `doc_to_choice`."""
    if task.ll_target == "letter":
        return [LETTERS[i] for i in range(len(item["choices"]))]
    return list(item["choices"])


def target_text(task: Task, item: dict) -> str:
    """The reference answer as text: used for few-shot examples and as lm-eval's generation target."""
    if task.is_mc:
        return choice_targets(task, item)[item["answer"]]
    return str(item["answer"])


def uses_chat(task: Task, tokenizer) -> bool:
    return task.chat_template and getattr(tokenizer, "chat_template", None) is not None


def build_context(task: Task, item: dict, tokenizer) -> str:
    """The full model input before the answer: few-shot examples plus the item, chat-wrapped when the task asks."""
    shots = task.fewshot[: task.num_fewshot]
    if uses_chat(task, tokenizer):
        messages = []
        for shot in shots:
            messages += [{"role": "user", "content": user_text(task, shot)},
                         {"role": "assistant", "content": target_text(task, shot)}]
        messages.append({"role": "user", "content": user_text(task, item)})
        # enable_thinking=False: Qwen3's non-thinking mode, as the paper evaluates; other templates ignore it.
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
    examples = "".join(f"{user_text(task, shot)} {target_text(task, shot)}\n\n" for shot in shots)
    return examples + user_text(task, item)


def target_delimiter(task: Task, tokenizer) -> str:
    """lm-eval puts nothing between a chat generation prompt and the answer, a space otherwise."""
    return "" if uses_chat(task, tokenizer) else " "


RECALL_FAMILIES = ("niah_single", "niah_multikey", "assoc_recall")  # built by gendistill.evaluation.recall
_LENGTH = re.compile(r"^(\d+)([kK]?)$")


def parse_length(text: str) -> int:
    """'4k' -> 4096, '1000' -> 1000 (tokens): `gendistill.io.parse_size`, whose k is 1024."""
    return parse_size(text, f"bad context length {text!r}")


LM_EVAL_PREFIX = "lm-eval:"
NAMED_SETS = ("paper",)  # suites of lm-eval tasks (gendistill.evaluation.lmeval_tasks.PAPER_SUITE)


def is_lm_eval_ref(ref) -> bool:
    """`lm-eval:NAME` (a task, group or tag of lm-eval's registry, or an lm-eval YAML path) or a named set."""
    return isinstance(ref, str) and (ref.startswith(LM_EVAL_PREFIX) or ref in NAMED_SETS)


def parse_task_list(spec: str | list[str]) -> list[str | tuple[str, list[int]]]:
    """'a.yaml,dir/,niah_single@1k,4k,assoc_recall@2k' -> ['a.yaml', 'dir/', ('niah_single', [1024, 4096]), ...].
    Bare lengths after a recall task belong to it; YAML files and directories (all *.yaml inside) are task specs;
    `lm-eval:NAME` and `paper` stay strings (see `is_lm_eval_ref`)."""
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else
                                 [q for s in spec for q in s.split(",")]) if p.strip()]
    out: list = []
    for part in parts:
        if is_lm_eval_ref(part):
            if part == LM_EVAL_PREFIX:
                raise UserError("lm-eval: needs a task name, e.g. lm-eval:arc_challenge")
            out.append(part)
        elif "@" in part:
            family, length = part.split("@", 1)
            if family not in RECALL_FAMILIES:
                raise UserError(f"unknown recall task {family!r}; built-in: {', '.join(RECALL_FAMILIES)}")
            out.append((family, [parse_length(length)]))
        elif _LENGTH.match(part) and out and isinstance(out[-1], tuple):
            out[-1][1].append(parse_length(part))
        elif part in RECALL_FAMILIES:
            raise UserError(f"recall task {part!r} needs context lengths, e.g. {part}@1k,4k")
        else:
            out.append(part)
    return out


def load_task_files(ref: str | Path) -> list[Task]:
    """A YAML file, or a directory of them (sorted), as tasks."""
    path = Path(ref)
    if path.is_dir():
        files = sorted(list(path.glob("*.yaml")) + list(path.glob("*.yml")))
        if not files:
            raise UserError(f"no task YAML files in {path}")
        return [load_task(f) for f in files]
    if path.is_file():
        return [load_task(path)]
    raise UserError(f"task {ref!r} is neither a task YAML, a directory of them, nor a recall task like niah_single@4k")
