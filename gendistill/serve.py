"""`gendistill serve MODEL_DIR`: an OpenAI-compatible HTTP server for a student (or any causal LM directory).

Endpoints: `POST /v1/chat/completions` (the tokenizer's chat template), `POST /v1/completions` (raw prompt), both
streamed as server-sent events with `"stream": true`; `GET /v1/models`; `GET /health`. Parameters: `max_tokens`,
`temperature` (0 = greedy), `top_p`, `stop`, `seed`.

This is `transformers serve` (its FastAPI app, request handlers and `model.generate` worker) with three differences,
each because `transformers serve` itself cannot serve the student:
- The model is loaded with `AutoModelForCausalLM`, which knows the classes that `import gendistill` registers (and
  those a directory's `auto_map` names, with --trust-remote-code). transformers' model manager resolves the class as
  `getattr(transformers, config.architectures[0])`, which finds only classes shipped with transformers.
- Continuous batching is never used: transformers' paged cache has allocators for full and sliding attention only and
  rejects the KDA layers ("Invalid layer type: linear_attention"). Requests run one at a time through
  `model.generate`, which keeps the hybrid cache (K/V for attention layers, conv + recurrent state for KDA layers).
- `/v1/models` lists the served model (transformers scans the hub cache instead, and fails without one), and a
  student whose tokenizer has no response template gets Qwen3's, as its Qwen3 teacher does: reasoning
  (`<think>...</think>`) and tool calls come back parsed the same way for both.

docs/SERVING.md has the details and what vLLM would need.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

from gendistill.io import UserError

STUDENT_MODEL_TYPE = "hybrid_kda"  # gendistill.modeling.HybridKDAConfig.model_type (not imported: keeps --help fast)


def model_manager_class():
    """transformers' ModelManager, loading through the Auto classes and listing only the served model."""
    import transformers
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.utils import get_response_template

    class GendistillModelManager(ModelManager):
        def _load_model(self, model_id_and_revision: str, tqdm_class=None, progress_callback=None, gguf_file=None):
            model_id, revision = model_id_and_revision.split("@", 1)
            kwargs = {"revision": revision, "dtype": self.dtype, "device_map": self.device,
                      "attn_implementation": self.attn_implementation, "trust_remote_code": self.trust_remote_code}
            if tqdm_class is not None:
                kwargs["tqdm_class"] = tqdm_class
            return transformers.AutoModelForCausalLM.from_pretrained(model_id, **kwargs)

        def load_model_and_processor(self, model_id_and_revision: str, *args, **kwargs):
            model, processor = super().load_model_and_processor(model_id_and_revision, *args, **kwargs)
            tokenizer = getattr(processor, "tokenizer", processor)
            if model.config.model_type == STUDENT_MODEL_TYPE and getattr(tokenizer, "response_template", None) is None:
                # The student speaks its Qwen3 teacher's chat format; transformers picks the template by model_type.
                tokenizer.response_template = get_response_template(
                    tokenizer, SimpleNamespace(config=SimpleNamespace(model_type="qwen3")))
            return model, processor

        def get_gen_models(self, cache_dir=None) -> list[dict]:
            return [{"id": self.force_model, "object": "model", "owned_by": "gendistill", "created": 0}]

    return GendistillModelManager


def build_app(model_dir: str, device: str = "auto", dtype: str = "auto", attn_implementation: str | None = None,
              trust_remote_code: bool = False):
    """Load the model and return the FastAPI app (the model is loaded here, before the server accepts requests)."""
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerationState

    import gendistill  # noqa: F401  (registers HybridKDAForCausalLM with the Auto classes)

    try:
        manager = model_manager_class()(device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                        attn_implementation=attn_implementation, continuous_batching=False,
                                        force_model=model_dir)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"could not load a model and tokenizer from {model_dir!r}: {err}") from err
    state = GenerationState(continuous_batching=False)  # see the module docstring: KDA layers have no paged cache
    return build_server(
        manager, ChatCompletionHandler(manager, state), completion_handler=CompletionHandler(manager, state),
        response_handler=ResponseHandler(manager, state), transcription_handler=TranscriptionHandler(manager, state),
        systemone_handler=SystemOneHandler(manager, state), generation_state=state)


def check_model_dir(model_dir: str) -> None:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise UserError(f"{model_dir!r} is not a model directory (no config.json); give the directory that "
                        "`gendistill convert` or `gendistill distill` wrote")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise UserError(f"{model_dir!r} has no tokenizer (tokenizer.json / tokenizer_config.json); save the "
                        "teacher's tokenizer into it (`tokenizer.save_pretrained(dir)`)")
    if "@" in model_dir:
        raise UserError(f"{model_dir!r}: transformers' server reads '@' as 'model@revision'; serve it from a path "
                        "without '@' (a symlink will do)")


def _version(name: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(name)


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Serve a model directory over an OpenAI-compatible HTTP API "
                                "(/v1/chat/completions, /v1/completions, streaming); the model id is MODEL_DIR as "
                                "given. Requests run one at a time through model.generate (no continuous batching: "
                                "transformers' paged cache rejects KDA layers).")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a student (or teacher) directory with its tokenizer")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="listen port (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto: as saved (default)")
    p.add_argument("--attn-implementation", help="for the attention layers: sdpa, flash_attention_2, eager, ...")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the directory's own modeling code (auto_map), as transformers' flag does")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default %(default)s)")
    return p


def check_address(host: str, port: int) -> None:
    """Fail before loading the model (minutes for a large one) if the address cannot be listened on."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            sock.bind(infos[0][4])
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port} ({err}); choose another --port or --host") from err


def main(args) -> int:
    check_model_dir(args.model_dir)
    check_address(args.host, args.port)
    try:
        from transformers.utils.import_utils import is_serve_available
    except ImportError:
        is_serve_available = None
    if is_serve_available is not None and not is_serve_available():
        raise UserError("serving needs fastapi, uvicorn and openai: pip install 'gendistill[serve]' "
                        "(or the pinned lines of requirements.txt)")
    try:  # transformers' serving modules are internal to it and may move between releases
        import transformers.cli.serving.server  # noqa: F401
    except ImportError as err:
        raise UserError(f"transformers {_version('transformers')} has no serving module where gendistill serve "
                        f"expects one ({err}); it is tested with transformers 5.23") from err
    import uvicorn

    app = build_app(args.model_dir, device=args.device, dtype=args.dtype,
                    attn_implementation=args.attn_implementation, trust_remote_code=args.trust_remote_code)
    print(f"serving {args.model_dir} at http://{args.host}:{args.port}/v1 (model id: {args.model_dir!r})",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
