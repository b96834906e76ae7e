"""Hugging Face transformers integration (fusedce.integrations.transformers).

Tiny randomly initialised models on the CPU (no downloads). A model patched with ``apply``
must give, when training with labels, the loss and parameter gradients of the unpatched
model

    loss = sum_{b, s: y[b, s+1] != -100} CE(z(W h[b, s]), y[b, s+1]) / N (+ router aux),
    z = softcap / scale the forward applies, N = num_items_in_batch or the counted positions,

without the LM head computing logits (``logits`` is None), and must leave inference (no
labels) and generation unchanged. Families whose forward fusedce cannot prove equivalent
are refused at apply() with the reason. Every family of the installed transformers is
covered in test_hf_families.py; PEFT in test_hf_peft.py; the Trainer in
test_hf_trainer.py. Skipped when transformers is not installed.
"""

from __future__ import annotations

import copy
import inspect
import logging

import os

import pytest
import torch

# no kernel downloads from the Hub (a machine without network waits for each attempt)
os.environ.setdefault("USE_HUB_KERNELS", "NO")

transformers = pytest.importorskip("transformers")

import fusedce as fce  # noqa: E402
from fusedce.integrations import transformers as fhf  # noqa: E402
from oracle import assert_close_normwise, ref_cross_entropy  # noqa: E402

V = 97  # odd vocabulary

COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=64)

KINDS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(final_logit_softcapping=2.0)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.5)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=4.0)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                     router_aux_loss_coef=0.1)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       output_router_logits=True, router_aux_loss_coef=0.1,
                       decoder_sparse_step=1)),
}


# transformers before 4.50 computes many families' losses inline (CrossEntropyLoss on the
# logits), which fusedce refuses; those versions fuse fewer families
OLD = tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (4, 50)


def _tiny(kind: str, dtype=torch.float32, **extra):
    cfg_name, model_name, special = KINDS[kind]
    if not hasattr(transformers, cfg_name):
        pytest.skip(f"transformers {transformers.__version__} has no {cfg_name}")
    cfg = getattr(transformers, cfg_name)(**COMMON, **{**special, **extra})
    model = getattr(transformers, model_name)(cfg)
    with torch.no_grad():
        # logits of a few units, so that softcaps and scales are far from trivial
        model.lm_head.weight.normal_(0.0, 0.6)
    return model.to(dtype)


def _apply(model, **kw):
    """apply(), skipping where an old transformers computes the loss inline."""
    try:
        return fhf.apply(model, **kw)
    except fhf.UnsupportedModel as exc:
        if OLD and "another way" in str(exc):
            pytest.skip(f"transformers {transformers.__version__}: {exc}")
        raise


def _batch(B=2, S=9):
    ids = torch.randint(0, V, (B, S))
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that is not trained on
    labels[1, -2:] = -100  # padding
    return ids, labels


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def _head_widths(model):
    widths = []
    handle = model.lm_head.register_forward_hook(lambda m, a, o: widths.append(o.shape[-1]))
    return widths, handle


@pytest.mark.parametrize("kind", list(KINDS))
def test_fused_training_matches_unpatched(kind):
    ref_model = _tiny(kind)
    model = _apply(copy.deepcopy(ref_model))
    assert fhf.is_applied(model)
    ref_model.train()
    model.train()
    ids, labels = _batch()
    widths, handle = _head_widths(model)
    for kw in (dict(), dict(num_items_in_batch=torch.tensor(11))):
        ref_model.zero_grad()
        model.zero_grad()
        ref = ref_model(input_ids=ids, labels=labels, **kw)
        out = model(input_ids=ids, labels=labels, **kw)
        assert out.logits is None, "the fused path must not return logits"
        assert out.loss.dtype == torch.float32 and out.loss.shape == ()
        assert_close_normwise(out.loss.detach(), ref.loss.detach(), 1e-5, f"{kind} loss {kw}")
        if "aux_loss" in ref:
            assert_close_normwise(out.aux_loss.detach(), ref.aux_loss.detach(), 1e-6, "aux")
        ref.loss.backward()
        out.loss.backward()
        g_ref, g = _grads(ref_model), _grads(model)
        assert g.keys() == g_ref.keys()
        for name in g_ref:
            assert_close_normwise(g[name], g_ref[name], 1e-4, f"{kind} grad {name}")
    assert widths and V not in widths, "the LM head computed logits"
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


@pytest.mark.parametrize("kind,field,plain", [("gemma2", "final_logit_softcapping", None),
                                              ("cohere", "logit_scale", 1.0),
                                              ("granite", "logits_scaling", 1.0)])
def test_logit_transform_is_applied(kind, field, plain):
    """Without the family's transform the fused loss would differ (the comparisons above
    are not vacuous), and a config changed after apply() is followed."""
    model = _tiny(kind).train()
    ids, labels = _batch()
    fused = _apply(copy.deepcopy(model))
    with torch.no_grad():
        ref = model(input_ids=ids, labels=labels).loss
        out = fused(input_ids=ids, labels=labels).loss
        assert abs(out.item() - ref.item()) < 1e-5 * abs(ref.item())
        setattr(model.config, field, plain)
        setattr(fused.config, field, plain)
        if kind == "cohere":  # Cohere copies the scale into the module at init
            model.logit_scale = fused.logit_scale = plain
        ref2 = model(input_ids=ids, labels=labels).loss
        out2 = fused(input_ids=ids, labels=labels).loss
    assert abs(out2.item() - ref2.item()) < 1e-5 * abs(ref2.item())
    assert abs(ref2.item() - ref.item()) > 1e-2


def test_router_aux_loss_is_added():
    """Mixtral with output_router_logits: the loss is the CE plus coef * aux, as the
    original forward adds it."""
    model = _apply(_tiny("mixtral")).train()
    ids, labels = _batch()
    out = model(input_ids=ids, labels=labels)
    with torch.no_grad():
        plain = fhf.revert(copy.deepcopy(model))
        plain.config.output_router_logits = False
        ce = plain(input_ids=ids, labels=labels).loss
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    assert_close_normwise(out.loss.detach(), ce + 0.1 * out.aux_loss.detach(), 1e-5, "aux")


def test_vision_language_model_with_images():
    """LLaVA with images: the fused loss of the language head, and gradients down to the
    vision tower, equal the unpatched model's."""
    if not hasattr(transformers, "LlavaForConditionalGeneration"):
        pytest.skip("no LLaVA in this transformers")
    text = transformers.LlamaConfig(**COMMON)
    vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           image_size=16, patch_size=8, projection_dim=16)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text,
                                   image_token_index=V - 1, vision_feature_layer=-1)
    ref_model = transformers.LlavaForConditionalGeneration(cfg).train()
    model = _apply(copy.deepcopy(ref_model))
    ids = torch.randint(0, V - 1, (2, 10))
    ids[:, 1:5] = V - 1  # 4 image tokens: (16 / 8)^2 patches
    labels = ids.clone()
    labels[:, :5] = -100
    pixels = torch.randn(2, 3, 16, 16)
    ref = ref_model(input_ids=ids, pixel_values=pixels, labels=labels)
    out = model(input_ids=ids, pixel_values=pixels, labels=labels)
    assert out.logits is None
    assert_close_normwise(out.loss.detach(), ref.loss.detach(), 1e-5, "llava loss")
    ref.loss.backward()
    out.loss.backward()
    g_ref, g = _grads(ref_model), _grads(model)
    assert g.keys() == g_ref.keys() and any("vision_tower" in n for n in g)
    for name in g_ref:
        assert_close_normwise(g[name], g_ref[name], 1e-4, f"llava grad {name}")


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
        assert isinstance(tup, tuple) and tup[0].shape == ()
        assert_close_normwise(tup[0], ref.loss, 1e-5, "tuple loss")
        ref_tup = ref_model(input_ids=ids, labels=labels, return_dict=False)
        assert len(tup) == len(ref_tup) - 1  # everything but the logits
        shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        shift[0, 4] = -100  # differs from labels: the loss must follow shift_labels
        sl = model(input_ids=ids, labels=labels, shift_labels=shift, skip_logits=True)
        sl_ref = ref_model(input_ids=ids, labels=labels, shift_labels=shift)
        assert_close_normwise(sl.loss, sl_ref.loss, 1e-5, "shift_labels")
        from transformers.loss.loss_utils import ForCausalLMLoss

        if "shift_labels" in inspect.signature(ForCausalLMLoss).parameters:
            assert abs(sl.loss.item() - ref.loss.item()) > 1e-6
        # ignore_index through the loss kwargs
        seven = torch.where(labels == -100, 7, labels)
        ii = model(input_ids=ids, labels=seven, ignore_index=7, skip_logits=True)
        ii_ref = ref_model(input_ids=ids, labels=seven, ignore_index=7)
        assert_close_normwise(ii.loss, ii_ref.loss, 1e-5, "ignore_index")
        # hidden states, attentions and the cache are returned as asked
        hs = model(input_ids=ids, labels=labels, skip_logits=True, output_hidden_states=True,
                   use_cache=True)
        hs_ref = ref_model(input_ids=ids, labels=labels, output_hidden_states=True,
                           use_cache=True)
        assert len(hs.hidden_states) == len(hs_ref.hidden_states)
        for a, b in zip(hs.hidden_states, hs_ref.hidden_states):
            assert torch.equal(a, b)
        cache = getattr(hs, "past_key_values", None) or hs.get("cache")
        assert cache is not None
        length = cache.get_seq_length() if hasattr(cache, "get_seq_length") else \
            cache[0][0].shape[-2]  # a tuple cache of old transformers
        assert length == ids.shape[1]
    model.train()
    kept = model(input_ids=ids, labels=labels, skip_logits=False)
    assert kept.logits is not None
    assert_close_normwise(kept.loss.detach(), ref.loss, 1e-5, "skip_logits=False")
    # logits_to_keep other than 0 falls back to the original forward
    params = inspect.signature(type(model).forward).parameters
    keep = "logits_to_keep" if "logits_to_keep" in params else "num_logits_to_keep"
    last = model(input_ids=ids, **{keep: 1})
    assert last.logits.shape == (2, 1, V)
    # generation goes through the original forward
    with torch.no_grad():
        model.eval()
        ref_model.eval()
        a = model.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
        b = ref_model.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
    assert torch.equal(a, b)


def test_reduction_none_per_token_losses():
    """reduction="none": outputs.loss is the per-position loss [B, S] (position s scored
    against label s + 1; 0 where ignored and at the last position), without the router
    auxiliary loss, and its gradient is that of any weighting of it."""
    ref_model = _tiny("mixtral")
    model = _apply(copy.deepcopy(ref_model), reduction="none")
    ids, labels = _batch()
    w = torch.rand(ids.shape)
    for train in (True, False):  # "none" takes the fused path in eval mode too
        ref_model.train(train)
        model.train(train)
        ref_model.zero_grad()
        model.zero_grad()
        ref = ref_model(input_ids=ids, labels=labels)
        shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        ref_tok = torch.nn.functional.cross_entropy(
            ref.logits.float().flatten(0, 1), shift.flatten(), reduction="none").view(ids.shape)
        out = model(input_ids=ids, labels=labels)
        assert out.logits is None and out.loss.shape == ids.shape
        assert out.aux_loss is not None
        assert_close_normwise(out.loss.detach(), ref_tok.detach(), 1e-5, "per-token")
        assert torch.all(out.loss[shift == -100] == 0)
        (ref_tok * w).sum().backward()
        (out.loss * w).sum().backward()
        g_ref, g = _grads(ref_model), _grads(model)
        for name in g_ref:
            assert_close_normwise(g[name], g_ref[name], 1e-4, f"weighted grad {name}")


def test_verify():
    model = _tiny("gemma2")
    fhf.apply(model, verify=True)
    assert fhf.is_applied(model)
    fhf.apply(model, verify=True, reduction="none")
    # a fused loss that differs is caught, and the model left unpatched
    real = fhf.linear_causal_lm_loss
    try:
        fhf.linear_causal_lm_loss = lambda *a, **k: real(*a, **k) * 1.01
        with pytest.raises(fhf.UnsupportedModel, match="verify: the fused loss differs"):
            fhf.apply(model, verify=True)
    finally:
        fhf.linear_causal_lm_loss = real
    assert not fhf.is_applied(model)


def test_transform_guard():
    """The head returns a few probe logits that go through the forward's own transform
    code; the loss hook checks they came out as the transform the fused loss used, so a
    misread layout raises instead of giving a wrong loss."""
    from fusedce.integrations import _hf_layout

    model = fhf.apply(_tiny("gemma2")).train()
    ids, labels = _batch()
    real = _hf_layout.canonical
    try:
        _hf_layout.canonical = lambda layout, m: _hf_layout.Transform(1.0, 3.0)
        with pytest.raises(RuntimeError, match="transformed its logits differently"):
            model(input_ids=ids, labels=labels)
        with pytest.raises(fhf.UnsupportedModel, match="verify: the fused forward failed"):
            fhf.apply(model, verify=True)
    finally:
        _hf_layout.canonical = real
    assert not fhf.is_applied(model)  # the failed verify left it unpatched
    assert fhf.apply(model, verify=True)(input_ids=ids, labels=labels).logits is None


def test_refused_at_apply_with_the_reason():
    # a loss function other than ForCausalLMLoss
    model = _tiny("llama")
    model.loss_function = lambda logits, labels, vocab_size, **kw: logits.sum()
    with pytest.raises(fhf.UnsupportedModel, match="loss_function"):
        fhf.apply(model)
    assert not fhf.is_applied(model)
    # a head that is not a linear layer
    model = _tiny("llama")
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, V))
    with pytest.raises(fhf.UnsupportedModel, match="not a linear layer"):
        fhf.apply(model)
    # a family whose loss is computed another way is refused by name
    with pytest.raises(fhf.UnsupportedModel, match="loss_function"):
        fhf.patch("musicgen")
    if not hasattr(transformers, "BambaConfig"):
        return
    # a configuration that sends the logits elsewhere (Bamba's z-loss over every position)
    cfg = transformers.BambaConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, mamba_n_heads=4, mamba_d_head=16,
                                   mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=8,
                                   attn_layer_indices=[0], z_loss_coefficient=1e-3)
    bamba = transformers.BambaForCausalLM(cfg)
    with pytest.raises(fhf.UnsupportedModel, match="z_loss"):
        fhf.apply(bamba)
    bamba.config.z_loss_coefficient = 0.0
    bamba.z_loss_coefficient = 0.0
    fhf.apply(bamba)
    assert "head lm_head" in fhf.describe(bamba)


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
    # a renamed model type needs no registration: the layout is read from the forward
    model.config.model_type = "tinyllama_fork"
    fhf.apply(model).train()
    ids, labels = _batch()
    assert model(input_ids=ids, labels=labels).logits is None
    with pytest.warns(DeprecationWarning):
        fhf.register("tinyllama_fork", softcap_attr=None)


def test_patch_classes():
    ids, labels = _batch()
    handle = fhf.patch("llama", "gemma2")
    try:
        assert set(handle.patched) == {"llama", "gemma2"}
        model = _tiny("llama").train()  # built after patch(): fused
        assert not fhf.is_applied(model)
        assert model(input_ids=ids, labels=labels).logits is None
        assert _tiny("qwen2").train()(input_ids=ids, labels=labels).logits is not None
        # signatures are kept, instance options override the class's
        assert "labels" in inspect.signature(model.forward).parameters
        fhf.apply(model, reduction="none")
        assert model(input_ids=ids, labels=labels).loss.shape == ids.shape
        fhf.revert(model)
        assert model(input_ids=ids, labels=labels).loss.shape == ()
    finally:
        handle.undo()
    model = _tiny("llama").train()
    assert model(input_ids=ids, labels=labels).logits is not None
    with fhf.patch(transformers.LlamaForCausalLM):
        assert model(input_ids=ids, labels=labels).logits is None
    assert model(input_ids=ids, labels=labels).logits is not None
    # every family: the refused ones are listed with the reason
    handle = fhf.patch(reduction="none")
    try:
        assert len(handle.patched) >= (10 if OLD else 60)
        assert "musicgen" in handle.refused and "loss_function" in handle.refused["musicgen"]
        assert model(input_ids=ids, labels=labels).loss.shape == ids.shape
        classes = {c for cs in handle.patched.values() for c in cs}
    finally:
        fhf.unpatch()
    assert model(input_ids=ids, labels=labels).logits is not None
    # every class is unpatched, also where a model type has two (causal LM and VLM)
    from fusedce.integrations.transformers import _class_options

    assert not any(_class_options(c) is not None for c in classes)


def test_loss_function_set_after_apply_falls_back(caplog):
    """A custom loss function set after apply() is honoured: the original forward runs
    (with a warning), never the fused loss in its place."""
    model = fhf.apply(_tiny("llama")).train()
    ids, labels = _batch()
    assert model(input_ids=ids, labels=labels).logits is None
    model.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().mean()
    with caplog.at_level(logging.WARNING, logger="fusedce.integrations.transformers"):
        out = model(input_ids=ids, labels=labels)
    assert out.logits is not None and "loss_function" in caplog.text
    assert torch.equal(out.loss, out.logits.float().mean())


def test_class_patch_instance_refusal_falls_back(caplog):
    """A class-patched model whose instance cannot be fused (a non-linear head) logs why
    and runs its original forward: never a wrong loss."""
    ids, labels = _batch()
    with fhf.patch("llama"):
        model = _tiny("llama").train()
        model.lm_head = torch.nn.Sequential(torch.nn.Linear(32, V))
        with caplog.at_level(logging.WARNING, logger="fusedce.integrations.transformers"):
            out = model(input_ids=ids, labels=labels)
        assert out.logits is not None
        assert "not a linear layer" in caplog.text


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


def test_pickle_and_replicas_of_a_patched_model():
    """The options are data in the instance: a pickled copy stays patched, and a shallow
    replica (as DataParallel makes) runs on its own parameters."""
    import pickle

    model = fhf.apply(_tiny("llama")).train()
    ids, labels = _batch()
    twin = pickle.loads(pickle.dumps(model))
    assert fhf.is_applied(twin)
    out = twin(input_ids=ids, labels=labels)
    assert out.logits is None
    assert_close_normwise(out.loss.detach(), model(input_ids=ids, labels=labels).loss.detach(),
                          1e-6, "pickled")
    replica = model._replicate_for_data_parallel()
    replica.lm_head = torch.nn.Linear(32, V, bias=False)
    got = replica(input_ids=ids, labels=labels).loss
    want = fhf.revert(copy.deepcopy(replica))(input_ids=ids, labels=labels).loss
    assert_close_normwise(got.detach(), want.detach(), 1e-5, "replica")


def test_accelerate_hooks():
    """Models with accelerate hooks (as device_map builds them) on the whole model and on
    the head: the fused path runs inside them, before or after the hooks are added."""
    hooks = pytest.importorskip("accelerate.hooks")
    ids, labels = _batch()
    ref_model = _tiny("llama").train()
    ref = ref_model(input_ids=ids, labels=labels).loss
    for order in ("hooks first", "apply first"):
        model = copy.deepcopy(ref_model)
        if order == "apply first":
            fhf.apply(model)
        calls = []
        for m in (model, model.lm_head):
            hooks.add_hook_to_module(m, hooks.AlignDevicesHook(io_same_device=True))
        model.lm_head.register_forward_pre_hook(lambda m, a: calls.append(1))
        if order == "hooks first":
            fhf.apply(model)
        out = model(input_ids=ids, labels=labels)
        assert out.logits is None and calls, order
        assert_close_normwise(out.loss.detach(), ref.detach(), 1e-5, order)
        fhf.revert(model)
        assert model(input_ids=ids, labels=labels).logits is not None


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


def test_linear_causal_lm_loss_options():
    hidden = torch.randn(2, 6, 16)
    w = torch.randn(V, 16) * 0.5
    _, labels = _batch(2, 6)
    logits = hidden @ w.T
    for scale, cap in ((1.0, None), (0.25, None), (0.5, 3.0)):
        z = logits * scale
        if cap is not None:
            z = cap * torch.tanh(z / cap)
        assert_close_normwise(fhf.linear_causal_lm_loss(hidden, w, labels, softcap=cap,
                                                        logit_scale=scale),
                              fhf.causal_lm_loss(z, labels, V), 1e-5, f"{scale} {cap}")
    tok = fhf.linear_causal_lm_loss(hidden, w, labels, reduction="none")
    assert tok.shape == labels.shape and tok[:, -1].eq(0).all()


def test_register_loss(monkeypatch):
    from transformers.loss import loss_utils

    monkeypatch.setitem(loss_utils.LOSS_MAPPING, "ForCausalLM", loss_utils.LOSS_MAPPING[
        "ForCausalLM"])
    fhf.register_loss()
    assert loss_utils.LOSS_MAPPING["ForCausalLM"] is fhf.causal_lm_loss
    model = _tiny("qwen2")
    assert model.loss_function is fhf.causal_lm_loss
    fhf.apply(model)  # causal_lm_loss is ForCausalLMLoss: accepted


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
