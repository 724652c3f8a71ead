"""One model loader: `gendistill.loading.load_model` reads every checkpoint (the trainer's `path:` specs, the eval
runner, convert), so a bad reference gives one message naming the path and the role."""
import pytest
import torch

from gendistill import loading
from gendistill.convert import convert
from gendistill.io import UserError
from gendistill.testing import tiny_qwen3, tiny_tokenizer


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("loading") / "student"
    convert(tiny_qwen3(layers=2), attention_layers=[0]).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_load_model_dtype_device_eval_mode(student_dir):
    model = loading.load_model(student_dir, dtype="bfloat16", device="cpu")
    assert type(model).__name__ == "HybridKDAForCausalLM" and not model.training
    kept_fp32 = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    assert kept_fp32 and all(n.endswith(("A_log", "dt_bias")) for n in kept_fp32)  # the KDA gate stays fp32
    assert loading.load_model(student_dir, dtype="float32").model.embed_tokens.weight.dtype == torch.float32


def test_bad_references_name_the_role(tmp_path, student_dir):
    with pytest.raises(UserError, match=r"could not load teacher .*/missing: no such directory"):
        loading.load_model(tmp_path / "missing", role="teacher")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"^student .*/empty is not a model directory \(no config.json\)"):
        loading.load_model(tmp_path / "empty", role="student")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no_such_architecture"}')
    with pytest.raises(UserError, match=r"could not load the teacher from .*broken"):
        loading.load_model(broken, role="teacher")
    with pytest.raises(UserError, match="unknown dtype 'fp8'"):
        loading.load_model(student_dir, dtype="fp8")


def test_trainer_and_eval_runner_load_through_it(student_dir, monkeypatch):
    from gendistill.distill.trainer import load_model as from_spec
    from gendistill.evaluation.runner import load_model as for_eval

    calls = []
    real = loading.load_model

    def spy(path, **kwargs):
        calls.append((str(path), kwargs.get("role"), kwargs.get("dtype")))
        return real(path, **kwargs)

    monkeypatch.setattr(loading, "load_model", spy)
    from_spec({"path": str(student_dir), "dtype": "float32"}, role="teacher")
    model, tokenizer = for_eval(student_dir, "cpu", "bfloat16", role="student")
    assert calls == [(str(student_dir), "teacher", "float32"), (str(student_dir), "student", "bfloat16")]
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and len(tokenizer) == len(tiny_tokenizer())
    with pytest.raises(UserError, match="could not load student .*nowhere: no such directory"):
        from_spec({"path": str(student_dir.parent / "nowhere")}, role="student")
