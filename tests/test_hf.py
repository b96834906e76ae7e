"""Hugging Face transformers integration (fusedce.integrations.transformers).

Tiny randomly initialised Llama, Qwen2, Mistral, Gemma-2 (final-logit softcap), Qwen3 and
Gemma models on the CPU (no downloads). A model patched with ``apply`` must give, when
training with labels, the loss and parameter gradients of the unpatched model

    loss = sum_{b, s: y[b, s+1] != -100} CE(softcap(W h[b, s]), y[b, s+1]) / N,
    N = num_items_in_batch or the number of counted positions,

without ever calling its LM head (the logits are never materialised; ``logits`` is None),
and must leave inference (no labels) and generation unchanged. ``causal_lm_loss`` must
equal transformers' own ``ForCausalLMLoss``. Skipped when transformers is not installed.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fusedce as fce  # noqa: E402
from fusedce.integrations import transformers as fhf  # noqa: E402
from oracle import assert_close_normwise, ref_cross_entropy  # noqa: E402

V = 97  # odd vocabulary

COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=64)


def _tiny(kind: str, dtype=torch.float32):
    extra = {}
    if kind == "gemma2":
        extra = dict(final_logit_softcapping=2.0)
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
    }[kind]
    model = model_cls(cfg_cls(**COMMON, **extra))
    with torch.no_grad():
        # logits of a few units, so that the softcap and the softmax are far from trivial
        model.lm_head.weight.normal_(0.0, 0.6)
    return model.to(dtype)


def _batch(B=2, S=9):
    ids = torch.randint(0, V, (B, S))
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that is not trained on
    labels[1, -2:] = -100  # padding
    return ids, labels


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def _count_head_calls(model):
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


ARCHS = ["llama", "qwen2", "mistral", "gemma2", "qwen3", "gemma"]


@pytest.mark.parametrize("kind", ARCHS)
def test_fused_training_matches_unpatched(kind):
    ref_model = _tiny(kind)
    model = fhf.apply(copy.deepcopy(ref_model))
    assert fhf.is_applied(model)
    ref_model.train()
    model.train()
    ids, labels = _batch()
    calls, handle = _count_head_calls(model)
    for kw in (dict(), dict(num_items_in_batch=torch.tensor(11))):
        ref_model.zero_grad()
        model.zero_grad()
        ref = ref_model(input_ids=ids, labels=labels, **kw)
        out = model(input_ids=ids, labels=labels, **kw)
        assert out.logits is None, "the fused path must not return logits"
        assert out.loss.dtype == torch.float32 and out.loss.shape == ()
        assert_close_normwise(out.loss.detach(), ref.loss.detach(), 1e-5, f"{kind} loss {kw}")
        ref.loss.backward()
        out.loss.backward()
        g_ref, g = _grads(ref_model), _grads(model)
        assert g.keys() == g_ref.keys()
        for name in g_ref:
            assert_close_normwise(g[name], g_ref[name], 1e-4, f"{kind} grad {name}")
    assert not calls, "the LM head ran: logits were materialised"
    handle.remove()

    # inference without labels is the original forward, bit for bit
    with torch.no_grad():
        ref_model.eval()
        model.eval()
        assert torch.equal(model(input_ids=ids).logits, ref_model(input_ids=ids).logits)
        ref_model.train()
        model.train()

    # one optimiser step each: same parameters afterwards, and the loss goes down
    ids, labels = _batch()
    opt_ref = torch.optim.SGD(ref_model.parameters(), lr=0.02)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    losses = []
    for m, o in ((ref_model, opt_ref), (model, opt)):
        m.zero_grad()
        before = m(input_ids=ids, labels=labels).loss
        before.backward()
        o.step()
        with torch.no_grad():
            losses.append((before.item(), m(input_ids=ids, labels=labels).loss.item()))
    for (n, p), (n2, p2) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert_close_normwise(p2.detach(), p.detach(), 1e-5, f"{kind} param {n} after a step")
    assert losses[1][1] < losses[1][0]



def test_gemma2_softcap_is_applied():
    """Without the softcap the fused loss would differ: the test above is not vacuous."""
    model = _tiny("gemma2").train()
    ids, labels = _batch()
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        plain = fhf.linear_causal_lm_loss(hidden, model.lm_head.weight, labels)
        capped = fhf.linear_causal_lm_loss(hidden, model.lm_head.weight, labels, softcap=2.0)
        ref = model(input_ids=ids, labels=labels).loss
    assert abs(capped.item() - ref.item()) < 1e-5 * abs(ref.item())
    assert abs(plain.item() - ref.item()) > 1e-2


def test_eval_with_labels_and_options():
    ref_model = _tiny("llama")
    model = fhf.apply(copy.deepcopy(ref_model))
    ids, labels = _batch()
    model.eval()
    ref_model.eval()
    with torch.no_grad():
        ref = ref_model(input_ids=ids, labels=labels)
        out = model(input_ids=ids, labels=labels)  # eval: logits kept, loss by causal_lm_loss
        assert torch.equal(out.logits, ref.logits)
        assert_close_normwise(out.loss, ref.loss, 1e-5, "eval loss")
        # per-call override, tuple output, shift_labels
        fused = model(input_ids=ids, labels=labels, skip_logits=True)
        assert fused.logits is None
        assert_close_normwise(fused.loss, ref.loss, 1e-5, "skip_logits=True")
        tup = model(input_ids=ids, labels=labels, skip_logits=True, return_dict=False)
        assert isinstance(tup, tuple)
        assert_close_normwise(tup[0], ref.loss, 1e-5, "tuple loss")
        shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        sl = model(input_ids=ids, shift_labels=shift, skip_logits=True)
        assert_close_normwise(sl.loss, ref.loss, 1e-5, "shift_labels")
    model.train()
    kept = model(input_ids=ids, labels=labels, skip_logits=False)
    assert kept.logits is not None
    assert_close_normwise(kept.loss.detach(), ref.loss, 1e-5, "skip_logits=False")
    # logits_to_keep other than 0 falls back to the original forward
    last = model(input_ids=ids, labels=labels[:, -1:], logits_to_keep=1)
    assert last.logits.shape == (2, 1, V)
    # generation goes through the original forward
    with torch.no_grad():
        model.eval()
        ref_model.eval()
        a = model.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
        b = ref_model.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
    assert torch.equal(a, b)


def test_apply_revert_register_and_signature():
    model = _tiny("llama")
    original_params = list(inspect.signature(model.forward).parameters)
    fhf.apply(model)
    # trainers read the forward's signature to pick dataset columns and loss kwargs
    assert list(inspect.signature(model.forward).parameters) == original_params
    assert model.loss_function is fhf.causal_lm_loss
    fhf.apply(model)  # applying twice is harmless
    fhf.revert(model)
    assert not fhf.is_applied(model)
    assert "forward" not in model.__dict__
    assert model.loss_function is not fhf.causal_lm_loss
    # only the loss function
    fhf.apply(model, fused=False)
    assert "forward" not in model.__dict__ and model.loss_function is fhf.causal_lm_loss
    fhf.revert(model)
    # an unknown architecture is refused until registered
    model.config.model_type = "tinyllama_fork"
    with pytest.raises(ValueError, match="register"):
        fhf.apply(model)
    try:
        fhf.register("tinyllama_fork", softcap_attr=None)
        fhf.apply(model).train()
        ids, labels = _batch()
        assert model(input_ids=ids, labels=labels).logits is None
    finally:
        fhf.ARCHITECTURES.pop("tinyllama_fork", None)


def test_deepcopy_of_patched_model_uses_its_own_weights():
    """A deep copy of a patched model (a reference / EMA model) runs on its own weights in
    every path (fused training loss, eval, inference), and revert() on it restores the class
    forward."""
    model = fhf.apply(_tiny("llama"))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.normal_(0.0, 0.6)
    ids, labels = _batch()
    plain = copy.deepcopy(twin)
    fhf.revert(plain)
    assert "forward" not in plain.__dict__ and not fhf.is_applied(plain)
    for train in (False, True):
        for m in (model, twin, plain):
            m.train(train)
        with torch.no_grad():
            if not train:
                got = twin(input_ids=ids).logits
                assert torch.equal(got, plain(input_ids=ids).logits)
                assert not torch.equal(got, model(input_ids=ids).logits)
            lt = twin(input_ids=ids, labels=labels).loss
            lp = plain(input_ids=ids, labels=labels).loss
            lm = model(input_ids=ids, labels=labels).loss
        torch.testing.assert_close(lt, lp, rtol=2e-5, atol=2e-6)
        assert not torch.isclose(lt, lm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_lm_loss_matches_transformers(dtype):
    from transformers.loss.loss_utils import ForCausalLMLoss

    B, S = 3, 8
    logits = (torch.randn(B, S, V) * 3).to(dtype).requires_grad_(True)
    _, labels = _batch(B, S)
    labels7 = torch.where(labels == -100, 7, labels)
    for kw in (dict(), dict(num_items_in_batch=5), dict(num_items_in_batch=torch.tensor(5)),
               dict(ignore_index=7)):
        y = labels7 if "ignore_index" in kw else labels
        logits.grad = None
        ours = fhf.causal_lm_loss(logits, y, V, **kw)
        lr = logits.detach().clone().requires_grad_(True)
        ref = ForCausalLMLoss(lr, y, V, **kw)
        assert ours.dtype == torch.float32
        rtol = 1e-5 if dtype == torch.float32 else 2e-2
        assert_close_normwise(ours.detach(), ref.detach(), rtol, f"loss {kw}")
        ours.backward()
        ref.backward()
        assert logits.grad.dtype == dtype
        assert_close_normwise(logits.grad, lr.grad, rtol, f"grad {kw}")
    # and against the fp64 oracle on the shifted targets
    shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    assert_close_normwise(fhf.causal_lm_loss(logits.detach(), None, V, shift_labels=shift),
                          ref_cross_entropy(logits.detach(), shift), 2e-5 if dtype ==
                          torch.float32 else 2e-2, "oracle")


def test_register_loss(monkeypatch):
    from transformers.loss import loss_utils

    monkeypatch.setitem(loss_utils.LOSS_MAPPING, "ForCausalLM", loss_utils.LOSS_MAPPING[
        "ForCausalLM"])
    fhf.register_loss()
    assert loss_utils.LOSS_MAPPING["ForCausalLM"] is fhf.causal_lm_loss
    model = _tiny("qwen2")
    assert model.loss_function is fhf.causal_lm_loss


def test_bf16_model():
    ref_model = _tiny("llama", torch.bfloat16)
    model = fhf.apply(copy.deepcopy(ref_model)).train()
    ref_model.train()
    ids, labels = _batch()
    ref = ref_model(input_ids=ids, labels=labels)
    out = model(input_ids=ids, labels=labels)
    assert_close_normwise(out.loss.detach(), ref.loss.detach(), 2e-2, "bf16 loss")
    ref.loss.backward()
    out.loss.backward()
    for (n, p), (_, p2) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert p2.grad.dtype == torch.bfloat16
        assert_close_normwise(p2.grad, p.grad, 5e-2, f"bf16 grad {n}")


def test_linear_cross_entropy_is_the_real_one():
    """The integration calls the core's fused linear CE (no stand-in)."""
    from fusedce import linear

    assert fce.linear_cross_entropy is linear.linear_cross_entropy
