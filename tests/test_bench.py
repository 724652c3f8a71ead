"""`gendistill bench`: analytic cache bytes equal the cache objects, the command runs end to end on CPU and writes its
table, json and plots (generate() beside the forward), targets are scored from their data, and a wrong KDA fast path
makes it refuse without writing any speed figure."""
import copy
import json

import pytest
import torch
from transformers import DynamicCache

import gendistill.kda
from gendistill import cli, convert
from gendistill.bench import checks, measure, targets
from gendistill.convert import PAPER_ATTENTION_LAYERS, student_config
from gendistill.io import UserError, parse_size
from gendistill.modeling import cache_bytes
from gendistill.testing import qwen3_0_6b_config, tiny_qwen3

GiB = 2**30


@pytest.fixture(scope="module")
def teacher():
    return tiny_qwen3(layers=4)


@pytest.fixture(scope="module")
def student(teacher):
    return convert(teacher, attention_layers=[1])  # layer 0 is KDA: the cache must find its length elsewhere


def cache_tensors(cache):
    """(kind, shape, dtype) of every tensor a cache holds, layer by layer."""
    out = []
    for layer in cache.layers:
        if hasattr(layer, "recurrent_states"):
            out.append(("conv", tuple(layer.conv_states[0].shape), layer.conv_states[0].dtype))
            out.append(("state", tuple(layer.recurrent_states[0].shape), layer.recurrent_states[0].dtype))
        else:
            out.append(("kv", tuple(layer.keys.shape), layer.keys.dtype))
            out.append(("kv", tuple(layer.values.shape), layer.values.dtype))
    return out


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_analytic_cache_bytes_match_the_cache_objects(teacher, student, dtype):
    for model in (copy.deepcopy(teacher).to(dtype), copy.deepcopy(student).to(dtype)):
        for batch, context in ((1, 1), (1, 2), (3, 17), (2, 64)):  # 1 and 2 tokens: fewer than the conv's 3 steps
            ids = torch.randint(3, 384, (batch, context))
            cache = DynamicCache(config=model.config)
            model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            expected = cache_bytes(model.config, context, batch, dtype)
            assert measure.measured_cache_bytes(cache) == expected > 0
            # the decode benchmark's synthetic cache has exactly the tensors a prefill leaves
            synthetic = measure.synthetic_cache(model, batch, context)
            assert cache_tensors(synthetic) == cache_tensors(cache)
            assert measure.measured_cache_bytes(synthetic) == expected
    # the KDA part does not grow with the context; attention grows by 2 * Hkv * head_dim * bytes per token and layer
    per_token_and_layer = 2 * 2 * 16 * 4  # K and V, 2 kv heads, head_dim 16, fp32
    grow = cache_bytes(student.config, 1001, 1, torch.float32) - cache_bytes(student.config, 1, 1, torch.float32)
    assert grow == 1000 * per_token_and_layer  # one attention layer
    assert cache_bytes(teacher.config, 1000, 3, torch.float32) == 3 * 4 * 1000 * per_token_and_layer


@torch.no_grad()
@pytest.mark.parametrize("mixer", ["gdn", "gla", "mamba2"])
@pytest.mark.parametrize("attention_layers", [[1], []], ids=["hybrid", "pure-linear"])
def test_every_mixer_hybrid_or_pure_linear_gets_exact_cache_bytes_and_a_decode_cache(teacher, mixer,
                                                                                      attention_layers):
    """The bench measures any student `convert` makes: its analytic bytes equal a prefill's cache, the synthetic
    decode cache has the same tensors, and with no attention layer the cache does not grow with the context."""
    model = convert(teacher, attention_layers=attention_layers, mixer=mixer)
    for batch, context in ((1, 2), (2, 33)):
        cache = DynamicCache(config=model.config)
        model(torch.randint(3, 384, (batch, context)), past_key_values=cache, use_cache=True, logits_to_keep=1)
        assert measure.measured_cache_bytes(cache) == cache_bytes(model.config, context, batch, torch.float32) > 0
        synthetic = measure.synthetic_cache(model, batch, context)
        assert cache_tensors(synthetic) == cache_tensors(cache)
    growth = cache_bytes(model.config, 1001, 1, torch.float32) - cache_bytes(model.config, 1, 1, torch.float32)
    assert growth == (2 * 2 * 16 * 4 * 1000 if attention_layers else 0)


def test_analytic_bytes_for_the_qwen3_0_6b_shape_match_the_reference_table():
    teacher_config = qwen3_0_6b_config()
    hybrid_config = student_config(teacher_config, PAPER_ATTENTION_LAYERS)
    context = 131072
    teacher_bytes = cache_bytes(teacher_config, context, 1, torch.bfloat16)
    student_bytes = cache_bytes(hybrid_config, context, 1, torch.bfloat16)
    assert teacher_bytes == 112 * 1024 * context  # 14.0 GiB, as kda.md §6.2
    kda_layer = 16 * 128 * 128 * 4 + (16 + 2 * 8) * 128 * 3 * 2  # 1 MiB fp32 state + 24 KiB conv (k/v at 8 heads)
    assert student_bytes == 7 * 4096 * context + 21 * kda_layer
    assert 0.25 < student_bytes / teacher_bytes < 0.26  # the target: <= 26 %


def test_largest_batch_fills_the_budget_and_no_more(student):
    per_sequence = measure.decode_bytes_per_sequence(student.config, 4096, torch.bfloat16)
    assert per_sequence > cache_bytes(student.config, 4096, 1, torch.bfloat16)  # the step's transients count
    for batch in (0, 1, 7, 300):
        budget = (batch + 0.5) * per_sequence
        free = (budget + measure.DECODE_RESERVE_BYTES) / measure.DECODE_MEMORY_FRACTION
        assert measure.largest_batch_that_fits(student.config, 4096, torch.bfloat16, free) == batch
    assert measure.largest_batch_that_fits(student.config, 4096, torch.bfloat16, free_bytes=GiB) == 0  # below the reserve


@torch.no_grad()
def test_decode_backs_off_on_out_of_memory(student, monkeypatch):
    real_synthetic_cache = measure.synthetic_cache

    def card_fits_five(model, batch, context, max_len=None):
        if batch > 5:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_synthetic_cache(model, batch, context, max_len)

    monkeypatch.setattr(measure, "synthetic_cache", card_fits_five)
    record = measure.measure_decode(student, context=16, batches=None, max_batch=8, steps=1, repeats=1, warmup=0, seed=0)
    # 8 -> 6 -> 5 (x0.85 each try), then the powers of two below it
    assert record["largest_batch"] == 5 and [p["batch"] for p in record["points"]] == [1, 4, 5]
    assert record["tokens_per_s_at_largest"] == record["points"][-1]["tokens_per_s"] > 0


@torch.no_grad()
def test_static_decode_cache_gives_the_same_logits_as_the_dynamic_one(teacher, student):
    for model in (teacher, student):
        logits = []
        for max_len in (None, 40):
            torch.manual_seed(0)
            cache = measure.synthetic_cache(model, batch=2, context=31, max_len=max_len)
            token = torch.tensor([[5], [7]])
            steps = []
            for _ in range(3):
                steps.append(model(token, past_key_values=cache, use_cache=True).logits)
                token = steps[-1][:, -1:].argmax(-1)
            logits.append(torch.cat(steps, dim=1))
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


def test_targets_say_pass_or_fail_and_by_how_much():
    def model(ttft, peak, kv, generate_ms=None, generate_peak=None):
        return {"ttft_no_cache_ms": ttft, "peak_no_cache_bytes": peak, "cache_bytes_measured": kv,
                "ttft_generate_ms": generate_ms, "peak_generate_bytes": generate_peak}

    prefill = [{"context": 4096, "teacher": model(10.0, 2 * GiB, 1.0),
                "student": model(12.5, 2 * GiB, 1.0, generate_ms=12.5 * 1.05, generate_peak=2.2 * GiB)},
               {"context": 131072, "teacher": model(3300.0, 4.5 * GiB, 100.0),
                "student": model(1000.0, 4.0 * GiB, 25.0, generate_ms=3000.0, generate_peak=52 * GiB)}]
    decode = {"teacher": {"context": 32768, "largest_batch": 30, "tokens_per_s_at_largest": 300.0},
              "student": {"context": 32768, "largest_batch": 120, "tokens_per_s_at_largest": 600.0}}
    scored = targets.compare_with_targets(prefill, decode)
    assert len(scored) == len(targets.TARGETS) - 2  # the CUDA-graph rows are optional and not measured here
    results = [(t["target"], round(t["measured"], 4), t["passed"], round(t["margin"], 4))
               for t in scored if t["measured"] is not None]
    assert results == [(">= 3.1", 3.3, True, round(3.3 / 3.1 - 1, 4)),      # TTFT at 128K
                       (">= 1", 0.8, False, -0.2),                           # TTFT at 4K: missed by 20 %
                       ("<= 1", round(4.0 / 4.5, 4), True, round(1 - 4.0 / 4.5, 4)),  # prefill peak at 128K
                       ("<= 0.26", 0.25, True, round(1 - 0.25 / 0.26, 4)),   # KV + state at 128K
                       (">= 3", 2.0, False, round(2 / 3 - 1, 4)),            # decode throughput
                       ("<= 1.1", 1.05, True, round(1 - 1.05 / 1.1, 4)),     # generate() time at 4K
                       ("<= 1.1", 3.0, False, round(1 - 3.0 / 1.1, 4)),      # ... at 128K: 3x the forward
                       ("<= 1.2", 1.1, True, round(1 - 1.1 / 1.2, 4)),       # generate() peak at 4K
                       ("<= 1.2", 13.0, False, round(1 - 13.0 / 1.2, 4))]    # ... at 128K
    by_name = {t["name"]: t for t in scored}
    assert by_name["student generate()/forward TTFT at 4K"]["detail"] == "generate() 13.12 ms / forward 12.5 ms"
    assert by_name["student generate()/forward TTFT at 32K"]["passed"] is None  # context not run
    missing = targets.compare_with_targets(prefill[:1], decode)[0]
    assert missing["measured"] is None and missing["passed"] is None


def test_targets_are_data_with_one_bound_each():
    for target in targets.TARGETS:
        assert ("at_least" in target) != ("at_most" in target), target
        assert ("ratio" in target) != ("measure" in target), target
    contexts = {t["context"] for t in targets.TARGETS if "generate()" in t["name"]}
    assert contexts == {4096, 32768, 131072}  # generate() is held to the forward at 4K, 32K and 128K


def test_one_size_parser_k_is_1024_and_budgets_are_decimal():
    assert [parse_size(v) for v in ("4k", "128K", "300", 300, "30M", "1.5B", "1.1M", 1e6)] == [
        4096, 131072, 300, 300, 30_000_000, 1_500_000_000, 1_100_000, 1_000_000]
    for bad in ("0", "-4k", "4q", "1.3", "0.1k", True, None):
        with pytest.raises(UserError, match="--contexts: expected a positive whole count"):
            parse_size(bad, "--contexts")


def test_bench_runs_end_to_end_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench"
    code = cli.main(["bench", "--shape", "tiny", "--contexts", "40,80", "--decode-context", "64", "--repeats", "2",
                     "--warmup", "1", "--decode-steps", "2", "--batch", "1", "--max-batch", "2",
                     "--generate-contexts", "80", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| 80 | student |" in printed and "## Targets" in printed
    assert "generate(ids, max_new_tokens=1)` against the forward" in printed
    assert (out / "table.md").read_text() in printed
    for png in ("ttft_vs_context.png", "memory_vs_context.png", "decode_throughput_vs_batch.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000

    result = json.loads((out / "bench.json").read_text())
    assert result["status"] == "ok" and result["correctness"]["passed"]
    assert {c["rtol"] for c in result["correctness"]["checks"]} == {5e-3, 1e-3}  # fp32 on CPU
    assert all(c["rel_err"] < 1e-4 for c in result["correctness"]["checks"])  # PyTorch paths agree to ~1e-6
    env = result["environment"]
    assert env["torch"] == torch.__version__ and env["transformers"] and env["date"] and env["device"] == "cpu"
    assert "command" in result and result["arguments"]["contexts"] == "40,80" and "commit" in env
    assert result["settings"]["generate_contexts"] == [80]
    assert result["settings"]["dtype"] == "float32" and result["settings"]["kda_backend"]["prefill"] == "chunk"
    assert [row["context"] for row in result["prefill"]] == [40, 80]
    for row in result["prefill"]:
        for name in ("teacher", "student"):
            r = row[name]
            assert r["cache_bytes_measured"] == r["cache_bytes_analytic"] > 0
            for times in (r["ttft_no_cache_ms_all"], r["ttft_cache_ms_all"]):  # >= --repeats 2; short calls until
                n, seconds = len(times), [t / 1e3 for t in times]                # 1 s is timed, at most 50
                assert n >= 2 and (n == measure.MAX_REPEATS or sum(seconds) >= measure.MIN_TIMED_SECONDS)
                assert n == 2 or sum(seconds[:-1]) < measure.MIN_TIMED_SECONDS
            assert r["ttft_no_cache_ms"] > 0 and r["ttft_cache_ms"] > 0
            assert r["peak_no_cache_bytes"] is None  # no device memory on CPU
            # generate() is timed (like the forward: repeated, median) only where asked
            assert (r.get("ttft_generate_ms", 0) > 0) is (row["context"] == 80)
            if row["context"] == 80:
                assert len(r["ttft_generate_ms_all"]) >= 2 and r["peak_generate_bytes"] is None
        assert row["student"]["cache_bytes_measured"] < row["teacher"]["cache_bytes_measured"]
    for name in ("teacher", "student"):
        d = result["decode"][name]
        assert d["largest_batch"] == 2 and [p["batch"] for p in d["points"]] == [1, 2]
        assert all(p["tokens_per_s"] > 0 for p in d["points"]) and d["ms_per_token_batch_1"] > 0
    assert len(result["targets"]) == len(targets.TARGETS) - 2  # no CUDA graphs on CPU: their rows are left out
    decode_target = next(t for t in result["targets"] if t["name"].startswith("decode"))
    assert decode_target["measured"] == pytest.approx(result["decode"]["student"]["tokens_per_s_at_largest"]
                                                      / result["decode"]["teacher"]["tokens_per_s_at_largest"])
    assert decode_target["passed"] is (decode_target["measured"] >= 3.0)
    assert decode_target["name"].endswith("largest batch each (StaticCache)")  # the default, named in the row
    assert all(t["measured"] is None for t in result["targets"] if t is not decode_target)  # no 4K/32K/128K here


@torch.no_grad()
def test_generate_is_timed_on_the_call_a_user_makes_and_answers_the_forwards_token(teacher, student):
    for model in (teacher, student):
        ids = measure.random_ids(model, 1, 30, seed=0)
        tokens, cache = measure.first_token(model, ids, "generate")
        logits, _ = measure.first_token(model, ids, "no_cache")
        assert cache is None and tokens.shape == (1, 31) and torch.equal(tokens[:, :30], ids)
        assert tokens[0, -1] == logits[0, -1].argmax()


def test_generate_contexts_must_be_prefill_contexts(tmp_path, capsys):
    code = cli.main(["bench", "--shape", "tiny", "--contexts", "40", "--generate-contexts", "80",
                     "--out", str(tmp_path / "b")])
    assert code == 2 and "[80] not among --contexts" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_wrong_fast_path_refuses_and_writes_no_speed(tmp_path, monkeypatch, capsys, teacher, student):
    teacher.save_pretrained(tmp_path / "teacher")
    student.save_pretrained(tmp_path / "student")
    right_chunk_kda = gendistill.kda.chunk_kda

    def off_by_one_chunk_kda(*args, **kwargs):  # each token's output one position late: a plausible kernel bug
        o, state = right_chunk_kda(*args, **kwargs)
        return torch.cat([torch.zeros_like(o[:, :1]), o[:, :-1]], dim=1), state

    monkeypatch.setattr(gendistill.kda, "chunk_kda", off_by_one_chunk_kda)
    out = tmp_path / "bench"
    code = cli.main(["bench", "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"),
                     "--contexts", "32", "--decode-context", "32", "--repeats", "1", "--out", str(out)])
    assert code == 1
    assert "refusing to report speed" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if p.name != ".gendistill") == ["correctness.json"]  # + marker
    record = json.loads((out / "correctness.json").read_text())
    assert record["status"] == "refused" and not record["correctness"]["passed"]
    failed = [c["name"] for c in record["correctness"]["checks"] if not c["passed"]]
    assert failed and all("fast path vs reference" in name for name in failed)
    text = json.dumps(record)
    assert not any(key in text for key in ("ttft", "tokens_per_s", "ms_per_step", "prefill\": ["))


def test_a_fast_path_that_ignores_padding_fails_only_the_padded_check(student, monkeypatch):
    from gendistill.kernels.hybrid import FusedKDAMixer as KDAMixer

    right_forward = KDAMixer.forward

    def padding_blind_forward(self, hidden_states, attention_mask=None, **kwargs):
        if gendistill.kda.resolve_backend(hidden_states, hidden_states.shape[1]) == "chunk":
            attention_mask = None  # the fast path treats padded steps as tokens
        return right_forward(self, hidden_states, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(KDAMixer, "forward", padding_blind_forward)
    ids = measure.random_ids(student, 2, checks.CHECK_TOKENS, seed=0)
    with torch.no_grad():
        layer_checks = checks.kda_layer_checks(student, ids, rtol=5e-3)
    failed = [c["name"] for c in layer_checks if not c["rel_err"] <= c["rtol"]]
    assert len(layer_checks) == 4 and len(failed) == 1 and "left-padding" in failed[0]


def test_cuda_graph_ttft_gets_its_own_targets_beside_the_eager_ones():
    """The graphed student is held against the teacher's faster way, whichever it is."""
    def model(eager, graph):
        return {"ttft_no_cache_ms": eager, "ttft_graph_ms": graph}

    prefill = [{"context": 4096, "teacher": model(26.0, 33.5), "student": model(78.0, 20.0)},
               {"context": 131072, "teacher": model(4100.0, 4090.0), "student": model(1300.0, 1290.0)}]
    decode = {"teacher": {"context": 32768}, "student": {"context": 32768}}
    rows = {t["name"]: t for t in targets.compare_with_targets(prefill, decode)}
    eager = rows["TTFT teacher/student at 4K (no cache)"]
    graph = rows["TTFT teacher/student at 4K (student as a CUDA graph, teacher at its best)"]
    assert eager["measured"] == pytest.approx(26 / 78) and eager["passed"] is False
    assert graph["measured"] == pytest.approx(26 / 20) and graph["passed"] is True and "(eager)" in graph["detail"]
    long = rows["TTFT teacher/student at 128K (student as a CUDA graph, teacher at its best)"]
    assert long["measured"] == pytest.approx(4090 / 1290) and "(graph)" in long["detail"]


def test_cuda_graphs_on_cpu_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["bench", "--shape", "tiny", "--contexts", "40", "--cuda-graphs", "--out", str(tmp_path / "b")])
    assert code == 2
    assert "--cuda-graphs needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


class EagerGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: capture runs the function twice (capture_graph's warm-up), replay
    runs it again. `stale=True`: replay does nothing, as a graph whose work was not captured."""

    def __init__(self, fn, stale=False):
        self.fn, self.stale = fn, stale
        fn()
        fn()

    def replay(self):
        if not self.stale:
            self.fn()


@torch.no_grad()
@pytest.mark.parametrize("name", ["teacher", "student"])
def test_graph_decode_check_accepts_the_same_computation_and_catches_a_frozen_one(name, teacher, student,
                                                                                  monkeypatch):
    model = {"teacher": teacher, "student": student}[name]
    monkeypatch.setattr(measure, "capture_graph", lambda fn, device: EagerGraph(fn))
    assert checks.graph_decode_error(model, batch=2, context=24, steps=3, seed=0) < 1e-6
    # a replay that does nothing (outputs and cache frozen at capture) must fail the check
    monkeypatch.setattr(measure, "capture_graph", lambda fn, device: EagerGraph(fn, stale=True))
    assert checks.graph_decode_error(model, batch=2, context=24, steps=3, seed=0) > 1e-2


@torch.no_grad()
@pytest.mark.parametrize("name", ["teacher", "student"])
def test_graph_prefill_check_accepts_the_same_computation_and_catches_a_frozen_one(name, teacher, student,
                                                                                   monkeypatch):
    model = {"teacher": teacher, "student": student}[name]
    ids = measure.random_ids(model, 2, 24, seed=0)
    monkeypatch.setattr(measure, "capture_graph", lambda fn, device: EagerGraph(fn))
    assert checks.graph_prefill_error(model, ids, seed=0) < 1e-6
    # captured on other tokens: a replay that does nothing still holds their logits
    monkeypatch.setattr(measure, "capture_graph", lambda fn, device: EagerGraph(fn, stale=True))
    assert checks.graph_prefill_error(model, ids, seed=0) > 1e-2


@torch.no_grad()
def test_a_failing_decode_graph_is_rechecked_on_the_pytorch_kda_path(student, monkeypatch):
    """The diagnosis tells the fast path's kernels from the wiring: here the replay is stale on both paths."""
    monkeypatch.setattr(measure, "capture_graph", lambda fn, device: EagerGraph(fn, stale=True))
    ids = measure.random_ids(student, 2, 24, seed=0)
    decode = checks.graph_checks("student", student, ids, seed=0, decode=True)[-1]
    assert decode["rel_err"] > decode["rtol"] and decode["rel_err_pytorch_kda_path"] > decode["rtol"]


@torch.no_grad()
def test_correctness_with_graphs_checks_prefill_and_decode_graphs_of_both_models(teacher, student, monkeypatch):
    monkeypatch.setattr(measure, "capture_graph", lambda fn, device: EagerGraph(fn))
    ran = checks.check_correctness(teacher, student, graphs=True, decode_graphs=True)["checks"]
    graph_checks = [c["name"] for c in ran if "CUDA graph" in c["name"]]
    assert len(graph_checks) == 4  # prefill and decode, both models
    assert all(c["passed"] for c in ran)
    prefill_only = checks.check_correctness(teacher, student, graphs=True)["checks"]
    assert not any("decode steps replayed" in c["name"] for c in prefill_only)


@torch.no_grad()
def test_graph_decode_point_replays_greedy_steps(student, monkeypatch):
    """With graphs, each step is one replay that also feeds the argmax back: same tokens/s bookkeeping, and a
    capture that fails is reported, not taken for out of memory."""
    monkeypatch.setattr(measure, "capture_graph", lambda fn, device: EagerGraph(fn))
    point = measure.measure_decode_point(student, batch=2, context=16, steps=2, repeats=1, warmup=0, seed=0,
                                       static_len=32, graphs=True)
    assert point["batch"] == 2 and point["tokens_per_s"] > 0

    def no_capture(fn, device):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(measure, "capture_graph", no_capture)
    record = measure.measure_decode(student, context=16, batches=[1], max_batch=2, steps=2, repeats=1, warmup=0,
                                  seed=0, static=True, graphs=True)
    assert record["error"] == "CUDA graph capture failed: operation not permitted when stream is capturing"


def test_timed_calls_of_the_models_alternate_until_each_is_done():
    """Short prefills are host-paced and the host drifts: the teacher's and the student's timed calls alternate, each
    model stops on its own count, and one that runs out of memory keeps the others going."""
    order = []

    def calls(name, n, out_of_memory_at=None):
        for i in range(n):
            if i == out_of_memory_at:
                raise torch.OutOfMemoryError("CUDA out of memory")
            order.append(name)
            yield i

    results, out_of_memory = measure.interleaved({"teacher": calls("t", 3), "student": calls("s", 5),
                                                "large": calls("l", 4, out_of_memory_at=1)})
    assert order == ["t", "s", "l", "t", "s", "t", "s", "s", "s"]
    assert results == {"teacher": [0, 1, 2], "student": [0, 1, 2, 3, 4], "large": [0]} and out_of_memory == {"large"}


def test_a_directory_that_is_not_a_checkpoint_is_named_with_its_role(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = cli.main(["bench", "--teacher", str(tmp_path / "empty"), "--student", str(tmp_path / "empty"),
                     "--out", str(tmp_path / "b")])
    assert code == 2 and "teacher" in capsys.readouterr().err and not (tmp_path / "b").exists()
