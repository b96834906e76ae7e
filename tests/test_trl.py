"""TRL integration (fusedce.integrations.trl).

TRL's trainers score tokens through a fused LM head (per-token log-probs, entropy and a few
metric outputs from the final hidden states, at the sampling temperature, with the
config's softcap and logit scale). With ``apply(trainer)`` those outputs come from
fusedce.linear_logprobs; every trainer must then log the same per-step loss and grad_norm
as with TRL's own kernel (same seed, tiny random models on the CPU, fp32), and fusedce
must have been called. Also checked: the outputs and gradients of the projection itself
against TRL's kernel, the log lines and fallbacks (never a silent bypass), and the order of
application against fusedce.integrations.transformers. Skipped when trl is not installed.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from fusedce.integrations import trl as ftrl  # noqa: E402
from oracle import assert_close_normwise  # noqa: E402

V = 128
WORDS = [f"w{i}" for i in range(V - 4)]
SPECIALS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
# loss and grad_norm agree to fp32 rounding; a few optimizer steps carry it along
RTOL, ATOL = 2e-4, 1e-8


def _tokenizer():
    vocab = {**SPECIALS, **{w: i + len(SPECIALS) for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
        unk_token="<unk>")


def _save_model(path, kind: str) -> str:
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0,
                  eos_token_id=1, bos_token_id=2)
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:  # a final-logit softcap, which TRL's head and fusedce must both apply
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            **common, final_logit_softcapping=3.0, attn_logit_softcapping=None))
    with torch.no_grad():
        # logits of a few units: the softmax, the softcap and the temperature all matter
        model.lm_head.weight.normal_(0.0, 0.5)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl_models")
    return {k: _save_model(root / k, k) for k in ("qwen2", "llama", "gemma2")}


@pytest.fixture(autouse=True)
def _clean_state():
    # each test sees the integration's log lines afresh and leaves nothing patched
    ftrl._LOGGED.clear()
    yield
    ftrl.unpatch()
    for ref, _ in list(ftrl._HEADS.values()):
        w = ref()
        if w is not None:
            ftrl._HEADS.pop(id(w), None)
    ftrl._uninstall_if_idle()


def _text(r: random.Random, n: int) -> str:
    return " ".join(r.choice(WORDS[:48]) for _ in range(n))


def _common(tmp_path, **kw):
    return dict(output_dir=str(tmp_path / "out"), logging_steps=1, report_to=[],
                save_strategy="no", use_cpu=True, bf16=False, seed=0, learning_rate=5e-3,
                disable_tqdm=True, **kw)


def _reward(completions, completion_ids=None, **kwargs):
    # deterministic and spread out, so that every group has non-zero advantages
    return [float(sum(ids) % 11) + 0.1 * len(ids) for ids in completion_ids]


def _sft(model, tmp_path):
    r = random.Random(1)
    ds = datasets.Dataset.from_dict({"text": [_text(r, r.randint(5, 12)) for _ in range(12)]})
    args = trl.SFTConfig(**_common(tmp_path, max_steps=3, per_device_train_batch_size=4,
                                   max_length=32))
    return trl.SFTTrainer(model=model, args=args, train_dataset=ds,
                          processing_class=_tokenizer())


def _grpo(model, tmp_path):
    r = random.Random(2)
    ds = datasets.Dataset.from_dict({"prompt": [_text(r, 4) for _ in range(8)]})
    args = trl.GRPOConfig(**_common(
        tmp_path, max_steps=2, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=6, temperature=0.7, beta=0.1, entropy_coef=0.05))
    return trl.GRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=ds,
                           processing_class=_tokenizer())


def _rloo(model, tmp_path):
    r = random.Random(3)
    ds = datasets.Dataset.from_dict({"prompt": [_text(r, 4) for _ in range(8)]})
    args = trl.RLOOConfig(**_common(
        tmp_path, max_steps=2, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=6, temperature=1.3, beta=0.05))
    return trl.RLOOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=ds,
                           processing_class=_tokenizer())


def _dpo(model, tmp_path, use_weighting=False, peft_config=None):
    r = random.Random(4)
    ds = datasets.Dataset.from_dict({
        "prompt": [_text(r, 4) for _ in range(8)],
        "chosen": [_text(r, r.randint(2, 5)) for _ in range(8)],
        "rejected": [_text(r, r.randint(2, 5)) for _ in range(8)]})
    # use_weighting (WPO): the head's log(sum p^2) output weights the loss
    args = trl.DPOConfig(**_common(tmp_path, max_steps=2, per_device_train_batch_size=4,
                                   max_length=32, use_weighting=use_weighting))
    return trl.DPOTrainer(model=model, args=args, train_dataset=ds,
                          processing_class=_tokenizer(), peft_config=peft_config)


def _kto(model, tmp_path):
    r = random.Random(5)
    ds = datasets.Dataset.from_dict({
        "prompt": [_text(r, 4) for _ in range(8)],
        "completion": [_text(r, r.randint(2, 5)) for _ in range(8)],
        "label": [True, False] * 4})
    args = trl.KTOConfig(**_common(tmp_path, max_steps=2, per_device_train_batch_size=4,
                                   max_length=32))
    return trl.KTOTrainer(model=model, args=args, train_dataset=ds,
                          processing_class=_tokenizer())


def _lora():
    peft = pytest.importorskip("peft")
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           lora_dropout=0.0, task_type="CAUSAL_LM")


def _history(trainer):
    return [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]


def _train(build, use_fusedce: bool):
    trainer = build()
    if use_fusedce:
        ftrl.apply(trainer)
    with ftrl.count_calls() as calls:
        trainer.train()
    if use_fusedce:
        ftrl.revert(trainer)
    return _history(trainer), calls


def _assert_same_steps(ref, got, keys):
    assert len(ref) == len(got) > 0
    for step, (a, b) in enumerate(zip(ref, got)):
        for k in keys:
            if k not in a:
                continue
            assert b[k] == pytest.approx(a[k], rel=RTOL, abs=ATOL), (step, k, a[k], b[k])


# (trainer builder, model, logged values besides loss and grad_norm that the head feeds)
TRAINERS = {
    "sft": (_sft, "qwen2", ("entropy", "mean_token_accuracy")),
    "grpo": (_grpo, "qwen2", ("entropy", "kl")),
    "rloo_softcap": (_rloo, "gemma2", ("entropy", "kl")),
    "dpo": (_dpo, "llama", ("rewards/chosen", "rewards/rejected", "logps/chosen",
                            "logits/chosen", "mean_token_accuracy", "entropy")),
    "dpo_wpo": (lambda model, path: _dpo(model, path, use_weighting=True), "llama",
                ("logps/chosen", "logits/chosen")),
    # LoRA: TRL's head sits on the base model and the reference is the adapter disabled
    "dpo_lora": (lambda model, path: _dpo(model, path, peft_config=_lora()), "qwen2",
                 ("rewards/chosen", "logps/chosen", "entropy")),
    "kto": (_kto, "qwen2", ("rewards/chosen", "logps/chosen", "logits/chosen", "kl",
                            "entropy")),
}


@pytest.mark.parametrize("name", list(TRAINERS))
def test_trainer_matches_trl(name, models, tmp_path, caplog):
    build, kind, keys = TRAINERS[name]
    ref, ref_calls = _train(lambda: build(models[kind], tmp_path), use_fusedce=False)
    with caplog.at_level(logging.INFO, logger="fusedce"):
        got, calls = _train(lambda: build(models[kind], tmp_path), use_fusedce=True)
    assert ref_calls["linear_logprobs"] == 0
    assert calls["linear_logprobs"] >= len(got), calls
    _assert_same_steps(ref, got, ("loss", "grad_norm") + keys)
    messages = [r.getMessage() for r in caplog.records if r.name == "fusedce"]
    assert any("through fusedce.linear_logprobs" in m for m in messages), messages
    assert not any(r.levelno >= logging.WARNING for r in caplog.records
                   if r.name == "fusedce"), messages


# ------------------------------------------------------------- the projection itself


@pytest.mark.parametrize("temperature,softcap,logit_scale,bias", [
    (1.0, None, 1.0, False), (0.7, None, 1.3, True), (0.6, 2.0, 1.5, True), (1.4, 3.0, 1.0, False)])
def test_head_matches_trl_kernel(temperature, softcap, logit_scale, bias):
    from trl.kernels import ChunkedLogProbFunction

    N, D, Vh = 37, 16, 50
    h = torch.randn(N, D, requires_grad=True)
    w = (torch.randn(Vh, D) * 0.8).requires_grad_()
    b = torch.randn(Vh, requires_grad=True) if bias else None
    t = torch.randint(0, Vh, (N,))
    with torch.no_grad():
        # a third of the rows hit the argmax, so that is_top1 holds both values
        t[::3] = torch.nn.functional.linear(h[::3], w, b).argmax(-1)
    ref = ChunkedLogProbFunction.apply(h, w, b, t, temperature, 16, softcap, logit_scale,
                                       ftrl.OUTPUTS)
    with ftrl.count_calls() as calls:
        got = ftrl.head_logprobs(h, w, t, bias=b, temperature=temperature, softcap=softcap,
                                 logit_scale=logit_scale, outputs=ftrl.OUTPUTS)
    assert calls["linear_logprobs"] == 1
    for name, r, g in zip(ftrl.OUTPUTS, ref, got):
        if r.dtype == torch.bool:
            assert torch.equal(r, g) and 0 < int(g.sum()) < N, name
        else:
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=name)
    assert not got[2].requires_grad and not got[3].requires_grad
    # an entropy bonus trains through the entropy: both gradients must be exact
    g_lp, g_h = torch.randn(N), torch.randn(N)
    params = [x for x in (h, w, b) if x is not None]
    want = torch.autograd.grad((ref[0] * g_lp + ref[1] * g_h).sum(), params)
    have = torch.autograd.grad((got[0] * g_lp + got[1] * g_h).sum(), params)
    for p, a, c in zip(("hidden", "weight", "bias"), want, have):
        assert_close_normwise(c, a, 1e-5, what=f"grad of {p}")


def test_head_outputs_subsets_and_empty():
    h, w = torch.randn(9, 8), torch.randn(20, 8)
    t = torch.randint(0, 20, (9,))
    out = ftrl.head_logprobs(h, w, t, outputs=("log_probs", "mean_logits"))
    assert out[1] is None and out[2] is None and out[4] is None
    torch.testing.assert_close(out[3], (h @ w.T).mean(-1))
    empty = ftrl.head_logprobs(h[:0].requires_grad_(), w, t[:0], outputs=("log_probs", "entropy"))
    assert empty[0].shape == (0,) and empty[1].shape == (0,)
    with pytest.raises(ValueError, match="unknown outputs"):
        ftrl.head_logprobs(h, w, t, outputs=("log_probs", "logits"))


def test_head_mixed_dtypes_follow_hidden():
    # cast_lm_head_to_fp32: fp32 hidden states with a bf16 head compute in fp32, as TRL does
    h = torch.randn(6, 8)
    w = torch.randn(20, 8).bfloat16().requires_grad_()
    t = torch.randint(0, 20, (6,))
    lp, ent = ftrl.head_logprobs(h, w, t, outputs=("log_probs", "entropy"))[:2]
    ref = torch.log_softmax(h @ w.detach().float().T, -1).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(lp, ref)
    (lp.sum() + ent.sum()).backward()
    assert w.grad.dtype == torch.bfloat16


# ------------------------------------------------- routing, log lines and fallbacks


def _sft_model(models):
    return transformers.AutoModelForCausalLM.from_pretrained(models["qwen2"])


def test_stand_in_routes_by_head(models, caplog):
    from trl.trainer import utils as tu

    applied, other = _sft_model(models), _sft_model(models)
    trl.trainer.utils.add_fused_lm_head(applied, outputs=("log_probs", "entropy"))
    trl.trainer.utils.add_fused_lm_head(other)
    ids = torch.randint(4, V, (2, 7))
    with caplog.at_level(logging.INFO, logger="fusedce"):
        ftrl.apply(applied)
        assert ftrl.is_applied(applied) and not ftrl.is_applied(other)
        assert isinstance(tu._ChunkedLogProbFunction, ftrl._FusedceHead)
        before = ftrl.stats()
        with ftrl.count_calls() as calls:
            out = applied(input_ids=ids, labels=ids, fused_lm_head=True)
            ref = other(input_ids=ids, labels=ids, fused_lm_head=True)
            other(input_ids=ids, labels=ids, fused_lm_head=True)
    assert calls["linear_logprobs"] == 1
    after = ftrl.stats()
    assert after["fusedce"] - before["fusedce"] == 1 and after["trl"] - before["trl"] == 2
    torch.testing.assert_close(out.log_probs, ref.log_probs, rtol=1e-5, atol=1e-5)
    assert out.entropy is not None and ref.entropy is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # the head fusedce was not applied to says so, once
    assert len(warnings) == 1 and "not applied to" in warnings[0]
    ftrl.revert(applied)
    assert not isinstance(tu._ChunkedLogProbFunction, ftrl._FusedceHead)


def test_unsupported_option_stays_on_trl_with_warning(models, caplog):
    model = _sft_model(models)
    model.config.logit_scale = -0.5  # a sign flip fusedce's logit_scale does not take
    trl.trainer.utils.add_fused_lm_head(model)
    ftrl.apply(model)
    ids = torch.randint(4, V, (2, 7))
    with caplog.at_level(logging.WARNING, logger="fusedce"), ftrl.count_calls() as calls:
        out = model(input_ids=ids, labels=ids, fused_lm_head=True)
    assert calls["linear_logprobs"] == 0 and torch.isfinite(out.log_probs).all()
    assert any("logit_scale=-0.5" in r.getMessage() for r in caplog.records)


def test_patch_covers_models_built_later(models, tmp_path):
    # patch() before the trainer exists: the reference model DPO builds is covered too
    ftrl.patch()
    trainer = _dpo(models["llama"], tmp_path)
    assert trainer.ref_model is not None
    with ftrl.count_calls() as calls:
        trainer.train()
    ftrl.unpatch()
    from trl.trainer import utils as tu

    assert not isinstance(tu._ChunkedLogProbFunction, ftrl._FusedceHead)
    # policy and reference model, every step
    assert calls["linear_logprobs"] >= 2 * len(_history(trainer))


def test_apply_model_before_trainer(models, tmp_path, caplog):
    model = _sft_model(models)
    ftrl.apply(model)
    trainer = _sft(model, tmp_path)
    with caplog.at_level(logging.WARNING, logger="fusedce"), ftrl.count_calls() as calls:
        trainer.train()
    assert calls["linear_logprobs"] == len(_history(trainer)) > 0
    assert not caplog.records


def test_transformers_integration_after_trainer(models, tmp_path, caplog):
    # fusedce.integrations.transformers.apply() after TRL added its fused head hides it (the
    # trainer's fused_lm_head calls get no log_probs); apply(trainer) undoes that, saying so
    from fusedce.integrations import transformers as fce_hf

    trainer = _sft(_sft_model(models), tmp_path)
    try:
        fce_hf.apply(trainer.model)
    except (ValueError, RuntimeError) as exc:  # an architecture it refuses
        pytest.skip(f"fusedce.integrations.transformers.apply refused the model: {exc}")
    hidden = not ftrl._is_trl_forward(trainer.model)
    with caplog.at_level(logging.WARNING, logger="fusedce"):
        ftrl.apply(trainer)
    with ftrl.count_calls() as calls:
        trainer.train()
    assert calls["linear_logprobs"] == len(_history(trainer)) > 0
    if hidden:  # a transformers integration whose forward drops fused_lm_head calls
        assert any("reverted it" in r.getMessage() for r in caplog.records)
        assert not fce_hf.is_applied(trainer.model)


def test_transformers_integration_before_trainer(models, tmp_path):
    from fusedce.integrations import transformers as fce_hf

    model = _sft_model(models)
    try:
        fce_hf.apply(model)
    except (ValueError, RuntimeError) as exc:
        pytest.skip(f"fusedce.integrations.transformers.apply refused the model: {exc}")
    trainer = _sft(model, tmp_path)
    ftrl.apply(trainer)
    with ftrl.count_calls() as calls:
        trainer.train()
    assert calls["linear_logprobs"] == len(_history(trainer)) > 0


def test_sft_label_smoothing_warns(models, tmp_path, caplog):
    r = random.Random(1)
    ds = datasets.Dataset.from_dict({"text": [_text(r, 8) for _ in range(4)]})
    args = trl.SFTConfig(**_common(tmp_path, max_steps=1, per_device_train_batch_size=4,
                                   max_length=32, label_smoothing_factor=0.1))
    trainer = trl.SFTTrainer(model=_sft_model(models), args=args, train_dataset=ds,
                             processing_class=_tokenizer())
    with caplog.at_level(logging.WARNING, logger="fusedce"):
        ftrl.apply(trainer)
    assert any("label_smoothing_factor" in r.getMessage() for r in caplog.records)
