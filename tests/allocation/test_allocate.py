"""Data-driven allocation (issue 9): each signal against a direct computation on a tiny random model, the
score -> experts mapping on awkward cases, `molora allocate`, and `auto:` in a recipe."""
from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

from molora.allocation.mapping import MappingError, scores_to_experts

from test_train import _isolated_env, _records, assets, write_recipe  # noqa: F401 (fixtures)


# ------------------------------------------------------------------------------------------ mapping
@pytest.mark.parametrize("seed", range(20))
def test_mapping_meets_the_budget_exactly_inside_the_bounds(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    scores = [rng.choice([0.0, rng.random(), rng.random() * 100, 1.0]) for _ in range(n)]
    lo = rng.randint(1, 3)
    hi = rng.choice([None, lo + rng.randint(0, 6)])
    budget = rng.randint(n * lo, n * (hi if hi else lo + 8))
    for higher in (True, False):
        got = scores_to_experts(scores, budget, beta=rng.choice([0.0, 0.5, 1.0, 2.5]), higher_gets_more=higher,
                                min_experts=lo, max_experts=hi)
        assert len(got) == n and sum(got) == budget
        assert all(lo <= e <= (hi or budget) for e in got)


def test_mapping_follows_the_scores_and_their_direction():
    scores = [0.1, 0.2, 0.4, 0.8]
    assert scores_to_experts(scores, 30, beta=1.0) == [2, 4, 8, 16]
    assert scores_to_experts(scores, 30, beta=1.0, higher_gets_more=False) == [16, 8, 4, 2]
    assert scores_to_experts(scores, 12, beta=0.0) == [3, 3, 3, 3]
    # bounds: the share above max is spread over the others in proportion
    # bounds: 16 and then 11.4 exceed max 10; the other two share the remaining 10 as 1:2 (3.33, 6.67)
    assert scores_to_experts(scores, 30, beta=1.0, max_experts=10) == [3, 7, 10, 10]
    assert scores_to_experts(scores, 30, beta=1.0, min_experts=6) == [6, 6, 6, 12]


def test_mapping_ties_and_one_layer():
    assert scores_to_experts([1.0, 1.0, 1.0], 7) == [3, 2, 2]  # ties: the lower layer first
    assert scores_to_experts([0.3], 5) == [5]
    assert scores_to_experts([0.0, 0.0], 4) == [2, 2]  # all-zero scores: uniform


@pytest.mark.parametrize("kw,match", [
    (dict(scores=[1, 2, 3], budget=2), "budget=2 is below 3 layers x min 1"),
    (dict(scores=[1, 2, 3], budget=7, min_experts=3), "budget=7 is below 3 layers x min 3"),
    (dict(scores=[1, 2, 3], budget=20, max_experts=4), "budget=20 is above 3 layers x max 4"),
    (dict(scores=[1, 2, 3], budget=9, min_experts=3, max_experts=2), "max=2 must be an int >= min=3"),
    (dict(scores=[1, float("nan")], budget=4), "score of layer 1 is nan"),
    (dict(scores=[1, -2], budget=4), "score of layer 1 is -2 < 0"),
    (dict(scores=[], budget=4), "no layer scores"),
    (dict(scores=[1, 2], budget=4, groups=3), "groups=3 must be an int between 1 and the number of layers"),
])
def test_mapping_errors_name_the_value(kw, match):
    scores, budget = kw.pop("scores"), kw.pop("budget")
    with pytest.raises(MappingError, match=match.replace("(", r"\(").replace(")", r"\)")):
        scores_to_experts(scores, budget, **kw)


def test_mapping_with_groups_is_constant_inside_each_group():
    scores = [0.1, 0.12, 0.3, 0.32, 0.5, 0.55, 0.9, 0.95]
    got = scores_to_experts(scores, 40, groups=4)
    assert got[0] == got[1] and got[2] == got[3] and got[4] == got[5] and got[6] == got[7]
    assert got == sorted(got) and sum(got) == 40


# ------------------------------------------------------------------------------------------ signals
def _batches(seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        ids = torch.randint(3, 64, (3, 10), generator=g)
        att = torch.ones_like(ids)
        if pad:
            att[1, 7:] = 0  # right padding
            att[2, 4:] = 0
            ids[att == 0] = 0
        labels = ids.clone()
        labels[att == 0] = -100
        out.append({"input_ids": ids, "attention_mask": att, "labels": labels})
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_block_influence_equals_the_direct_computation(tiny_model, arch):
    from molora.allocation.signals import block_influence

    model = tiny_model(arch, num_layers=4)
    batches = _batches()
    got = block_influence(model, batches)
    # direct: hidden_states[l] and [l + 1] are block l's input and output once the final norm is the identity
    final_norm = ("model", "norm") if arch != "gpt2" else ("transformer", "ln_f")
    setattr(getattr(model, final_norm[0]), final_norm[1], nn.Identity())
    sums, counts = np.zeros(4), 0.0
    with torch.no_grad():
        for b in batches:
            hs = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
            hs = hs.hidden_states
            m = b["attention_mask"].double().numpy()
            for layer in range(4):
                a, c = hs[layer].double().numpy(), hs[layer + 1].double().numpy()
                cos = (a * c).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(c, axis=-1))
                sums[layer] += (cos * m).sum()
            counts += m.sum()
    want = 1 - sums / counts
    np.testing.assert_allclose(got.scores, want, rtol=1e-5, atol=1e-6)
    assert got.detail["tokens"] == int(counts)


def test_alpha_hill_equals_the_direct_computation(tiny_model):
    from molora.allocation.signals import alpha_hill, alpha_hill_of

    model = tiny_model("llama", num_layers=3)
    got = alpha_hill(model)

    def direct(w):
        w = w.detach().double().numpy()
        ev = np.sort(np.linalg.eigvalsh(w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T))
        nz = ev[ev > 1e-5]
        i = len(nz) // 2
        n = len(nz) - i
        return 1 + n / (np.log(nz[i:]).sum() - n * np.log(nz[i]))

    for layer, blk in enumerate(model.model.layers):
        mods = [m for m in blk.modules() if isinstance(m, nn.Linear)]
        want = np.mean([direct(m.weight) for m in mods])
        assert got.scores[layer] == pytest.approx(want, rel=1e-6)
    # a heavier tail gives a smaller alpha: a matrix with a few dominant directions vs an isotropic one
    g = torch.Generator().manual_seed(0)
    iso = torch.randn(64, 64, generator=g)
    u, s, v = torch.linalg.svd(iso)
    heavy = u @ torch.diag(s * torch.logspace(2, 0, 64)) @ v
    assert alpha_hill_of(heavy) < alpha_hill_of(iso)


def test_alpha_hill_agrees_with_weightwatcher():
    """Our alpha-Hill against weightwatcher (Martin & Mahoney's tool, which AlphaLoRA's spectra come from): WW's
    eigenvalues of every block weight are ours up to its normalisation (alpha is scale-free), and WW's own
    power-law fit, evaluated at AlphaLoRA's xmin (the median eigenvalue), gives our alpha. WW then picks its xmin
    by the KS distance; AlphaLoRA (and molora) fix it at the median, so only that candidate is compared. WW fits
    tails of fewer than 20 eigenvalues with another estimator, so the matrices here all have 64 (or 63)."""
    import warnings

    from transformers import LlamaConfig, LlamaForCausalLM

    from molora.allocation.signals import alpha_hill_of

    with warnings.catch_warnings():  # weightwatcher's powerlaw module sets a global "ignore" filter on import
        ww = pytest.importorskip("weightwatcher")
        from weightwatcher.WW_powerlaw import WWFit

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=4))
        # give one weight a heavy tail, as training does, so the alphas are not all alike
        w = model.model.layers[1].mlp.down_proj.weight
        u, s, v = torch.linalg.svd(w.detach(), full_matrices=False)
        w.data = u @ torch.diag(s * torch.logspace(1.5, 0, s.numel())) @ v
        watcher = ww.WeightWatcher(model=model)
        frame = watcher.analyze(min_evals=1, plot=False)
        modules = dict(model.named_modules())
        compared = []
        for _, row in frame.iterrows():
            if ".layers." not in row.longname:
                continue
            evals = np.sort(np.asarray(watcher.get_ESD(layer=int(row.layer_id)), dtype=np.float64))
            weight = modules[row.longname].weight
            ours_evals = np.sort(torch.linalg.svdvals(weight.detach().double()).numpy() ** 2)
            ratio = ours_evals / evals
            np.testing.assert_allclose(ratio, ratio[0], rtol=1e-8)  # the same spectrum up to WW's scale
            # AlphaLoRA/TempBalance drop eigenvalues of W^T W below 1e-5 *before* any normalisation (a random
            # square matrix often has one there); WW keeps them: compare on the same set
            evals = evals[ours_evals > 1e-5]
            fit = WWFit(evals, xmin=evals[len(evals) // 2])
            assert alpha_hill_of(weight) == pytest.approx(fit.alphas[0], rel=1e-5), row.longname
            compared.append((row.longname, alpha_hill_of(weight)))
    assert len(compared) == 14  # 2 blocks x 7 projections
    alphas = dict(compared)
    assert alphas["model.layers.1.mlp.down_proj"] < min(a for n, a in compared if "down_proj" not in n)


def test_grad_norm_equals_the_direct_computation(tiny_model):
    """The probe's dL/dB per layer equals scaling * dL/dW @ A^T computed on the bare model (same A: the probe is
    drawn with the same seed), and the model comes back unchanged."""
    from peft import get_peft_model

    from molora import MoLoRAConfig
    from molora.allocation.signals import grad_norm

    model = tiny_model("llama", num_layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _batches(pad=True)
    got = grad_norm(model, batches, rank=4, seed=5)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the model is unchanged"
    assert not any(hasattr(m, "molora_A") for m in model.modules()), "the probe is removed"

    # the probe's A matrices, drawn the same way
    twin = tiny_model("llama", num_layers=3)
    torch.manual_seed(5)
    probe = get_peft_model(twin, MoLoRAConfig(num_experts=1, top_k=1, r=4, lora_alpha=4, aux_loss_coef=0.0),
                           adapter_name="_molora_probe")
    a_of = {n.replace("base_model.model.", "").replace(".molora_A._molora_probe", ""): p.detach()
            for n, p in probe.named_parameters() if "molora_A" in n}
    for p in model.parameters():
        p.requires_grad_(True)
    want = np.zeros(3)
    for b in batches:
        model.zero_grad()
        model(**b).loss.backward()
        sq = np.zeros(3)
        for name, a in a_of.items():
            w = model.get_submodule(name).weight
            db = (w.grad.double() @ a.double().t()).numpy()  # scaling = alpha / r = 1
            sq[int(name.split(".")[2])] += (db ** 2).sum()
        want += np.sqrt(sq)
    want /= len(batches)
    np.testing.assert_allclose(got.scores, want, rtol=1e-4)


# ------------------------------------------------------------------------------------------ molora allocate, auto:
def _cli(argv):
    from molora.run.cli import main

    return main([str(a) for a in argv])


def test_allocate_command_prints_table_png_and_a_fragment_a_recipe_accepts(assets, tmp_path, capsys):
    from molora.run.recipe import load_recipe

    recipe = write_recipe(tmp_path / "r.yaml", assets, tmp_path / "run")
    frag = tmp_path / "alloc.yaml"
    rc = _cli(["allocate", recipe, "--method", "block-influence", "--budget", "10", "--calib-examples", "8",
               "--write", frag, "--out", tmp_path / "alloc"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "block-influence score" in out and "trainable params" in out and "total" in out
    data = json.loads((tmp_path / "alloc" / "block-influence-budget10.json").read_text())
    assert sum(data["experts"]) == 10 and len(data["scores"]) == 4 and data["calib_examples"] == 8
    assert (tmp_path / "alloc" / "block-influence-budget10.png").stat().st_size > 1000
    text = frag.read_text()
    assert yaml.safe_load(text)["allocation"]["num_experts"] == data["experts"]
    # the fragment goes into a recipe as is
    merged = yaml.safe_load(recipe.read_text())
    merged["allocation"].update(yaml.safe_load(text)["allocation"])
    merged["allocation"]["top_k"] = 1
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(merged))
    assert load_recipe(tmp_path / "m.yaml").allocation.num_experts == data["experts"]


@pytest.mark.parametrize("argv,match", [
    (["--method", "nope", "--budget", "10"], "unknown allocation method 'nope'; known: alpha-hill, attn-mlp, block-influence"),
    (["--method", "alpha-hill", "--budget", "3"], "--budget=3 is below one expert per layer"),
    (["--method", "alpha-hill", "--budget", "10", "--min", "3"], "budget=10 is below 4 layers x min 3"),
])
def test_allocate_command_errors(assets, tmp_path, capsys, argv, match):
    recipe = write_recipe(tmp_path / "r.yaml", assets, tmp_path / "run", allocation={"top_k": 1})
    assert _cli(["allocate", recipe, *argv, "--out", tmp_path / "a"]) == 2
    assert match in capsys.readouterr().err


def test_auto_in_a_recipe_resolves_identically_twice_and_is_stored(assets, tmp_path, capsys, monkeypatch):
    from molora.run.train import main

    monkeypatch.setenv("MOLORA_CACHE", str(tmp_path / "cache"))
    alloc = {"num_experts": "auto:block-influence", "expert_budget": 10, "top_k": 1, "auto_calib_examples": 8}
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        recipe = write_recipe(tmp_path / f"{name}.yaml", assets, out, allocation=alloc, train={"max_steps": 1},
                              eval={"before": False, "after": False})
        assert main([str(recipe)]) == 0
        printed = capsys.readouterr().out
        runs.append((out, printed))
    assert "computed, cached in" in runs[0][1] and "(cache " in runs[1][1]
    cfgs = [json.loads((out / "adapter" / "adapter_config.json").read_text()) for out, _ in runs]
    assert cfgs[0]["allocation"] == cfgs[1]["allocation"]
    experts = [row["num_experts"] for row in cfgs[0]["allocation"]]
    assert sum(experts) == 10
    auto = _records(runs[0][0], "run")[0]["auto_allocation"]
    assert auto["num_experts"] == experts and auto["result"]["method"] == "block-influence"


def test_auto_cache_entries_are_validated_and_an_unwritable_cache_only_warns(assets, tmp_path, capsys, monkeypatch):
    """Issue 19.7: an edited but valid-looking cache file (200 experts for a budget of 10) was used as it was; `{}`,
    a JSON list or an unwritable cache path gave a traceback. Bad entries are recomputed with a warning naming why."""
    from molora.run.train import main

    cache = tmp_path / "cache"
    monkeypatch.setenv("MOLORA_CACHE", str(cache))
    alloc = {"num_experts": "auto:block-influence", "expert_budget": 10, "top_k": 1, "auto_calib_examples": 8}

    def run(name):
        out = tmp_path / name
        recipe = write_recipe(tmp_path / f"{name}.yaml", assets, out, allocation=alloc, train={"max_steps": 1},
                              eval={"before": False, "after": False})
        rc = main([str(recipe)])
        printed = capsys.readouterr()
        cfg = json.loads((out / "adapter" / "adapter_config.json").read_text()) if rc == 0 else None
        return rc, printed.out + printed.err, cfg

    rc, _, cfg = run("first")
    good = [row["num_experts"] for row in cfg["allocation"]]
    (entry,) = (cache / "allocations").glob("block-influence-*.json")
    valid = json.loads(entry.read_text())
    edited = dict(valid, num_experts=[200] + valid["num_experts"][1:])
    for i, (content, why) in enumerate([(json.dumps(edited), "sums to"), ("{}", "its key None"),
                                        ("[1, 2]", "not a JSON object (list)"), ("{not json", "unreadable")]):
        entry.write_text(content)
        rc, printed, cfg = run(f"bad{i}")
        assert rc == 0 and "ignoring the cached allocation" in printed and why in printed, printed
        assert [row["num_experts"] for row in cfg["allocation"]] == good
        assert json.loads(entry.read_text())["num_experts"] == valid["num_experts"], "rewritten with the good one"
    entry.unlink()
    monkeypatch.setenv("MOLORA_CACHE", str(tmp_path / "a_file"))
    (tmp_path / "a_file").write_text("not a folder")
    rc, printed, cfg = run("unwritable")
    assert rc == 0 and "could not cache the allocation" in printed
    assert [row["num_experts"] for row in cfg["allocation"]] == good


def test_auto_recipe_errors_before_loading(assets, tmp_path, capsys):
    from molora.run.train import main

    recipe = write_recipe(tmp_path / "r.yaml", assets, tmp_path / "run",
                          allocation={"num_experts": "auto:block-influence", "top_k": 1})
    assert main([str(recipe)]) == 2
    assert "needs allocation.expert_budget" in capsys.readouterr().err
    assert main([str(recipe), "--allocation.num_experts", "auto:nope", "--allocation.expert_budget", "8"]) == 2
    assert "unknown allocation method 'nope'" in capsys.readouterr().err
    assert main([str(recipe), "--allocation.expert_budget", "3"]) == 2
    assert "expert_budget=3 is below one expert per layer" in capsys.readouterr().err


def test_allocate_through_the_light_command_entry_point(assets, tmp_path):
    """The installed `molora` command imports the package without registering it with PEFT; grad-norm's probe
    must register it (bug found running `molora allocate --method grad-norm`)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    recipe = write_recipe(tmp_path / "r.yaml", assets, tmp_path / "run", allocation={"top_k": 1})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "kernels")]))
    code = "import sys, molora_cli; sys.argv = ['molora'] + sys.argv[1:]; sys.exit(molora_cli.main())"
    proc = subprocess.run([sys.executable, "-c", code, "allocate", str(recipe), "--method", "grad-norm", "--budget",
                           "8", "--calib-examples", "8", "--out", str(tmp_path / "a")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sum(json.loads((tmp_path / "a" / "grad-norm-budget8.json").read_text())["experts"]) == 8


@pytest.mark.parametrize("method", sorted(__import__("molora.allocation.methods", fromlist=["METHODS"]).METHODS))
def test_every_registered_method_allocates_the_budget(tiny_model, method):
    """Contract of the method registry (issue 22.2): every registered method scores each layer of a tiny model and
    its allocation spends the budget exactly, with at least one expert per layer."""
    from molora.allocation.auto import allocate

    model = tiny_model("llama", num_layers=4)
    res = allocate(model, method, 12, batches=_batches())
    counts = list(res.experts) + list(res.experts_mlp or [])
    assert len(res.experts) == len(res.scores) == 4 and all(c >= 1 for c in counts)
    assert sum(counts) == 12 * (2 if res.experts_mlp else 1)


def test_a_method_registered_from_its_own_module_runs(tiny_model):
    """One file + one entry: a method whose function lives outside the signals module ("module:function")."""
    from molora.allocation import methods
    from molora.allocation.auto import allocate

    entry = methods.AllocationMethod("bi-elsewhere", "molora.allocation.signals:block_influence", True, True, 1.0,
                                     "block influence, registered by module path")
    methods.register_method(entry)
    try:
        with pytest.raises(ValueError, match="already registered"):
            methods.register_method(entry)
        model = tiny_model("llama", num_layers=4)
        got = allocate(model, "bi-elsewhere", 12, batches=_batches())
        want = allocate(model, "block-influence", 12, batches=_batches())
        assert got.experts == want.experts and got.scores == want.scores
    finally:
        methods.METHODS.pop("bi-elsewhere")
