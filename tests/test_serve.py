"""`gendistill serve`: a real server process on 127.0.0.1, a real OpenAI client, answers equal to `model.generate`."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import gendistill
from gendistill.cli import main as cli_main
from gendistill.testing import printable_outputs_only, tiny_qwen3, tiny_tokenizer

STARTUP_S = 60  # importing torch + transformers on a busy 2-core CI machine; the model itself loads in < 1 s
MAX_TOKENS = 12
MESSAGES = [{"role": "user", "content": "Where was Alice born?"}]
PROMPT = "Bruno Keller works for"


def printable_student(out: Path):
    """A converted tiny student whose greedy output is whole printable tokens and never ends early (a random model
    otherwise picks lone UTF-8 bytes and end-of-turn tokens, and the comparison would test little)."""
    tokenizer = tiny_tokenizer()
    teacher = tiny_qwen3(seed=3, tie_word_embeddings=False)
    printable_outputs_only(teacher, tokenizer)
    student = gendistill.convert(teacher, seed=0)
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    pytest.fail(f"server not up after {STARTUP_S} s:\n{log.read_text()}")


def test_serve_student_end_to_end(tmp_path):
    model_dir = tmp_path / "student"
    tokenizer = printable_student(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # what the server loads
    assert type(model).__name__ == "HybridKDAForCausalLM" and "linear_attention" in model.config.layer_types

    def greedy(ids: torch.Tensor) -> str:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_TOKENS)
        assert out.shape[1] == ids.shape[1] + MAX_TOKENS  # no end-of-turn token can be picked
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    chat_ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)["input_ids"]
    expected_chat = greedy(chat_ids)
    expected_text = greedy(tokenizer(PROMPT, return_tensors="pt")["input_ids"])
    assert expected_chat.strip() and expected_text.strip() and expected_chat != expected_text

    port, log = free_port(), tmp_path / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1",  # as conftest's set_num_threads(1): no spinning threads on 2 cores
           "PYTHONPATH": os.pathsep.join([str(Path(gendistill.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "gendistill", "serve", str(model_dir), "--host", "127.0.0.1",
                                 "--port", str(port), "--device", "cpu"], stdout=log_file, stderr=subprocess.STDOUT,
                                env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(proc, base, log)
        import openai  # here, not at the top: `pytest -m gpu` collects this file on machines without the serve extra

        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=30, max_retries=0)
        model_id = str(model_dir)
        assert [m.id for m in client.models.list().data] == [model_id]

        reply = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                               temperature=0)
        assert reply.choices[0].message.content == expected_chat
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == MAX_TOKENS
        assert reply.usage.prompt_tokens == chat_ids.shape[1]

        chunks = list(client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                     temperature=0, stream=True))
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(pieces) > 1, "the answer came in one piece, not streamed"
        assert "".join(pieces) == expected_chat
        assert chunks[-1].choices[0].finish_reason == "length"

        completion = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
        assert completion.choices[0].text == expected_text
        streamed = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                             stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == expected_text

        # The wire format itself: server-sent events, one `data: {json}` per chunk.
        request = urllib.request.Request(base + "/v1/chat/completions", method="POST", headers={
            "Content-Type": "application/json"}, data=json.dumps({
                "model": model_id, "messages": MESSAGES, "max_tokens": 3, "temperature": 0, "stream": True}).encode())
        with urllib.request.urlopen(request, timeout=30) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [e for e in r.read().decode().split("\n\n") if e]
        assert all(e.startswith("data: ") for e in events)
        assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events)
        assert "CB: False" in log.read_text() and "CB: True" not in log.read_text()  # sequential generate
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def test_serve_refuses_bad_input_before_loading(tmp_path, capsys):
    assert cli_main(["serve", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert cli_main(["serve", str(tmp_path)]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    (tmp_path / "tokenizer.json").write_text("{}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert cli_main(["serve", str(tmp_path), "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_transformers_continuous_batching_rejects_kda_layers():
    """Why `gendistill serve` never turns on transformers' continuous batching. When this fails, transformers' paged
    cache has learnt linear-attention layers, and the server could offer it (and docs/SERVING.md should say so)."""
    from transformers.generation.continuous_batching.cache import group_layers_by_attn_type

    student = gendistill.convert(tiny_qwen3(layers=2), attention_layers=[1], seed=0)
    with pytest.raises(ValueError, match="linear_attention"):
        group_layers_by_attn_type(student.config)
