"""LM head only at labelled positions (molora.label_logits): same loss and gradients as the full head."""
from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from molora import MoLoRAConfig
from molora.run.label_logits import accepts_logits_to_keep, label_positions, restrict_to_labels


def test_label_positions_picks_the_union_of_rows_and_shifts_targets():
    labels = torch.full((3, 10), -100)
    labels[0, 4:6] = torch.tensor([7, 8])  # predicted from positions 3, 4
    labels[1, 8] = 9  # from 7
    labels[2, 5] = 3  # from 4 (shared with row 0)
    positions, shift = label_positions(labels)
    assert positions.tolist() == [3, 4, 7]
    assert shift.tolist() == [[7, 8, -100], [-100, -100, 9], [-100, 3, -100]]
    # a label at position 0 is never a target (nothing predicts it)
    only_first = torch.full((2, 6), -100)
    only_first[:, 0] = 5
    assert label_positions(only_first) is None


def test_label_positions_declines_dense_labels():
    labels = torch.randint(0, 50, (2, 12))
    assert label_positions(labels) is None  # train_on_inputs: every position is a target
    assert label_positions(labels, max_fraction=1.0)[0].tolist() == list(range(11))
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        label_positions(labels[0])


def _batch(vocab: int, seed: int, batch: int = 4, length: int = 24):
    """Right-padded rows of different lengths with 1-3 answer tokens at the end of each (answer-only labels)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.zeros(batch, length, dtype=torch.long)
    labels = torch.full((batch, length), -100)
    for i in range(batch):
        n = int(torch.randint(8, length + 1, (1,), generator=g))
        k = int(torch.randint(1, 4, (1,), generator=g))
        mask[i, :n] = 1
        ids[i, n:] = 0
        labels[i, n - k : n] = ids[i, n - k : n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("num_items", [None, 7])
@pytest.mark.parametrize("seed", [0, 1])
def test_restricted_loss_and_gradients_equal_the_full_head(tiny_model, seed, num_items):
    model = get_peft_model(tiny_model("llama", num_layers=3, seed=seed),
                           MoLoRAConfig(num_experts="2,3,4", top_k=2, r=4, lora_dropout=0.0, aux_loss_coef=0.01))
    model.train()
    for p in model.parameters():
        if p.requires_grad:  # the B matrices start at zero: give every adapter weight a gradient path
            torch.nn.init.normal_(p, std=0.2)
    batch = _batch(model.config.vocab_size, seed)
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}

    def loss_and_grads(inputs):
        model.zero_grad()
        out = model(**inputs, **kw)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full, g_full = loss_and_grads(batch)
    restricted_inputs = restrict_to_labels(batch)
    assert "logits_to_keep" in restricted_inputs  # the test batch is answer-only: slicing applies
    restricted, g_restricted = loss_and_grads(restricted_inputs)
    kept = restricted_inputs["logits_to_keep"].numel()
    assert restricted.logits.shape == (4, kept, model.config.vocab_size) and kept < 24
    torch.testing.assert_close(restricted.loss, full.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(restricted.aux_loss, full.aux_loss)
    assert g_full.keys() == g_restricted.keys() and len(g_full) > 0
    for n in g_full:
        assert g_full[n].abs().sum() > 0, n
        torch.testing.assert_close(g_restricted[n], g_full[n], rtol=1e-5, atol=1e-6, msg=n)


def test_restrict_leaves_batches_without_labels_or_with_dense_labels_alone():
    ids = torch.randint(0, 50, (2, 12))
    plain = {"input_ids": ids}
    assert restrict_to_labels(plain) is plain
    dense = {"input_ids": ids, "labels": ids.clone()}
    assert restrict_to_labels(dense) is dense


def test_accepts_logits_to_keep_unwraps_peft(tiny_model):
    base = tiny_model("llama", num_layers=2)
    assert accepts_logits_to_keep(base)
    assert accepts_logits_to_keep(get_peft_model(base, MoLoRAConfig(num_experts=2, top_k=1, r=2)))
    assert not accepts_logits_to_keep(tiny_model("bert", num_layers=2))
