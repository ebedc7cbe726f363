"""MoLoRA as a PEFT method on several architectures: injection with a non-uniform allocation, save/load,
disabling, generation with a KV cache, merging, the allocation table, and the `kernels` import name."""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import molora
from molora import AllocationError, MoLoRAConfig, MoLoRALinear, RoutedMergeError

ROOT = Path(__file__).resolve().parents[2]

# arch -> (layers, config kwargs, expected experts per layer, top_k per layer, ranks per layer, block name, modules per block)
ARCHS = {
    "llama": (6, dict(num_experts="▽", top_k=2, r=4), [2, 2, 4, 4, 6, 8], [2] * 6, [4] * 6, "layers", 7),
    "qwen2": (4, dict(num_experts=[1, 3, 2, 4], top_k=1, r="2,4"), [1, 3, 2, 4], [1] * 4, [2, 2, 4, 4], "layers", 7),
    "mistral": (5, dict(num_experts="2,4,6,8", top_k="1,2", r=2), [2, 2, 4, 6, 8], [1, 1, 1, 2, 2], [2] * 5,
                "layers", 7),
    "bert": (3, dict(num_experts="1,2,3", top_k=1, r=4, target_modules=["query", "key", "value", "dense"],
                     exclude_modules=["pooler.dense"]), [1, 2, 3], [1] * 3, [4] * 3, "layer", 6),
    "gpt2": (4, dict(num_experts="△", top_k="2,1", r=3, target_modules=["c_attn", "c_proj", "c_fc"]),
             [8, 6, 4, 2], [2, 2, 1, 1], [3] * 4, "h", 4),
}


def inputs(seed=0, batch=2, seq=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    return dict(input_ids=ids, attention_mask=mask)


def main_output(out):
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def molora_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoLoRALinear)]


def build(tiny_model, arch, **overrides):
    num_layers, kwargs, *_ = ARCHS[arch]
    base = tiny_model(arch, num_layers=num_layers)
    reference = copy.deepcopy(base)
    config = MoLoRAConfig(init_weights=False, **{**kwargs, **overrides})
    model = get_peft_model(base, config).eval()
    return model, reference


# --------------------------------------------------------------------------- injection
@pytest.mark.parametrize("arch", list(ARCHS))
def test_layer_indices_and_allocation(tiny_model, arch):
    num_layers, _, experts, ks, ranks, block, per_block = ARCHS[arch]
    model, reference = build(tiny_model, arch)
    mods = molora_modules(model)
    assert len(mods) == num_layers * per_block
    for name, m in mods:
        index = int(re.search(rf"\.{block}\.(\d+)\.", name).group(1))
        assert m.layer_index == index, name
        assert (m.num_experts["default"], m.top_k["default"], m.r["default"]) == (experts[index], ks[index],
                                                                                 ranks[index]), name
        e, r = experts[index], ranks[index]
        assert m.molora_A["default"].shape == (e * r, m.in_features)
        assert m.molora_B["default"].shape == (m.out_features, e * r)
        assert m.molora_router["default"].shape == (e, m.in_features)
    config = model.peft_config["default"]
    assert config.num_layers == num_layers
    assert config.allocation == [{"layer": i, "num_experts": experts[i], "top_k": ks[i], "r": ranks[i]}
                                 for i in range(num_layers)]
    batch = inputs()
    model.base_model.record_router_stats = True  # an eval-mode forward records statistics only when asked
    with torch.no_grad():
        out = main_output(model(**batch))
        base_out = main_output(reference(**batch))
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, base_out, atol=1e-4)  # random B: the adapter changes the output
    assert set(model.base_model.last_aux_loss.shape) == set()  # the aux loss was computed (a scalar)


def test_only_adapter_parameters_train(tiny_model):
    model, _ = build(tiny_model, "llama")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(re.search(r"\.molora_(A|B|router)\.default$", n) for n in trainable)


# --------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("arch", list(ARCHS))
def test_save_and_load_bit_identical(tiny_model, tmp_path, arch):
    num_layers, _, experts, ks, ranks, *_ = ARCHS[arch]
    model, _ = build(tiny_model, arch)
    batch = inputs()
    with torch.no_grad():
        out = main_output(model(**batch))
        aux = model.base_model.last_aux_loss
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MOLORA"
    assert saved["num_layers"] == num_layers
    assert saved["allocation"] == [{"layer": i, "num_experts": experts[i], "top_k": ks[i], "r": ranks[i]}
                                   for i in range(num_layers)]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    own = {n: p for n, p in model.named_parameters() if ".molora_" in n}  # one-expert routers too (frozen)
    assert len(tensors) == len(own) and all(k.endswith(("molora_A", "molora_B", "molora_router")) for k in tensors)
    frozen = {n for n, p in own.items() if not p.requires_grad}
    assert frozen == {n for n, p in own.items() if "molora_router" in n and p.shape[0] == 1}

    fresh = tiny_model(arch, num_layers=num_layers)  # same seed: the same base weights
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert loaded.peft_config["default"].allocation == saved["allocation"]
    with torch.no_grad():
        out2 = main_output(loaded(**batch))
    assert torch.equal(out, out2)
    torch.testing.assert_close(loaded.base_model.last_aux_loss, aux, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode by default


def test_loading_into_a_different_layer_count_fails(tiny_model, tmp_path):
    model, _ = build(tiny_model, "llama")
    model.save_pretrained(tmp_path)
    other = tiny_model("llama", num_layers=4)
    with pytest.raises(AllocationError, match=r"6 layers.*this model has 4"):
        PeftModel.from_pretrained(other, tmp_path)


def test_loading_with_a_different_allocation_fails(tiny_model, tmp_path):
    model, _ = build(tiny_model, "llama")
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    saved["num_experts"] = "□"  # the config now resolves to 5 experts everywhere, the checkpoint has 2,2,4,4,6,8
    path.write_text(json.dumps(saved))
    with pytest.raises(AllocationError, match=r"adapter config edited after the adapter was saved: num_experts"):
        PeftModel.from_pretrained(tiny_model("llama", num_layers=6), tmp_path)
    del saved["output_fingerprint"]  # an adapter saved before the fingerprint: the allocation check names the layer
    path.write_text(json.dumps(saved))
    with pytest.raises(AllocationError, match=r"differs.*layer 0: checkpoint 2 experts.*config 5"):
        PeftModel.from_pretrained(tiny_model("llama", num_layers=6), tmp_path)


def test_loading_with_a_different_config_fails(tiny_model, tmp_path):
    model, _ = build(tiny_model, "llama")
    model.save_pretrained(tmp_path)
    config = MoLoRAConfig(num_experts=4, top_k=2, r=4)  # no saved allocation to compare with: shapes differ
    with pytest.raises(Exception, match=r"(?s)molora_A.*size mismatch|size mismatch.*molora_A|shape"):
        PeftModel.from_pretrained(tiny_model("llama", num_layers=6), tmp_path, config=config)


# --------------------------------------------------------------------------- disable / generate
@pytest.mark.parametrize("arch", list(ARCHS))
def test_disable_adapter_gives_the_base_model(tiny_model, arch):
    model, reference = build(tiny_model, arch)
    batch = inputs()
    with torch.no_grad():
        expected = main_output(reference(**batch))
        with model.disable_adapter():
            got = main_output(model(**batch))
        adapted = main_output(model(**batch))
    assert torch.equal(got, expected)
    assert not torch.allclose(adapted, expected, atol=1e-4)  # re-enabled afterwards


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_with_and_without_kv_cache(tiny_model, arch):
    num_layers, kwargs, *_ = ARCHS[arch]
    model = get_peft_model(tiny_model(arch, num_layers=num_layers),
                           MoLoRAConfig(init_weights=False, task_type="CAUSAL_LM", **kwargs)).eval()
    with torch.no_grad():  # "trained-ish": make the experts matter
        for _, m in molora_modules(model):
            m.molora_B["default"].mul_(4.0)
    batch = inputs(seed=3, batch=2, seq=5)
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(**batch, use_cache=True, **gen)
        uncached = model.generate(**batch, use_cache=False, **gen)
        with model.disable_adapter():
            base = model.generate(**batch, use_cache=True, **gen)
    assert cached.shape == (2, 5 + 8)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, base)  # the adapter changes what is generated
    # a manual greedy loop over full forwards gives the same tokens
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        for _ in range(8):
            positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate() does with left padding (GPT-2)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(ids, cached)


# --------------------------------------------------------------------------- merging
@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_merge_and_unload_single_expert_layers(tiny_model, arch):
    model, reference = build(tiny_model, arch, num_experts=1, top_k=1)
    batch = inputs()
    with torch.no_grad():
        before = main_output(model(**batch))
    merged = model.merge_and_unload()
    assert type(merged) is type(reference)
    assert not any(isinstance(m, MoLoRALinear) for m in merged.modules())
    with torch.no_grad():
        after = main_output(merged(**batch))
        base = main_output(reference(**batch))
    real = batch["attention_mask"].bool()  # padded positions attend to nothing: ill-conditioned, not compared
    torch.testing.assert_close(after[real], before[real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, base, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_is_exact_in_float64(tiny_model, arch):
    """The merged weight is computed in the model's precision: a float64 model merges to float64 rounding (the
    delta used to be formed in float32, 1e-7 off)."""
    model, _ = build(tiny_model, arch, num_experts=1, top_k=1)
    model = model.double()
    batch = inputs()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        before = main_output(model(**batch))
        after = main_output(model.merge_and_unload()(**batch))
    assert after.dtype == torch.float64
    torch.testing.assert_close(after[real], before[real], rtol=0, atol=1e-12)


def test_merge_and_unload_routed_layer_raises_and_leaves_the_model_intact(tiny_model):
    model, _ = build(tiny_model, "llama", num_experts="1,1,1,1,1,3", top_k=1)
    batch = inputs()
    with torch.no_grad():
        before = main_output(model(**batch))
    with pytest.raises(RoutedMergeError) as info:
        model.merge_and_unload()
    msg = str(info.value)
    assert "model.layers.5." in msg and "3" in msg and "routed" in msg
    assert "num_experts=1" in msg and "merge_static_experts" in msg  # says what can be done instead
    # nothing was merged or unloaded on the way
    mods = molora_modules(model)
    assert len(mods) == 6 * 7 and not any(m.merged for _, m in mods)
    with torch.no_grad():
        assert torch.equal(main_output(model(**batch)), before)
    with pytest.raises(RoutedMergeError):
        model.merge_adapter()
    assert not any(m.merged for _, m in molora_modules(model))


def test_merge_static_experts(tiny_model):
    model, _ = build(tiny_model, "llama", num_experts="1,1,1,2,2,4", top_k=1)
    model.base_model.record_router_stats = True  # router_summary is read after eval-mode forwards below
    batch = inputs()
    with torch.no_grad():
        before = main_output(model(**batch))
    n = model.base_model.merge_static_experts()
    mods = molora_modules(model)
    assert n == 3 * 7
    for name, m in mods:
        assert m.merged == (m.num_experts["default"] == 1), name
    with torch.no_grad():
        after = main_output(model(**batch))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    summary = molora.router_summary(model)
    assert sorted(summary) == [3, 4, 5]  # merged layers no longer route
    with pytest.raises(RoutedMergeError):
        model.merge_and_unload()
    model.unmerge_adapter()
    assert not any(m.merged for _, m in molora_modules(model))
    with torch.no_grad():
        torch.testing.assert_close(main_output(model(**batch)), before, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- allocation table
@pytest.mark.parametrize("arch", list(ARCHS))
def test_allocation_table_matches_parameters(tiny_model, arch):
    num_layers, _, experts, ks, ranks, block, per_block = ARCHS[arch]
    model, _ = build(tiny_model, arch)
    table = molora.allocation_table(model)
    assert [row.layer for row in table] == list(range(num_layers))
    params = [0] * num_layers
    for name, p in model.named_parameters():
        if ".molora_" in name and p.requires_grad:  # a one-expert router is frozen: not counted
            params[int(re.search(rf"\.{block}\.(\d+)\.", name).group(1))] += p.numel()
    for i, row in enumerate(table):
        assert (row.num_experts, row.top_k, row.r, row.modules) == (experts[i], ks[i], ranks[i], per_block)
        assert row.params == params[i] > 0
    assert table.total_params == sum(params) == model.get_nb_trainable_parameters()[0]
    assert table.total_experts == sum(experts)
    text = str(table)
    assert f"{table.total_params:,}" in text and len(text.splitlines()) == num_layers + 4  # head, rules, total


def test_allocation_table_errors_without_molora(tiny_model):
    with pytest.raises(ValueError, match="no MoLoRA layers"):
        molora.allocation_table(tiny_model("llama", num_layers=2))


# --------------------------------------------------------------------------- the `kernels` name
def test_kernels_import_name_is_left_alone(tmp_path):
    """transformers probes a top-level ``kernels`` (Hub kernels library): importing molora must not change that.

    Checked in a fresh interpreter with the installed layout (``molora`` and ``molora_kernels`` importable, the
    repository root not on sys.path), comparing ``is_kernels_available()`` before and after the imports.
    """
    site = tmp_path / "site"
    site.mkdir()
    (site / "molora").symlink_to(ROOT / "molora")
    (site / "molora_kernels").symlink_to(ROOT / "kernels" / "molora_kernels")
    code = textwrap.dedent("""
        import importlib.util, json, sys
        from transformers.utils import is_kernels_available
        before = is_kernels_available()
        spec_before = importlib.util.find_spec("kernels")
        import molora, molora_kernels
        is_kernels_available.cache_clear()
        after = is_kernels_available()
        spec = importlib.util.find_spec("kernels")
        print(json.dumps({
            "before": before, "after": after,
            "same_spec": (spec is None) == (spec_before is None),
            "origin": None if spec is None else spec.origin,
            "locations": [] if spec is None or spec.submodule_search_locations is None
                         else list(spec.submodule_search_locations),
            "molora_kernels": molora_kernels.__file__,
            "kernels_module": getattr(sys.modules.get("kernels"), "__file__", None),
        }))
    """)
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["before"] == res["after"]
    assert res["same_spec"]
    ours = [str(ROOT / "kernels"), str(ROOT / "kernels" / "molora_kernels")]
    assert res["origin"] is None or not res["origin"].startswith(tuple(ours)), res
    assert not any(loc.startswith(str(ROOT)) for loc in res["locations"]), res
    assert res["kernels_module"] is None or not res["kernels_module"].startswith(str(ROOT)), res
    assert Path(res["molora_kernels"]).resolve().parent == (ROOT / "kernels" / "molora_kernels").resolve()
    # and in this process (repository layout, molora already imported) transformers still sees no Hub kernels
    # unless they are really installed
    from transformers.utils import is_kernels_available
    is_kernels_available.cache_clear()
    assert is_kernels_available() == res["before"]
    spec = importlib_spec("kernels")
    # with the repository root on sys.path, `kernels/` can at most appear as an empty PEP 420 namespace (no code)
    assert spec is None or spec.origin is None or not spec.origin.startswith(str(ROOT))


def importlib_spec(name):
    import importlib.util
    return importlib.util.find_spec(name)


def test_router_stats_are_recorded_unless_pure_inference_or_asked(tiny_model):
    """Issue 20.1: by default (record_router_stats None) a pure inference forward (eval, no_grad, no labels)
    records nothing (router_summary empty, no aux loss) and gives the same outputs; a training forward records, and
    so does an eval-mode forward with autograd on (a hand-written loop that trains in eval mode) or with labels (its
    loss keeps coef * aux: the CI failure of test_trl / test_quantized); True records in inference too; False
    never, and a forward with autograd that would lose its aux loss to it is refused, one without an aux term
    trains."""
    model, _ = build(tiny_model, "llama", num_experts=4, top_k=2)
    batch = inputs()
    tuner = model.base_model
    assert tuner.record_router_stats is None
    model.eval()
    with torch.no_grad():
        quiet = main_output(model(**batch))
        assert tuner.router_summary() == {} and tuner.last_aux_loss is None
        tuner.record_router_stats = True
        want = main_output(model(**batch))
        assert tuner.router_summary() and tuner.last_aux_loss is not None
        tuner.record_router_stats = False
        got = main_output(model(**batch))
    # no statistics: the inference path (same math, another GEMM split: round-off apart from the training path)
    torch.testing.assert_close(got, quiet, rtol=0, atol=0)
    torch.testing.assert_close(quiet, want, rtol=1e-5, atol=1e-5)
    assert tuner.router_summary() == {} and tuner.last_aux_loss is None
    tuner.record_router_stats = None
    out = model(**batch)  # eval mode, autograd on
    assert tuner.router_summary() and out.aux_loss is not None and out.aux_loss.requires_grad
    with torch.no_grad():
        model(**batch)
        assert tuner.last_aux_loss is None
        out = model(**batch, labels=batch["input_ids"])  # eval loss: the same objective as in training
        assert out.aux_loss is not None and not out.aux_loss.requires_grad
    model.train()
    model(**batch)
    assert tuner.router_summary() and tuner.last_aux_loss is not None  # training forwards record by default
    with pytest.raises(ValueError, match=r"record_router_stats='yes': True \(every forward\), False"):
        tuner.record_router_stats = "yes"
    tuner.record_router_stats = False
    with pytest.raises(RuntimeError, match=r"record_router_stats is False in a forward with autograd on, but .* trains with "
                                           r"aux_loss_coef=0.001"):
        model(**batch)
    for m in molora_modules(model):
        m[1].aux_loss_coef["default"] = 0.0
    model.eval()
    main_output(model(**batch)).sum().backward()  # eval mode with autograd is checked as well
    model.train()
    main_output(model(**batch)).sum().backward()  # nothing to lose: trains
    assert any(p.grad is not None for n, p in model.named_parameters() if "molora_B" in n)
    tuner.record_router_stats = None


# --------------------------------------------------------------------------- one-expert routers
def _router_weights(model):
    return {n: p for n, p in model.named_parameters() if "molora_router" in n}


def _registered_routers():
    from molora_kernels.routers import router_names

    return sorted(router_names())


@pytest.mark.parametrize("router", _registered_routers())
def test_a_one_expert_router_gets_no_gradient_from_any_router(tiny_model, router):
    """Why molora freezes a one-expert router: for every registered router the gate of a single expert is 1 and
    the load loss and router regularisers skip E = 1, so even when made trainable it gets an exactly zero gradient
    (with the aux loss and, where the router has one, the z-loss on)."""
    from molora_kernels import get_router

    spec = get_router(router)
    opts = {"z_loss_coef": 0.5} if any(o.name == "z_loss_coef" for o in spec.options) else None
    model = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(
        num_experts=1, top_k=1, r=2, router=router, router_options=opts, aux_loss_coef=0.5, init_weights=False))
    model.train()
    routers = _router_weights(model)
    assert routers and not any(p.requires_grad for p in routers.values())
    for p in routers.values():
        p.requires_grad_(True)
    ids = inputs()
    out = model(**ids, labels=ids["input_ids"])
    out.loss.backward()
    for n, p in routers.items():
        assert p.grad is None or not p.grad.any(), (router, n)


def test_one_expert_routers_are_frozen_saved_and_stay_frozen(tiny_model, tmp_path):
    """A one-expert router is declared frozen: not trainable, not counted, not optimised; set_adapter and
    set_requires_grad keep it so; it is still saved (the layout is unchanged) and loads back frozen."""
    model = get_peft_model(tiny_model("llama", num_layers=4), MoLoRAConfig(
        num_experts=[1, 4, 1, 4], top_k=[1, 2, 1, 2], r=2, init_weights=False))
    routers = _router_weights(model)
    one = {n for n in routers if ".layers.0." in n or ".layers.2." in n}
    assert {n for n, p in routers.items() if not p.requires_grad} == one and len(one) == 14
    model.set_adapter("default")
    model.base_model.set_requires_grad("default", True)
    assert {n for n, p in routers.items() if not p.requires_grad} == one
    trainable = model.get_nb_trainable_parameters()[0]
    assert trainable == molora.allocation_table(model).total_params
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if ".molora_" in n and n not in one)

    before = {n: p.detach().clone() for n, p in routers.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    ids = inputs()
    model(**ids, labels=ids["input_ids"]).loss.backward()
    opt.step()
    for n, p in routers.items():
        assert torch.equal(p, before[n]) == (n in one), n

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sum("molora_router" in k for k in saved) == len(routers)
    loaded = PeftModel.from_pretrained(tiny_model("llama", num_layers=4), tmp_path, is_trainable=True)
    got = _router_weights(loaded)
    assert {n for n, p in got.items() if not p.requires_grad} == one
    assert all(torch.equal(got[n], routers[n]) for n in routers)


def test_merging_down_to_one_expert_freezes_the_router(tiny_model):
    from molora.tuner.merge import merge_experts

    model = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(num_experts=3, top_k=1, r=2,
                                                                          init_weights=False))
    loads = {i: [0.5, 0.3, 0.2] for i in range(2)}
    merge_experts(model, 1, loads)
    routers = _router_weights(model)
    assert all(p.shape[0] == 1 and not p.requires_grad for p in routers.values())
    assert model.get_nb_trainable_parameters()[0] == molora.allocation_table(model).total_params
