"""Nothing silently wrong (issue 8): non-finite training, precision, resume checks, checkpoint integrity and
errors a person can act on. Each test drives `molora train` / `molora eval` on a tiny random Llama (CPU)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_train import _adapter, _isolated_env, _records, assets, write_recipe  # noqa: F401 (fixtures)


def _train(argv):
    from molora.run.train import main

    return main([str(a) for a in argv])


def _all_finite_dir(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(path / "adapter_model.safetensors")).values())


def _nan_loss_at(monkeypatch, steps: set[int]):
    """Make the training loss NaN in the given (1-based) optimizer steps, through the Trainer subclass."""
    import molora.run.train as train_mod

    build = train_mod._build_trainer_class

    def patched():
        base = build()

        class NanAt(base):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                res = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                if self.state.global_step + 1 in steps and model.training:
                    if return_outputs:
                        return res[0] * float("nan"), res[1]
                    return res * float("nan")
                return res

        return NanAt

    monkeypatch.setattr(train_mod, "_build_trainer_class", patched)


# ------------------------------------------------------------------------------------------ item 2: non-finite
def test_diverging_run_stops_with_the_step_and_writes_nothing_non_finite(assets, tmp_path, capsys):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, eval={"before": False},
                          train={"max_steps": 6, "save_steps": 1, "lr_scheduler_type": "constant"})
    # 1e30: one Adam step makes the adapter weights ~1e30, so the next forward overflows float32 on any CPU (at 1e6
    # some CPUs saturate to a finite loss with zero gradients instead)
    assert _train([recipe, "--train.learning_rate", "1e30"]) == 2
    err = capsys.readouterr().err
    # the loss, a gradient or a weight is named as non-finite, with the step
    assert re.search(r"step \d of 6: .*(non-finite|is nan|is inf)", err) and "Training stopped" in err, err
    assert not (out / "adapter").exists(), "a diverged run must not write a final adapter"
    cps = sorted(out.glob("checkpoint-*"))
    for cp in cps:  # every checkpoint that exists is a good one
        assert _all_finite_dir(cp), cp


def test_skip_policy_run_whose_weights_overflow_does_not_exit_0(assets, tmp_path, capsys):
    """Issue 19.2: with nonfinite: skip, lr 1e30 leaves finite weights of ~1e30 whose forward overflows; every later
    step is skipped and the run used to exit 0 and score NaN logits as an accuracy. The final scoring refuses them."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, eval={"before": False, "generation": False},
                          train={"max_steps": 4, "save_steps": 1, "lr_scheduler_type": "constant",
                                 "nonfinite": "skip", "gradient_accumulation_steps": 1})
    assert _train([recipe, "--train.learning_rate", "1e30"]) == 2
    err = capsys.readouterr().err
    assert "output is not finite" in err and "first module with a non-finite output:" in err, err
    assert not (out / "results.json").exists(), "no accuracy was recorded"


def test_nan_loss_stops_the_run_naming_the_step(assets, tmp_path, capsys, monkeypatch):
    _nan_loss_at(monkeypatch, {3})
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, eval={"before": False, "after": False},
                          train={"max_steps": 4, "save_steps": 1})
    assert _train([recipe]) == 2
    err = capsys.readouterr().err
    assert "step 3 of 4: the training loss is nan" in err and "checkpoint-2" in err, err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_skip_policy_drops_the_step_and_leaves_weights_and_moments_alone(assets, tmp_path, capsys, monkeypatch):
    _nan_loss_at(monkeypatch, {3})
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, eval={"before": False, "after": False},
                          train={"max_steps": 4, "save_steps": 1, "gradient_accumulation_steps": 1,
                                 "nonfinite": "skip", "logging_steps": 1})
    assert _train([recipe]) == 0
    printed = capsys.readouterr().out
    assert "step 3: the training loss is nan; step skipped" in printed
    a2, a3 = _adapter(out / "checkpoint-2"), _adapter(out / "checkpoint-3")
    assert a2.keys() == a3.keys() and all(torch.equal(a2[k], a3[k]) for k in a2), "a skipped step changes nothing"
    o2 = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=False)["state"]
    o3 = torch.load(out / "checkpoint-3" / "optimizer.pt", weights_only=False)["state"]
    assert all(torch.equal(o2[i]["exp_avg"], o3[i]["exp_avg"]) for i in o2), "moments untouched"
    a4 = _adapter(out / "checkpoint-4")
    assert any(not torch.equal(a3[k], a4[k]) for k in a3), "training goes on after the skipped step"
    logs = _records(out, "train")
    assert logs[-1]["nonfinite_skipped"] == 1
    assert json.loads((out / "results.json").read_text())["nonfinite_skipped_steps"] == 1


def test_skip_policy_gives_up_after_too_many_in_a_row(assets, tmp_path, capsys, monkeypatch):
    _nan_loss_at(monkeypatch, {2, 3, 4})
    recipe = write_recipe(tmp_path / "r.yaml", assets, tmp_path / "run", eval={"before": False, "after": False},
                          train={"max_steps": 5, "nonfinite": "skip", "max_nonfinite_skips": 2})
    assert _train([recipe]) == 2
    assert "3 steps in a row had non-finite losses" in capsys.readouterr().err


def test_save_adapter_refuses_non_finite_weights(tiny_model, tmp_path):
    from peft import get_peft_model

    from molora import MoLoRAConfig
    from molora.run.checkpoint import save_adapter
    from molora.run.nonfinite import NonFiniteError

    model = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(num_experts=2, top_k=1, r=2))
    name, p = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        p.view(-1)[3] = float("inf")
    with pytest.raises(NonFiniteError, match=r"non-finite adapter weights: .*molora_A.*0 nan, 1 inf"):
        save_adapter(model, tmp_path / "a", is_main=True)
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()


def test_eval_refuses_non_finite_adapter(assets, tmp_path, capsys):
    from molora.run.eval_run import main as eval_main

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, eval={"before": False, "after": False},
                          train={"max_steps": 2})
    assert _train([recipe]) == 0
    f = out / "adapter" / "adapter_model.safetensors"
    state = load_file(str(f))
    key = sorted(state)[0]
    state[key][0, 0] = float("nan")
    save_file(state, str(f), metadata={"format": "pt"})
    (out / "adapter" / "molora_complete.json").unlink()  # an adapter from elsewhere: no hashes to check
    assert eval_main([str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and key.split(".")[-2] in err and str(f.parent) in err, err


# ------------------------------------------------------------------------------------------ resume (items 4-7, 10, 16)
def _crash_after(monkeypatch, recipe, step, *extra):
    from molora.run.train import main
    from molora_faults import CRASH, SimulatedCrash

    monkeypatch.setenv(CRASH, str(step))
    with pytest.raises(SimulatedCrash):
        main([str(recipe), *map(str, extra)])
    monkeypatch.delenv(CRASH)


def test_resume_of_a_finished_run_never_trains_past_max_steps(assets, tmp_path, capsys):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, eval={"before": False},
                          train={"max_steps": 4, "save_steps": 2, "lr_scheduler_type": "constant"})
    assert _train([recipe]) == 0
    final = _adapter(out / "adapter")
    results = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    # resumed when complete: says so, changes nothing
    assert _train([recipe, "--resume", "latest"]) == 0
    assert "is complete" in capsys.readouterr().out
    assert all(torch.equal(final[k], v) for k, v in _adapter(out / "adapter").items())
    # killed during the evaluation after training (results.json never written): only the rest is done
    (out / "results.json").unlink()
    assert _train([recipe, "--resume", "latest"]) == 0
    printed = capsys.readouterr().out
    assert "checkpoint-4 is the end of training (step 4)" in printed
    again = _adapter(out / "adapter")
    ckpt = _adapter(out / "checkpoint-4")
    assert all(torch.equal(ckpt[k], again[k]) and torch.equal(final[k], again[k]) for k in final)
    new = json.loads((out / "results.json").read_text())
    assert new["global_step"] == 4 and new["accuracy"]["after"] == results["accuracy"]["after"]
    assert max(r["step"] for r in _records(out, "train")) == 4
    assert not list(out.glob("checkpoint-5"))


def test_resume_refuses_a_changed_recipe_or_data_naming_the_keys(assets, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, eval={"before": False, "after": False},
                          train={"max_steps": 4, "save_steps": 2})
    _crash_after(monkeypatch, recipe, 2)
    capsys.readouterr()
    # labels flipped in the training file
    flipped = tmp_path / "flipped.jsonl"
    rows = [json.loads(line) for line in Path(assets["train"]).read_text().splitlines()]
    flipped.write_text("".join(json.dumps({**r, "label": 1 - r["label"]}) + "\n" for r in rows))
    assert _train([recipe, "--resume", "latest", "--data.train_file", flipped]) == 2
    err = capsys.readouterr().err
    assert "data.train_rows_sha256" in err and "different setup" in err and "--resume-allow" in err
    assert _train([recipe, "--resume", "latest", "--train.learning_rate", "0.02", "--train.seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rate: 0.01 (checkpoint) -> 0.02 (now)" in err and "train.seed: 0 (checkpoint) -> 1" in err
    # a misspelt allow key is refused naming it (issue 19.10), not silently ignored
    assert _train([recipe, "--resume", "latest", "--train.learning_rate", "0.02",
                   "--resume-allow", "train.learning_rat"]) == 2
    err = capsys.readouterr().err
    assert "--resume-allow train.learning_rat: not a key" in err and "did you mean train.learning_rate" in err, err
    # keys that do not change the weights may differ; an explicit allow accepts the rest
    assert _train([recipe, "--resume", "latest", "--train.learning_rate", "0.02", "--train.logging_steps", "1",
                   "--resume-allow", "train.learning_rate"]) == 0
    printed = capsys.readouterr().out
    assert "changes allowed by --resume-allow" in printed and "train.learning_rate" in printed


def test_resume_refuses_another_deepspeed_setup(assets, tmp_path, capsys, monkeypatch):
    """A checkpoint written under ZeRO-3 with 2 processes, resumed without DeepSpeed: refused with the reason
    (its optimizer state is in DeepSpeed's partitioned layout)."""
    from molora.run.checkpoint import MARKER

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, eval={"before": False, "after": False},
                          train={"max_steps": 4, "save_steps": 2})
    _crash_after(monkeypatch, recipe, 2)
    marker_path = out / "checkpoint-2" / MARKER
    marker = json.loads(marker_path.read_text())
    assert marker["setup"] == {"deepspeed": False, "zero_stage": None, "world_size": 1}
    marker["setup"] = {"deepspeed": True, "zero_stage": 3, "world_size": 2}
    marker_path.write_text(json.dumps(marker))
    capsys.readouterr()
    assert _train([recipe, "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert "DeepSpeed ZeRO-3 with 2 process(es)" in err and "no DeepSpeed, 1 process(es)" in err
    assert "restart the optimizer" in err
    # an older marker without the setup: inferred from the files (DeepSpeed's global_step<N>/ folder)
    del marker["setup"]
    marker_path.write_text(json.dumps(marker))
    (out / "checkpoint-2" / "global_step2").mkdir()
    assert _train([recipe, "--resume", "latest"]) == 2
    assert "DeepSpeed with 1 process(es)" in capsys.readouterr().err


def test_corrupted_checkpoint_falls_back_to_the_previous_one(assets, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, eval={"before": False, "after": False},
                          train={"max_steps": 6, "save_steps": 2})
    _crash_after(monkeypatch, recipe, 4)
    f = out / "checkpoint-4" / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x40  # one bit flipped inside a tensor: same size, valid file
    f.write_bytes(bytes(data))
    opt = out / "checkpoint-2" / "optimizer.pt"
    capsys.readouterr()
    assert _train([recipe, "--resume", "latest"]) == 0
    printed = capsys.readouterr().out
    assert "skipping corrupted checkpoint checkpoint-4" in printed and "adapter_model.safetensors" in printed
    assert f"resuming from {out / 'checkpoint-2'}" in printed
    # an explicit path to a corrupted checkpoint is refused, naming the file
    data = bytearray(opt.read_bytes())
    data[len(data) // 2] ^= 0x01
    opt.write_bytes(bytes(data))
    assert _train([recipe, "--resume", out / "checkpoint-2"]) == 2
    assert "optimizer.pt: content differs from the SHA-256" in capsys.readouterr().err


def test_run_that_never_trained_does_not_block_the_next(assets, tmp_path, capsys):
    out = tmp_path / "run"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "choices": ["x"], "label": 3}\n')
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, eval={"before": False, "after": False},
                          train={"max_steps": 2})
    assert _train([recipe, "--data.train_file", bad]) == 2
    capsys.readouterr()
    assert _train([recipe]) == 0, capsys.readouterr().err


def test_resume_refuses_an_optimizer_state_of_other_trainable_tensors(assets, tmp_path, capsys, monkeypatch):
    """An optimizer state written for another set of trainable tensors (e.g. by a molora that still trained the
    one-expert routers, which the default test allocation 1,2,4 has) is a one-line ResumeError naming the
    checkpoint, not torch's traceback."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, eval={"before": False, "after": False},
                          train={"max_steps": 4, "save_steps": 2})
    _crash_after(monkeypatch, recipe, 2)
    opt_path = out / "checkpoint-2" / "optimizer.pt"
    state = torch.load(opt_path, weights_only=True)
    group = state["param_groups"][0]
    group["params"] = list(group["params"]) + [max(p for g in state["param_groups"] for p in g["params"]) + 1]
    torch.save(state, opt_path)
    from molora.run.checkpoint import MARKER, sha256_file

    marker_path = out / "checkpoint-2" / MARKER  # a well-formed checkpoint, not a corrupted one
    marker = json.loads(marker_path.read_text())
    for f in marker["files"]:
        if f["path"] == "optimizer.pt":
            f.update(size=opt_path.stat().st_size, sha256=sha256_file(opt_path))
    marker_path.write_text(json.dumps(marker))
    capsys.readouterr()
    assert _train([recipe, "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint-2: its optimizer state was written for another set of trainable tensors" in err, err
    assert "Traceback" not in err and "start a new output_dir" in err


def test_resume_latest_before_the_first_checkpoint_starts_cleanly(assets, tmp_path, capsys, monkeypatch):
    _nan_loss_at(monkeypatch, {3})
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, eval={"before": False, "after": False},
                          train={"max_steps": 4, "save_steps": 100, "logging_steps": 1})
    assert _train([recipe]) == 2  # stopped at step 3, no checkpoint, metrics.jsonl with steps 1-2
    assert _records(out, "train") and not list(out.glob("checkpoint-*"))
    monkeypatch.undo()
    os.environ["WANDB_MODE"] = "offline"
    capsys.readouterr()
    assert _train([recipe, "--resume", "latest"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "stopped before its first checkpoint" in printed and "starting from scratch" in printed
    assert [r["step"] for r in _records(out, "train")] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------ precision (items 1, 3)
ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "recipes").rglob("*.yaml"))
PRECISION_KEYS = ("bf16", "fp16", "gradient_checkpointing", "use_reentrant")
ALLOCATION_KEYS = ("lora_dropout", "backend", "router", "aux_loss_coef", "aux_loss_mode")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_shipped_recipe_precision_trains_on_a_tiny_model(path, assets, tmp_path, capsys):
    """Each shipped recipe's precision, checkpointing and routing settings, through `molora train` (the paper
    recipes' bf16 + gradient checkpointing crashed the default kernel on the first backward)."""
    import yaml

    recipe_yaml = yaml.safe_load(path.read_text(encoding="utf-8"))
    train = {k: v for k, v in recipe_yaml.get("train", {}).items() if k in PRECISION_KEYS}
    alloc = {k: v for k, v in recipe_yaml.get("allocation", {}).items() if k in ALLOCATION_KEYS}
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, eval={"before": False, "after": False},
                          train={"max_steps": 2, "save_steps": 2, **train}, allocation=alloc)
    rc = _train([recipe])
    if train.get("fp16") and not torch.cuda.is_available():
        assert rc == 2 and "train.fp16: true needs a CUDA GPU" in capsys.readouterr().err
        return
    assert rc == 0, capsys.readouterr().err
    run = _records(out, "run")[0]
    want = "bfloat16 autocast (CPU)" if train.get("bf16") else "float32 (no autocast)"
    assert run["precision"].startswith(want)
    assert _all_finite_dir(out / "adapter")
    losses = [r["loss"] for r in _records(out, "train")]
    assert losses and all(l == l and abs(l) < 1e3 for l in losses)


def test_fp16_on_cpu_is_refused_before_loading(assets, tmp_path, capsys):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, train={"max_steps": 2, "fp16": True})
    if torch.cuda.is_available():
        pytest.skip("CUDA machine: fp16 runs")
    assert _train([recipe]) == 2
    err = capsys.readouterr().err
    assert "train.fp16: true needs a CUDA GPU" in err and "bf16" in err
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("train,model,why", [
    ({"deepspeed": str(ROOT / "recipes" / "deepspeed" / "zero3.json")}, {}, "DeepSpeed casts the model to float32"),
    ({"bf16": True}, {}, "autocast would compute in 16 bits"),
])
def test_float64_is_refused_where_it_would_silently_be_something_else(assets, tmp_path, capsys, train, model, why):
    """Issue 19.11: model.dtype float64 is the exact reference of the ZeRO equivalence test; under DeepSpeed the
    engine silently trained a float64 model in float32 (its adapter came back float32)."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, train={"max_steps": 2, **train},
                          model={"dtype": "float64", **model})
    assert _train([recipe]) == 2
    err = capsys.readouterr().err
    assert "model.dtype: float64 is a single-process, unquantized, no-autocast setting" in err and why in err
    assert not (out / "metrics.jsonl").exists()


def test_float64_trains_a_float64_adapter(assets, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, train={"max_steps": 2, "save_steps": 2},
                          model={"dtype": "float64"}, eval={"before": False, "after": False})
    assert _train([recipe]) == 0
    assert _records(out, "run")[0]["precision"].startswith("float64 (no autocast)")
    assert {t.dtype for t in load_file(str(out / "adapter" / "adapter_model.safetensors")).values()} == {torch.float64}


# ------------------------------------------------------------------------------------------ item 15, 18: warnings
def test_a_run_prints_no_deprecation_warnings(assets, tmp_path):
    """A fresh process (transformers warns once per process) trains with activation checkpointing and
    evaluates (KV-cache option scoring, generation), loads the adapter with `molora eval`: no deprecation
    notice from transformers or PEFT (`is_gradient_checkpointing`, `gradient_checkpointing_enable`,
    `past_key_values`), and no bitsandbytes notice asking to install the Hub `kernels` package (printed on
    AVX512-BF16 CPUs when PEFT imports bitsandbytes)."""
    import subprocess
    import sys

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, train={"max_steps": 2, "gradient_checkpointing": True},
                          eval={"loglik_max_examples": 4, "generation_max_examples": 2})
    env = dict(os.environ, PYTHONWARNINGS="always", WANDB_MODE="offline")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "kernels"), env.get("PYTHONPATH", "")])
    for cmd in (["-m", "molora.run.train", str(recipe)], ["-m", "molora.run.eval_run", str(recipe)]):
        proc = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        text = proc.stdout + proc.stderr
        for needle in ("deprecated", "FutureWarning", "DeprecationWarning", "kernels-community"):
            assert needle not in text, [line for line in text.splitlines() if needle in line][:5]


# ------------------------------------------------------------------------------------------ item 11: broken adapters
@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    """A finished tiny run (recipe path, output dir)."""
    root = tmp_path_factory.mktemp("trained")
    out = root / "run"
    recipe = write_recipe(root / "r.yaml", assets, out, eval={"before": False, "after": False,
                                                              "generation_max_examples": 2, "loglik_max_examples": 4},
                          train={"max_steps": 2}, report={"wandb": False, "plots": False})
    from molora.run.train import main

    saved = dict(os.environ)
    try:
        assert main([str(recipe)]) == 0
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return recipe, out


def _broken_copy(trained, tmp_path, name):
    import shutil

    recipe, out = trained
    dst = tmp_path / name
    shutil.copytree(out / "adapter", dst)
    (dst / "molora_complete.json").unlink()  # as if copied by hand: no hashes to compare against
    return recipe, dst


@pytest.mark.parametrize("damage", ["truncated", "empty", "no-weights", "missing-tensor"])
def test_eval_names_the_broken_adapter_file(trained, tmp_path, capsys, monkeypatch, damage):
    from molora.run.eval_run import main as eval_main

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    recipe, dst = _broken_copy(trained, tmp_path, damage)
    f = dst / "adapter_model.safetensors"
    if damage == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        want = ["adapter_model.safetensors: unreadable", "truncated or corrupted"]
    elif damage == "empty":
        f.write_bytes(b"")
        want = ["adapter_model.safetensors: unreadable (0 bytes"]
    elif damage == "no-weights":
        f.unlink()
        want = ["holds no adapter weights", "nothing is fetched from a hub"]
    else:
        state = load_file(str(f))
        gone = sorted(k for k in state if "molora_B" in k)[-1]
        del state[gone]
        save_file(state, str(f), metadata={"format": "pt"})
        want = ["1 adapter tensor(s) missing", gone]
    assert eval_main([str(recipe), "--adapter", str(dst)]) == 2
    err = capsys.readouterr().err
    assert str(dst) in err and all(w in err for w in want), err
    assert "Traceback" not in err and "huggingface.co" not in err


@pytest.mark.parametrize("edit", [{"router": "soft"}, {"top_k": 1}, {"lora_alpha": 64},
                                  {"router_options": {"top_p": 0.5}}])
def test_eval_refuses_an_adapter_config_edited_after_saving(trained, tmp_path, capsys, monkeypatch, edit):
    """Issue 19.10: editing an output-shaping field of adapter_config.json (no marker to catch it) used to load
    silently with other outputs; the fingerprint saved with the config names the edited field."""
    from molora.run.eval_run import main as eval_main

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    recipe, dst = _broken_copy(trained, tmp_path, "edited")
    cfg_path = dst / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert set(cfg["output_fingerprint"]) >= {"router", "top_k", "lora_alpha", "allocation"}
    key = next(iter(edit))
    if key == "router_options":
        cfg["router"] = "topp"
        edit = {**edit, "router": "topp"}
    if key == "top_k" and cfg["top_k"] == 1:
        edit = {"top_k": 2}
    cfg_path.write_text(json.dumps({**cfg, **edit}))
    assert eval_main([str(recipe), "--adapter", str(dst)]) == 2
    err = capsys.readouterr().err
    assert "adapter config edited after the adapter was saved" in err and key in err.split("saved:")[1], err
    assert "Traceback" not in err


def test_fields_that_do_not_shape_outputs_may_be_edited_and_old_adapters_load(trained, tmp_path):
    """backend / aux / dropout are not output fields; an adapter saved before the fingerprint loads unchecked."""
    from peft import PeftModel

    from molora import MoLoRAConfig

    _, dst = _broken_copy(trained, tmp_path, "ok")
    cfg_path = dst / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "backend": "reference", "aux_loss_coef": 0.5, "lora_dropout": 0.2}))
    assert MoLoRAConfig.from_pretrained(str(dst)).backend == "reference"
    old = {k: v for k, v in cfg.items() if k != "output_fingerprint"}
    cfg_path.write_text(json.dumps({**old, "top_k": 1}))
    assert MoLoRAConfig.from_pretrained(str(dst)).top_k == 1  # nothing to compare with: taken as written
    assert isinstance(PeftModel, type)


# ------------------------------------------------------------------------------------------ item 13: output dir
def test_unwritable_output_dir_fails_before_anything_loads(assets, tmp_path, capsys):
    import time

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out, want in ((blocker / "run", "cannot be created"), (Path("/sys/kernel"), "is not writable")):
        if out == Path("/sys/kernel") and not out.is_dir():
            continue
        recipe = write_recipe(tmp_path / "r.yaml", assets, out, report={"jsonl": False})
        t0 = time.perf_counter()
        assert _train([recipe]) == 2
        captured = capsys.readouterr()
        assert f"train.output_dir {out} {want}" in captured.err, captured.err
        assert "layers" not in captured.out, "no model was loaded"
        assert time.perf_counter() - t0 < 5


def test_not_enough_space_is_refused_before_training(assets, tmp_path, capsys, monkeypatch):
    import shutil as sh

    from molora.run import storage

    real = sh.disk_usage
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    recipe = write_recipe(tmp_path / "r.yaml", assets, tmp_path / "run")
    assert _train([recipe]) == 2
    err = capsys.readouterr().err
    assert "not enough disk space" in err and "1000 B free" in err and "needs about" in err


@pytest.mark.parametrize("kind", ["torch-writer", "torch-pos", "ENOSPC"])
def test_disk_full_while_saving_names_path_and_bytes(assets, tmp_path, capsys, monkeypatch, kind):
    import errno

    import transformers.trainer as hf_trainer

    def full(*a, **k):
        if kind == "ENOSPC":
            raise OSError(errno.ENOSPC, "No space left on device")
        if kind == "torch-pos":  # what a real full disk gave (issue 19.9)
            raise RuntimeError("[enforce fail at inline_container.cc:858] . unexpected pos 64 vs 0")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, eval={"before": False, "after": False},
                          train={"max_steps": 2, "save_steps": 2})
    monkeypatch.setattr(hf_trainer.torch, "save", full)
    assert _train([recipe]) == 2
    err = capsys.readouterr().err
    assert "disk full while writing checkpoint-2" in err and str(out / ".tmp-checkpoint-2") in err, err
    assert "needs about" in err and "free" in err and "--resume latest" in err


# ------------------------------------------------------------------------------------------ item 14: cut rows
def test_cut_rows_are_counted_and_reported(tiny_tokenizer):
    from molora.run.data import build_dataset

    long_words = " ".join(["cat"] * 3000)
    rows = [{"id": "short", "input": "a dog", "choices": ["cat", "dog"], "label": 1},
            {"id": "long-input", "input": long_words, "choices": ["cat", "dog"], "label": 0},
            {"id": "long-answer", "instruction": "say it", "input": "", "output": long_words}]
    ds = build_dataset(rows, tiny_tokenizer, cutoff_len=64)
    rep = ds.truncation
    assert (rep.rows, rep.cut, rep.answer_cut, rep.answer_lost) == (3, 2, 1, 0)
    assert rep.longest > 3000 and all(len(f["input_ids"]) <= 64 for f in ds.features)
    msg = rep.message("training rows")
    assert msg.startswith("2 of 3 training rows were longer than data.cutoff_len=64")
    assert "'long-input'" in msg and "1 lost part of their answer" in msg
    assert build_dataset(rows[:1], tiny_tokenizer, cutoff_len=64).truncation.message() is None


def test_a_run_reports_cut_rows(assets, tmp_path, capsys):
    rows = [json.loads(line) for line in Path(assets["train"]).read_text().splitlines()]
    rows[5]["input"] = " ".join(["the cat sat"] * 20000)  # ~0.2 MB row
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, eval={"before": False, "after": False},
                          train={"max_steps": 1}, data={"train_file": str(data)})
    assert _train([recipe]) == 0
    printed = capsys.readouterr().out
    assert "warning: 1 of 64 training rows were longer than data.cutoff_len=64" in printed
    assert "0 lost part of their answer" in printed
    assert _records(out, "run")[0]["truncation"]["cut"] == 1


# ------------------------------------------------------------------------------------------ item 17: early allocation
def _validate(recipe, *extra):
    import subprocess
    import sys
    import time

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels")]))
    code = ("import sys, molora_cli; sys.argv = ['molora', 'train'] + sys.argv[1:]; rc = molora_cli.main(); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(recipe), *map(str, extra)], env=env, capture_output=True,
                          text=True, timeout=120)
    return proc, time.perf_counter() - t0


@pytest.mark.parametrize("override,want", [
    (["--allocation.num_experts", "1,2,4", "--allocation.top_k", "2"], "top_k=2 is larger than num_experts=1 in layer 0"),
    (["--allocation.num_experts", "1,2,3,4,5"], "has 5 groups but the model has only 4 layers"),
    (["--allocation.num_experts", "[2, 2, 2]"], "has 3 entries but the model has 4 layers"),
])
def test_validate_resolves_the_allocation_from_the_config(assets, tmp_path, override, want):
    recipe = write_recipe(tmp_path / "r.yaml", assets, tmp_path / "run")
    proc, seconds = _validate(recipe, "--validate", *override)
    assert proc.returncode == 2 and want in proc.stderr and "allocation" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and seconds < 20
    proc, _ = _validate(recipe, *override)  # the same before a real run: no model load, no torch
    assert proc.returncode == 2 and want in proc.stderr


def test_validate_prints_the_resolved_allocation_and_warns_on_misaligned_groups(assets, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", assets, tmp_path / "run")
    proc, _ = _validate(recipe, "--validate", "--allocation.num_experts", "2,4", "--allocation.top_k", "1,1,2")
    assert proc.returncode == 0, proc.stderr
    assert "layers 0-1: 2 experts, top_k 1, r 4; layer 2: 4 experts, top_k 1, r 4; layer 3: 4 experts, top_k 2" in \
        proc.stdout
    assert "warning: top_k='1,1,2' splits the 4 layers into groups that do not line up" in proc.stderr
    proc, _ = _validate(recipe, "--validate", "--allocation.num_experts", "2,4", "--allocation.top_k", "1,2")
    assert proc.returncode == 0 and "line up" not in proc.stderr


def test_packaged_model_layer_count_matches_the_table():
    from molora.run.recipe import PACKAGED_MODEL_LAYERS, PACKAGED_MODEL_NAMES

    assert set(PACKAGED_MODEL_LAYERS) == set(PACKAGED_MODEL_NAMES)
    assert PACKAGED_MODEL_LAYERS["smollm2-135m"] == 30  # SmolLM2-135M: 30 decoder layers (the packaged SmolLM2-135M-Instruct)


def test_allocation_command_prints_one_line_errors(assets, capsys):
    from molora.run.cli import main as cli_main

    assert cli_main(["allocation", str(assets["model"]), "--num-experts", "1,2", "--top-k", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("molora allocation: error: top_k=3 is larger than num_experts=1") and "\n" not in err


def test_a_marker_stripped_of_its_hashes_is_refused(trained, tmp_path, capsys):
    """Issue 19.10: a completion marker whose SHA-256 fields were removed (or whose file list was emptied) used to be
    accepted, so an edited adapter passed as verified. Since format 2 every listed file must carry its hash."""
    import shutil

    from molora.run.checkpoint import CheckpointError, verify_hashes
    from molora.run.eval_run import main as eval_main

    recipe, out = trained
    verify_hashes(out / "adapter")  # the real one passes
    for name, edit in [("stripped", lambda m: {**m, "files": [{k: v for k, v in f.items() if k != "sha256"}
                                                              for f in m["files"]]}),
                       ("emptied", lambda m: {**m, "files": []})]:
        dst = tmp_path / name
        shutil.copytree(out / "adapter", dst)
        marker = dst / "molora_complete.json"
        marker.write_text(json.dumps(edit(json.loads(marker.read_text()))))
        with pytest.raises(CheckpointError, match="must list every file with its size and SHA-256"):
            verify_hashes(dst)
        assert eval_main([str(recipe), "--adapter", str(dst)]) == 2
        assert "stripped of its hashes" in capsys.readouterr().err


def test_a_checkpoint_from_before_a_new_recipe_key_resumes_when_the_key_is_at_its_default(tmp_path):
    """A checkpoint written before train.router_lr_multiplier existed resumed as "different setup"; a new key at its
    default is the behaviour the checkpoint was made with. A non-default value is still refused."""
    from molora.run.resume import ResumeError, check_fingerprint

    saved = {"train.learning_rate": 0.01}
    now = {"train.learning_rate": 0.01, "train.router_lr_multiplier": 1.0, "allocation.shared_expert_r": 0}
    assert check_fingerprint(tmp_path, saved, now) == []
    with pytest.raises(ResumeError, match=r"train.router_lr_multiplier: \"<unset>\" \(checkpoint\) -> 10.0"):
        check_fingerprint(tmp_path, saved, {**now, "train.router_lr_multiplier": 10.0})
    from molora.run.resume import NOT_FINGERPRINTED

    assert "train.threads" in NOT_FINGERPRINTED  # thread counts do not shape the weights


def test_output_fingerprint_survives_save_and_load_of_sets_lists_and_specs(tiny_model, tmp_path):
    """The fingerprint is computed on normalised fields: a target list in any order (saved from a set), block
    notation and router options load back unrefused, with the same outputs."""
    from peft import PeftModel, get_peft_model

    from molora import MoLoRAConfig

    cfg = MoLoRAConfig(num_experts="2,4", top_k=[1, 2], r=2, target_modules=["v_proj", "q_proj", "down_proj"],
                       router="topp", router_options={"top_p": 0.7}, init_weights=False)
    model = get_peft_model(tiny_model("llama", num_layers=2), cfg)
    model.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    saved["target_modules"] = list(reversed(saved["target_modules"]))  # another order of the same set
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(saved))
    loaded = PeftModel.from_pretrained(tiny_model("llama", num_layers=2), tmp_path / "a")
    ids = torch.randint(0, 64, (2, 6))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
