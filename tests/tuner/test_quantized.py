"""MoLoRA on bitsandbytes-quantized base layers (4-bit nf4/fp4, 8-bit), on bitsandbytes' CPU backend.

The reference is the same MoLoRA layer around an ``nn.Linear`` holding the *dequantized* weight: the experts and
router never read the base weight, so their outputs and gradients must match exactly; the base part matches to
the rounding of the compute dtype (4-bit) or of LLM.int8's activation quantization (8-bit).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

bnb = pytest.importorskip("bitsandbytes")

import molora  # noqa: E402
from molora import MoLoRAConfig, MoLoRALinear  # noqa: E402
from molora.tuner.base_layers import BASE_LAYERS, BaseLayerType, base_layer_type, register_base_layer  # noqa: E402
from molora.tuner.router_state import RouterCollector  # noqa: E402

D_IN, D_OUT = 128, 64  # multiples of bitsandbytes' 4-bit block size (64)


def quantize_linear(lin: nn.Linear, kind: str, compute_dtype=torch.float32) -> nn.Module:
    """A bitsandbytes copy of ``lin``: kind in nf4, fp4 (double quant), int8."""
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                has_fp16_weights=False, threshold=0.0)
        q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, quant_type=kind, compress_statistics=kind == "fp4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=kind,
                                     compress_statistics=kind == "fp4")
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu")  # quantizes


def molora_pair(kind: str, router: str = "topk", compute_dtype=torch.float32, dropout=0.0, seed=0):
    """(quantized MoLoRA layer, reference MoLoRA layer around nn.Linear(dequantized W)), same adapter params."""
    torch.manual_seed(seed)
    lin = nn.Linear(D_IN, D_OUT, bias=True).requires_grad_(False)
    q = quantize_linear(lin, kind, compute_dtype)
    kw = dict(num_experts=4, top_k=2, r=4, lora_alpha=8, lora_dropout=dropout, router=router, aux_loss_coef=0.1,
              aux_loss_mode="masked", backend="auto", init_weights=False)
    layer = MoLoRALinear(q, "default", layer_index=0, module_name="blocks.0.proj", **kw)
    for p in layer.parameters():  # PEFT puts adapters in the compute dtype; get_peft_model casts them back to fp32
        if p.requires_grad:
            p.data = p.data.float()
    ref_base = nn.Linear(D_IN, D_OUT, bias=True).requires_grad_(False)
    ref_base.weight.data = base_layer_type(q).dequantize(q).clone()
    ref_base.bias.data = lin.bias.data.clone()
    ref = MoLoRALinear(ref_base, "default", layer_index=0, module_name="blocks.0.proj", **kw)
    ref.load_state_dict({k: v for k, v in layer.state_dict().items() if "molora_" in k}, strict=False)
    return layer, ref, lin


def forward_backward(layer, x, upstream):
    layer.collector = RouterCollector()
    layer.collector.start_forward(None)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y.float() * upstream).sum().backward()
    return y, [x.grad] + [p.grad for p in (layer.molora_A["default"], layer.molora_B["default"],
                                           layer.molora_router["default"])]


@pytest.mark.parametrize("kind,compute,tol", [("nf4", torch.float32, 1e-5), ("fp4", torch.float32, 1e-5),
                                              ("nf4", torch.bfloat16, 2e-2), ("int8", torch.float32, 3e-2)])
@pytest.mark.parametrize("router", ["topk", "soft"])
def test_quantized_base_matches_dequantized_reference(kind, compute, tol, router):
    layer, ref, lin = molora_pair(kind, router, compute)
    assert base_layer_type(layer.base_layer).quantized
    torch.manual_seed(1)
    x = torch.randn(3, 5, D_IN)
    up = torch.randn(3, 5, D_OUT)
    y, grads = forward_backward(layer, x, up)
    y_ref, grads_ref = forward_backward(ref, x, up)
    scale = y_ref.abs().max().item()
    assert (y.float() - y_ref).abs().max().item() <= tol * scale, "output"
    # the adapters do not read the base weight: their gradients agree to float32 rounding whatever the base
    for name, g, gr in zip(("A", "B", "router"), grads[1:], grads_ref[1:], strict=True):
        assert g is not None and torch.allclose(g, gr, atol=1e-5, rtol=1e-4), name
    assert (grads[0] - grads_ref[0]).abs().max().item() <= tol * grads_ref[0].abs().max().item(), "x grad"
    # the delta on its own is exactly the reference's delta
    with torch.no_grad():
        d = layer(x) - layer.base_layer(x)
        d_ref = ref(x) - ref.base_layer(x)
    assert torch.allclose(d.float(), d_ref, atol=1e-5, rtol=1e-4)
    # and quantization did change the weight (the test compares against the dequantized one, not the original)
    assert (ref.base_layer.weight - lin.weight).abs().max() > 1e-4


def test_dequantized_reference_equals_peft_dequantize():
    """Our dispatcher's dequantize agrees with PEFT's helper and with bitsandbytes' 4-bit forward itself."""
    from peft.utils.integrations import dequantize_module_weight

    torch.manual_seed(0)
    lin = nn.Linear(D_IN, D_OUT, bias=False)
    for kind in ("nf4", "fp4", "int8"):
        q = quantize_linear(lin, kind)
        w = base_layer_type(q).dequantize(q)
        assert torch.allclose(w, dequantize_module_weight(q).float())
        assert w.shape == (D_OUT, D_IN)
        if kind != "int8":
            x = torch.randn(4, D_IN)
            assert torch.allclose(q(x), x @ w.t(), atol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_dequantize_understands_the_cpu_packed_4bit_layout(kind):
    """On AVX512-BF16 CPUs bitsandbytes repacks a 4-bit weight at its first eval forward without gradients (its
    absmax rounded to bf16 on the way); dequantize then read the packed bytes as if unpacked (0.18 off). The
    packing is done here with bitsandbytes' own converter, so the case runs on every CPU."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    torch.manual_seed(0)
    q = quantize_linear(nn.Linear(D_IN, D_OUT, bias=False), kind)
    before = base_layer_type(q).dequantize(q).clone()
    q.weight.data, q.weight.quant_state = _convert_weight_packed_for_cpu(q.weight.data, q.weight.quant_state)
    assert q.weight.quant_state.packing_format_for_cpu
    after = base_layer_type(q).dequantize(q)
    assert not q.weight.quant_state.packing_format_for_cpu  # back in the layout dequantize_4bit reads
    # equal up to the bf16 rounding of the per-block absmax that the packing applied
    torch.testing.assert_close(after, before, rtol=1e-2, atol=1e-2 * float(before.abs().max()))
    # and the layer still computes with it (in its standard 4-bit path)
    x = torch.randn(3, D_IN)
    torch.testing.assert_close(q(x), x @ after.t(), rtol=1e-4, atol=1e-4)


def test_merge_single_expert_into_4bit_weight_requantizes():
    torch.manual_seed(0)
    lin = nn.Linear(D_IN, D_OUT).requires_grad_(False)
    q = quantize_linear(lin, "nf4")
    layer = MoLoRALinear(q, "default", layer_index=0, module_name="p", num_experts=1, top_k=1, r=4, lora_alpha=8,
                         lora_dropout=0.0, router="topk", aux_loss_coef=0.0, aux_loss_mode="masked",
                         backend="auto", init_weights=False)
    x = torch.randn(6, D_IN)
    with torch.no_grad():
        before = layer(x)
        w0 = base_layer_type(q).dequantize(layer.base_layer).clone()
        with pytest.warns(UserWarning, match="re-quantizes"):
            layer.merge()
        merged = layer(x)
        assert isinstance(layer.base_layer.weight, bnb.nn.Params4bit)
        w1 = base_layer_type(q).dequantize(layer.base_layer)
        delta = layer.delta_weight("default")
        # the merged weight is exactly the 4-bit rounding of W + delta, with the layer's quantization settings
        requant = quantize_linear(nn.Linear(D_IN, D_OUT, bias=False), "nf4")
        requant.weight = bnb.nn.Params4bit((w0 + delta).clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=False)
        requant = requant.to("cpu")
        assert torch.equal(w1, base_layer_type(requant).dequantize(requant))
        assert layer.base_layer.weight.quant_state.quant_type == "nf4"
        # the merged layer computes with it (plus the bias); the unmerged output is W + delta unrounded
        assert torch.allclose(merged, x @ w1.t() + layer.base_layer.bias, atol=1e-5)
        assert torch.allclose(before, x @ (w0 + delta).t() + layer.base_layer.bias, atol=1e-4)
        layer.unmerge()
        assert not layer.merged


class Opaque(nn.Module):
    """A linear map MoLoRA does not know (not an nn.Linear subclass)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return x @ self.weight.t()


class TinyBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"proj": Opaque(), "lin": nn.Linear(8, 8)}) for _ in range(2)])

    def forward(self, x):
        for blk in self.layers:
            x = blk["lin"](blk["proj"](x))
        return x


def test_unknown_base_layer_type_is_refused_naming_module_and_supported():
    from peft import get_peft_model

    with pytest.raises(Exception) as e:
        get_peft_model(TinyBlocks(), MoLoRAConfig(target_modules=["proj"], num_experts=2, top_k=1, r=2))
    msg = str(e.value)
    assert "layers.0.proj" in msg and "Opaque" in msg
    assert "bitsandbytes Linear4bit" in msg and "nn.Linear" in msg


def test_registering_a_base_layer_type_makes_it_wrappable():
    from peft import get_peft_model

    kind = BaseLayerType("test Opaque", matches=lambda m: isinstance(m, Opaque),
                         features=lambda m: (m.weight.shape[1], m.weight.shape[0]),
                         dequantize=lambda m: m.weight.detach().float(),
                         replace_weight=lambda m, w: setattr(m.weight, "data", w))
    register_base_layer(kind)
    try:
        model = get_peft_model(TinyBlocks(), MoLoRAConfig(target_modules=["proj"], num_experts=2, top_k=1, r=2,
                                                          init_weights=False))
        x = torch.randn(3, 8)
        model(x).sum().backward()
        layer = model.base_model.model.layers[0]["proj"]
        assert isinstance(layer, MoLoRALinear) and layer.molora_A["default"].grad is not None
    finally:
        BASE_LAYERS.remove(kind)


# ------------------------------------------------------------------------------------------------ whole model
def _quantized_tiny(tmp_path, tiny_model, kind: str):
    from transformers import AutoModelForCausalLM

    from molora.run.assets import _quantized_kwargs

    src = tiny_model("llama", num_layers=2, hidden_size=64)  # bitsandbytes' packed CPU 4-bit path needs K >= 64
    src.save_pretrained(tmp_path / "fp32")
    q = ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"} if kind == "4bit"
         else {"load_in_8bit": True})
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.float32, **_quantized_kwargs(q))
    return src, model, q


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_quantized_model_trains_saves_and_loads(tmp_path, tiny_model, kind):
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from molora.run.assets import _quantized_kwargs

    _, base, q = _quantized_tiny(tmp_path, tiny_model, kind)
    assert type(base.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    model = get_peft_model(base, MoLoRAConfig(num_experts=[2, 4], top_k=2, r=4, task_type="CAUSAL_LM"))
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    assert isinstance(layer, MoLoRALinear) and base_layer_type(layer.base_layer).quantized
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("molora_" in n and p.dtype == torch.float32 for n, p in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 12))
    b0 = layer.molora_B["default"].detach().clone()
    losses = []
    for _ in range(3):
        out = model(input_ids=ids, labels=ids)
        assert out.aux_loss is not None
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert not torch.equal(b0, layer.molora_B["default"]), "the adapter did not move"
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.float32, **_quantized_kwargs(q))
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, logits, atol=1e-5)


def test_recipe_quantization_fields(tmp_path):
    from molora.run.recipe import RecipeError, recipe_from_dict

    r = recipe_from_dict({"data": {"packaged": "bbc-news"}, "model": {"load_in_4bit": True, "dtype": "bfloat16"}})
    assert r.model.bnb_config_kwargs() == {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                           "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"}
    with pytest.raises(RecipeError, match="load_in_4bit and model.load_in_8bit are exclusive"):
        recipe_from_dict({"data": {"packaged": "bbc-news"}, "model": {"load_in_4bit": True, "load_in_8bit": True}})
    with pytest.raises(RecipeError, match="bnb_4bit_quant_type"):
        recipe_from_dict({"data": {"packaged": "bbc-news"}, "model": {"load_in_4bit": True,
                                                                      "bnb_4bit_quant_type": "int4"}})
    ds = tmp_path / "ds.json"
    ds.write_text("{}")
    with pytest.raises(RecipeError, match="model.load_in_8bit with train.deepspeed"):
        recipe_from_dict({"data": {"packaged": "bbc-news"}, "model": {"load_in_8bit": True},
                          "train": {"deepspeed": str(ds)}})


def test_quantized_recipe_without_bitsandbytes_fails_before_training(monkeypatch):
    import importlib.util

    from molora.run.recipe import RecipeError, recipe_from_dict

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(RecipeError, match=r"model.load_in_4bit: a 4bit base needs bitsandbytes, which is not installed"):
        recipe_from_dict({"data": {"packaged": "bbc-news"}, "model": {"load_in_4bit": True}})


def test_molora_train_with_a_4bit_base(tmp_path, capsys, monkeypatch):
    """`molora train` with model.load_in_4bit: the base loads quantized, the adapter trains and evaluates, and
    `molora eval` on the saved adapter (same recipe, 4-bit base again) reproduces the after-training accuracy."""
    from test_train import make_assets, write_recipe

    from molora.run.eval_run import main as eval_main
    from molora.run.train import main

    monkeypatch.setenv("WANDB_MODE", "disabled")
    assets = make_assets(tmp_path / "tiny", num_layers=2, n_train=16, n_eval=8, hidden_size=64)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, model={"load_in_4bit": True}, allocation={"num_experts": "2,4"},
                          train={"max_steps": 2, "save_steps": 2},
                          eval={"generation": False})
    assert main([str(recipe)]) == 0
    printed = capsys.readouterr().out
    assert "base model loaded in 4bit (bitsandbytes)" in printed
    assert "base weights nf4 4-bit (compute float32)" in printed
    after = [ln for ln in printed.splitlines() if "accuracy (loglik" in ln]
    assert after, printed
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert eval_main([str(recipe), "--adapter", str(out / "adapter")]) == 0
    again = capsys.readouterr().out
    acc_after = after[0].split("after")[-1].split()[0].strip(",")
    assert acc_after in again, (after, again)
