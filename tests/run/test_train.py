"""`molora train` end to end on a tiny random Llama (CPU): training, evaluation, atomic adapter-only checkpoints,
exact resume after a crash, router telemetry in metrics.jsonl, `molora report` PNGs."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import build_tiny_tokenizer

WORDS_A = "the cat sat on the mat a bird".split()
WORDS_B = "Question which animal barks dog fish".split()


def make_assets(root: Path, num_layers: int = 4, n_train: int = 64, n_eval: int = 16,
                hidden_size: int = 32) -> dict[str, Path]:
    """A tiny random Llama checkpoint with its tokenizer, and choices-format JSONL data in two vocabularies
    (rows alternate in pairs: A A B B ...), labels 'cat' for A rows and 'dog' for B rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    model_dir = root / "model"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rng = random.Random(0)
    paths = {"model": model_dir}
    for split, n in (("train", n_train), ("validation", n_eval)):
        rows = []
        for i in range(n):
            label = (i // 2) % 2
            words = [rng.choice(WORDS_A if label == 0 else WORDS_B) for _ in range(rng.randint(3, 8))]
            rows.append({"id": f"{split}-{i}", "input": " ".join(words), "choices": ["cat", "dog"], "label": label})
        p = root / f"{split}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        paths[split] = p
    return paths


def write_recipe(path: Path, assets: dict[str, Path], out: Path, **sections) -> Path:
    recipe = {
        "model": {"name_or_path": str(assets["model"])},
        "data": {"train_file": str(assets["train"]), "eval_file": str(assets["validation"]), "cutoff_len": 64},
        "allocation": {"num_experts": "1,2,4", "top_k": 1, "r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "train": {"output_dir": str(out), "max_steps": 4, "per_device_train_batch_size": 4,
                  "gradient_accumulation_steps": 2, "learning_rate": 0.01, "logging_steps": 2, "save_steps": 2,
                  "seed": 0},
        "eval": {"loglik_max_examples": 8, "generation_max_examples": 4, "max_new_tokens": 3},
        "report": {"wandb": False},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    """run() sets WANDB_* and friends in os.environ: restore it after each test."""
    saved = dict(os.environ)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def _records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_train_evaluates_saves_and_reports(assets, tmp_path, capsys):
    """One run: accuracy before/after, eval loss, checkpoints with markers, adapter loadable by PEFT, router
    telemetry accumulated over every micro-batch of each logging interval, wandb offline, `molora report` PNGs."""
    from molora.run.checkpoint import MARKER, is_complete
    from molora.run.report import main as report_main
    from molora.run.train import main

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out,
                          train={"eval_strategy": "steps", "eval_steps": 2, "max_steps": 4},
                          report={"wandb": True, "wandb_mode": "offline"})
    assert main([str(recipe)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy (loglik, 8 rows): before" in printed and str(out / "adapter") in printed

    # checkpoints: complete (marker written last, files as listed), nothing left in staging
    cps = sorted(p.name for p in out.glob("checkpoint-*"))
    assert cps == ["checkpoint-2", "checkpoint-4"]
    for cp in cps:
        assert is_complete(out / cp) and (out / cp / MARKER).is_file()
        assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= {
            p.name for p in (out / cp).iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]

    # the adapter: adapter-only safetensors (no base weights), non-empty, allocation recorded, loadable by PEFT
    adapter = _adapter(out / "adapter")
    assert adapter and all(v.numel() > 0 for v in adapter.values())
    assert all("molora_" in k for k in adapter), "only adapter tensors are saved"
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert [a["num_experts"] for a in cfg["allocation"]] == [1, 1, 2, 4]
    assert torch.equal(adapter[next(iter(adapter))], _adapter(out / "checkpoint-4")[next(iter(adapter))])
    import molora  # noqa: F401 - registers the PEFT method
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"]), out / "adapter")
    sd = {k.replace(".default", ""): v for k, v in loaded.state_dict().items() if "molora_" in k}
    some = next(k for k in adapter if "molora_B" in k)
    assert torch.equal(sd[some], adapter[some])
    assert adapter[some].abs().sum() > 0, "B moved away from its zero init"

    # metrics.jsonl: loss, aux loss, lr, tokens/s and per-layer router telemetry over 2 steps x 2 micro-batches
    train = _records(out, "train")
    assert [r["step"] for r in train] == [1, 2, 4]  # logging_first_step, then every 2 steps
    for r in train:
        assert {"loss", "task_loss", "aux_loss", "learning_rate", "tokens_per_s", "grad_norm"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["aux_loss"] > 0
        assert 0.05 < r["host_rss_gib"] < 64  # resident memory of the process, logged with every record
        assert r["host_rss_gib"] <= r["host_peak_rss_gib"] + 0.01  # and the process's peak so far
        assert r["loss"] == pytest.approx(r["task_loss"] + 0.001 * r["aux_loss"], abs=2e-6)
        router = r["router"]
        assert router["layers"] == [0, 1, 2, 3] and router["num_experts"] == [1, 1, 2, 4]
        for load, e in zip(router["load"], router["num_experts"], strict=True):
            assert len(load) == e and sum(load) == pytest.approx(1.0, abs=1e-4)
        assert all(1.0 <= imb <= e + 1e-6 for imb, e in zip(router["imbalance"], router["num_experts"], strict=True))
    assert train[0]["router"]["forwards"] == 2 and train[1]["router"]["forwards"] == 2  # GA micro-batches
    assert train[2]["router"]["forwards"] == 4  # steps 3-4: every micro-batch of the interval, not just the last
    assert len(_records(out, "eval")) >= 2 and "eval_loss" in _records(out, "eval")[0]
    acc = {r["stage"]: r for r in _records(out, "accuracy")}
    assert set(acc) == {"before", "after"} and acc["after"]["loglik"]["n"] == 8 and acc["after"]["generation"]["n"] == 4
    results = json.loads((out / "results.json").read_text())
    assert results["accuracy"]["after"]["loglik"]["n"] == 8 and results["global_step"] == 4

    # wandb ran offline inside the output dir, without prompting
    assert list((out / "wandb").glob("offline-run-*")), "no offline wandb run"

    # plots: written by the run and again by `molora report`
    assert {p.name for p in (out / "plots").glob("*.png")} == {"loss.png", "expert_load.png", "router.png"}
    shutil.rmtree(out / "plots")
    assert report_main([str(out), "--out", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out
    paths = [Path(line) for line in printed.splitlines() if line.startswith(str(tmp_path / "plots"))]
    assert sorted(p.name for p in paths) == ["expert_load.png", "loss.png", "router.png", "router_diagnostics.json",
                                            "router_diagnostics.txt"]
    assert all(p.stat().st_size > 5000 for p in paths if p.suffix == ".png")
    assert "router diagnostics (end of training" in printed and "layer 3: E=4 k=1" in printed


def test_resume_after_crash_matches_uninterrupted(assets, tmp_path, capsys, monkeypatch):
    """Killed right after checkpoint 4 of 6 (linear LR schedule, dropout on, so RNG, optimizer, scheduler and
    data position all matter), a half-written checkpoint-5 left behind: --resume latest skips checkpoint-5,
    continues from 4 and ends with the same adapter as an uninterrupted run."""
    from molora.run.train import main
    from molora_faults import CRASH, SimulatedCrash

    common = {"max_steps": 6, "save_steps": 2, "logging_steps": 1}
    alloc = {"lora_dropout": 0.1}
    evals = {"before": False, "after": False}
    full = tmp_path / "full"
    r_full = write_recipe(tmp_path / "full.yaml", assets, full, train=common, allocation=alloc, eval=evals)
    assert main([str(r_full)]) == 0

    part = tmp_path / "part"
    r_part = write_recipe(tmp_path / "part.yaml", assets, part, train=common, allocation=alloc, eval=evals)
    monkeypatch.setenv(CRASH, "4")
    with pytest.raises(SimulatedCrash):
        main([str(r_part)])
    monkeypatch.delenv(CRASH)
    assert not (part / "adapter").exists() and (part / "checkpoint-4").is_dir()
    # a checkpoint that was being written when the machine died: everything but the marker
    half = part / "checkpoint-5"
    shutil.copytree(part / "checkpoint-4", half)
    (half / "molora_complete.json").unlink()
    capsys.readouterr()

    assert main([str(r_part), "--resume", "latest"]) == 0
    printed = capsys.readouterr().out
    assert "ignoring incomplete checkpoint(s)" in printed and "checkpoint-5" in printed
    assert f"resuming from {part / 'checkpoint-4'}" in printed
    a, b = _adapter(full / "adapter"), _adapter(part / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    # the stitched log has each step once, and the resumed steps equal the uninterrupted ones
    from molora.run.report import load_run

    stitched = {r["step"]: r["loss"] for r in load_run(part / "metrics.jsonl")["train"]}
    reference = {r["step"]: r["loss"] for r in load_run(full / "metrics.jsonl")["train"]}
    assert stitched.keys() == reference.keys() == set(range(1, 7))
    assert stitched == pytest.approx(reference, abs=1e-5)

    # an explicit path to the half-written checkpoint is refused
    assert main([str(r_part), "--resume", str(half)]) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err


def test_resume_with_another_allocation_fails_clearly(assets, tmp_path, capsys):
    from molora.run.train import main

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, train={"max_steps": 2},
                          eval={"before": False, "after": False})
    assert main([str(recipe)]) == 0
    capsys.readouterr()
    assert main([str(recipe), "--resume", "latest", "--allocation.num_experts", "2,2,4", "--train.max_steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "different setup" in err and 'allocation.num_experts: "1,2,4" (checkpoint) -> "2,2,4" (now)' in err
    assert "train.max_steps: 2 (checkpoint) -> 4 (now)" in err
    # allowed differences still meet the allocation check, which names the layers
    assert main([str(recipe), "--resume", "latest", "--allocation.num_experts", "2,2,4", "--train.max_steps", "4",
                 "--resume-allow", "allocation,train.max_steps"]) == 2
    err = capsys.readouterr().err
    assert "different allocation" in err and "layer 0: checkpoint 1 experts" in err and "config 2" in err


def test_fresh_run_refuses_to_mix_with_a_previous_one(assets, tmp_path, capsys):
    from molora.run.train import main

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, train={"max_steps": 2},
                          eval={"before": False, "after": False}, report={"plots": False})
    assert main([str(recipe)]) == 0
    capsys.readouterr()
    assert main([str(recipe)]) == 2
    assert "--resume latest" in capsys.readouterr().err
    assert main([str(recipe), "--train.overwrite_output_dir", "true", "--train.save_strategy", "no"]) == 0
    assert not list(out.glob("checkpoint-*")), "overwrite_output_dir removes the previous run's checkpoints"
    assert len(_records(out, "run")) == 1


def test_lm_head_at_labels_only_trains_the_same_adapter(assets, tmp_path, monkeypatch):
    """train.logits_at_labels_only (default on) changes the work, not the result: same adapter and losses as the
    full LM head, with gradient accumulation (the Trainer's num_items_in_batch path) and the aux loss on."""
    import molora.run.label_logits as ll
    from molora.run.train import main

    sliced = []
    real = ll.label_positions

    def counting(labels, *args, **kwargs):
        picked = real(labels, *args, **kwargs)
        sliced.append(picked is not None and picked[0].numel() < labels.shape[1] - 1)
        return picked

    monkeypatch.setattr(ll, "label_positions", counting)
    evals = {"before": False, "after": False}
    outs = {}
    for flag in (True, False):
        out = tmp_path / f"labels_only_{flag}"
        recipe = write_recipe(tmp_path / f"{flag}.yaml", assets, out, eval=evals,
                              train={"logits_at_labels_only": flag, "logging_steps": 1},
                              allocation={"aux_loss_coef": 0.01})
        assert main([str(recipe)]) == 0
        outs[flag] = out
        if flag:
            assert len(sliced) == 8 and all(sliced)  # 4 steps x 2 micro-batches, every one sliced
    assert len(sliced) == 8  # the full-head run never slices
    a, b = _adapter(outs[True] / "adapter"), _adapter(outs[False] / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    losses = [[r["loss"] for r in _records(o, "train")] for o in (outs[True], outs[False])]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_eval_command_scores_saved_adapters_like_training_did(assets, tmp_path, capsys):
    """`molora eval` on the final adapter reproduces the run's "after" accuracy, `--adapter none` its "before",
    a checkpoint directory is accepted, and a missing adapter fails before any model is loaded."""
    from molora.run.cli import main as cli_main
    from molora.run.train import main

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out)
    assert main([str(recipe)]) == 0
    acc = json.loads((out / "results.json").read_text())["accuracy"]
    capsys.readouterr()

    assert cli_main(["eval", str(recipe)]) == 0
    got = json.loads((out / "adapter" / "eval_results.json").read_text())["accuracy"]
    for kind in ("loglik", "generation"):
        assert got[kind]["n"] == acc["after"][kind]["n"]
        assert got[kind]["accuracy"] == pytest.approx(acc["after"][kind]["accuracy"])
    assert "loglik accuracy" in capsys.readouterr().out

    base_json = tmp_path / "base.json"
    assert cli_main(["eval", str(recipe), "--adapter", "none", "--output", str(base_json)]) == 0
    got = json.loads(base_json.read_text())["accuracy"]
    assert got["loglik"]["accuracy"] == pytest.approx(acc["before"]["loglik"]["accuracy"])

    assert cli_main(["eval", str(recipe), "--adapter", str(out / "checkpoint-4")]) == 0
    assert (out / "checkpoint-4" / "eval_results.json").is_file()

    # through the `molora` command in a fresh interpreter (the package is imported there without registering
    # with PEFT until it is needed)
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "kernels")]))
    code = f"import sys, molora_cli; sys.argv = ['molora', 'eval', {str(recipe)!r}, '--output', " \
           f"{str(tmp_path / 'cmd.json')!r}]; sys.exit(molora_cli.main())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads((tmp_path / "cmd.json").read_text())["accuracy"]
    assert got["loglik"]["accuracy"] == pytest.approx(acc["after"]["loglik"]["accuracy"])

    capsys.readouterr()
    assert cli_main(["eval", str(recipe), "--adapter", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "adapter_config.json" in err
