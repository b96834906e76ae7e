"""Every causal-LM and image-text-to-text family of the installed transformers, fused or
refused (fusedce.integrations.transformers).

For each model type of transformers' auto mappings (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES), a tiny random model (hidden 32, 2 layers,
vocabulary 128, softcaps, logit scales and the router auxiliary loss on) either

* is fused: after ``apply(model)`` a training forward with labels returns ``logits=None``,
  never runs the LM head's own forward, and gives the unpatched model's loss and every
  parameter gradient (fp32, normwise 1e-5 / 1e-4), with and without
  ``num_items_in_batch``, with gradient checkpointing; ``generate()`` is unchanged; or
* is refused, by ``patch(model_type)`` (what the forward's code does) or at ``apply()``
  (what the instance holds), with a reason from :data:`REFUSALS` (documented in
  docs/integrations.md).

Families the tiny builder cannot build on this machine (a missing optional package) are
skipped with the reason.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time

import pytest
import torch

# no kernel downloads from the Hub (the reference paths are what is compared, and a machine
# without network would wait for each attempt)
os.environ.setdefault("USE_HUB_KERNELS", "NO")

transformers = pytest.importorskip("transformers")

from fusedce.integrations import transformers as fhf  # noqa: E402
from oracle import assert_close_normwise  # noqa: E402

# ---------------------------------------------------------------------------- tiny configs
# the family's default config with every size shrunk (hidden 32, 2 layers, 4 heads,
# vocabulary 128, 4 experts), dropout off, and the options that change the head or the loss
# made non-trivial: final-logit softcaps, logit scales and multipliers, the router auxiliary
# loss (output_router_logits=True, coefficient 0.1)

V = 128
L = 2

# name -> value where the family's default int is larger (sizes)
SIZES = {
    "vocab_size": V, "text_vocab_size": V,
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "embed_dim": 32, "hidden_dim": 32,
    "word_embed_proj_dim": 32, "dim": 32, "model_dim": 32, "embedding_size": 32,
    "projection_dim": 32, "text_hidden_size": 32, "vision_hidden_size": 32,
    "intermediate_size": 64, "ffn_dim": 64, "n_inner": 64, "d_ff": 64, "ffn_hidden_size": 64,
    "mlp_dim": 64, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "mlp_hidden_size": 64,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "expert_intermediate_size": 32, "moe_ffn_hidden_size": 32,
    "num_hidden_layers": L, "n_layer": L, "num_layers": L, "n_layers": L, "decoder_layers": L,
    "encoder_layers": L, "num_decoder_layers": L, "text_num_hidden_layers": L,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "n_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "n_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 8, "kv_channels": 8, "attention_head_dim": 8,
    "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "qk_head_dim": 16,
    "q_lora_rank": 16, "kv_lora_rank": 16,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "n_shared_experts": 1,
    "num_shared_experts": 1, "n_group": 1, "topk_group": 1,
    "max_position_embeddings": 64, "rotary_dim": 8, "n_words": V, "emb_dim": 32,
    "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
    "expert_layer_offset": 1, "intermediate_size_mlp": 64, "out_hidden_size": 32,
    "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8, "mamba_n_groups": 1,
    "num_kv_shared_layers": 0, "attention_chunk_size": 8,
    "vocab_size_per_layer_input": V, "hidden_size_per_layer_input": 8,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
    "linear_value_head_dim": 8, "projector_input_dim": 32, "projector_output_dim": 32,
    "vision_output_dim": 32, "adapter_in_dim": 32, "text_intermediate_size": 64,
    "adapter_input_size": 32, "codebook_dim": 32, "moe_k": 2, "n_groups": 1,
}

# options that change the logits or the loss: made non-trivial
SPECIAL = {
    "final_logit_softcapping": 2.0, "logits_soft_cap": 2.0, "logit_softcapping": 2.0,
    "logit_scale": 0.5, "logits_scaling": 4.0, "lm_head_multiplier": 0.5,
    "output_multiplier": 0.5,
    "output_router_logits": True, "router_aux_loss_coef": 0.1, "aux_loss_coef": 0.1,
    # randomness in the forward (training-mode router noise) is off: two runs must agree
    "router_jitter_noise": 0.0, "input_jitter_noise": 0.0,
}


def _fields(cls):
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return None


def _per_layer(value, n: int):
    """A per-layer list (or pattern string) cut to n layers keeping every kind it has (a
    hybrid keeps one attention layer), and how many layers that takes."""
    kinds = []
    for v in value:
        if v not in kinds:
            kinds.append(v)
    n = max(n, len(kinds))
    out = kinds + [value[0]] * (n - len(kinds))
    return ("".join(out) if isinstance(value, str) else out), n


def _is_index_list(name: str, value) -> bool:
    return (isinstance(value, (list, tuple)) and value
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            and list(value) == sorted(set(value))
            and name.endswith(("_layers", "_indices", "_layer_ids", "_layer_idx")))


def _token_ids(name: str, value, remap: dict):
    """Special token ids moved into the tiny vocabulary (the top ids, in order of first
    appearance), so embeddings and padding indices stay in range."""
    def one(v):
        if isinstance(v, int) and not isinstance(v, bool) and v >= V:
            if v not in remap:
                remap[v] = V - 1 - len(remap)
            return remap[v]
        return v
    if isinstance(value, (list, tuple)):
        return [one(v) for v in value]
    return one(value)


def _is_token_field(name: str) -> bool:
    return name.endswith(("_token_id", "_token_index", "_token_ids", "_token"))


def tiny_kwargs(default, remap=None) -> dict:
    """Constructor kwargs that shrink ``default`` (a config instance)."""
    from transformers import PretrainedConfig

    remap = {} if remap is None else remap
    cls = type(default)
    names = _fields(cls) or list(default.to_dict())
    old_layers = None
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        v = getattr(default, key, None)
        if isinstance(v, int) and not isinstance(v, bool):
            old_layers = v
            break
    kw = {}
    layers = L
    index_lists = {}
    if hasattr(default, "allow_global_per_layer_attribute_access"):
        default.allow_global_per_layer_attribute_access = True
    for name in names:
        if name.startswith("_"):
            continue
        try:
            value = getattr(default, name)
        except AttributeError:
            continue
        if isinstance(value, PretrainedConfig):
            kw[name] = tiny_config(type(value), value, remap)
        elif _is_token_field(name):
            new = _token_ids(name, value, remap)
            if new != value:
                kw[name] = new
        elif name in SPECIAL:
            kw[name] = SPECIAL[name]
        elif name in SIZES and isinstance(value, int) and not isinstance(value, bool):
            if value > SIZES[name]:
                kw[name] = SIZES[name]
        elif name in ("head_dim", "num_experts_per_tok", "num_key_value_heads",
                      "moe_intermediate_size") and value is None:
            kw[name] = SIZES[name]
        elif isinstance(value, float) and ("dropout" in name or name.endswith("_pdrop")
                                           or name.endswith("drop_rate")):
            kw[name] = 0.0
        elif _is_index_list(name, value) and old_layers and old_layers > L:
            index_lists[name] = list(value)
        elif (old_layers and old_layers > L and len(value if isinstance(value, (list, tuple))
                                                    else "") == old_layers) or (
                isinstance(value, str) and "pattern" in name and old_layers
                and len(value) == old_layers):
            kw[name], n = _per_layer(value, L)
            layers = max(layers, n)
        elif name == "rope_parameters" and isinstance(value, dict) and "mrope_section" in value:
            kw[name] = dict(value)
    for name, value in index_lists.items():
        kept = [i for i in value if i < layers]
        if len(kept) == layers:  # every layer: keep the other kind in the model too
            kept = kept[:-1]
        kw[name] = kept or [layers - 1]
    if layers != L:
        for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            if key in kw:
                kw[key] = layers
        for name, value in kw.items():
            if isinstance(value, list) and old_layers and len(value) < layers and \
                    getattr(default, name, None) is not None and \
                    len(getattr(default, name)) == old_layers:
                kw[name] = value + [value[0]] * (layers - len(value))
    rope = kw.get("rope_parameters")
    if rope is not None:
        head = kw.get("head_dim", getattr(default, "head_dim", None)) or 8
        half = min(int(head), 8) // 2
        rope["mrope_section"] = [half - 2 * (half // 4), half // 4, half // 4] \
            if len(rope["mrope_section"]) == 3 else rope["mrope_section"]
    if "kv_lora_rank" in kw or getattr(default, "kv_lora_rank", None):
        # multi-head latent attention: every head has its own keys
        kw["num_key_value_heads"] = kw.get("num_attention_heads", 4)
    return kw


def tiny_config(cls, default=None, remap=None, **extra):
    default = default if default is not None else cls()
    return cls(**{**tiny_kwargs(default, remap), **extra})

# ---------------------------------------------------------------------------- the test

# the reasons a family may be refused for (regexes over the message)
REFUSALS = {
    "loss computed another way": r"does not compute the loss with self\.loss_function",
    "loss under a config branch": r"its loss is computed under the condition",
    "no labels": r"its forward takes no labels",
    "labels shifted by the forward": r"its loss call sets shift_labels=",
    "logit transform not readable": r"not a linear layer followed by|a module whose "
                                    r"transform|depends on .* not read from the config",
    "logits used beyond the loss": r"uses the logits beyond the loss",
    "head not a linear layer": r"the head .* is a .*not a linear layer|no self\.",
    "head is a linear layer with its own forward": r"a linear layer with its own forward",
    "loss is not ForCausalLMLoss": r"its loss_function is .* not transformers' "
                                   r"ForCausalLMLoss",
}


def _families():
    from transformers.models.auto import modeling_auto as auto

    out = {}
    for mapping in (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                    auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES):
        for mt, cn in mapping.items():
            out.setdefault(mt, [])
            if cn not in out[mt]:
                out[mt].append(cn)
    return [(mt, cn) for mt in sorted(out) for cn in out[mt]]


FAMILIES = _families()



def _mrope(cfg, section=(2, 1, 1)):
    text = cfg.get_text_config()
    text.rope_parameters = {**(text.rope_parameters or {}), "mrope_section": list(section)}


def _set(**values):
    def change(cfg):
        for key, value in values.items():
            target = cfg
            *path, last = key.split(".")
            for p in path:
                target = getattr(target, p)
            setattr(target, last, value)
    return change


def _mllama_text_only(cfg):
    text = cfg.get_text_config()
    text.cross_attention_layers = []  # no layer waits for image states
    if getattr(text, "rope_scaling", {}) is None:  # old transformers: no default
        text.rope_scaling = {"rope_type": "default"}


# per-family config changes the generic shrinking cannot guess: a hybrid keeps one
# attention layer, multimodal rotary sections fit the tiny head
OVERRIDES = {
    **{mt: _mrope for mt in ("qwen2_vl", "qwen2_5_vl", "qwen2_5_omni_thinker", "paddleocr_vl",
                             "glm4v", "glm46v", "glm_ocr", "glmga", "glm4v_moe")},
    "glm4v_moe": lambda cfg: _mrope(cfg, (1, 1, 0)),
    "mllama": _mllama_text_only,
    "paligemma": _set(**{"text_config.num_key_value_heads": 1}),
    "granitemoehybrid": _set(layer_types=["linear_attention", "full_attention"]),
    "recurrent_gemma": _set(block_types=["recurrent", "attention"]),
    "bamba": _set(attn_layer_indices=[1]),
    "lfm2_moe": _set(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "cohere_compass_text": _set(rope_parameters={"full_attention": {
        "rope_type": "default", "rope_theta": 10000.0}}),
    "cohere_compass": _set(**{"text_config.rope_parameters": {"full_attention": {
        "rope_type": "default", "rope_theta": 10000.0}}}),
}

# constructor arguments where the config validates them at construction
EXTRA = {
    "mamba2": dict(head_dim=16),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
    "kolibri1_1": dict(index_layers=[1]),
    "reformer": dict(is_decoder=True, axial_pos_embds_dim=[16, 16], axial_pos_shape=[4, 2],
                     attn_layers=["local", "lsh"], local_attn_chunk_length=4,
                     lsh_attn_chunk_length=4, num_buckets=2),
    "step3p7": dict(sliding_window=8),
}

# after the model is built
POST = {
    "xmod": lambda model: model.set_default_language(model.config.languages[0]),
}

# families this tiny builder cannot build (a multimodal config whose towers must agree in
# ways the generic shrinking does not know); not counted as fused or refused
UNBUILT = dict.fromkeys((
    "Apertus1p5ForConditionalGeneration", "BltForCausalLM", "DbrxForCausalLM",
    "DeepseekOcr2ForConditionalGeneration", "Dots1ForCausalLM", "Dots3NoteForCausalLM",
    "Dots3NoteForConditionalGeneration", "Emu3ForConditionalGeneration",
    "Ernie4_5_VLMoeForConditionalGeneration", "Granite4VisionForConditionalGeneration",
    "HunYuanVLForConditionalGeneration", "Kolibri1_1ForCausalLM",
    "MistralLarge4ForConditionalGeneration", "Molmo2ForConditionalGeneration",
    "Qwen4ExpForCausalLM", "Qwen4ExpForConditionalGeneration",
    "Step3p7ForConditionalGeneration", "ZambaForCausalLM"),
    "the generic tiny config does not build (a constraint between its parts that the "
    "shrinking does not know)")

RESULTS = {}  # model type / class -> ("fused" | "refused" | "skipped", detail)


def _reason_kind(message: str) -> str:
    for kind, pattern in REFUSALS.items():
        if re.search(pattern, message):
            return kind
    raise AssertionError(f"refused for an undocumented reason: {message}")


def _avoid_ids(config) -> set:
    ids = set()
    seen = set()

    def walk(cfg):
        if cfg is None or id(cfg) in seen:
            return
        seen.add(id(cfg))
        for key, value in vars(cfg).items():
            if key.endswith(("_token_id", "_token_index", "_token_ids", "_token")):
                for v in (value if isinstance(value, (list, tuple)) else [value]):
                    if isinstance(v, int) and not isinstance(v, bool):
                        ids.add(v)
            elif hasattr(value, "to_dict") and hasattr(value, "model_type"):
                walk(value)

    walk(config)
    return ids


def _batch(config, vocab: int, B=2, S=8, seed=0):
    avoid = _avoid_ids(config)
    allowed = torch.tensor([i for i in range(vocab) if i not in avoid])
    g = torch.Generator().manual_seed(seed)
    ids = allowed[torch.randint(0, len(allowed), (B, S), generator=g)]
    labels = ids.clone()
    labels[0, :2] = -100  # a prompt
    labels[1, -1] = -100  # padding
    return ids, labels


def _build(mt, cn):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = getattr(transformers, cn)
    cfg = tiny_config(CONFIG_MAPPING[mt], **EXTRA.get(mt, {}))
    if not isinstance(cfg, cls.config_class) and isinstance(cfg.get_text_config(),
                                                             cls.config_class):
        cfg = cfg.get_text_config()  # a text-only class of a multimodal family
    if mt in OVERRIDES:
        OVERRIDES[mt](cfg)
    torch.manual_seed(0)
    model = cls(cfg).float()
    if mt in POST:
        POST[mt](model)
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear):
        with torch.no_grad():
            # logits of a few units, so that softcaps and scales are far from trivial
            head.weight.normal_(0.0, 0.5)
    return model.train()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def _run(model, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    return out, _grads(model)


def _checkpointing(model, on: bool):
    if on:
        getattr(model, "activation_checkpointing_enable",
                model.gradient_checkpointing_enable)()
    elif model.supports_gradient_checkpointing:
        getattr(model, "activation_checkpointing_disable",
                model.gradient_checkpointing_disable)()


def _compare(ref, ref_grads, out, grads, what):
    assert out.logits is None, f"{what}: logits were returned"
    assert out.loss.shape == () and out.loss.dtype == torch.float32
    assert_close_normwise(out.loss.detach(), ref.loss.detach(), 1e-5, f"{what}: loss")
    assert grads.keys() == ref_grads.keys(), f"{what}: other parameters got gradients"
    for name, g in ref_grads.items():
        assert_close_normwise(grads[name], g, 1e-4, f"{what}: grad {name}")


@pytest.mark.parametrize("mt,cn", FAMILIES, ids=[f"{mt}-{cn}" for mt, cn in FAMILIES])
def test_family(mt, cn):
    t0 = time.perf_counter()
    try:
        cls = getattr(transformers, cn)
    except Exception as exc:  # an optional dependency of the family is missing
        RESULTS[cn] = ("skipped", f"import: {exc}")
        pytest.skip(f"{cn} cannot be imported: {exc}")
    try:
        fhf.patch(cls).undo()
    except fhf.UnsupportedModel as exc:
        RESULTS[cn] = ("refused", _reason_kind(str(exc)), str(exc))
        return
    if cn in UNBUILT:
        RESULTS[cn] = ("skipped", UNBUILT[cn])
        pytest.skip(f"{cn}: {UNBUILT[cn]}")
    try:
        model = _build(mt, cn)
    except ImportError as exc:
        RESULTS[cn] = ("skipped", f"build: {exc}")
        pytest.skip(f"{cn} needs an optional package: {exc}")
    try:
        fhf.apply(model)
    except fhf.UnsupportedModel as exc:
        RESULTS[cn] = ("refused", _reason_kind(str(exc)), str(exc))
        return
    fhf.revert(model)
    ids, labels = _batch(model.config, V)

    n_items = torch.tensor(int((labels[:, 1:] != -100).sum()) + 3)
    checkpointing = model.supports_gradient_checkpointing
    # two passes each way: plain; then num_items_in_batch under gradient checkpointing
    ref, ref_grads = _run(model, ids, labels)
    _checkpointing(model, checkpointing)
    ref_n, ref_n_grads = _run(model, ids, labels, num_items_in_batch=n_items)
    _checkpointing(model, False)

    fhf.apply(model)
    widths = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, a, o: widths.append(o.shape[-1])) \
        if head is not None else None
    out, grads = _run(model, ids, labels)
    _compare(ref, ref_grads, out, grads, cn)
    _checkpointing(model, checkpointing)
    out, grads = _run(model, ids, labels, num_items_in_batch=n_items)
    _compare(ref_n, ref_n_grads, out, grads, f"{cn} num_items_in_batch, checkpointing")
    _checkpointing(model, False)
    if hook is not None:
        hook.remove()
        assert V not in widths, f"{cn}: the LM head computed logits"

    if model.can_generate():
        model.eval()
        prompt = ids[:, :4]
        with torch.no_grad():
            fhf.revert(model)
            try:
                want = model.generate(prompt, max_new_tokens=2, do_sample=False)
            except Exception:  # the family cannot generate from text alone
                want = None
            fhf.apply(model)
            if want is not None:
                got = model.generate(prompt, max_new_tokens=2, do_sample=False)
                assert torch.equal(got, want), f"{cn}: generate() changed"
    RESULTS[cn] = ("fused", f"{time.perf_counter() - t0:.2f}s")


def test_family_counts():
    """Runs after every test_family case: the counts of docs/integrations.md."""
    if len(RESULTS) < len({cn for _, cn in FAMILIES}):
        pytest.skip("only part of the families ran")
    kinds = {}
    for cn, (status, *detail) in sorted(RESULTS.items()):
        kinds.setdefault(status, []).append(cn)
    fused = {mt for mt, cn in FAMILIES if RESULTS.get(cn, ("",))[0] == "fused"}
    refused = {}
    for cn, (status, *detail) in RESULTS.items():
        if status == "refused":
            refused.setdefault(detail[0], []).append(cn)
    print(f"\nfused: {len(kinds.get('fused', []))} classes ({len(fused)} model types); "
          f"refused: {len(kinds.get('refused', []))}; skipped: {len(kinds.get('skipped', []))}")
    for kind, classes in sorted(refused.items()):
        print(f"  refused, {kind}: {len(classes)}: {', '.join(sorted(classes))}")
    for cn in kinds.get("skipped", []):
        print(f"  skipped: {cn}: {RESULTS[cn][1]}".splitlines()[0])
    print(f"  fused model types: {', '.join(sorted(fused))}")
    old = tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (4, 50)
    # before 4.50 most families compute their loss inline (refused); the floor fuses ~15
    assert len(fused) >= (10 if old else 60)
