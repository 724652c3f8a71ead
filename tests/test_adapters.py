"""Adapters and weight edits take effect: PEFT's LoRA on every KDA projection changes the student's logits exactly
as the unmerged math says, merge_and_unload() keeps them, and the adapter round-trips through save/load. (In-place
weight edits and load_state_dict after a forward: tests/test_model.py::test_weight_edits_between_forwards_take_effect.)
"""
import copy

import pytest
import torch
from torch import nn

from gendistill import convert
from gendistill.modeling_hybrid_kda import KDAMixer
from gendistill.testing import tiny_qwen3

peft = pytest.importorskip("peft")  # pinned in requirements.txt: CI always runs these

KDA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "f_a_proj", "g_a_proj", "b_proj", "f_b_proj", "g_b_proj", "o_proj"]


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    model = convert(tiny_qwen3(layers=3), attention_layers=[0]).float().eval()
    with torch.no_grad():  # a gate that depends on its input (convert starts g_b at zero: the gate would be constant)
        for m in model.modules():
            if isinstance(m, KDAMixer):
                m.g_b_proj.weight.normal_(0, 0.1)
    return model


def ids(B=2, T=13):
    return torch.randint(3, 384, (B, T), generator=torch.Generator().manual_seed(1))


def lora(model):
    """LoRA on every KDA projection (layers 1 and 2), with B initialised at random (not zero) so it changes
    the output from the start."""
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                             target_modules=rf"model\.layers\.[12]\.self_attn\.({'|'.join(KDA_PROJECTIONS)})")
    torch.manual_seed(3)
    return peft.get_peft_model(copy.deepcopy(model), config).eval()


def merged_by_hand(base, adapted):
    """A copy of `base` whose adapted linears hold W + scaling * B @ A: what the LoRA branch adds, as one weight."""
    expected = copy.deepcopy(base)
    modules = dict(expected.named_modules())
    done = []
    for name, module in adapted.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and isinstance(module, nn.Module) and hasattr(module, "lora_A"):
            target = modules[name.removeprefix("base_model.model.")]
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
            with torch.no_grad():
                target.weight += module.scaling["default"] * (B @ A)
            done.append(name.rsplit(".", 1)[-1])
    return expected, done


@torch.no_grad()
def test_lora_on_every_kda_projection_changes_logits_as_the_unmerged_math(student):
    x, mask = ids(), torch.ones(2, 13, dtype=torch.long)
    mask[1, :4] = 0  # a left-padded row: the padded path too
    adapted = lora(student)
    expected, done = merged_by_hand(student, adapted)
    assert sorted(done) == sorted(KDA_PROJECTIONS * 2)  # two KDA layers, every projection adapted
    base_logits = student(x, attention_mask=mask).logits
    got = adapted(input_ids=x, attention_mask=mask).logits
    assert (got - base_logits).abs().max() > 1e-2  # the adapters take effect
    torch.testing.assert_close(got, expected(x, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
    # cached prefill + decode steps through the adapted layers
    cache_out = adapted.generate(x[:1], max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(cache_out, expected.generate(x[:1], max_new_tokens=4, do_sample=False))


@torch.no_grad()
def test_merge_and_unload_keeps_the_adapted_logits(student, tmp_path):
    x = ids()
    adapted = lora(student)
    want = adapted(input_ids=x).logits
    adapted.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(student), tmp_path / "adapter").eval()
    torch.testing.assert_close(reloaded(input_ids=x).logits, want, atol=1e-6, rtol=0)
    merged = adapted.merge_and_unload()
    assert all(type(m.q_proj) is nn.Linear for m in merged.modules() if isinstance(m, KDAMixer))
    torch.testing.assert_close(merged(x).logits, want, atol=1e-5, rtol=1e-5)


def test_lora_trains_the_adapter_only(student):
    """Gradients reach the LoRA weights of the KDA projections (the branch is on the graph) and one step moves the
    logits."""
    adapted = lora(student).train()
    x = ids()
    loss = adapted(input_ids=x, labels=x).loss
    loss.backward()
    grads = {n: p.grad for n, p in adapted.named_parameters() if p.requires_grad}
    assert grads and all(".lora_" in n for n in grads)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "f_a_proj" in n or "b_proj" in n)
