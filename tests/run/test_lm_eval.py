"""lm-evaluation-harness on a molora adapter: `molora lm-eval --jsonl-task NAME=FILE --model hf --model_args
pretrained=BASE,peft=ADAPTER` scores a local task from a choices-format JSONL file, offline, and its per-option
log-likelihoods equal molora's own option scores on the same adapter."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval")

from conftest import build_tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    import molora
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("lm_eval")
    tok = build_tiny_tokenizer(add_bos=False)  # lm-eval adds no BOS for this model; neither does molora then
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2))
    base.save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    model = get_peft_model(base, molora.MoLoRAConfig(num_experts="2,4", top_k=2, r=4, target_modules=["q_proj", "v_proj"],
                                                     init_weights=False))
    model.save_pretrained(d / "adapter")
    rows = [{"input": f"the cat sat on the mat {i}", "choices": ["cat", "dog", "bird fish"], "label": i % 3,
             "id": f"r{i}"} for i in range(6)]
    (d / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d, rows


def test_lm_eval_scores_a_molora_adapter_like_molora(saved, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from molora.run.evaluation import score_options
    from molora.run.lm_eval_cmd import main

    d, rows = saved
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(["--jsonl-task", f"tiny_task={d / 'task.jsonl'}", "--task-dir", str(d / "tasks"),
               "--model", "hf", "--model_args", f"pretrained={d / 'base'},peft={d / 'adapter'},dtype=float32",
               "--tasks", "tiny_task", "--device", "cpu", "--batch_size", "2", "--output_path", str(d / "out"),
               "--log_samples"])
    assert rc == 0
    samples = [json.loads(line) for f in sorted((d / "out").rglob("samples_tiny_task_*.jsonl"))
               for line in f.read_text().splitlines()]
    assert len(samples) == len(rows)
    got = {s["doc"]["id"]: [float(r[0][0]) for r in s["resps"]] for s in samples}
    results = json.loads(next((d / "out").rglob("results_*.json")).read_text())["results"]["tiny_task"]

    tok = AutoTokenizer.from_pretrained(d / "base")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d / "base"), d / "adapter").eval()
    ours = score_options(model, tok, rows, progress=False)
    for row, want in zip(rows, ours, strict=True):
        torch.testing.assert_close(torch.tensor(got[row["id"]]), torch.tensor(want), rtol=1e-4, atol=1e-4)
    acc = sum(int(max(range(3), key=s.__getitem__) == r["label"]) for r, s in zip(rows, ours, strict=True)) / len(rows)
    assert results["acc,none"] == pytest.approx(acc)
    # the adapter really was applied: the base model alone scores differently
    plain = score_options(AutoModelForCausalLM.from_pretrained(d / "base").eval(), tok, rows, progress=False)
    assert max(abs(a - b) for p, o in zip(plain, ours, strict=True) for a, b in zip(p, o, strict=True)) > 1e-3


def test_bad_jsonl_task_specs_are_refused(saved, tmp_path, capsys):
    from molora.run.lm_eval_cmd import main

    d, _ = saved
    assert main(["--jsonl-task", str(d / "task.jsonl"), "--tasks", "x"]) == 2
    assert "expected NAME=FILE" in capsys.readouterr().err
    alpaca = tmp_path / "a.jsonl"
    alpaca.write_text(json.dumps({"instruction": "say hi", "output": "hi"}) + "\n")
    assert main(["--jsonl-task", f"a={alpaca}", "--tasks", "a"]) == 2
    assert "alpaca format" in capsys.readouterr().err
    assert main(["--jsonl-task", f"1bad={d / 'task.jsonl'}", "--tasks", "x"]) == 2
    assert "'1bad'" in capsys.readouterr().err


def test_packaged_model_names_resolve_and_unknown_models_fail_in_one_line(tmp_path, capsys, monkeypatch):
    """Issue 21.4: `pretrained=smollm2-135m` (a packaged name) becomes its converted checkpoint folder, as
    everywhere else a model path is accepted; a model that is nowhere fails before lm-eval runs, in one line."""
    from molora.run import assets
    from molora.run.lm_eval_cmd import _resolve_model_args, main

    monkeypatch.setattr(assets, "packaged_model_dir", lambda name: tmp_path / "models" / name)
    got = _resolve_model_args(["--model", "hf", "--model_args", "pretrained=smollm2-135m,peft=/a,dtype=float32"])
    assert got[3] == f"pretrained={tmp_path / 'models' / 'smollm2-135m'},peft=/a,dtype=float32"
    got = _resolve_model_args([f"--model_args=pretrained={tmp_path},tokenizer=smollm2-135m"])
    assert got == [f"--model_args=pretrained={tmp_path},tokenizer={tmp_path / 'models' / 'smollm2-135m'}"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["--model", "hf", "--model_args", "pretrained=smollm2-135M,peft=/a", "--tasks", "x"]) == 2
    err = capsys.readouterr().err
    assert "pretrained=smollm2-135M: not a packaged model, a local folder, or a model in the local Hugging Face " \
           "cache" in err and "smollm2-135m" in err and "Traceback" not in err
