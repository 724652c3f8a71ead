"""bench/retrieval_probe.py (issue 22's question: does the GPU teacher's shape learn retrieval from drills?): its drills
hold what it says they hold, and the script runs end to end on CPU and writes its curve."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import retrieval_probe as probe  # noqa: E402


@pytest.mark.parametrize("n_keys", [8, 1024])
def test_mqar_rows_ask_only_about_their_own_pairs(n_keys):
    (ids, mask), = probe._mqar(random.Random(0), 1, 64, pairs=4, n_keys=n_keys)
    assert len(ids) == len(mask) == 64
    pairs = dict(zip(ids[:8:2], ids[1:8:2]))
    keys, values = probe.mqar_ranges(n_keys)
    assert len(pairs) == 4 and all(k in keys and v in values for k, v in pairs.items())
    answers = [i for i, m in enumerate(mask) if m]
    assert answers and all(i >= 9 and i % 2 == 1 for i in answers)  # the value after each queried key
    assert all(pairs[ids[i - 1]] == ids[i] for i in answers)


@pytest.fixture(scope="module")
def drill_worker():
    from gendistill.world.world import _render_chats, build_world

    world = build_world(seed=0, scale="tiny", long_docs=0)
    chats = [(f"c{i}", t) for i, t in enumerate(_render_chats(world.tokenizer, world.chats))]
    bios = [(f"b{i}", t) for i, t in enumerate(world.pretrain_texts)]
    return world.tokenizer, bios, chats


@pytest.mark.parametrize("mode", ["long", "dense"])
def test_world_drills_mask_exactly_the_answers(drill_worker, monkeypatch, tmp_path, mode):
    tok, bios, chats = drill_worker
    tok.save_pretrained(tmp_path)
    monkeypatch.setattr(probe, "_worker", {})
    probe._init_worker(str(tmp_path), bios, chats, mode, 0)
    rows = probe._drills((1, 3, 512))
    questions = 0
    for ids, mask in rows:
        assert len(ids) == len(mask) == 512 and ids[-1] == tok.convert_tokens_to_ids("<|endoftext|>")
        text = tok.decode(ids[:-1])
        answers = [m.group(1) for m in probe.ANSWER.finditer(text)]
        masked = tok.decode([t for t, m in zip(ids, mask) if m])
        assert masked == "".join(answers)  # every answer's tokens and nothing else
        questions += len(answers)
    assert questions >= 1


def test_probe_runs_on_cpu_and_writes_its_curve(tmp_path):
    out = tmp_path / "probe.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "retrieval_probe.py"), "--device", "cpu",
                           "--world", "tiny", "--teacher", "cpu", "--drills", "mqar", "--mqar-pairs", "4",
                           "--seq-len", "64",
                           "--batch", "2", "--layers", "1", "--hidden", "64", "--mqar-keys", "16", "--budget-s", "4",
                           "--eval-every", "1000",
                           "--eval-items", "1", "--eval-lengths", "1024", "--workers", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    first, last = result["curve"][0], result["curve"][-1]
    assert first["step"] == 0 and last["step"] > 0 and last["tokens"] == last["step"] * 2 * 63
    assert 0 <= last["heldout_answer_tokens"] <= 1 and set(last["recall"]) == {
        f"{family}@1k" for family in probe.FAMILIES}
    assert result["config"]["parameters"] > 0 and result["command"]
    model = result["config"]["model"]
    assert (model["hidden_size"], model["head_dim"], model["num_hidden_layers"]) == (64, 16, 1)
    assert model["vocab_size"] == 1536  # demo/teacher-cpu.yaml's, not the GPU teacher's 6144


def test_mqar_calibration_rows_and_run(tmp_path):
    import mqar_calibration as cal

    ids, mask = cal.rows(random.Random(0), 3, 32, pairs=4, keys=range(4, 12), values=range(12, 20))
    for row, m in zip(ids.tolist(), mask.tolist()):
        pairs = dict(zip(row[:8:2], row[1:8:2]))
        answers = [i for i, flag in enumerate(m) if flag]
        assert len(pairs) == 4 and answers and all(pairs[row[i - 1]] == row[i] for i in answers)
    out = tmp_path / "mqar.json"
    assert cal.main(["--pairs", "2", "--keys", "8", "--seq-len", "16", "--batch", "4", "--steps", "100",
                     "--hidden", "16", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["curve"]) == 1 and result["curve"][0]["step"] == 100 and result["chance"] == 0.5
    assert set(result["first_step_at"]) == {"0.5", "0.9"} and result["config"]["vocab"] == 24
    assert cal.main(["--arch", "gpt2", "--pairs", "2", "--keys", "8", "--seq-len", "16", "--batch", "4", "--steps",
                     "100", "--hidden", "16", "--layers", "3", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["arch"] == "gpt2"


def test_mqar_calibration_init_options_change_only_what_they_name():
    import argparse

    import mqar_calibration as cal

    args = cal.parser().parse_args("--keys 8 --hidden 16 --mlp 2 --layers 3 --seq-len 16 --out x".split())
    plain = cal.make_model(args).state_dict()
    scaled = cal.make_model(argparse.Namespace(**vars(args) | {"residual_init": True})).state_dict()
    for name, weight in plain.items():
        factor = 6 ** -0.5 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
        assert torch.allclose(scaled[name], weight * factor), name
    zeroed = cal.make_model(argparse.Namespace(**vars(args) | {"zero_writes": True, "embed_std": 1.0})).state_dict()
    for name, weight in plain.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            assert not zeroed[name].any(), name  # every block starts as the identity
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):  # tied
            assert 0.8 < zeroed[name].std().item() < 1.2
        else:
            assert torch.equal(zeroed[name], weight), name
    for keep, gone in (("none", ("q_norm.weight", "k_norm.weight")), ("q", ("k_norm.weight",))):
        bare = cal.make_model(argparse.Namespace(**vars(args) | {"qk_norm": keep}))
        assert set(bare.state_dict()) == {n for n in plain if not n.endswith(gone)}
        assert bare(torch.arange(8)[None]).logits.isfinite().all()
    gained = cal.make_model(argparse.Namespace(**vars(args) | {"qk_norm_init": 2.0})).state_dict()
    for name, weight in plain.items():
        expected = torch.full_like(weight, 2.0) if name.endswith(("q_norm.weight", "k_norm.weight")) else weight
        assert torch.equal(gained[name], expected), name


def test_mqar_calibration_init_std_sets_the_weight_init():
    import argparse

    import mqar_calibration as cal

    args = cal.parser().parse_args("--keys 64 --layers 1 --seq-len 16 --init-std 0.125 --out x".split())
    model = cal.make_model(args)
    assert model.config.initializer_range == 0.125
    assert abs(model.model.layers[0].mlp.up_proj.weight.std().item() - 0.125) < 0.01
    gpt2 = cal.make_model(argparse.Namespace(**vars(args) | {"arch": "gpt2"}))
    assert abs(gpt2.transformer.h[0].mlp.c_fc.weight.std().item() - 0.125) < 0.01


def test_mqar_qk_eps_anneals_to_the_models_own_epsilon():
    import mqar_calibration as cal

    args = cal.parser().parse_args("--keys 8 --hidden 16 --layers 2 --seq-len 16 --qk-norm-eps 1 --qk-eps-anneal 100 "
                                   "--out x".split())
    model = cal.make_model(args)
    assert all(l.self_attn.q_norm.variance_epsilon == 1.0 for l in model.model.layers)
    assert cal.qk_eps(args, 1e-6, 0) == 1.0 and abs(cal.qk_eps(args, 1e-6, 50) - 1e-3) < 1e-12
    assert cal.qk_eps(args, 1e-6, 100) == cal.qk_eps(args, 1e-6, 500) == pytest.approx(1e-6)
    cal.set_qk_eps(model, 1e-6)  # then the model is a plain Qwen3 again: the same outputs as one loaded fresh
    ids = torch.arange(4, 12)[None]
    plain = type(model)(model.config)
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(ids).logits, plain(ids).logits)


def test_mqar_sweep_runs_seeds_of_conditions_in_parallel_resumes_and_summarises(tmp_path, monkeypatch):
    import mqar_sweep as sweep

    grid = {"base": "--pairs 2 --keys 8 --seq-len 16 --batch 4 --hidden 16 --layers 1", "steps": 100, "budget_s": None,
            "seeds": [0, 1], "conditions": {"qk": "", "none": "--qk-norm none"}}
    assert sweep.plan(grid, only=["none"], seeds=[3])[0] == (
        "none", 3, "--pairs 2 --keys 8 --seq-len 16 --batch 4 --hidden 16 --layers 1 --qk-norm none --steps 100 "
                   "--seed 3".split())
    with pytest.raises(SystemExit, match="unknown condition"):
        sweep.plan(grid, only=["nrom"])
    monkeypatch.setitem(sweep.GRIDS, "tiny", grid)
    out = tmp_path / "sweep.json"
    assert sweep.main(["--grid", "tiny", "--jobs", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert sorted(result["runs"]) == ["none_s0", "none_s1", "qk_s0", "qk_s1"]
    assert {r["condition"]: r["config"]["qk_norm"] for r in result["runs"].values()} == {"qk": "qk", "none": "none"}
    assert [(row["condition"], row["seeds"]) for row in result["summary"]] == [("qk", 2), ("none", 2)]
    for row in result["summary"]:
        seeds = [r for r in result["runs"].values() if r["condition"] == row["condition"]]
        assert row["formed"] == sum(r["first_step_at"]["0.9"] is not None for r in seeds)
    stamp = (tmp_path / "sweep.json.runs" / "qk_s0.json").stat().st_mtime_ns
    assert sweep.main(["--grid", "tiny", "--out", str(out)]) == 0  # a rerun reuses every finished run
    assert (tmp_path / "sweep.json.runs" / "qk_s0.json").stat().st_mtime_ns == stamp
