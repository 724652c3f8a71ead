"""Cold start of fla's Triton kernels: a persistent cache, pinned configs for known GPUs, and a warm-up.

fla autotunes each KDA kernel the first time it meets a new autotuning key (head count, head size, chunk size, ...;
mostly not the sequence length): every candidate config is compiled and timed. On a fresh machine that is minutes
before the first training step. Three things cut it:

- a persistent cache: Triton keeps compiled kernels, and (fla sets cache_results, FLA_CACHE_RESULTS=1 by default)
  the autotuning winners, in TRITON_CACHE_DIR. `configure()` points it at ~/.cache/gendistill/triton (or
  $GENDISTILL_CACHE/triton) unless the user set it, so every later process on the machine starts warm, and the CLI
  says where it is;
- pinned configs: fla can take each kernel's config from JSON files (FLA_CONFIG_DIR, FLA_CACHE_MODE) instead of
  autotuning; then only the chosen config is compiled. `export_fla_configs` writes the configs this process's
  autotuning chose, in fla's format; gendistill ships such a set per GPU and fla version under
  gendistill/kernels/configs/<gpu>/ and `configure()` uses it when the GPU, fla and Triton versions match, in fla's
  fuzzy mode: a kernel's exact autotuning key first, else the entry whose key has the same structure, dtypes and
  flags with other numbers (head count, head size, length), so that other model shapes (the world demo's, a 1.7B)
  start without autotuning too, at a config tuned on another shape. An H200 uses the H100's set (`SAME_CHIP`).
  FLA_CACHE_MODE=disabled (or strict) in the environment brings fla's own autotuning back;
- `warm(...)`: one layer's training forward and backward and an inference prefill, at a training shape, per linear
  mixer (KDA by default), in its own process before a run (the `gendistill kernels warm` command), so the run itself
  starts warm; `export` warms, then writes the set to ship.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import time
from pathlib import Path

PINNED_ROOT = Path(__file__).resolve().parent / "configs"
PINNED_MODE = "fuzzy"
# GPUs that take another GPU's pinned set: the H200 is the H100 SXM's GH100 chip (132 SMs, the same caches) with more
# and faster memory; its kernels' best tiles are the H100's to within autotuning noise, and either beats minutes of
# autotuning on a fresh machine.
SAME_CHIP = {"NVIDIA_H200": "NVIDIA_H100_80GB_HBM3"}


def cache_root() -> Path:
    return Path(os.environ.get("GENDISTILL_CACHE", "~/.cache/gendistill")).expanduser()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpu_key(name: str) -> str:
    """fla's name for a GPU's config directory (`fla.ops.utils.cache.sanitize_gpu_name`): NVIDIA H200 -> NVIDIA_H200."""
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_") or "unknown_gpu"


def pinned_dir(gpu_name: str | None) -> Path | None:
    """The shipped fla configs for this GPU if they were exported with the installed fla and Triton versions."""
    if not gpu_name:
        return None
    key = gpu_key(gpu_name)
    directory = PINNED_ROOT / key
    if not directory.is_dir() and key in SAME_CHIP:
        directory = PINNED_ROOT / SAME_CHIP[key]
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    fla = _version("fla-core") or _version("flash-linear-attention")
    if manifest.get("fla") != fla or manifest.get("triton") != _version("triton"):
        return None
    return directory


def configure(gpu_name: str | None = None, environ=os.environ) -> dict:
    """Set the kernel cache locations in `environ` (the process environment) before triton or fla is imported, where
    the user has not set them; return what is in effect. gpu_name: the CUDA device's name, for the pinned configs."""
    report = {}
    if environ.get("TRITON_CACHE_DIR"):
        report["triton_cache_dir"], report["triton_cache_dir_source"] = environ["TRITON_CACHE_DIR"], "TRITON_CACHE_DIR"
    else:
        environ["TRITON_CACHE_DIR"] = str(cache_root() / "triton")
        report["triton_cache_dir"] = environ["TRITON_CACHE_DIR"]
        report["triton_cache_dir_source"] = "gendistill default"
    pinned = pinned_dir(gpu_name)
    if "FLA_CONFIG_DIR" in environ or "FLA_CACHE_MODE" in environ:
        report["fla_configs"] = f"{environ.get('FLA_CONFIG_DIR', 'fla default')} (FLA_CACHE_MODE=" \
                                f"{environ.get('FLA_CACHE_MODE', 'disabled')}, set by the user)"
    elif pinned is not None:
        environ["FLA_CONFIG_DIR"], environ["FLA_CACHE_MODE"] = str(pinned), PINNED_MODE
        report["fla_configs"] = f"{pinned} (pinned for {gpu_name}, FLA_CACHE_MODE={PINNED_MODE})"
    else:
        report["fla_configs"] = f"none pinned for {gpu_name or 'this device'}: fla autotunes on first use"
    directory = Path(report["triton_cache_dir"])
    report["triton_cache_files"] = sum(1 for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else 0
    return report


def describe(report: dict) -> str:
    return (f"kernel cache: {report['triton_cache_dir']} ({report['triton_cache_files']} files; "
            f"{report['triton_cache_dir_source']}); fla configs: {report['fla_configs']}")


def configure_for_cuda() -> dict:
    """`configure` with this process's first CUDA device (none: no pinned configs)."""
    import torch

    return configure(torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def fla_autotuners() -> list:
    """fla's autotuned kernels in this process (its `CachedAutotuner`s, found among live objects)."""
    import gc

    try:
        from fla.ops.utils.cache import CachedAutotuner
    except ImportError:
        return []
    return [obj for obj in gc.get_objects() if isinstance(obj, CachedAutotuner)]


def export_fla_configs(out_dir: str | Path, gpu_name: str) -> dict:
    """Write the configs fla's autotuning chose in this process, one `<kernel>.json` per kernel in fla's format
    (autotune_entries keyed by the hash of the autotuning key), plus manifest.json (GPU, fla and Triton versions).
    A kernel name shared by two autotuners is left out: fla looks configs up by name only."""
    from fla.ops.utils.cache import AutotuneKey

    from gendistill.io import atomic_write_json

    by_name: dict[str, list] = {}
    for tuner in fla_autotuners():
        by_name.setdefault(tuner.kernel_name, []).append(tuner)
    out_dir = Path(out_dir)
    written, skipped = {}, []
    for name, tuners in sorted(by_name.items()):
        if len(tuners) > 1:
            skipped.append(name)
            continue
        entries = {}
        for key, config in tuners[0].cache.items():
            entries[AutotuneKey.key_hash(key)] = {"autotune_key": AutotuneKey.normalize_autotune_key(list(key)),
                                                  "config": {"kwargs": dict(config.kwargs),
                                                             "num_warps": config.num_warps,
                                                             "num_stages": config.num_stages,
                                                             "num_ctas": config.num_ctas,
                                                             "maxnreg": config.maxnreg}}
        if entries:
            atomic_write_json(out_dir / f"{name}.json", {"kernel_name": name, "triton_version": _version("triton"),
                                                         "autotune_entries": entries})
            written[name] = len(entries)
    manifest = {"gpu": gpu_name, "fla": _version("fla-core") or _version("flash-linear-attention"),
                "triton": _version("triton"), "kernels": written, "left_out_shared_names": skipped}
    atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest


def warm(heads: int = 16, kv_heads: int = 8, head_dim: int = 128, hidden: int = 1024, tokens: int = 16384,
         documents: int = 8, dtype: str = "bfloat16", mixers: tuple[str, ...] = ("kda",),
         prefill: bool = True) -> dict:
    """For each linear mixer in `mixers`, one layer's training forward and backward on CUDA at a training shape
    (`tokens` packed tokens in `documents` documents, bf16 autocast as training runs), then (`prefill`) an inference
    prefill of one document: compiles and autotunes every fla kernel training and prefill use, into the persistent
    cache. Returns the seconds each took, and the same again (warm)."""
    import torch

    from gendistill.io import UserError
    from gendistill.modeling import HybridKDAConfig, HybridKDAForCausalLM

    if not torch.cuda.is_available():
        raise UserError("`gendistill kernels warm` and `export` need a CUDA GPU: fla's kernels are Triton kernels, "
                        "compiled and autotuned for the GPU they run on (`kernels info` runs anywhere)")
    per_doc = tokens // documents
    position_ids = torch.arange(per_doc, device="cuda").repeat(documents)[None]
    half = getattr(torch, dtype)
    result = {"tokens": per_doc * documents, "heads": heads, "head_dim": head_dim}
    for mixer in mixers:
        config = HybridKDAConfig(vocab_size=256, hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=1,
                                 num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                                 layer_types=["linear_attention"], linear_mixer=mixer)
        model = HybridKDAForCausalLM(config).cuda().train()
        infer = None
        if prefill:  # the prefill path has kernels and flags of its own: a model as from_pretrained loads it in
            infer = HybridKDAForCausalLM(config).cuda().to(half).eval()  # `dtype`, its decay parameters kept fp32
            for name, param in infer.named_parameters():
                if name.rsplit(".", 1)[-1] in infer._keep_in_fp32_modules_strict:
                    param.data = param.data.float()
        x = torch.randn(1, per_doc * documents, hidden, device="cuda", requires_grad=True)
        seconds = []
        for _ in range(2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=half):
                out = model.model(inputs_embeds=x, position_ids=position_ids, use_cache=False).last_hidden_state
            out.float().square().mean().backward()
            if infer is not None:
                with torch.no_grad():
                    infer(inputs_embeds=x[:, :per_doc].detach().to(half))
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        key = "" if mixers == ("kda",) else f"{mixer}_"  # the KDA-only record keeps its names
        result[f"{key}first_s"], result[f"{key}again_s"] = seconds
    return result


def _mixer_list(text: str) -> tuple[str, ...]:
    from gendistill.configuration_hybrid_kda import MIXERS

    names = MIXERS if text == "all" else tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in MIXERS]
    if unknown or not names:
        named = ", ".join(unknown) if unknown else repr(text)
        raise argparse.ArgumentTypeError(f"unknown mixer(s) {named}; choose from {', '.join(MIXERS)} or all")
    return names


def build_parser(prog: str) -> argparse.ArgumentParser:
    from gendistill.configuration_hybrid_kda import MIXERS

    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("info", help="where the kernel cache is and which fla configs are pinned")
    w = sub.add_parser("warm", help="compile and autotune the --mixers' training and prefill kernels into the cache "
                                    "(CUDA)")
    w.add_argument("--heads", type=int, default=16)
    w.add_argument("--kv-heads", type=int, default=8)
    w.add_argument("--head-dim", type=int, default=128)
    w.add_argument("--hidden", type=int, default=1024)
    w.add_argument("--tokens", type=int, default=16384, help="packed tokens per forward (micro-batch x seq_len)")
    e = sub.add_parser("export", help="warm, then write the autotuned fla configs (fla's JSON format) to OUT")
    e.add_argument("out", type=Path)
    for parser in (w, e):
        parser.add_argument("--mixers", default="kda", type=_mixer_list,
                            help=f"the linear mixers whose kernels to warm, comma-separated ({', '.join(MIXERS)}) "
                                 "or all")
    return p


def main(args) -> int:
    report = configure_for_cuda()
    print(describe(report))
    if args.action == "info":
        return 0
    shape = {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "hidden": args.hidden,
             "tokens": args.tokens} if args.action == "warm" else {}
    result = warm(**shape, mixers=args.mixers)
    print(json.dumps(result))
    if args.action == "export":
        import torch

        print(json.dumps(export_fla_configs(args.out, torch.cuda.get_device_name(0))))
    return 0
