"""gendistill: Qwen3 -> Hybrid-KDA conversion and GenDistill distillation, judged by what the student generates.

Importing the package registers `HybridKDAConfig` / `HybridKDAForCausalLM` with transformers' Auto classes, and turns
off flash-linear-attention's per-call backend dispatch unless FLA_DISABLE_BACKEND_DISPATCH is set (fla reads it when
it is first imported; set it to 0 to keep the dispatch). The student uses fla's Triton kernels only, and the dispatch
wraps each of ~10 calls per KDA layer in a backend search and torch.compiler.disable: host time that a short prefill
waits for (bench/host_profile.py).
"""
import os

os.environ.setdefault("FLA_DISABLE_BACKEND_DISPATCH", "1")

from gendistill.modeling import HybridKDAConfig, HybridKDAForCausalLM  # noqa: E402,F401  (registers the Auto classes)
from gendistill.convert import convert  # noqa: E402,F401

__version__ = "0.1.0"
