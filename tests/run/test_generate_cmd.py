"""Issue 20.5: `molora generate` (prompts or a file through the recipe's template, batched, greedy or sampled) and
`molora chat`, both refusing a missing or mismatched adapter in one line."""
from __future__ import annotations

import io
import json

from molora.run.generate_cmd import main_chat, main_generate

from test_train import _isolated_env, assets, write_recipe  # noqa: F401 (fixtures)


def _recipe(assets, tmp_path, **kw):
    return write_recipe(tmp_path / "r.yaml", assets, tmp_path / "run", data={
        "train_file": str(assets["train"]), "eval_file": str(assets["validation"]), "cutoff_len": 64,
        "prompt_template": "Q: {input}\nA:"}, **kw)


def test_generate_renders_the_template_and_matches_direct_greedy_decoding(assets, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = _recipe(assets, tmp_path)
    assert main_generate([str(recipe), "--adapter", "none", "--prompt", "a b", "--prompt", "c", "--max-new-tokens",
                          "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("Q: a b\nA:") == 1 and printed.count("Q: c\nA:") == 1
    out = tmp_path / "gen.jsonl"
    assert main_generate([str(recipe), "--adapter", "none", "--file", str(assets["validation"]), "--output", str(out),
                          "--max-new-tokens", "3", "--batch-size", "2"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    src = [json.loads(x) for x in open(assets["validation"]).read().splitlines()]
    assert len(rows) == len(src) and all(r["prompt"] == f"Q: {s['input']}\nA:" for r, s in zip(rows, src, strict=True))
    # batched, left-padded generation equals one-at-a-time greedy decoding
    tok = AutoTokenizer.from_pretrained(assets["model"])
    model = AutoModelForCausalLM.from_pretrained(assets["model"]).eval()
    for r in rows[:3]:
        enc = tok(r["prompt"], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        assert tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True) == r["completion"]


def test_generate_with_a_trained_adapter_and_sampling(assets, tmp_path, capsys):
    from molora.run.train import main as train

    recipe = _recipe(assets, tmp_path, train={"max_steps": 1}, eval={"before": False, "after": False},
                     report={"wandb": False, "plots": False})
    assert train([str(recipe)]) == 0
    capsys.readouterr()
    args = [str(recipe), "--prompt", "a", "--max-new-tokens", "4", "--temperature", "1.0", "--seed", "3"]
    assert main_generate(args) == 0
    first = capsys.readouterr().out
    assert main_generate(args) == 0
    assert capsys.readouterr().out == first, "a seed makes sampling repeatable"


def test_bad_requests_fail_in_one_line(assets, tmp_path, capsys):
    recipe = _recipe(assets, tmp_path)
    for argv, match in [(["--prompt", "a"], "is not an adapter folder"),
                        (["--adapter", str(tmp_path), "--prompt", "a"], "is not an adapter folder"),
                        (["--adapter", "none", "--prompt", "a", "--temperature", "-1"], "--temperature=-1.0"),
                        (["--adapter", "none", "--file", str(tmp_path / "nope.jsonl")], "no such file")]:
        assert main_generate([str(recipe), *argv]) == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1, err
    choices = write_recipe(tmp_path / "c.yaml", assets, tmp_path / "run2", data={
        "train_file": str(assets["train"]), "prompt_template": "Q: {input}\n{choices}\nA:"})
    assert main_generate([str(choices), "--adapter", "none", "--prompt", "a"]) == 2
    assert "needs {choices} besides {input}" in capsys.readouterr().err
    assert main_generate([str(choices), "--adapter", "none", "--prompt", "a", "--raw", "--max-new-tokens", "2"]) == 0


def test_chat_loop_and_a_tokenizer_without_chat_template(assets, tmp_path, capsys):
    from transformers import AutoTokenizer

    recipe = _recipe(assets, tmp_path)
    tok = AutoTokenizer.from_pretrained(assets["model"])
    if not getattr(tok, "chat_template", None):
        assert main_chat([str(recipe), "--adapter", "none"], stdin=io.StringIO("hi\n")) == 2
        assert "has no chat template" in capsys.readouterr().err
        model_dir = tmp_path / "chat_model"
        import shutil

        shutil.copytree(assets["model"], model_dir)
        tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                             "{% if add_generation_prompt %}<assistant>{% endif %}")
        tok.save_pretrained(model_dir)
        recipe = write_recipe(tmp_path / "chat.yaml", dict(assets, model=model_dir), tmp_path / "run3")
    assert main_chat([str(recipe), "--adapter", "none", "--max-new-tokens", "2"],
                     stdin=io.StringIO("hello\n/reset\nagain\n\n")) == 0
    out = capsys.readouterr().out
    assert out.count("> ") == 4 and "quits" in out
