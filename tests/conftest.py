"""Shared pytest setup: import paths and tiny random HF models built from configs (no downloads).

The tests mirror the package: tests/kernels (molora_kernels), tests/tuner, tests/allocation, tests/run; the
package-wide checks (layout, packaging, the README's code) stay here."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Run without an install: `molora` from the checkout, `molora_kernels` from kernels/ (never as `kernels`).
if importlib.util.find_spec("molora_kernels") is None:
    sys.path.insert(0, str(ROOT / "kernels"))
if importlib.util.find_spec("molora") is None:
    sys.path.append(str(ROOT))
# The tests mirror the package (kernels/, tuner/, allocation/, run/); some share helpers and fixtures by module
# name (``from test_layer import batch``), so every group's folder is importable whatever pytest collects first.
for _group in ("kernels", "tuner", "allocation", "run"):
    sys.path.insert(0, str(Path(__file__).resolve().parent / _group))
sys.path.insert(0, str(Path(__file__).resolve().parent))
# fault injection (crash after a checkpoint, a nan loss on one rank) lives here, not in molora: see faults/
sys.path.insert(0, str(Path(__file__).resolve().parent / "faults"))
import molora_faults  # noqa: E402

molora_faults.install_on_import()

# Tests use tiny tensors: one intra-op thread is several times faster than two on a shared 2-core machine
# (thread oversubscription); MOLORA_TEST_THREADS overrides.
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("MOLORA_TEST_THREADS", "1")))

TINY_VOCAB = 64


def build_tiny_model(arch: str, num_layers: int = 4, seed: int = 0, hidden_size: int = 32):
    """A tiny randomly initialised model of ``arch`` (llama, qwen2, mistral, bert, gpt2), in eval mode, fp32
    (``hidden_size`` 64 or more for bitsandbytes' 4-bit CPU kernels, which need 64-wide blocks)."""
    import torch
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                              MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=TINY_VOCAB, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers,
                  num_attention_heads=4, max_position_embeddings=64)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **common))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None,
                                                 **common))
    elif arch == "bert":
        model = BertModel(BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=TINY_VOCAB, n_embd=hidden_size, n_layer=num_layers, n_head=4,
                                           n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                           bos_token_id=0, eos_token_id=0))
    else:
        raise ValueError(arch)
    return model.eval()


@pytest.fixture
def tiny_model():
    """Factory fixture: ``tiny_model("llama", num_layers=4, seed=0)``."""
    return build_tiny_model


# --- tiny tokenizer (used by tests/run/test_data_eval.py) ---------------------------------------------

TINY_TOKENIZER_CORPUS = [
    "the cat sat on the mat", "a dog and a bird", "Answer: cat dog bird fish",
    "Question: which animal barks? the dog barks", "entailment not_entailment business sports tech",
    "Below is an instruction that describes a task. Write a response.", "### Instruction: ### Input: ### Response:",
]


def build_tiny_tokenizer(corpus=None, vocab_size: int = 320, add_bos: bool = True):
    """A byte-level BPE tokenizer trained in memory, wrapped in ``PreTrainedTokenizerFast``.

    Special tokens: ``<pad>`` (0), ``<s>`` (1, bos; prepended when ``add_bos``), ``</s>`` (2, eos).
    Any text encodes (byte-level alphabet); builds in milliseconds.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus or TINY_TOKENIZER_CORPUS) * 5, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture
def tiny_tokenizer():
    """A fresh tiny byte-level BPE tokenizer (bos prepended, eos and pad defined)."""
    return build_tiny_tokenizer()


def assert_save_load_same_logits(model, fresh_base, path, ids):
    """Save ``model`` (a PEFT model) to ``path``, load it into ``fresh_base`` and assert the same logits on ``ids``;
    returns the loaded model."""
    from peft import PeftModel

    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(path)
    loaded = PeftModel.from_pretrained(fresh_base, path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want)
    return loaded


def forward_capturing_inputs(model, ids, mask, labels):
    """``model``'s output on the batch and the (module, input) of every MoLoRA module call during it."""
    from test_layer import capture_inputs

    calls, hooks = capture_inputs(model)
    try:
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    finally:
        for h in hooks:
            h.remove()
    return out, calls
