"""A transformers Trainer run with fusedce's class-level patch (fusedce.integrations.transformers).

The model is built by the caller after ``patch("llama")``, as a Trainer / TRL / YAML-driven
setup does; the run uses gradient accumulation (2 micro-batches per step, whose numbers of
labelled tokens differ, so that ``num_items_in_batch`` matters) and must equal the
unpatched run step by step (loss, grad_norm), with the LM head never computing logits.
Skipped when transformers or accelerate is not installed.
"""

from __future__ import annotations

import os

import pytest
import torch

# no kernel downloads from the Hub (a machine without network waits for each attempt)
os.environ.setdefault("USE_HUB_KERNELS", "NO")

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from fusedce.integrations import transformers as fhf  # noqa: E402

V = 97
N, S = 12, 10


class _Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(5)
        self.rows = []
        for i in range(N):
            ids = torch.randint(0, V, (S,), generator=g)
            labels = ids.clone()
            labels[: i % 5] = -100  # prompts of different lengths
            self.rows.append({"input_ids": ids, "labels": labels,
                              "attention_mask": torch.ones(S, dtype=torch.long)})

    def __len__(self):
        return N

    def __getitem__(self, i):
        return self.rows[i]


def _train(tmp_path, patched: bool):
    handle = fhf.patch("llama") if patched else None
    try:
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=8)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)  # built after patch(): fused
        widths = []
        model.lm_head.register_forward_hook(lambda m, a, o: widths.append(o.shape[-1]))
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / ("fused" if patched else "plain")),
            per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
            learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1,
            save_strategy="no", report_to=[], seed=0, use_cpu=True,
            dataloader_num_workers=0, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data())
        trainer.train()
        logs = [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]
        return logs, widths, trainer
    finally:
        if handle is not None:
            handle.undo()


def test_trainer_gradient_accumulation_matches_unpatched(tmp_path):
    ref, ref_widths, _ = _train(tmp_path, patched=False)
    got, widths, trainer = _train(tmp_path, patched=True)
    assert len(ref) == len(got) == 3
    assert trainer.model_accepts_loss_kwargs  # num_items_in_batch reaches the loss
    assert set(ref_widths) == {V}
    assert widths and V not in widths, "the LM head computed logits"
    for step, ((loss_r, gn_r), (loss, gn)) in enumerate(zip(ref, got)):
        assert loss == pytest.approx(loss_r, rel=1e-5), f"step {step} loss"
        assert float(gn) == pytest.approx(float(gn_r), rel=1e-4), f"step {step} grad_norm"
