"""TRL's trainers with a MoLoRA adapter: the aux loss reaches TRL's optimised loss, its logs and the routers.

TRL optimises a loss computed from the fused LM head's log-probabilities (never ``outputs.loss``) and adds
``router_aux_loss_coef * outputs.aux_loss`` for models that declare ``output_router_logits``; molora declares it
(molora.tuner.aux_output). These tests check the gradient TRL's objective gives the routers against autograd of
the aux formula, and run SFTTrainer and DPOTrainer on a tiny model under TRL's defaults (bf16 autocast on CPU).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from conftest import build_tiny_tokenizer  # noqa: E402
from test_layer import adapter_params, aux_model, assert_close, batch, reference_router_grads  # noqa: E402


def _tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2))


def _molora_config(**kw):
    import molora

    return molora.MoLoRAConfig(num_experts="2,4", top_k=2, r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                               aux_loss_coef=0.01, init_weights=False, **kw)


@pytest.mark.parametrize("trl_coef,steps", [(None, 1), (None, 2), (0.2, 2)], ids=["own_coef", "ga2", "trl_coef"])
def test_trl_objective_gives_routers_the_weighted_aux_gradient(tiny_model, trl_coef, steps):
    """TRL's SFT objective, -sum(log_probs)/n + c * outputs.aux_loss / steps, computed with TRL's fused head:
    every adapter gradient equals autograd of task/1 + c/steps * aux_formula (c: molora's coef, or TRL's own)."""
    from trl.trainer.utils import add_fused_lm_head

    coef = 0.5
    model = aux_model(tiny_model, coef=coef)
    config = model.get_base_model().config
    assert config.router_aux_loss_coef == coef and config.output_router_logits is False  # what TRL reads
    c = coef if trl_coef is None else trl_coef
    ids, mask, labels = batch()
    expected, aux_only = reference_router_grads(tiny_model, model, coef, "masked", ids, mask, labels)
    add_fused_lm_head(model.get_base_model())
    config.output_router_logits = True  # what TRL's trainers do when the aux loss is enabled
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, output_router_logits=True)
    assert out.aux_loss is not None and out.aux_loss.requires_grad
    loss = -out.log_probs.sum() / out.label_mask.sum() + c * out.aux_loss / steps
    loss.backward()
    for name, p in adapter_params(model).items():
        aux = aux_only[name]
        task = expected[name] - (coef * aux if aux is not None else 0)
        want = task + (c / steps * aux if aux is not None else 0)
        assert_close(p.grad, want, 1e-4, name)
    # the aux part is really there: without it the router gradients would differ
    visible = [n for n, a in aux_only.items() if a is not None and (c / steps * a).abs().max() > 0.05 * expected[n].abs().max()]
    assert visible


def test_a_forward_without_trl_is_unchanged(tiny_model):
    """Declaring the MoE attributes changes nothing for a plain forward: no `output_router_logits` kwarg is
    invented, the loss still includes coef * aux, and `outputs.aux_loss` stays detached in eval."""
    model = aux_model(tiny_model, coef=0.5)
    ids, mask, labels = batch()
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert not out.aux_loss.requires_grad
    assert torch.isfinite(out.loss)


def test_a_model_with_its_own_moe_attributes_keeps_them(tiny_model):
    from peft import get_peft_model

    base = tiny_model("llama", num_layers=2)
    base.config.router_aux_loss_coef = 0.123
    model = get_peft_model(base, _molora_config())
    cfg = model.get_base_model().config
    assert cfg.router_aux_loss_coef == 0.123 and not hasattr(cfg, "output_router_logits")


def _sft(tmp_path, **args):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok = build_tiny_tokenizer()
    ds = Dataset.from_list([{"prompt": "Question: which animal barks?", "completion": " the dog barks"}] * 16)
    cfg = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                    logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", **args)
    return SFTTrainer(model=_tiny_llama(len(tok)), args=cfg, train_dataset=ds, processing_class=tok,
                      peft_config=_molora_config())


def test_sft_trainer_trains_with_the_aux_loss_in_its_loss_and_logs(tmp_path):
    """SFTTrainer(peft_config=MoLoRAConfig) under bf16 autocast (TRL's default on a bf16-capable CPU): TRL sees an
    aux loss with molora's coefficient, its loss is CE + 0.01 * aux, it logs aux_loss, every adapter tensor moves."""
    trainer = _sft(tmp_path, bf16=True, gradient_accumulation_steps=2)
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.01
    model = trainer.model
    batch_ = next(iter(trainer.get_train_dataloader()))
    model.train()
    loss = trainer.compute_loss(model, dict(batch_))
    with torch.no_grad():
        out = model(**{k: v for k, v in batch_.items()}, fused_lm_head=True, use_cache=False)
    ce = -out.log_probs.sum() / out.label_mask.sum()
    assert out.aux_loss.item() > 1.0  # MoLA aux: about 1 per layer at uniform routing, 2 layers
    torch.testing.assert_close(loss.detach().float(), (ce + 0.01 * out.aux_loss).float(), rtol=2e-2, atol=1e-3)
    model.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 3 and all(r["aux_loss"] > 1.0 for r in logs)
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), before[n])]
    assert len(moved) == len(before) and any("router" in n for n in moved)


def test_dpo_trainer_runs_with_the_aux_loss(tmp_path):
    """DPOTrainer weights the aux loss the same way (policy forward only; the reference pass runs with the
    adapter disabled, so it records no routing)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok = build_tiny_tokenizer()
    ds = Dataset.from_list([{"prompt": "Question: which animal barks?", "chosen": " the dog barks",
                             "rejected": " a cat"}] * 8)
    args = DPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                     logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", bf16=True)
    trainer = DPOTrainer(model=_tiny_llama(len(tok)), args=args, train_dataset=ds, processing_class=tok,
                         peft_config=_molora_config())
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.01
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert logs and all(r["aux_loss"] > 1.0 and r["loss"] == r["loss"] for r in logs)
    moved = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), before[n])]
    assert len(moved) == len(before)
