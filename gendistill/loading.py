"""One way to load a model: a checkpoint directory or hub id -> a causal LM in eval mode, or a clear UserError.

Every command that reads a teacher or a student goes through `load_model`, so that the Hybrid-KDA classes are
registered first, a missing or broken checkpoint gives one message naming the path and the role it was loaded for,
and remote code runs only where the user asked for it."""
from __future__ import annotations

import os

import torch

from gendistill.io import UserError, check_model_ref

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """'auto' stays 'auto' (the checkpoint's own dtype); a name or torch.dtype becomes a torch.dtype."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def load_model(path_or_id: str | os.PathLike, *, dtype: str | torch.dtype = "auto", device=None,
               attn_implementation: str | None = None, trust_remote_code: bool = False, role: str = "model",
               **from_pretrained_kwargs):
    """AutoModelForCausalLM.from_pretrained in eval mode, moved to `device` if given (after loading in `dtype`, so
    buffers kept in fp32, such as RoPE frequencies, stay fp32). `role` names the model in errors ("teacher")."""
    import gendistill.modeling  # noqa: F401  (registers HybridKDAConfig / HybridKDAForCausalLM with the Auto classes)
    from transformers import AutoModelForCausalLM

    check_model_ref(path_or_id, role)  # a directory with config.json, or something shaped like a hub id
    ref = os.path.expanduser(str(path_or_id))
    kwargs = {"dtype": resolve_dtype(dtype), "trust_remote_code": trust_remote_code, **from_pretrained_kwargs}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(ref, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load the {role} from {str(path_or_id)!r}: {err}") from err
    if device is not None:
        model = model.to(device)
    return model.eval()
