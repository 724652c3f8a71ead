"""Recipes: a teacher, a student, data sources and an ordered list of declarative stages, loaded from YAML.
A recipe without a teacher trains its `model:` by plain training (e.g. the world's teacher, from scratch).

Everything is checked here, before any work starts: an unknown key, a wrong type or an impossible value raises
`UserError` naming the key (`stages[2] (kd).lr: ...`). A new stage is a new entry, never a new script; a new loss
term is one entry in `OBJECTIVE_TERMS` plus its computation in `losses.py`.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import yaml

from gendistill.io import UserError, parse_size

OBJECTIVE_TERMS = ("attn_align", "qk_align", "hidden_align", "kd", "ce")  # qk_align: see losses.py (stage 1's Q/K form)
TEACHER_TERMS = ("attn_align", "qk_align", "hidden_align", "kd")  # terms that read the teacher
DIVERGENCES = ("fkl", "rkl", "jsd")
LOSS_MASKS = ("all", "completion_only")
# gendistill.modeling.PARAMETER_GROUPS (each parameter is in one) + ATTENTION_BLOCK (attention + its input_layernorm)
PARAMETER_GROUPS = ("kda", "attention", "mlp", "norms", "embeddings", "attention_block")
BUDGET_COUNTS = ("packed", "scored")
PACKINGS = ("concat", "whole")
SCHEDULES = ("constant", "cosine", "wsd")
PRECISIONS = ("auto", "bf16", "fp32")
PARALLEL = ("auto", "fsdp", "ddp")
KD_KERNELS = ("chunked", "liger_kl", "liger_jsd")
# stage keys that change how fast a step runs, never its math (up to floating-point rounding), so a resumed stage
# may change them (micro_batch_size, gradient_checkpointing and chunk_tokens are such keys too, but older run records
# count them as math and keep doing so)
THROUGHPUT_KEYS = ("compile", "kd_kernel", "teacher_batch_size", "teacher_inference_mode")
EVAL_HOOKS = {"evaluate": "gendistill.evaluation:evaluate"}  # short names for `eval:`; any "module:function" works
# A recipe is data: a "module:function" entry (`factory`, `eval`) runs code, so it is refused unless the user passes
# --allow-code (allow_code=True). These are gendistill's own builders, which take data only, and are always allowed.
BUILTIN_CALLABLES = frozenset({*EVAL_HOOKS, *EVAL_HOOKS.values(), "gendistill.testing:tiny_qwen3",
                               "gendistill.testing:tiny_tokenizer"})


@dataclasses.dataclass
class Stage:
    """One declarative training stage. The fields, their defaults and comments are the stage schema."""

    name: str
    objective: dict[str, float]  # term -> weight, e.g. {"kd": 1.0} or {"kd": 1.0, "ce": 0.1}
    data: str  # name of an entry in Recipe.data
    tokens: int | None = None  # token budget (sequences x seq_len): 400000, "30M", "1.5B" (io.parse_size); or `steps`
    count: str = "packed"  # what `tokens` counts: packed (every token, prompts too) | scored (loss-masked tokens)
    steps: int | None = None
    divergence: str = "fkl"  # fkl = KL(teacher||student), rkl = KL(student||teacher), jsd = generalised JSD(beta)
    jsd_beta: float = 0.5  # mixture weight of the teacher in jsd (0 < beta < 1)
    temperature: float = 1.0  # softens both distributions in kd (no T^2 rescaling, as TRL)
    loss_mask: str = "all"  # all | completion_only (assistant tokens of chat data)
    # concat: documents run on across windows (no padding; a document cut at a window's end goes on in the next
    # window without its beginning). whole: no document shorter than a window is cut; the rest of a window is padding
    # (not scored; `tokens` still counts it). In-context copying and retrieval need whole: docs/FINDINGS.md.
    packing: str = "concat"
    train: str | list[str] = "all"  # parameter groups that train (all = every parameter); everything else is frozen
    freeze: list[str] = dataclasses.field(default_factory=list)  # groups frozen even where `train` covers them
    layers: str | list[int] = "linear"  # layers aligned by attn_align/hidden_align: linear (KDA) | all | [i, ...]
    seq_len: int = 2048
    batch_size: int = 8  # global sequences per optimiser step, whatever the number of processes
    micro_batch_size: int | None = None  # sequences per forward; None = largest of 1..8 dividing batch_size/world
    lr: float = 1e-4
    schedule: str = "cosine"
    warmup: float = 0.0  # fraction of the steps
    decay: float = 0.1  # wsd: fraction of the steps in the final decay
    min_lr_ratio: float = 0.0  # lr at the end of cosine/wsd, as a fraction of `lr`
    weight_decay: float = 0.0
    no_decay: str | list[str] = "auto"  # auto = gendistill.modeling.no_weight_decay (A_log, dt_bias, norms, biases)
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    seed: int = 0
    chunk_tokens: int = 1024  # tokens per chunk of the vocabulary-sized kd/ce computation
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500  # steps; a checkpoint is always written at the end of the stage
    keep_checkpoints: int = 2
    log_every: int = 1
    eval: str | Callable | None = None  # hook run on the finished stage's model dir: name, "module:function", callable
    eval_args: dict = dataclasses.field(default_factory=dict)
    # -- throughput: how a step is computed, not what (docs/distill.md "Throughput settings"; bench/kd_step.py) --
    compile: bool | str = False  # torch.compile the decoder blocks of student and teacher (true = inductor, or a
    #                              torch.compile backend name); fla's kernels stay as they are (graph breaks)
    kd_kernel: str = "chunked"  # chunked (PyTorch, any device) | liger_kl | liger_jsd (Liger-Kernel, CUDA, fkl kd only)
    teacher_batch_size: int | None = None  # sequences per teacher forward (a multiple of micro_batch_size); None = one
    #                                        forward per micro-batch
    teacher_inference_mode: bool = False  # the teacher forward under torch.inference_mode (else no_grad)
    # -- sparse teacher (changes the KD term: losses.py "top-k probabilities plus one tail bucket") --
    kd_topk: int | None = None  # KD against the teacher's top-k probabilities + tail mass, not the whole vocabulary
    teacher_cache: str | None = None  # with kd_topk: directory of the cached top-k (written on first use, reused by
    #                                   any later run with the same teacher, data, stream and settings)

    @property
    def needs_teacher(self) -> bool:
        return any(term in self.objective for term in TEACHER_TERMS)

    def math_keys(self) -> dict:
        """The fields that change what is computed (a resumed stage must not change these), as plain JSON data: they
        are compared with what checkpoints, run.json and ablation keys stored."""
        operational = {"eval", "eval_args", "log_every", "checkpoint_every", "keep_checkpoints", *THROUGHPUT_KEYS,
                       "teacher_cache"}
        # added later: at these defaults, older checkpoints still match
        later = {"freeze": [], "count": "packed", "kd_topk": None}
        keys = {k: v for k, v in dataclasses.asdict(self).items() if k not in operational and later.get(k, k) != v}
        return json.loads(json.dumps(keys, default=str))


@dataclasses.dataclass
class DataSource:
    path: str | list  # hub dataset id, a local .jsonl/.json/.parquet/.txt file or directory, or a list of those
    format: str = "auto"  # auto | json | parquet | text | hub
    name: str | None = None  # hub configuration
    split: str = "train"
    kind: str = "auto"  # auto | text | chat (auto: chat when the first record has `messages_field`)
    text_field: str = "text"
    messages_field: str = "messages"
    chat_template_kwargs: dict = dataclasses.field(default_factory=dict)
    append_eos: bool = True  # text documents end with the tokenizer's eos token
    text_sample_by: str = "paragraph"  # .txt files: line | paragraph | document
    shuffle: bool = True  # reshuffle documents every epoch (seeded by the stage)
    max_documents: int | None = None


@dataclasses.dataclass
class Recipe:
    name: str
    out_dir: str
    student: Any  # the trained model: dir | {path} | {convert: {...}} | {config: {...}} | {factory: "mod:fn", ...}
    stages: list[Stage]
    data: dict[str, DataSource]
    teacher: Any = None  # dir/hub id | {path, dtype} | {config} | {factory}; None only if every stage is ce-only
    tokenizer: Any = None  # dir/hub id | {factory}; default: the teacher's, else the student's
    cache_dir: str | None = None  # tokenised data; default <out_dir>/token_cache
    parallel: str = "auto"  # several processes: auto (= fsdp) | fsdp (FSDP2) | ddp
    tensorboard: bool = True  # log to <stage>/tb when tensorboard is installed
    progress: bool = True
    seed: int = 0
    source: str | None = None  # the YAML file, if any
    allow_code: bool = False  # "module:function" entries outside BUILTIN_CALLABLES may run (--allow-code)
    trained: str = "student"  # what the YAML calls the trained model: student (distillation) | model (plain training)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


# `defaults`: keys for every stage
TOP_LEVEL_KEYS = (set(Recipe.__dataclass_fields__) - {"source", "allow_code", "trained"}) | {"defaults", "model"}


# ----------------------------------------------------------------------------------------------------------------
# loading, overrides

def load_recipe(recipe: str | Path | dict | Recipe, overrides: list[str] | tuple[str, ...] = (),
                allow_code: bool = False, *, import_code: bool | None = None) -> Recipe:
    """Read a recipe (YAML path or bundled name, dict or Recipe), apply `--set key=value` overrides, validate.
    Pure: writes nothing.

    allow_code: accept "module:function" entries outside BUILTIN_CALLABLES (code named by the recipe); without it
    they are a UserError naming them. import_code (default: allow_code) imports every such entry now, so a typo
    fails before any work; `--check` lists them without importing."""
    if isinstance(recipe, Recipe):
        if overrides:
            raise UserError("overrides apply to a YAML path or dict, not to an already built Recipe")
        return recipe
    source = None
    if isinstance(recipe, (str, Path)):
        from gendistill.recipes import resolve

        path = resolve(recipe, "recipe")  # a file, or a bundled recipe's name ("tiny", "demo/teacher-cpu")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise UserError(f"{path}: not valid YAML: {err}") from err
        source = str(path)
        raw = _substitute(raw, "${recipe_dir}", str(path.resolve().parent))
        if isinstance(raw, dict):
            raw.setdefault("name", path.stem)
    else:
        raw = copy.deepcopy(recipe)
    if not isinstance(raw, dict):
        raise UserError(f"{source or 'recipe'}: expected a mapping at the top level")
    for item in overrides:
        apply_override(raw, item)
    result = _validate(raw, source)
    result.allow_code = allow_code
    refused = untrusted_code(result)
    if refused and not allow_code:
        raise UserError("the recipe names code to run, which recipes may do only with --allow-code "
                        "(allow_code=True): " + "; ".join(f"{w} = {s}" for w, s in refused)
                        + ". Check that you trust it, then pass --allow-code")
    if allow_code if import_code is None else import_code:
        for where, spec in code_entries(result):
            resolve_callable(spec, where)
    return result


def code_entries(recipe: Recipe) -> list[tuple[str, Any]]:
    """Every entry that names a callable: [(where, "module:function" or the callable)]."""
    found = [(f"{role}.factory", spec["factory"]) for role, spec in
             (("teacher", recipe.teacher), (recipe.trained, recipe.student), ("tokenizer", recipe.tokenizer))
             if isinstance(spec, dict) and "factory" in spec]
    found += [(f"{s.name}.eval", s.eval) for s in recipe.stages if s.eval is not None]
    return found


def untrusted_code(recipe: Recipe) -> list[tuple[str, str]]:
    """The code entries that need --allow-code: strings outside BUILTIN_CALLABLES (a callable handed over in Python
    is the caller's own code)."""
    return [(w, s) for w, s in code_entries(recipe) if isinstance(s, str) and s not in BUILTIN_CALLABLES]


def apply_override(raw: dict, item: str) -> None:
    """`stage.key=value` (a stage by name), `*.key=value` (every stage) or `key.sub=value` (top level)."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. kd.lr=1e-5")
    key, value = item.split("=", 1)
    try:
        value = yaml.safe_load(value)
    except yaml.YAMLError:
        pass  # keep the raw string
    parts = key.strip().split(".")
    stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    names = [s.get("name") for s in stages if isinstance(s, dict)]
    if parts[0] == "*" and len(parts) > 1:
        targets = [s for s in stages if isinstance(s, dict)]
        parts = parts[1:]
    elif parts[0] in names and parts[0] not in TOP_LEVEL_KEYS and len(parts) > 1:
        targets = [stages[names.index(parts[0])]]
        parts = parts[1:]
    elif parts[0] in TOP_LEVEL_KEYS:
        targets = [raw]
    else:
        raise UserError(f"--set {key}: {parts[0]!r} is neither a stage ({', '.join(map(str, names))}) nor a recipe key "
                        f"({', '.join(sorted(TOP_LEVEL_KEYS))})")
    for target in targets:
        node = target
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value


def _substitute(node, needle: str, value: str):
    if isinstance(node, str):
        return node.replace(needle, value)
    if isinstance(node, list):
        return [_substitute(x, needle, value) for x in node]
    if isinstance(node, dict):
        return {k: _substitute(v, needle, value) for k, v in node.items()}
    return node


# ----------------------------------------------------------------------------------------------------------------
# validation

def _fail(where: str, msg: str):
    raise UserError(f"{where}: {msg}")


def _check_keys(raw: dict, allowed, where: str) -> None:
    for key in raw:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(sorted(allowed))}"
            _fail(f"{where}.{key}" if where else str(key), f"unknown key{hint}")


def _number(value, where: str, lo: float | None = None, hi: float | None = None, lo_open=False, hi_open=False,
            integer=False) -> float:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, str) and not integer:  # YAML reads "1e-5" (no dot) as a string
        try:
            value, ok_type = float(value), True
        except ValueError:
            pass
    if isinstance(value, bool) or not ok_type or (isinstance(value, float) and not math.isfinite(value)):
        _fail(where, f"expected {'an integer' if integer else 'a number'}, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        _fail(where, f"must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        _fail(where, f"must be {'<' if hi_open else '<='} {hi}, got {value!r}")
    return value


def _choice(value, options, where: str) -> str:
    if value not in options:
        _fail(where, f"expected one of {', '.join(options)}, got {value!r}")
    return value


def _objective(value, where: str) -> dict[str, float]:
    if isinstance(value, str):
        value = {value: 1.0}
    if not isinstance(value, dict) or not value:
        _fail(where, f"expected a term ({', '.join(OBJECTIVE_TERMS)}) or a mapping term -> weight, got {value!r}")
    out = {}
    for term, weight in value.items():
        _choice(term, OBJECTIVE_TERMS, f"{where}.{term}" if len(value) > 1 else where)
        out[term] = float(_number(weight, f"{where}.{term}", lo=0))
    if not any(w > 0 for w in out.values()):
        _fail(where, "at least one term needs a positive weight")
    return {t: w for t, w in out.items() if w > 0}


def _model_spec(value, where: str, student: bool):
    forms = ["a directory or hub id", "{path: ..., dtype: ...}", "{config: {...}, seed: 0}",
             "{factory: 'module:function', kwargs: {...}}"]
    if student:
        forms.append("{convert: {attention_layers: [...]}}")
    if isinstance(value, str) and value:
        return {"path": value}
    if isinstance(value, dict) and len({"path", "config", "factory", "convert"} & set(value)) == 1:
        kind = ({"path", "config", "factory", "convert"} & set(value)).pop()
        if kind == "convert" and not student:
            _fail(where, "only the student can be built by conversion")
        allowed = {"path": {"path", "dtype"}, "config": {"config", "seed"}, "factory": {"factory", "kwargs"},
                   "convert": {"convert"}}[kind]
        _check_keys(value, allowed, where)
        if kind == "path" and not isinstance(value["path"], str):
            _fail(f"{where}.path", "expected a string")
        if kind == "path" and value.get("dtype", "auto") not in ("auto", "float32", "bfloat16", "float16"):
            _fail(f"{where}.dtype", f"expected auto, float32, bfloat16 or float16, got {value['dtype']!r}")
        if kind in ("config", "convert") and not isinstance(value[kind] or {}, dict):
            _fail(f"{where}.{kind}", "expected a mapping")
        if kind == "factory":
            _callable_name(value["factory"], f"{where}.factory")
        return dict(value)
    _fail(where, f"expected one of: {'; '.join(forms)}; got {value!r}")


def _callable_name(spec, where: str) -> None:
    """Check the form of a callable entry without importing anything."""
    if callable(spec):
        return
    if not isinstance(spec, str):
        _fail(where, f"expected 'module:function' or a callable, got {spec!r}")
    if not EVAL_HOOKS.get(spec, spec).partition(":")[2]:
        _fail(where, f"expected 'module:function' or one of {sorted(EVAL_HOOKS)}, got {spec!r}")


def resolve_callable(spec, where: str) -> Callable:
    """"module:function" (or a short name from EVAL_HOOKS, or a callable) -> the callable; imports it now."""
    _callable_name(spec, where)
    if callable(spec):
        return spec
    target = EVAL_HOOKS.get(spec, spec)
    module_name, _, attr = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        _fail(where, f"cannot import {target!r}: {err}")
    if not callable(fn):
        _fail(where, f"{target!r} is not callable")
    return fn


def load_data_source(raw, where: str = "data") -> DataSource:
    """A data source entry (a path/hub id, or a mapping with `path` and DataSource fields), validated."""
    if isinstance(raw, str):
        raw = {"path": raw}
    if not isinstance(raw, dict):
        _fail(where, f"expected a path/hub id or a mapping with `path`, got {raw!r}")
    _check_keys(raw, DataSource.__dataclass_fields__, where)
    path = raw.get("path")
    if isinstance(path, list):
        if not path or not all(isinstance(p, str) and p for p in path):
            _fail(f"{where}.path", f"a list of local files/directories must be non-empty strings, got {path!r}")
        if raw.get("format") == "hub":
            _fail(f"{where}.format", "a `path` list names local files or directories; a hub dataset is one id")
    elif not isinstance(path, str) or not path:
        _fail(f"{where}.path", "required: a hub dataset id, a local file/directory, or a list of local files/"
                               "directories (read as one source)")
    src = DataSource(**raw)
    _choice(src.format, ("auto", "json", "parquet", "text", "hub"), f"{where}.format")
    _choice(src.kind, ("auto", "text", "chat"), f"{where}.kind")
    _choice(src.text_sample_by, ("line", "paragraph", "document"), f"{where}.text_sample_by")
    for key in ("text_field", "messages_field", "split"):
        if not isinstance(getattr(src, key), str):
            _fail(f"{where}.{key}", "expected a string")
    for key in ("append_eos", "shuffle"):
        if not isinstance(getattr(src, key), bool):
            _fail(f"{where}.{key}", f"expected true or false, got {getattr(src, key)!r}")
    if not isinstance(src.chat_template_kwargs, dict):
        _fail(f"{where}.chat_template_kwargs", "expected a mapping")
    if src.max_documents is not None:
        src.max_documents = parse_size(src.max_documents, f"{where}.max_documents")
    return src


def load_stage(raw: dict) -> Stage:
    """One stage outside a recipe (`train_stage` given a dict, layer-selection probes), validated as a recipe's
    stages are; its data is handed over separately, so `data` names nothing."""
    return _stage({**raw, "data": "data"}, {}, 0, {"data": None}, 0)


def _stage(raw, defaults: dict, index: int, data: dict, recipe_seed: int) -> Stage:
    where = f"stages[{index}]"
    if not isinstance(raw, dict):
        _fail(where, f"expected a mapping, got {raw!r}")
    if isinstance(raw.get("name"), str):
        where = f"stages[{index}] ({raw['name']})"
    _check_keys(raw, Stage.__dataclass_fields__, where)
    merged = {"seed": recipe_seed, **copy.deepcopy(defaults), **raw}
    for key in ("name", "objective", "data"):
        if key not in merged:
            _fail(f"{where}.{key}", "required")
    if not isinstance(merged["name"], str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", merged["name"]):
        _fail(f"{where}.name", f"expected a name of letters, digits, '_', '-', '.', got {merged['name']!r}")
    if isinstance(merged["data"], dict):  # inline source
        data[f"{merged['name']}_data"] = load_data_source(merged["data"], f"{where}.data")
        merged["data"] = f"{merged['name']}_data"
    if merged["data"] not in data:
        _fail(f"{where}.data", f"no data source {merged['data']!r}; defined: {', '.join(data) or 'none'}")
    merged["objective"] = _objective(merged["objective"], f"{where}.objective")
    s = Stage(**merged)

    if (s.tokens is None) == (s.steps is None):
        _fail(where, "give exactly one of `tokens` (a budget such as '30M') or `steps`")
    if s.tokens is not None:
        s.tokens = parse_size(s.tokens, f"{where}.tokens")  # k = 1024; M, B, T decimal
    if s.steps is not None:
        s.steps = int(_number(s.steps, f"{where}.steps", lo=1, integer=True))
    _choice(s.divergence, DIVERGENCES, f"{where}.divergence")
    s.jsd_beta = float(_number(s.jsd_beta, f"{where}.jsd_beta", lo=0, hi=1, lo_open=True, hi_open=True))
    s.temperature = float(_number(s.temperature, f"{where}.temperature", lo=0, lo_open=True))
    _choice(s.loss_mask, LOSS_MASKS, f"{where}.loss_mask")
    if s.train in ("none", [], None):
        _fail(f"{where}.train", "at least one parameter group must train")
    if isinstance(s.train, str) and s.train != "all":
        s.train = [s.train]
    if s.train != "all":
        if not isinstance(s.train, list):
            _fail(f"{where}.train", f"expected 'all' or a list of groups from {', '.join(PARAMETER_GROUPS)}, "
                                    f"got {s.train!r}")
        for group in s.train:
            if group not in PARAMETER_GROUPS:
                _fail(f"{where}.train", f"unknown parameter group {group!r}; groups: {', '.join(PARAMETER_GROUPS)}")
        s.train = sorted(set(s.train), key=PARAMETER_GROUPS.index)
    if isinstance(s.freeze, str):
        s.freeze = [s.freeze]
    if not isinstance(s.freeze, list) or any(g not in PARAMETER_GROUPS for g in s.freeze):
        _fail(f"{where}.freeze", f"expected a list of groups from {', '.join(PARAMETER_GROUPS)}, got {s.freeze!r}")
    s.freeze = sorted(set(s.freeze), key=PARAMETER_GROUPS.index)
    _choice(s.count, BUDGET_COUNTS, f"{where}.count")
    _choice(s.packing, PACKINGS, f"{where}.packing")
    if s.count == "scored" and s.packing == "whole":
        _fail(f"{where}.count", "`count: scored` is computed for `packing: concat` only; use a packed `tokens` budget "
                                "or `steps` with `packing: whole`")
    if s.count == "scored" and s.tokens is None:
        _fail(f"{where}.count", "`count: scored` applies to a `tokens` budget, not to `steps`")
    if isinstance(s.layers, list):
        s.layers = [int(_number(i, f"{where}.layers", lo=0, integer=True)) for i in s.layers]
        if not s.layers:
            _fail(f"{where}.layers", "empty list")
    else:
        _choice(s.layers, ("linear", "all"), f"{where}.layers")
    for key in ("seq_len", "batch_size", "chunk_tokens", "log_every", "keep_checkpoints"):
        setattr(s, key, int(_number(getattr(s, key), f"{where}.{key}", lo=1, integer=True)))
    if s.micro_batch_size is not None:
        s.micro_batch_size = int(_number(s.micro_batch_size, f"{where}.micro_batch_size", lo=1, integer=True))
        if s.batch_size % s.micro_batch_size:
            _fail(f"{where}.micro_batch_size", f"{s.micro_batch_size} does not divide batch_size {s.batch_size}")
    s.checkpoint_every = int(_number(s.checkpoint_every, f"{where}.checkpoint_every", lo=0, integer=True))
    s.lr = float(_number(s.lr, f"{where}.lr", lo=0, lo_open=True))
    _choice(s.schedule, SCHEDULES, f"{where}.schedule")
    s.warmup = float(_number(s.warmup, f"{where}.warmup", lo=0, hi=1, hi_open=True))
    s.decay = float(_number(s.decay, f"{where}.decay", lo=0, hi=1))
    if s.schedule == "wsd" and s.warmup + s.decay > 1:
        _fail(f"{where}.decay", f"warmup ({s.warmup}) + decay ({s.decay}) exceed the whole stage")
    s.min_lr_ratio = float(_number(s.min_lr_ratio, f"{where}.min_lr_ratio", lo=0, hi=1))
    s.weight_decay = float(_number(s.weight_decay, f"{where}.weight_decay", lo=0))
    if not (s.no_decay == "auto" or (isinstance(s.no_decay, list) and all(isinstance(x, str) for x in s.no_decay))):
        _fail(f"{where}.no_decay", f"expected 'auto' or a list of parameter-name substrings, got {s.no_decay!r}")
    if not (isinstance(s.betas, list) and len(s.betas) == 2):
        _fail(f"{where}.betas", f"expected [beta1, beta2], got {s.betas!r}")
    s.betas = [float(_number(b, f"{where}.betas", lo=0, hi=1, hi_open=True)) for b in s.betas]
    s.eps = float(_number(s.eps, f"{where}.eps", lo=0, lo_open=True))
    s.grad_clip = float(_number(s.grad_clip, f"{where}.grad_clip", lo=0))
    _choice(s.precision, PRECISIONS, f"{where}.precision")
    s.seed = int(_number(s.seed, f"{where}.seed", integer=True))
    if not isinstance(s.gradient_checkpointing, bool):
        _fail(f"{where}.gradient_checkpointing", "expected true or false")
    if not (isinstance(s.compile, bool) or (isinstance(s.compile, str) and s.compile)):
        _fail(f"{where}.compile", f"expected true, false or a torch.compile backend name, got {s.compile!r}")
    _choice(s.kd_kernel, KD_KERNELS, f"{where}.kd_kernel")
    if s.kd_kernel != "chunked" and (set(s.objective) != {"kd"} or s.divergence != "fkl"):
        _fail(f"{where}.kd_kernel", f"{s.kd_kernel} computes forward KL alone; this stage's objective is "
                                    f"{s.objective} with divergence {s.divergence} (use kd_kernel: chunked)")
    if s.teacher_batch_size is not None:
        s.teacher_batch_size = int(_number(s.teacher_batch_size, f"{where}.teacher_batch_size", lo=1, integer=True))
        if s.micro_batch_size is not None and s.teacher_batch_size % s.micro_batch_size:
            _fail(f"{where}.teacher_batch_size", f"{s.teacher_batch_size} is not a multiple of micro_batch_size "
                                                 f"{s.micro_batch_size}")
    if not isinstance(s.teacher_inference_mode, bool):
        _fail(f"{where}.teacher_inference_mode", "expected true or false")
    if s.kd_topk is not None:
        s.kd_topk = int(_number(s.kd_topk, f"{where}.kd_topk", lo=1, integer=True))
        if "kd" not in s.objective:
            _fail(f"{where}.kd_topk", f"applies to the kd term; this stage's objective is {s.objective}")
        if s.divergence != "fkl":
            _fail(f"{where}.kd_topk", f"the top-k KD term is forward KL; this stage uses divergence {s.divergence}")
        if s.kd_kernel != "chunked":
            _fail(f"{where}.kd_topk", f"computed by the chunked kernel; this stage sets kd_kernel {s.kd_kernel}")
    if s.teacher_cache is not None:
        if not isinstance(s.teacher_cache, str) or not s.teacher_cache:
            _fail(f"{where}.teacher_cache", f"expected a directory path, got {s.teacher_cache!r}")
        if s.kd_topk is None:
            _fail(f"{where}.teacher_cache", "caches top-k teacher probabilities: set kd_topk too (e.g. 64)")
    if s.eval is not None:
        _callable_name(s.eval, f"{where}.eval")
    if not isinstance(s.eval_args, dict):
        _fail(f"{where}.eval_args", "expected a mapping")
    return s


def parse_stage(raw: dict) -> Stage:
    """One stage from a mapping as in a recipe's `stages` list (its `data` key is not needed), validated."""
    return _stage({**raw, "data": "data"}, {}, 0, {"data": None}, 0)


def _validate(raw: dict, source: str | None) -> Recipe:
    _check_keys(raw, TOP_LEVEL_KEYS, "")
    raw = dict(raw)
    name = raw.get("name", "recipe")
    if not isinstance(name, str) or not name:
        _fail("name", "expected a non-empty string")
    out_dir = raw.get("out_dir", f"runs/{name}")
    if not isinstance(out_dir, str) or not out_dir:
        _fail("out_dir", "expected a directory path")
    seed = int(_number(raw.get("seed", 0), "seed", integer=True))

    data_raw = raw.get("data") or {}
    if not isinstance(data_raw, dict):
        _fail("data", "expected a mapping of name -> source")
    data = {str(k): load_data_source(v, f"data.{k}") for k, v in data_raw.items()}

    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        _fail("defaults", "expected a mapping of stage keys")
    _check_keys(defaults, set(Stage.__dataclass_fields__) - {"name"}, "defaults")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        _fail("stages", "expected a non-empty list of stage entries")
    stages = [_stage(s, defaults, i, data, seed) for i, s in enumerate(stages_raw)]
    names = [s.name for s in stages]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        _fail("stages", f"stage names must be unique, repeated: {dup}")

    teacher = raw.get("teacher")
    teacher = None if teacher is None else _model_spec(teacher, "teacher", student=False)
    needing = [s.name for s in stages if s.needs_teacher]
    if teacher is None and needing:
        _fail("teacher", f"required: stages {needing} use a teacher term ({'/'.join(TEACHER_TERMS)})")
    if "student" in raw and "model" in raw:
        _fail("model", "give `student:` (distillation from the teacher) or `model:` (plain training), not both")
    trained = "model" if "model" in raw else "student"
    if trained not in raw:
        _fail("student", "required: a converted model dir, or {convert: {attention_layers: [...]}}, or "
                         "{config: {...}}; or, to train a model without a teacher, `model:` ({config: {...}}, ...)")
    student = _model_spec(raw[trained], trained, student=trained == "student")
    if trained == "model" and teacher is not None:
        _fail("model", "`model:` is plain training, without a teacher; a recipe that distils from a teacher names "
                       "the model it trains `student:`")
    if "convert" in student and teacher is None:
        _fail("student.convert", "conversion needs a teacher")
    tokenizer = raw.get("tokenizer")
    if tokenizer is not None:
        tokenizer = _model_spec(tokenizer, "tokenizer", student=False)
        if "config" in tokenizer:
            _fail("tokenizer", "expected a directory/hub id or {factory: 'module:function'}")
    cache_dir = raw.get("cache_dir")
    if cache_dir is not None and not isinstance(cache_dir, str):
        _fail("cache_dir", "expected a directory path")
    parallel = _choice(raw.get("parallel", "auto"), PARALLEL, "parallel")
    for key in ("tensorboard", "progress"):
        if not isinstance(raw.get(key, True), bool):
            _fail(key, "expected true or false")
    return Recipe(name=name, out_dir=out_dir, student=student, stages=stages, data=data, teacher=teacher,
                  tokenizer=tokenizer, cache_dir=cache_dir, parallel=parallel,
                  tensorboard=raw.get("tensorboard", True), progress=raw.get("progress", True), seed=seed,
                  source=source, trained=trained)


def recipe_to_dict(recipe: Recipe) -> dict:
    """Plain data (for recipe.yaml next to the outputs); callables are written by name."""
    def clean(x):
        if callable(x):
            return f"{getattr(x, '__module__', '?')}:{getattr(x, '__qualname__', repr(x))}"
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    d = dataclasses.asdict(recipe)
    d.pop("source")
    d.pop("allow_code")
    d = {(recipe.trained if k == "student" else k): v for k, v in d.items() if k != "trained"}
    return clean(d)
