"""Import of original MoLA checkpoints: identical outputs after `molora convert-mola`."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

import molora  # noqa: F401  (registers the PEFT method)
from molora.run.cli import main as cli_main
from molora.tuner.convert import ConversionError, convert_mola

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class OriginalMoLALinear(nn.Module):
    """The forward of the original MoLA `Linear_MoE` (per-expert loop, index_add), written from its code."""

    def __init__(self, base: nn.Linear, A: list, B: list, router: torch.Tensor, top_k: int, scaling: float):
        super().__init__()
        self.base, self.A, self.B, self.router, self.top_k, self.scaling = base, A, B, router, top_k, scaling

    def forward(self, x):
        result = self.base(x)
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = x @ self.router.t()
        weights = F.softmax(logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros(x.shape[0], self.base.out_features, dtype=x.dtype)  # index_add target
        mask = F.one_hot(selected, num_classes=len(self.A)).permute(2, 1, 0)
        for e in range(len(self.A)):
            idx, top_x = torch.where(mask[e])
            cur = x[top_x]
            y = (cur @ self.A[e].t()) @ self.B[e].t() * self.scaling
            out.index_add_(0, top_x, y * weights[top_x, idx, None])
        return result + out.reshape(*shape[:-1], -1)


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    # float64 so that the two summation orders (per-expert loop vs stacked GEMM) agree to ~1e-12
    return LlamaForCausalLM(cfg).double().eval()


def _write_mola_checkpoint(path, model, experts, ranks, alpha=16):
    """A synthetic checkpoint in the original key format, with random (non-zero) weights."""
    g = torch.Generator().manual_seed(1)
    sd = {}
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in TARGETS:
            continue
        layer = int(name.split(".")[2])
        E, r = experts[layer], ranks[layer]
        pre = f"base_model.model.{name}"
        for e in range(E):
            sd[f"{pre}.lora_A_{e}.weight"] = torch.randn(r, mod.in_features, generator=g) * 0.2
            sd[f"{pre}.lora_B_{e}.weight"] = torch.randn(mod.out_features, r, generator=g) * 0.2
        sd[f"{pre}.router.router.weight"] = torch.randn(E, mod.in_features, generator=g)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path / "adapter_model.bin")
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": ranks, "lora_alpha": alpha, "lora_dropout": 0.05,
        "target_modules": TARGETS, "bias": "none", "base_model_name_or_path": "tiny-llama"}))
    return sd


def _original_model(model, sd, experts, top_k, ranks, alpha=16):
    for name, mod in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in TARGETS:
            continue
        layer = int(name.split(".")[2])
        pre = f"base_model.model.{name}"
        A = [sd[f"{pre}.lora_A_{e}.weight"].double() for e in range(experts[layer])]
        B = [sd[f"{pre}.lora_B_{e}.weight"].double() for e in range(experts[layer])]
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        router = sd[f"{pre}.router.router.weight"].double()
        setattr(parent, leaf, OriginalMoLALinear(mod, A, B, router, top_k[layer],
                                                 alpha / ranks[layer]))
    return model


@pytest.mark.parametrize("ranks", [[8, 8, 8, 8], [4, 4, 8, 8]])
def test_convert_mola_gives_identical_outputs(tmp_path, ranks):
    experts, top_k = [2, 4, 6, 8], [2, 2, 2, 2]
    src, dst = tmp_path / "mola", tmp_path / "molora"
    sd = _write_mola_checkpoint(src, _tiny_llama(), experts, ranks)
    rc = cli_main(["convert-mola", str(src), str(dst), "--num-experts", "2,4,6,8", "--top-k", "2"])
    assert rc == 0
    cfg = json.loads((dst / "adapter_config.json").read_text())
    assert [a["num_experts"] for a in cfg["allocation"]] == experts
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = _original_model(_tiny_llama(), sd, experts, top_k, ranks)(input_ids=ids).logits
        got_model = PeftModel.from_pretrained(_tiny_llama(), str(dst)).eval()
        got = got_model(input_ids=ids).logits
        base = _tiny_llama()(input_ids=ids).logits
    assert not torch.allclose(want, base, atol=1e-3), "the synthetic experts must change the outputs"
    # Both routers run their softmax in float32 (the original casts with dtype=torch.float), so the gates agree
    # to float32 rounding; everything else is float64.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # module by module the two are equal to float64 rounding
    name = "model.layers.3.mlp.down_proj"
    layer = got_model.base_model.model.get_submodule(name)
    pre = f"base_model.model.{name}"
    orig = OriginalMoLALinear(layer.base_layer, [sd[f"{pre}.lora_A_{e}.weight"].double() for e in range(8)],
                              [sd[f"{pre}.lora_B_{e}.weight"].double() for e in range(8)],
                              sd[f"{pre}.router.router.weight"].double(), 2, 16 / ranks[3])
    x = torch.randn(7, layer.in_features, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), orig(x), rtol=1e-12, atol=1e-12)


def test_convert_mola_rejects_wrong_expert_count(tmp_path):
    src = tmp_path / "mola"
    _write_mola_checkpoint(src, _tiny_llama(), [2, 4, 6, 8], [8] * 4)
    with pytest.raises(ConversionError, match=r"router has 2 experts but the given num_experts is 4"):
        convert_mola(src, tmp_path / "out", num_experts=4, top_k=2)
    assert not (tmp_path / "out").exists(), "a failed conversion must not leave a destination behind"
    rc = cli_main(["convert-mola", str(src), str(tmp_path / "out"), "--num-experts", "4", "--top-k", "2"])
    assert rc == 2


def test_convert_mola_rejects_non_mola_files(tmp_path):
    src = tmp_path / "lora"
    src.mkdir()
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 32)},
               src / "adapter_model.bin")
    (src / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    with pytest.raises(ConversionError, match="not in the MoLA format"):
        convert_mola(src, tmp_path / "out", num_experts=2, top_k=2)
    with pytest.raises(ConversionError, match="adapter_config.json not found"):
        convert_mola(tmp_path / "missing", tmp_path / "out", num_experts=2, top_k=2)
