"""PEFT with the transformers integration (fusedce.integrations.transformers).

``apply()`` before or after ``get_peft_model`` gives the loss and gradients of the unpatched
PEFT model: LoRA on the attention projections, LoRA on the LM head (with and without
dropout: the head ``base(x) + s * B(A(dropout(x)))`` is fused as one linear map of
``[x, s * A(dropout(x))]`` through ``[W, B]``), and the head in ``modules_to_save``.
Skipped when transformers or peft is not installed.
"""

from __future__ import annotations

import copy

import os

import pytest
import torch

# no kernel downloads from the Hub (a machine without network waits for each attempt)
os.environ.setdefault("USE_HUB_KERNELS", "NO")

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from fusedce.integrations import transformers as fhf  # noqa: E402
from oracle import assert_close_normwise  # noqa: E402

V = 97

CASES = {
    "lora-attention": dict(target_modules=["q_proj", "v_proj"]),
    "lora-head": dict(target_modules=["q_proj", "lm_head"]),
    "lora-head-dropout": dict(target_modules=["v_proj", "lm_head"], lora_dropout=0.3),
    "modules-to-save": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
}


def _tiny(tied=False):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8,
                                   tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.6)
    return model


def _peft(model, case):
    lora = peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **CASES[case])
    torch.manual_seed(1)
    pm = peft.get_peft_model(model, lora)
    with torch.no_grad():  # B starts at zero: make the adapters do something
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    return pm


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (2, 9), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


def _step(model, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout masks in both runs
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return out, grads


def _check(ref_model, model, what):
    ids, labels = _batch()
    if not any(p.requires_grad for p in model.parameters()):
        with torch.no_grad():  # everything frozen (adapters off): the loss alone
            torch.manual_seed(7)
            ref = ref_model(input_ids=ids, labels=labels)
            torch.manual_seed(7)
            out = model(input_ids=ids, labels=labels)
        assert out.logits is None, what
        assert_close_normwise(out.loss, ref.loss, 1e-5, f"{what} loss")
        return
    for kw in (dict(), dict(num_items_in_batch=torch.tensor(9))):
        ref, g_ref = _step(ref_model, ids, labels, **kw)
        out, g = _step(model, ids, labels, **kw)
        assert out.logits is None, what
        assert_close_normwise(out.loss.detach(), ref.loss.detach(), 1e-5, f"{what} loss")
        assert g.keys() == g_ref.keys() and g, what
        for name in g_ref:
            assert_close_normwise(g[name], g_ref[name], 1e-4, f"{what} grad {name}")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("order", ["after", "before"])
def test_peft_matches_unpatched(case, order):
    base = _tiny()
    ref_model = _peft(copy.deepcopy(base), case).train()
    if order == "after":
        model = fhf.apply(_peft(copy.deepcopy(base), case)).train()
    else:
        model = _peft(fhf.apply(copy.deepcopy(base)), case).train()
    assert fhf.is_applied(model)
    _check(ref_model, model, f"{case} {order}")
    # the adapter switched off: the base head alone
    with model.disable_adapter(), ref_model.disable_adapter():
        _check(ref_model, model, f"{case} {order} adapters off")
    fhf.revert(model)
    assert not fhf.is_applied(model)
    ids, labels = _batch()
    assert model(input_ids=ids, labels=labels).logits is not None


def test_peft_verify_and_describe():
    model = fhf.apply(_peft(_tiny(), "lora-head"), verify=True)
    assert "lm_head" in fhf.describe(model)


def test_peft_tied_embeddings_modules_to_save():
    base = _tiny(tied=True)
    ref_model = _peft(copy.deepcopy(base), "modules-to-save").train()
    model = fhf.apply(_peft(copy.deepcopy(base), "modules-to-save")).train()
    _check(ref_model, model, "tied modules_to_save")


def test_peft_unsupported_head_is_refused():
    """A LoRA variant (DoRA) on the head cannot be written as one linear map: refused at
    apply(), or, when the adapter comes after apply(), the original forward runs."""
    lora = peft.LoraConfig(r=4, target_modules=["lm_head"], use_dora=True)
    pm = peft.get_peft_model(_tiny(), lora)
    with pytest.raises(fhf.UnsupportedModel, match="DoRA"):
        fhf.apply(pm)
    pm2 = peft.get_peft_model(fhf.apply(_tiny()), lora).train()
    ids, labels = _batch()
    assert pm2(input_ids=ids, labels=labels).logits is not None
