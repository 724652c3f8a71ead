"""The batched engine is exact: left-padded batches give the one-by-one greedy outputs (ours and transformers'),
for Qwen3 and for its Hybrid-KDA student; stops per row; sampling is reproducible per seed."""
import pytest
import torch

from gendistill.convert import convert
from gendistill.evaluation.engine import Sampling, encode, generate
from gendistill.testing import tiny_qwen3, tiny_tokenizer

PROMPTS = [
    "Alice Moreau was born on", "Question: where was Alice born? Answer:", "Numbers 0 1 2 3",
    "The quick brown fox jumps over the lazy dog while the key is", "Bruno Keller works for Helix Labs in Zurich. He",
    "A B C D", "The answer is (B). Question: where was Bruno born? Answer: Basel. Question: and Alice?", "Lyon",
]


@pytest.fixture(scope="module")
def models():
    teacher = tiny_qwen3(seed=1)
    return {"qwen3": teacher, "hybrid_kda": convert(teacher).eval()}


@pytest.mark.parametrize("name", ["qwen3", "hybrid_kda"])
def test_batched_equals_one_by_one(models, name):
    model, tok = models[name], tiny_tokenizer()
    batched = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=4, progress=False)
    alone = [generate(model, tok, [p], max_new_tokens=12, progress=False)[0] for p in PROMPTS]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert len({tuple(g.token_ids) for g in batched}) >= 6  # outputs differ by prompt, so equality means something
    for prompt, ours in zip(PROMPTS, batched):  # and transformers' own generate agrees
        ids = torch.tensor([encode(tok, prompt)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        assert ours.token_ids == (out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out)
        assert ours.text == tok.decode(ours.token_ids, skip_special_tokens=True)


def test_stops_per_row(models):
    model, tok = models["qwen3"], tiny_tokenizer()
    free = generate(model, tok, PROMPTS[:3], max_new_tokens=10, progress=False)
    assert not any(g.stopped for g in free) and all(len(g.token_ids) == 10 for g in free)
    # a stop string taken from the middle of row 0's output ends row 0 there, and only row 0
    stop = tok.decode(free[0].token_ids[4:6])
    cut = generate(model, tok, PROMPTS[:3], max_new_tokens=10, stop=[stop], progress=False)
    assert cut[0].stopped and stop not in cut[0].text and free[0].text.startswith(cut[0].text)
    assert free[0].text.find(stop) == len(cut[0].text)
    for g, f in zip(cut[1:], free[1:]):
        assert g.token_ids == f.token_ids or (g.stopped and stop not in g.text)
    # EOS: make row 1's 4th token the end of sequence; it ends there, excluded from the output
    eos = free[1].token_ids[3]
    if eos in free[1].token_ids[:3]:
        pytest.fail("pick another row: the chosen token appears earlier")
    model.generation_config.eos_token_id = eos
    try:
        ended = generate(model, tok, PROMPTS[:3], max_new_tokens=10, progress=False)
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id
    assert ended[1].stopped and ended[1].token_ids == free[1].token_ids[:3]


def test_sampling_reproducible_per_seed(models, capsys):
    model, tok = models["hybrid_kda"], tiny_tokenizer()
    sampling = Sampling(temperature=1.0, top_p=0.95, top_k=50)

    def run(seed, batch_size):
        return [g.token_ids for g in generate(model, tok, PROMPTS, max_new_tokens=8, sampling=sampling, seed=seed,
                                              batch_size=batch_size, progress=batch_size == 8)]

    first = run(1, 8)
    assert "item" in capsys.readouterr().err  # the progress bar counts items
    assert run(1, 8) == first
    assert run(1, 3) == first  # each row has its own generator: batching does not change a sample
    assert run(2, 8) != first
    greedy = [g.token_ids for g in generate(model, tok, PROMPTS, max_new_tokens=8, progress=False)]
    assert greedy != first
    top1 = generate(model, tok, PROMPTS, max_new_tokens=8, sampling=Sampling(1.0, 1.0, 1), seed=5, progress=False)
    assert [g.token_ids for g in top1] == greedy  # top_k=1 sampling is greedy: the warpers are wired in
