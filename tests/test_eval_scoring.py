"""Log-likelihood scoring equals a hand computation; length normalisation as lm-eval; item records."""
import pytest
import torch

from gendistill.convert import convert
from gendistill.evaluation.engine import Sampling, encode
from gendistill.evaluation.scoring import decode_modes, loglikelihoods, mc_predictions, score_task, split_pair
from gendistill.evaluation.tasks import Task
from gendistill.testing import tiny_qwen3, tiny_tokenizer


PAIRS = [("Question: where was Alice born? Answer:", " Lyon"), ("Alice Moreau was born on", " 3 May 1971"),
         ("Numbers 0 1 2 3 4", " 5"), ("The quick brown fox jumps over the lazy dog while the key is ", "7351."),
         ("A", " B C D")]


@pytest.mark.parametrize("kind", ["qwen3", "hybrid_kda"])
def test_loglikelihood_equals_hand_computation(kind):
    teacher = tiny_qwen3(seed=2)
    model = teacher if kind == "qwen3" else convert(teacher).eval()
    tok = tiny_tokenizer()
    ours = loglikelihoods(model, tok, PAIRS, batch_size=3, progress=False)  # mixed lengths: padded batches
    for (context, continuation), value in zip(PAIRS, ours):
        context_ids = encode(tok, context.rstrip(" "))
        whole = encode(tok, context + continuation)
        assert whole[: len(context_ids)] == context_ids
        with torch.no_grad():
            logprobs = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
        hand = sum(logprobs[t - 1, whole[t]].item() for t in range(len(context_ids), len(whole)))
        assert value == pytest.approx(hand, abs=1e-4)
        assert value < 0


def test_pair_split_moves_trailing_space_like_lm_eval():
    tok = tiny_tokenizer()
    assert split_pair(tok, "Answer: ", "B") == split_pair(tok, "Answer:", " B")
    context, continuation = split_pair(tok, "Answer:", " Lyon")
    assert tok.decode(continuation) == " Lyon" and tok.decode(context) == "Answer:"


def test_length_normalisation_as_lm_eval():
    # lm-eval: acc_norm = argmax(ll / len(choice)) in characters; acc_bytes divides by UTF-8 bytes.
    assert mc_predictions([-4.0, -6.0, -9.0], ["ab", "abcdef", "abcdefghijk"]) == {
        "ll_pred": 0, "ll_pred_norm": 2, "ll_pred_bytes": 2}
    # non-ASCII: "éé" is 2 characters but 4 bytes, so the two normalisations disagree
    assert mc_predictions([-3.0, -2.5], ["éé", "ab"]) == {"ll_pred": 1, "ll_pred_norm": 1, "ll_pred_bytes": 0}
    assert mc_predictions([-2.0, -2.0], ["x", "y"])["ll_pred"] == 0  # ties: the first, as np.argmax


def test_score_task_records():
    model, tok = tiny_qwen3(seed=3), tiny_tokenizer()
    items = [{"id": f"q{i}", "question": f"Where was person {i} born?", "choices": ["Lyon", "Basel", "Zurich"],
              "answer": i % 3} for i in range(5)]
    task = Task(name="geo", kind="multiple_choice", prompt="{question}\n{choices}Answer:", items=items,
                max_new_tokens=6)
    records = score_task(model, tok, task, decode_modes("both", [7], Sampling()), progress=False)
    assert [r["id"] for r in records] == [i["id"] for i in items]
    for record, item in zip(records, items):
        assert len(record["ll"]) == 3 and record["ll_pred"] == max(range(3), key=lambda i: record["ll"][i])
        assert set(record["gen"]) == {"greedy", "seed7"}
        for label, gen in record["gen"].items():
            assert gen["correct"] == (gen["extracted"] == item["answer"])
            assert gen["n_tokens"] <= 6 and ("tokens" in gen) == (label == "greedy")
