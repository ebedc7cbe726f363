"""Nothing silently wrong (issue 8): non-finite training, precision, resume checks, checkpoint integrity and
errors a person can act on. Each test drives `molora train` / `molora eval` on a tiny random Llama (CPU)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_train import _adapter, _records, make_assets, write_recipe


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("tiny-rel"))


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    saved = dict(os.environ)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _train(argv):
    from molora.train import main

    return main([str(a) for a in argv])


def _all_finite_dir(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(path / "adapter_model.safetensors")).values())


def _nan_loss_at(monkeypatch, steps: set[int]):
    """Make the training loss NaN in the given (1-based) optimizer steps, through the Trainer subclass."""
    import molora.train as train_mod

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
    assert _train([recipe, "--train.learning_rate", "1e6"]) == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and "step " in err and "Training stopped" in err, err
    assert not (out / "adapter").exists(), "a diverged run must not write a final adapter"
    cps = sorted(out.glob("checkpoint-*"))
    for cp in cps:  # every checkpoint that exists is a good one
        assert _all_finite_dir(cp), cp


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
    from molora.checkpoint import save_adapter
    from molora.nonfinite import NonFiniteError

    model = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(num_experts=2, top_k=1, r=2))
    name, p = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        p.view(-1)[3] = float("inf")
    with pytest.raises(NonFiniteError, match=r"non-finite adapter weights: .*molora_A.*0 nan, 1 inf"):
        save_adapter(model, tmp_path / "a", is_main=True)
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()


def test_eval_refuses_non_finite_adapter(assets, tmp_path, capsys):
    from molora.eval_run import main as eval_main

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
