"""The layout analysis (fusedce.integrations._hf_layout) on small synthetic forwards.

The fused forward replaces the logits by a small placeholder and the loss by fusedce's, so
a forward is only equivalent when nothing computed from the logits reaches the loss or the
returned output (the logits themselves only as the output's ``logits`` field). Each class
below has a ``forward`` whose source the analysis reads (it is never run, so the names it
calls need not exist); the refused ones compute a z-loss-like term from the logits after the
loss and let it reach the loss or the output by some path, the accepted ones keep the shapes
transformers' own causal LMs have. The last tests run two such forwards on a tiny Llama
through apply(): the z-loss one is refused (fused, its z would come from the placeholder), the
softcap one gives the unpatched loss.
"""

from __future__ import annotations

import os
import types

import pytest
import torch

from fusedce.integrations import _hf_layout as L

try:  # the output class of the forwards run through apply() below
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError:  # the analysis alone needs no transformers
    CausalLMOutputWithPast = None
# the other names the synthetic forwards use; they are read, never called
MoeCausalLMOutputWithPast = slice_logits_to_keep = load_balancing_loss_func = None

BEYOND = "uses the logits beyond the loss"  # the refusal kind test_hf_families.py knows


# ------------------------------------------------------------------- refused: the z-loss


class ZInOutputLoss:
    """The z-loss added to the loss where the output object is built."""

    def forward(self, input_ids=None, labels=None, logits_to_keep=0, **kwargs):
        outputs = self.model(input_ids=input_ids, **kwargs)
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.vocab_size, **kwargs)
        z = logits.logsumexp(-1).mean()
        return CausalLMOutputWithPast(loss=loss + z, logits=logits,
                                      cache=outputs.cache, hidden_states=outputs.hidden_states)


class ZInPlainReturn:
    """``return loss + z``: a plain return of the sum."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids).last_hidden_state)
        loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        z = logits.logsumexp(-1).mean()
        return loss + z


class ZInAnotherField:
    """The z-loss returned as the output's auxiliary loss."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        outputs = self.model(input_ids)
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        z = 1e-4 * logits.logsumexp(-1).pow(2).mean()
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=z, logits=logits)


class ZThroughAChainIntoAField:
    """A value from the logits, through several assignments, in another output field."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        outputs = self.model(input_ids)
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        lse = logits.float().logsumexp(dim=-1)
        z = lse.pow(2)
        aux_loss = 1e-4 * z.mean()
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits,
                                         cache=outputs.cache)


class ZAddedToTheLoss:
    """``loss = loss + c * z`` after the call (a z-loss on every configuration)."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids).last_hidden_state)
        loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        z = logits.logsumexp(-1).pow(2).mean()
        loss = loss + 1e-4 * z
        return CausalLMOutputWithPast(loss=loss, logits=logits)


class ZInTheTupleOutput:
    """The tuple form of the output (``return_dict=False``) carries the z-loss."""

    def forward(self, input_ids=None, labels=None, return_dict=None, **kwargs):
        outputs = self.model(input_ids)
        logits = self.lm_head(outputs[0])
        loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        z = logits.logsumexp(-1).mean()
        if not return_dict:
            output = (logits,) + outputs[1:]
            return (loss + z,) + output
        return CausalLMOutputWithPast(loss=loss, logits=logits)


class ZDecidesTheLoss:
    """A branch on a value from the logits that changes the loss."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids).last_hidden_state)
        loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        z = logits.logsumexp(-1).mean()
        if z > 10:
            loss = loss * 2
        return CausalLMOutputWithPast(loss=loss, logits=logits)


class ZFromAWalrusInACondition:
    """The z-loss set by a walrus in an ``if`` test, returned later."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids).last_hidden_state)
        loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        if (z := logits.logsumexp(-1).mean()) is not None:
            flag = True
        return CausalLMOutputWithPast(loss=loss + z, logits=logits, flag=flag)


class LogitsInAnotherField:
    """The logits as they are, but in a field other than ``logits``."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids).last_hidden_state)
        loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=(logits,))


class OutputObjectChangedAfter:
    """An output built from the logits as they are, then changed with them."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids).last_hidden_state)
        loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        out = CausalLMOutputWithPast(loss=loss, logits=logits)
        extra = out.logits.logsumexp(-1).mean()
        return CausalLMOutputWithPast(loss=out.loss + extra, logits=logits)


REFUSED = {
    ZInOutputLoss: r"its returned output depends on them through z beyond the logits field "
                   r"\(line \d+: return CausalLMOutputWithPast\(loss=loss \+ z",
    ZInPlainReturn: r"its returned output depends on them through z .*: return loss \+ z\)",
    ZInAnotherField: r"returned output depends on them through z .*aux_loss=z, logits=",
    ZThroughAChainIntoAField: r"returned output depends on them through aux_loss",
    ZAddedToTheLoss: r"the loss it returns depends on them through z .*loss = loss \+ 0.0001",
    ZInTheTupleOutput: r"returned output depends on them through z .*return \(loss \+ z,\)",
    ZDecidesTheLoss: r"the loss it returns depends on them through z .*loss = loss \* 2",
    ZFromAWalrusInACondition: r"returned output depends on them through flag, z beyond",
    LogitsInAnotherField: r"returned output depends on them beyond the logits field",
    OutputObjectChangedAfter: r"returned output depends on them through extra",
}


@pytest.mark.parametrize("cls", list(REFUSED), ids=lambda c: c.__name__)
def test_logits_reaching_the_loss_or_output_are_refused(cls):
    with pytest.raises(L.Refused, match=BEYOND) as info:
        L.analyze_forward(cls.forward)
    assert info.match(REFUSED[cls])
    with pytest.raises(L.Refused, match=REFUSED[cls]):  # the cached refusal too
        L.analyze_forward(cls.forward)


# ------------------------------------------------------------------- accepted


class StockForward:
    """transformers' own causal-LM forward (Llama's shape)."""

    def forward(self, input_ids=None, attention_mask=None, cache=None, labels=None,
                logits_to_keep=0, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                             **kwargs)
        hidden_states = outputs.last_hidden_state
        hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states,
                                      attentions=outputs.attentions)


class LogitsOnlyReturned:
    """The logits only returned: cast after the loss, in the tuple form of the output and in
    an output object built first and returned later."""

    def forward(self, input_ids=None, labels=None, return_dict=None, **kwargs):
        outputs = self.model(input_ids)
        logits = self.lm_head(outputs[0])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        logits = logits.float()
        if not return_dict:
            output = (logits,) + outputs[1:]
            return (loss,) + output if loss is not None else output
        lm_outputs = CausalLMOutputWithPast(loss=loss, logits=logits,
                                            hidden_states=outputs.hidden_states)
        return lm_outputs


class SoftcapBeforeTheLoss:
    """Gemma 2's final logit softcap, then the loss."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        outputs = self.model(input_ids)
        logits = self.lm_head(outputs.last_hidden_state)
        if self.config.final_logit_softcapping is not None:
            logits = logits / self.config.final_logit_softcapping
            logits = torch.tanh(logits)
            logits = logits * self.config.final_logit_softcapping
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)


class RouterAuxLoss:
    """A mixture of experts: the router's auxiliary loss (not from the logits) is added."""

    def forward(self, input_ids=None, labels=None, output_router_logits=None, **kwargs):
        outputs = self.model(input_ids)
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        aux_loss = None
        if output_router_logits:
            aux_loss = load_balancing_loss_func(outputs.router_logits, self.num_experts)
            if labels is not None:
                loss += self.router_aux_loss_coef * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits,
                                         router_logits=outputs.router_logits)


class ConfiguredZLoss:
    """Bamba's z-loss behind a configuration switch: a guard, refused per configuration."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids).last_hidden_state)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
            if self.z_loss_coefficient > 0:
                z_loss = logits.logsumexp(dim=-1).to(dtype=loss.dtype).pow(2).mean()
                loss = loss + self.z_loss_coefficient * z_loss
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def _model(**config):
    return types.SimpleNamespace(config=types.SimpleNamespace(**config), z_loss_coefficient=0.0)


@pytest.mark.parametrize("cls", [StockForward, LogitsOnlyReturned, RouterAuxLoss],
                         ids=lambda c: c.__name__)
def test_logits_only_returned_are_accepted(cls):
    layout = L.analyze_forward(cls.forward)
    assert layout.head_attr == "lm_head" and layout.logits_name == "logits"
    assert not layout.guards
    assert layout.adds_to_loss == (cls is RouterAuxLoss)
    assert L.canonical(layout, _model()) == L.Transform()


def test_softcap_before_the_loss_is_accepted():
    layout = L.analyze_forward(SoftcapBeforeTheLoss.forward)
    assert not layout.guards and not layout.adds_to_loss
    assert L.canonical(layout, _model(final_logit_softcapping=30.0)) == \
        L.Transform(logit_scale=1.0, softcap=30.0)
    assert L.canonical(layout, _model(final_logit_softcapping=None)) == L.Transform()


def test_configured_z_loss_is_a_guard():
    layout = L.analyze_forward(ConfiguredZLoss.forward)
    assert [what for _, _, what in layout.guards] == [
        "z_loss = logits.logsumexp(dim=-1).to(dtype=loss.dtype).pow(2).mean()"]
    model = _model()
    assert L.canonical(layout, model) == L.Transform()
    model.z_loss_coefficient = 1e-4
    with pytest.raises(L.Refused, match=f"{BEYOND} for this configuration .*z_loss ="):
        L.canonical(layout, model)


# ------------------------------------------------------------------- through apply()


def _llama_with(forward):
    """A tiny Llama whose class has the given forward (source read by the analysis)."""
    os.environ.setdefault("USE_HUB_KERNELS", "NO")
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "LlamaForCausalLM"):
        pytest.skip("no LlamaForCausalLM")
    cls = type("SyntheticLlama", (transformers.LlamaForCausalLM,), {"forward": forward})
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=8,
                                   max_position_embeddings=32)
    return cls(cfg)


def _z_loss_forward(self, input_ids=None, labels=None, **kwargs):
    outputs = self.model(input_ids=input_ids)
    logits = self.lm_head(outputs.last_hidden_state)
    loss = None
    if labels is not None:
        loss = self.loss_function(logits=logits, labels=labels,
                                  vocab_size=self.config.vocab_size, **kwargs)
    z = logits.logsumexp(-1).pow(2).mean()
    return CausalLMOutputWithPast(loss=loss + 1e-2 * z, logits=logits)


def _softcap_forward(self, input_ids=None, labels=None, **kwargs):
    outputs = self.model(input_ids=input_ids)
    logits = self.lm_head(outputs.last_hidden_state)
    logits = torch.tanh(logits / 2.0) * 2.0
    loss = None
    if labels is not None:
        loss = self.loss_function(logits=logits, labels=labels,
                                  vocab_size=self.config.vocab_size, **kwargs)
    return CausalLMOutputWithPast(loss=loss, logits=logits)


def test_apply_refuses_a_z_loss_after_the_loss():
    from fusedce.integrations import transformers as fhf

    model = _llama_with(_z_loss_forward)
    with pytest.raises(fhf.UnsupportedModel, match=f"{BEYOND}: its returned output depends "
                                                   "on them through z"):
        fhf.apply(model)
    assert not fhf.is_applied(model)


def test_apply_fuses_a_softcap_before_the_loss():
    import copy

    from fusedce.integrations import transformers as fhf

    ref = _llama_with(_softcap_forward).train()
    model = fhf.apply(copy.deepcopy(ref)).train()
    ids = torch.randint(0, 61, (2, 7))
    out, want = model(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    assert out.logits is None
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
