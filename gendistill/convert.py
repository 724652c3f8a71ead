"""Qwen3 -> Hybrid-KDA conversion: keep a few attention layers (or none), give every other layer a linear mixer (KDA;
or Gated DeltaNet, GLA, Mamba2's SSD: `mixer`) that starts from the teacher attention's own Q/K/V/O weights.
Everything else (embeddings, norms, MLPs) is copied unchanged."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from gendistill.hub import write_student_files
from gendistill.configuration_hybrid_kda import ATTENTION, MIXERS
from gendistill.io import UserError, atomic_dir, check_output_dir
from gendistill.modeling import FULL, LINEAR, HybridKDAConfig, HybridKDAForCausalLM

PAPER_ATTENTION_LAYERS = (0, 2, 6, 11, 13, 18, 21)  # beam-searched set of arXiv 2603.26556 for 28-layer Qwen3
KDA_FROM_TEACHER = ("q_proj", "k_proj", "v_proj", "o_proj")  # every linear mixer has the teacher's q/k/v/o shapes
FP32_PARAMETERS = ("A_log", "dt_bias")  # the decay gate is computed in fp32 (paper; fla keeps them fp32)


def default_attention_layers(num_layers: int, ratio: float = 0.25) -> list[int]:
    """The paper's set for 28 layers at ratio 1:3; otherwise `ratio` of the layers spread evenly, ending on the last."""
    if num_layers == 28 and abs(ratio - 0.25) < 1e-9:
        return list(PAPER_ATTENTION_LAYERS)
    count = max(1, round(num_layers * ratio))
    if count >= num_layers:
        return list(range(num_layers))
    step = num_layers / count
    return sorted({min(num_layers - 1, round(num_layers - 1 - i * step)) for i in range(count)})


def _check_teacher(teacher) -> None:
    cfg = teacher.config
    needed = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "vocab_size")
    missing = [k for k in needed if not hasattr(cfg, k)]
    layers = getattr(getattr(teacher, "model", None), "layers", None)
    if missing or layers is None or not all(hasattr(l.self_attn, p) for l in layers for p in KDA_FROM_TEACHER + ("q_norm",)):
        raise UserError(f"teacher of type {type(teacher).__name__} (model_type {getattr(cfg, 'model_type', '?')!r}) is "
                        "not Qwen3-like: expected model.layers[i].self_attn with q/k/v/o_proj and q_norm/k_norm")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise UserError("teacher's attention heads are not a multiple of its key/value heads")


def _check_ratio(ratio, num_layers: int | None = None) -> float:
    """A share of attention layers strictly inside (0, 1) that leaves at least one attention and one KDA layer (a pure
    model is asked for explicitly, with an attention-layer list)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise UserError(f"--ratio {ratio}: the share of attention layers must be a number strictly between 0 and 1 "
                        "(e.g. 0.25); for an all-KDA or all-attention model list the layers with --attention-layers")
    count = max(1, round(num_layers * ratio)) if num_layers else 1  # as default_attention_layers counts
    if num_layers and count >= num_layers:
        raise UserError(f"--ratio {ratio} of {num_layers} layers gives {count} attention layers; a hybrid needs at "
                        f"least one attention and one KDA layer (use a ratio between {1 / num_layers:.3g} and "
                        f"{(num_layers - 1) / num_layers:.3g}, or list the layers with --attention-layers)")
    return ratio


def _check_layers(attention_layers, num_layers: int) -> list[int]:
    layers = [int(i) for i in attention_layers]
    out_of_range = [i for i in layers if not 0 <= i < num_layers]
    if out_of_range:
        raise UserError(f"attention layer index {out_of_range} out of range: the teacher has {num_layers} layers "
                        f"(valid 0..{num_layers - 1})")
    repeated = sorted({i for i in layers if layers.count(i) > 1})
    if repeated:
        raise UserError(f"attention layer index {repeated} repeated in {layers}")
    return sorted(layers)


def read_selection(path: str | Path) -> list[int]:
    """The chosen layers of a `gendistill select-layers` selection.json (`convert --attention-layers FILE`)."""
    try:
        data = json.loads(Path(path).read_text())
        layers = data["attention_layers"]
        if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers):
            raise ValueError("attention_layers is not a list of integers")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a `gendistill select-layers` result ({type(err).__name__}: {err})") from err
    return layers


def _check_mixer(mixer, num_layers: int, attention_layers: list[int]) -> dict:
    """The config fields for `mixer`: one name of MIXERS for every linear layer, or a list with one entry per layer
    ("attention" at the attention layers)."""
    if isinstance(mixer, str):
        if mixer not in MIXERS:
            raise UserError(f"--mixer {mixer!r}: the linear mixer must be one of {', '.join(MIXERS)}")
        return {"linear_mixer": mixer}
    if not isinstance(mixer, (list, tuple)) or len(mixer) != num_layers:
        raise UserError(f"mixer {mixer!r}: give one name of {', '.join(MIXERS)}, or a list of one entry per layer "
                        f"({num_layers})")
    for i, name in enumerate(mixer):
        kind, allowed = ("an attention", (ATTENTION,)) if i in attention_layers else ("a linear", MIXERS)
        if name not in allowed:
            raise UserError(f"mixer[{i}] = {name!r}: layer {i} is {kind} layer, its entry must be one of "
                            f"{', '.join(allowed)}")
    return {"mixer_types": list(mixer)}


def student_config(teacher_config, attention_layers, mixer="kda", **kda_options) -> HybridKDAConfig:
    fields = teacher_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "layer_types", "use_sliding_window",
                "sliding_window", "max_window_layers", "dtype", "torch_dtype"):
        fields.pop(key, None)
    n = teacher_config.num_hidden_layers
    fields["layer_types"] = [FULL if i in attention_layers else LINEAR for i in range(n)]
    fields.update(_check_mixer(mixer, n, attention_layers))
    fields.update({k: v for k, v in kda_options.items() if v is not None})
    config = HybridKDAConfig(**fields)
    config.architectures = ["HybridKDAForCausalLM"]
    return config


@torch.no_grad()
def convert(teacher, attention_layers=None, ratio: float | None = None, seed: int = 0, mixer="kda",
            **kda_options) -> HybridKDAForCausalLM:
    """Build the Hybrid-KDA student of a Qwen3-like `teacher` (a loaded model). `attention_layers` lists the layers
    that keep softmax attention (empty: a pure-linear student); default: the paper's set for 28 layers, else `ratio`
    (1:3) spread evenly. `mixer`: the linear layers' mixer (configuration_hybrid_kda.MIXERS), or one entry per
    layer ("attention" at the attention layers)."""
    _check_teacher(teacher)
    n = teacher.config.num_hidden_layers
    if attention_layers is None:
        attention_layers = default_attention_layers(n, 0.25 if ratio is None else _check_ratio(ratio, n))
    attention_layers = _check_layers(attention_layers, n)
    config = student_config(teacher.config, attention_layers, mixer, **kda_options)
    config._attn_implementation = getattr(teacher.config, "_attn_implementation", None) or "sdpa"
    torch.manual_seed(seed)
    dtype = next(teacher.parameters()).dtype
    student = HybridKDAForCausalLM(config)
    for name, param in student.named_parameters():  # buffers (RoPE frequencies) and the KDA gate stay fp32
        if not name.endswith(FP32_PARAMETERS):
            param.data = param.data.to(dtype)

    teacher_state = teacher.state_dict()
    student_state = student.state_dict()
    copied = set()
    for name, tensor in teacher_state.items():
        parts = name.split(".")
        if "layers" in parts and "self_attn" in parts:
            layer = int(parts[parts.index("layers") + 1])
            if config.layer_types[layer] == LINEAR and parts[-2] not in KDA_FROM_TEACHER:
                continue  # q_norm/k_norm: no linear mixer has them (KDA and GDN L2-normalise q/k instead)
        if name not in student_state:
            continue
        if student_state[name].shape != tensor.shape:
            raise UserError(f"cannot copy {name}: teacher {tuple(tensor.shape)} vs student {tuple(student_state[name].shape)}")
        student_state[name].copy_(tensor)
        copied.add(name)
    missing_teacher = [k for k in teacher_state if k not in copied and "self_attn" not in k and k != "lm_head.weight"]
    if missing_teacher:
        raise UserError(f"teacher weights with no place in the student: {missing_teacher[:5]}")
    student.tie_weights()
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = teacher.generation_config
    return student.eval()


def save_student(student, directory: str | Path, *, tokenizer=None, provenance: dict) -> None:
    """A converted student as a self-contained directory: weights, the tokenizer, gendistill.json (`provenance`:
    teacher, attention layers, seed) and the shipped model code with its model card. `gendistill convert` and a
    recipe's conversion step (`distill.trainer.convert_step`) both write it."""
    directory = Path(directory)
    student.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    (directory / "gendistill.json").write_text(json.dumps(provenance, indent=2))
    write_student_files(directory, student)  # model code + auto_map (loads without gendistill), README.md


def load_teacher(path_or_id: str, dtype: str = "auto", trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    from gendistill.loading import load_model

    teacher = load_model(path_or_id, dtype=dtype, trust_remote_code=trust_remote_code, role="teacher (safetensors "
                         "weights expected)", use_safetensors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        tokenizer = None
    return teacher, tokenizer


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Convert a Qwen3 checkpoint into a Hybrid-KDA student.")
    p.add_argument("--teacher", required=True, help="hub id or local directory of a Qwen3 checkpoint")
    p.add_argument("--out", required=True, help="output directory for the student (HF format, safetensors)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--attention-layers", help="comma-separated layer indices that keep softmax attention, or a "
                                                  "`gendistill select-layers` selection.json (default: "
                                                  "0,2,6,11,13,18,21 for 28 layers, else 1:3 evenly; `none`: "
                                                  "no attention layer, a pure-linear student)")
    group.add_argument("--ratio", type=float, help="share of layers kept as attention, spread evenly (e.g. 0.25)")
    p.add_argument("--mixer", choices=MIXERS, default="kda",
                   help="the linear layers' token mixer: kda (Kimi Delta Attention), gdn (Gated DeltaNet), gla "
                        "(Gated Linear Attention) or mamba2 (Mamba2's SSD); default kda")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--conv-activation", choices=["identity", "silu"], default=None)
    p.add_argument("--output-gate", choices=["sigmoid", "silu"], default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the teacher's own modelling code")
    return p


def main(args) -> int:
    check_output_dir(args.out, args.overwrite)
    if args.ratio is not None:
        _check_ratio(args.ratio)  # the form now (before loading the teacher); the layer count in convert()
    layers = None
    if args.attention_layers is not None and args.attention_layers.strip().lower() in ("none", ""):
        layers = []
    elif args.attention_layers and (args.attention_layers.endswith(".json") or Path(args.attention_layers).is_file()):
        layers = read_selection(args.attention_layers)
    elif args.attention_layers:
        try:
            layers = [int(x) for x in args.attention_layers.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--attention-layers must be comma-separated integers, got {args.attention_layers!r}")
    teacher, tokenizer = load_teacher(args.teacher, args.dtype, args.trust_remote_code)
    student = convert(teacher, attention_layers=layers, ratio=args.ratio, seed=args.seed, mixer=args.mixer,
                      kda_conv_activation=args.conv_activation, kda_output_gate=args.output_gate)
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        save_student(student, tmp, tokenizer=tokenizer, provenance={
            "teacher": args.teacher, "attention_layers": student.config.attention_layers, "mixer": args.mixer,
            "seed": args.seed})
    n = student.config.num_hidden_layers
    print(f"converted {args.teacher} -> {args.out}: attention layers {student.config.attention_layers}, "
          f"{n - len(student.config.attention_layers)} of {n} layers {args.mixer.upper()}, "
          f"{sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters")
    return 0
