"""gendistill: Qwen3 -> Hybrid-KDA conversion and GenDistill distillation, judged by what the student generates.

Importing the package registers `HybridKDAConfig` / `HybridKDAForCausalLM` with transformers' Auto classes.
"""
from gendistill.modeling import HybridKDAConfig, HybridKDAForCausalLM  # noqa: F401  (registers the Auto classes)
from gendistill.convert import convert  # noqa: F401

__version__ = "0.1.0"
