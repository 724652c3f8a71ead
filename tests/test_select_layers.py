"""`gendistill select-layers`: the beam search finds a planted best set that greedy search misses and scores each
candidate once (cached across runs); the masked-teacher probes equal their references (attention zeroed = o_proj
zeroed; `local` = transformers' own sliding-window layers, with and without the KV cache); the teacher-forced recall
score equals greedy generation; the real probes run end to end, and `convert` takes the result file."""
import copy
import json

import pytest
import torch

from gendistill.cli import main as cli
from gendistill.convert import read_selection
from gendistill.evaluation.engine import generate
from gendistill.io import UserError
from gendistill.select_layers import (beam_search, masked_attention, recall_probe, select_layers,
                                      teacher_forced)
from gendistill.recipes import ROOT as BUNDLED
from gendistill.testing import tiny_qwen3, tiny_tokenizer

PLANTED = (2, 5)


def planted_probe(calls):
    """Layer 0 alone looks best, but the planted pair {2, 5} is the only set scoring 1: greedy takes 0 first."""
    def probe(keep):
        calls.append(keep)
        keep = set(keep)
        if PLANTED == tuple(sorted(keep)):
            return {"score": 1.0}
        single = {0: 0.5, 2: 0.4, 5: 0.4}
        return {"score": 0.6 if 0 in keep and len(keep) == 2 else max([single.get(i, 0.0) for i in keep] + [0.0])
                / max(1, len(keep) - 1 if 0 in keep else 1)}
    return probe


def test_beam_finds_the_planted_set_that_greedy_misses_and_scores_each_candidate_once(tmp_path):
    calls = []
    greedy = beam_search(planted_probe(calls), 8, 2, beam=1)
    assert greedy["best"][0] == 0 and tuple(greedy["best"]) != PLANTED
    calls.clear()
    result = select_layers(planted_probe(calls), 8, 2, tmp_path, beam=3, baselines=4, probe_info={"name": "planted"})
    assert tuple(result["attention_layers"]) == PLANTED and result["score"] == 1.0
    assert len(calls) == len(set(calls)) == result["candidates_scored"]  # each set scored once, baselines included
    tree = result["tree"]
    assert [level["step"] for level in tree] == [0, 1, 2] and len(tree[1]["candidates"]) == 8
    assert [c["layers"] for c in tree[1]["candidates"] if c["in_beam"]] == [[0], [2], [5]]
    assert all(len(c["layers"]) == 2 and set(c["parent"]) < set(c["layers"]) for c in tree[2]["candidates"])
    assert len(result["baselines"]["random"]) == 4 and result["baselines"]["evenly_spaced"]["layers"] == [3, 7]
    assert (tmp_path / "search.png").stat().st_size > 1000
    stored = json.loads((tmp_path / "selection.json").read_text())
    assert stored["attention_layers"] == list(PLANTED) and read_selection(tmp_path / "selection.json") == [2, 5]
    calls.clear()  # a rerun finds every score in the cache
    again = select_layers(planted_probe(calls), 8, 2, tmp_path, beam=3, baselines=4, probe_info={"name": "planted"})
    assert calls == [] and again["scored_this_run"] == 0 and again["attention_layers"] == list(PLANTED)
    # depth 0: the full beam is never used, which is the greedy search again
    assert beam_search(planted_probe([]), 8, 2, beam=3, depth=0)["best"] == greedy["best"]
    removed = beam_search(planted_probe([]), 8, 2, beam=8, direction="remove")
    assert len(removed["tree"]) == 7 and len(removed["best"]) == 2


def _inputs():
    torch.manual_seed(1)
    return torch.randint(3, 300, (2, 24))


def test_zero_mask_equals_zeroed_output_projection():
    model, ids = tiny_qwen3(), _inputs()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for i in (1, 3):
            reference.model.layers[i].self_attn.o_proj.weight.zero_()
    with masked_attention(model, (0, 2), "zero"):
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    torch.testing.assert_close(model(ids).logits, copy.deepcopy(model)(ids).logits)  # hooks are gone afterwards
    assert not torch.allclose(model(ids).logits, reference(ids).logits)


def test_local_mask_equals_transformers_sliding_window_layers_with_and_without_cache():
    window = 5
    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    model = tiny_qwen3()
    reference = tiny_qwen3(use_sliding_window=True, sliding_window=window, max_window_layers=0, layer_types=types)
    tok, ids = tiny_tokenizer(), _inputs()
    with masked_attention(model, (0, 2), "local", window):
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
        prompts = ["Alice Moreau was born in", "The key is 7351 and"]  # different lengths: left padding
        ours = generate(model, tok, prompts, max_new_tokens=12, progress=False)
    theirs = generate(reference, tok, prompts, max_new_tokens=12, progress=False)
    assert [o.token_ids for o in ours] == [t.token_ids for t in theirs]
    assert not torch.allclose(model(ids).logits, reference(ids).logits)


def test_teacher_forced_exact_match_is_greedy_generation():
    model, tok = tiny_qwen3(), tiny_tokenizer()
    prompts = [tok("Bruno Keller works for", add_special_tokens=False)["input_ids"],
               tok("Numbers 0 1 2 3", add_special_tokens=False)["input_ids"]]
    with masked_attention(model, (1,), "local", 3):
        outputs = generate(model, tok, prompts, max_new_tokens=4, progress=False)
        pairs = [(p, o.token_ids) for p, o in zip(prompts, outputs)]
        pairs += [(p, o.token_ids[:-1] + [(o.token_ids[-1] + 1) % 300]) for p, o in zip(prompts, outputs)]
        exact, logp = teacher_forced(model, pairs, tok.pad_token_id or 0)
    assert all(len(o.token_ids) == 4 for o in outputs)
    assert exact == [True, True, False, False] and logp[0] > logp[2]


def test_recall_probe_and_cli_end_to_end(tmp_path, capsys):
    teacher, tok = tiny_qwen3(), tiny_tokenizer()
    probe = recall_probe(teacher, tok, length=160, samples=4)
    scores = probe((0, 1, 2, 3))
    assert 0 <= scores["score"] <= 1 and scores["tiebreak"] < 0
    assert probe(()) != scores  # taking attention out changes what the model predicts
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    assert cli(["select-layers", "--teacher", str(tmp_path / "teacher"), "--budget", "2", "--beam", "2",
                "--recall-length", "160", "--recall-samples", "4", "--mask", "local", "--window", "16",
                "--baselines", "2", "--out", str(tmp_path / "sel")]) == 0
    assert "attention layers" in capsys.readouterr().out
    chosen = read_selection(tmp_path / "sel" / "selection.json")
    assert len(chosen) == 2
    assert cli(["convert", "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "student"),
                "--attention-layers", str(tmp_path / "sel" / "selection.json")]) == 0
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert [i for i, t in enumerate(config["layer_types"]) if t == "full_attention"] == chosen
    (tmp_path / "bad.json").write_text("{}")
    assert cli(["convert", "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "s2"),
                "--attention-layers", str(tmp_path / "bad.json")]) == 2


def test_kl_probe_converts_aligns_and_scores(tmp_path):
    from gendistill.select_layers import kl_probe

    data = BUNDLED / "data" / "tiny_text.jsonl"
    teacher, tok = tiny_qwen3(), tiny_tokenizer()
    probe = kl_probe(teacher, tok, str(data), steps=2, seq_len=32, batch_size=4, cache_dir=tmp_path)
    assert probe((0, 1, 2, 3))["score"] == pytest.approx(0.0, abs=1e-6)  # nothing converted: the teacher itself
    result = select_layers(probe, 4, 1, None, beam=1, baselines=0, probe_info={"name": "kl"})
    assert len(result["attention_layers"]) == 1 and result["score"] < 0
    # --mixer: the other layers get that mixer (GLA here), so the same set scores differently than with KDA
    gla = kl_probe(teacher, tok, str(data), steps=2, seq_len=32, batch_size=4, cache_dir=tmp_path, mixer="gla")
    kda_score = probe((0,))["score"]
    assert gla((0,))["score"] < 0 and gla((0,))["score"] != pytest.approx(kda_score, rel=1e-3)
    with pytest.raises(UserError, match="mixer"):
        kl_probe(teacher, tok, str(data), mixer="lstm")


def test_bad_search_arguments():
    with pytest.raises(UserError, match="budget"):
        beam_search(lambda k: {"score": 0.0}, 4, 5)
    with pytest.raises(UserError, match="mask"):
        with masked_attention(tiny_qwen3(), (0,), "nope"):
            pass
