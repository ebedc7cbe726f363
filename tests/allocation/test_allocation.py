"""Layer-wise allocation: parsing of every notation, group splitting, budgets, and every bad-input error."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from peft import get_peft_model

import molora
from molora import AllocationError, MoLoRAConfig, resolve_allocation
from molora.allocation import AllocationWarning, resolve


def experts(spec, num_layers, **kw):
    return [a.num_experts for a in resolve_allocation(spec, 1, 4, num_layers, **kw)]


# --------------------------------------------------------------------------- parsing
def test_int_is_the_same_for_every_layer():
    alloc = resolve_allocation(4, 2, 8, num_layers=6)
    assert [(a.layer, a.num_experts, a.top_k, a.r) for a in alloc] == [(i, 4, 2, 8) for i in range(6)]


def test_list_is_taken_per_layer():
    assert resolve([1, 3, 5, 7, 2], 5, "num_experts") == [1, 3, 5, 7, 2]
    alloc = resolve_allocation([2, 4, 6], [1, 2, 3], [4, 8, 16], num_layers=3)
    assert [(a.num_experts, a.top_k, a.r) for a in alloc] == [(2, 1, 4), (4, 2, 8), (6, 3, 16)]


def test_tuple_is_a_list():
    assert MoLoRAConfig(num_experts=(2, 4)).num_experts == [2, 4]


@pytest.mark.parametrize("spec", ["2,4,6,8", "2468", " 2, 4 ,6,8 ", "2|4|6|8", "2 | 4|6 |8"])
def test_block_notation(spec):
    assert resolve(spec, 8, "num_experts") == [2, 2, 4, 4, 6, 6, 8, 8]
    assert resolve(spec, 4, "num_experts") == [2, 4, 6, 8]


def test_block_notation_multi_digit_values_need_commas():
    assert resolve("10,12", 4, "num_experts") == [10, 10, 12, 12]
    assert resolve("16,", 3, "num_experts") == [16, 16, 16]
    assert resolve("7", 3, "num_experts") == [7, 7, 7]
    assert resolve("24", 4, "num_experts") == [2, 2, 4, 4]  # run-together digits are groups


def test_bar_block_notation_for_every_field_and_in_a_sweep_arm():
    # "|" separates values where a comma separates something else (a sweep arm inside --allocations)
    alloc = resolve_allocation("2|4|6|8", "1|2", "4|8|8|16", num_layers=4)
    assert [(a.num_experts, a.top_k, a.r) for a in alloc] == [(2, 1, 4), (4, 1, 8), (6, 2, 8), (8, 2, 16)]
    assert resolve("10|12", 4, "num_experts") == [10, 10, 12, 12]
    from molora.run.recipe import load_recipe, parse_overrides
    from molora.run.sweep_plan import parse_arm
    from pathlib import Path

    arm = parse_arm("▽@allocation.top_k=1|2|2|2@allocation.r=8|8|8|16")
    recipe = load_recipe(Path(__file__).parents[2] / "recipes/quickstart_cpu.yaml",
                         parse_overrides(arm.override_args()), check_files=False)
    alloc = resolve_allocation("1,3,5,7", recipe.allocation.top_k, recipe.allocation.r, num_layers=8)
    assert [(a.top_k, a.r) for a in alloc] == [(1, 8)] * 2 + [(2, 8)] * 4 + [(2, 16)] * 2


def test_block_notation_for_top_k_and_rank():
    alloc = resolve_allocation("2,4,6,8", "1,2", "4,8,8,16", num_layers=4)
    assert [(a.num_experts, a.top_k, a.r) for a in alloc] == [(2, 1, 4), (4, 1, 8), (6, 2, 8), (8, 2, 16)]


@pytest.mark.parametrize("name,symbol,shape", [
    ("uniform", "□", (5, 5, 5, 5)),
    ("inverted_triangle", "▽", (2, 4, 6, 8)),
    ("triangle", "△", (8, 6, 4, 2)),
    ("hourglass", "⋈", (8, 2, 2, 8)),
    ("diamond", "◇", (2, 8, 8, 2)),
])
def test_presets_by_name_and_symbol(name, symbol, shape):
    assert molora.PRESETS[name] == shape
    expected = [v for v in shape for _ in range(2)]
    for spec in (name, name.upper(), f" {name} ", symbol):
        assert resolve(spec, 8, "num_experts") == expected, spec
        MoLoRAConfig(num_experts=spec, top_k=2)  # accepted at config time


def test_preset_aliases():
    assert resolve("mola", 4, "num_experts") == [2, 4, 6, 8]
    assert resolve("inverted-triangle", 4, "num_experts") == [2, 4, 6, 8]
    assert resolve("square", 4, "num_experts") == [5, 5, 5, 5]


def test_presets_are_for_num_experts_only():
    with pytest.raises(AllocationError, match="'▽'.*num_experts only"):
        MoLoRAConfig(num_experts=8, top_k="▽")
    with pytest.raises(AllocationError, match="'uniform'"):
        MoLoRAConfig(r="uniform")


# --------------------------------------------------------------------------- uneven layer counts
def test_uneven_layers_first_groups_get_one_more():
    # the documented rule (numpy.array_split): 30 layers in 4 groups -> 8, 8, 7, 7
    got = resolve("2,4,6,8", 30, "num_experts")
    assert got == [2] * 8 + [4] * 8 + [6] * 7 + [8] * 7
    assert resolve("▽", 30, "num_experts") == got
    assert resolve("2468", 30, "num_experts") == got
    assert resolve("1,2,3", 7, "num_experts") == [1, 1, 1, 2, 2, 3, 3]
    assert resolve("1,2", 1 + 2, "r") == [1, 1, 2]


def test_uneven_matches_numpy_array_split():
    np = pytest.importorskip("numpy")
    for num_layers in range(4, 33):
        want = [v for v, chunk in zip((2, 4, 6, 8), np.array_split(np.arange(num_layers), 4), strict=True) for _ in chunk]
        assert resolve("2,4,6,8", num_layers, "num_experts") == want


def test_more_groups_than_layers():
    with pytest.raises(AllocationError, match=r"'2,4,6,8'.*4 groups.*3 layers"):
        resolve("2,4,6,8", 3, "num_experts")


# --------------------------------------------------------------------------- expert budget
def test_expert_budget_scales_the_preset_shape():
    assert experts("▽", 8, expert_budget=40) == [2, 2, 4, 4, 6, 6, 8, 8]
    assert experts("▽", 8, expert_budget=20) == [1, 1, 2, 2, 3, 3, 4, 4]
    assert experts("2,4,6,8", 4, expert_budget=40) == [4, 8, 12, 16]


def _budget(spec, num_layers, budget):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = experts(spec, num_layers, expert_budget=budget)
    return got, [w for w in caught if issubclass(w.category, AllocationWarning)]


def _groups_of(spec, num_layers):
    """(shape value, layer indices) of each group of a spec, as the allocation splits it."""
    from molora.allocation import PRESETS, group_sizes, parse_blocks, preset_name

    if isinstance(spec, list):
        values, sizes = spec, [1] * len(spec)
    else:
        values = list(PRESETS[preset_name(spec)]) if isinstance(spec, str) and preset_name(spec) else \
            ([spec] if isinstance(spec, int) else parse_blocks(spec))
        sizes = group_sizes(num_layers, len(values))
    out, start = [], 0
    for v, n in zip(values, sizes, strict=True):
        out.append((v, range(start, start + n)))
        start += n
    return out


SHAPES = ["▽", "△", "□", "⋈", "◇", "1,3", "2,4,6,8,10", 4, [1, 2, 3, 4, 5, 6, 7]]


@pytest.mark.parametrize("spec", SHAPES, ids=str)
@pytest.mark.parametrize("num_layers", [7, 12, 30, 32])
def test_expert_budget_keeps_the_shape_at_every_budget(spec, num_layers):
    """Property test (every budget from L to 10 L): counts >= 1, equal inside a group, ordered like the shape
    (larger shape value -> never fewer experts; equal values -> equal counts), total within half the largest
    group of the budget when the shape allows it, a warning exactly when the total differs."""
    if isinstance(spec, list) and len(spec) != num_layers:
        spec = [1 + (i * 6) // num_layers for i in range(num_layers)]  # a rising per-layer list
    groups = _groups_of(spec, num_layers)
    biggest_class = max(sum(len(g) for v2, g in groups if v2 == v) for v, _ in groups)
    for budget in range(num_layers, 10 * num_layers + 1):
        got, warned = _budget(spec, num_layers, budget)
        assert len(got) == num_layers and min(got) >= 1, (spec, budget, got)
        for v, layers in groups:
            assert len({got[i] for i in layers}) == 1, f"{spec} budget {budget}: group {list(layers)} split: {got}"
        for v1, l1 in groups:
            for v2, l2 in groups:
                if v1 < v2:
                    assert got[l1[0]] <= got[l2[0]], f"{spec} budget {budget}: order broken: {got}"
                elif v1 == v2:
                    assert got[l1[0]] == got[l2[0]], f"{spec} budget {budget}: equal values differ: {got}"
        assert abs(sum(got) - budget) <= biggest_class, (spec, budget, sum(got))
        assert bool(warned) == (sum(got) != budget), (spec, budget, sum(got), warned)
        if warned:
            assert f"expert_budget={budget}" in str(warned[0].message) and str(sum(got)) in str(warned[0].message)


@pytest.mark.parametrize("budget", [60, 90, 120, 200])
def test_expert_budget_on_30_layers_reported_cases(budget):
    """The cases of issue 8: ▽ on SmolLM2's 30 layers (groups 8, 8, 7, 7) was not monotone at 60 (2, 1, 2, 3)
    and split groups at 90/120/200 (layers 8-10 got 3 experts, 11-15 got 2)."""
    got, _ = _budget("▽", 30, budget)
    per_group = [got[0], got[8], got[16], got[23]]
    assert got == [per_group[0]] * 8 + [per_group[1]] * 8 + [per_group[2]] * 7 + [per_group[3]] * 7
    assert per_group == sorted(per_group) and per_group[0] < per_group[3]


def test_expert_budget_exact_when_the_shape_allows():
    for spec, layers, budget in (("▽", 8, 40), ("▽", 8, 20), ("□", 30, 150), ("⋈", 32, 160), (4, 7, 35)):
        got, warned = _budget(spec, layers, budget)
        assert sum(got) == budget and not warned, (spec, layers, budget, got)


def test_expert_budget_through_the_config(tiny_model):
    model = get_peft_model(tiny_model("llama", num_layers=4),
                           MoLoRAConfig(num_experts="▽", expert_budget=10, top_k=1, r=2))
    assert [row.num_experts for row in molora.allocation_table(model)] == [1, 2, 3, 4]


def test_expert_budget_errors():
    with pytest.raises(AllocationError, match="expert_budget=3"):
        experts("▽", 8, expert_budget=3)
    for bad in (0, -4, 2.5, True):
        with pytest.raises(AllocationError, match=f"expert_budget={bad!r}"):
            MoLoRAConfig(num_experts="▽", expert_budget=bad)


# --------------------------------------------------------------------------- bad inputs
def test_list_length_differs_from_layer_count():
    with pytest.raises(AllocationError, match=r"num_experts.*\[2, 4, 6\].*3 entries.*4 layers"):
        resolve([2, 4, 6], 4, "num_experts")
    with pytest.raises(AllocationError, match=r"top_k.*5 entries.*4 layers"):
        resolve_allocation(4, [1, 1, 1, 1, 1], 8, num_layers=4)


def test_list_length_differs_at_injection(tiny_model):
    with pytest.raises(AllocationError, match=r"\[2, 4, 6\].*3 entries.*4 layers"):
        get_peft_model(tiny_model("llama", num_layers=4), MoLoRAConfig(num_experts=[2, 4, 6], top_k=1))


def test_top_k_larger_than_experts_at_config_time():
    with pytest.raises(AllocationError, match=r"top_k=3.*num_experts=2"):
        MoLoRAConfig(num_experts=2, top_k=3)
    MoLoRAConfig(num_experts=2, top_k=3, router="soft")  # the soft router uses every expert: top_k unused
    MoLoRAConfig(num_experts=3, top_k=3)  # E == k is fine


def test_top_k_larger_than_experts_per_layer():
    with pytest.raises(AllocationError, match=r"top_k=2.*num_experts=1.*layer 0"):
        resolve_allocation("1,2,4,8", 2, 4, num_layers=8)
    with pytest.raises(AllocationError, match=r"top_k=5.*num_experts=4.*layer 3"):
        resolve_allocation(4, [1, 2, 3, 5], 4, num_layers=4)


def test_int_top_k_that_reads_like_blocks_gets_a_hint():
    # "--allocation.top_k 1222" on the command line is YAML's int 1222, not four groups
    with pytest.raises(AllocationError, match=r"top_k=1222 is one int for every layer.*'1,2,2,2' or '1\|2\|2\|2'"):
        resolve_allocation("1,3,5,7", 1222, 4, num_layers=8)
    with pytest.raises(AllocationError) as info:
        resolve_allocation("1,3,5,7", 2, 4, num_layers=8)
    assert "one int for every layer" not in str(info.value)  # a plain too-large top_k gets no block hint


def test_top_k_larger_than_experts_at_injection(tiny_model):
    config = MoLoRAConfig(num_experts="1,2,4,8", top_k=2)  # fine at config time: per-layer values
    with pytest.raises(AllocationError, match=r"top_k=2 is larger than num_experts=1 in layer 0"):
        get_peft_model(tiny_model("llama", num_layers=4), config)
    config = MoLoRAConfig(num_experts=[4, 4, 4, 4], top_k="1,2,3,6")
    with pytest.raises(AllocationError, match=r"top_k=6 is larger than num_experts=4 in layer 3"):
        get_peft_model(tiny_model("llama", num_layers=4), config)


@pytest.mark.parametrize("field,bad,shown", [
    ("num_experts", 0, "0"), ("num_experts", -2, "-2"), ("num_experts", [2, 0, 4], "0"),
    ("num_experts", "2,0,4", "0"), ("r", 0, "0"), ("r", [8, -1], "-1"), ("r", "8,0", "0"),
    ("top_k", 0, "0"), ("top_k", "0", "0"),
])
def test_values_below_one(field, bad, shown):
    with pytest.raises(AllocationError, match=rf"{field}=.*>= 1, got {shown}"):
        MoLoRAConfig(**{field: bad})


@pytest.mark.parametrize("bad", ["pyramid", "inverted triangle", "2;4;6", "2.5", "a,b", "", "▲", "2,,4", "-2,4"])
def test_unknown_preset_or_garbage(bad):
    with pytest.raises(AllocationError) as info:
        MoLoRAConfig(num_experts=bad)
    msg = str(info.value)
    assert repr(bad) in msg
    assert "inverted_triangle" in msg and "▽" in msg  # the allowed presets are listed


@pytest.mark.parametrize("field,bad", [("num_experts", 2.0), ("r", None), ("top_k", True), ("num_experts", [2, "4"]),
                                       ("num_experts", []), ("num_experts", {"a": 1})])
def test_wrong_types(field, bad):
    with pytest.raises(AllocationError, match=field):
        MoLoRAConfig(**{field: bad})


def test_other_config_errors():
    with pytest.raises(AllocationError, match="'sparse'"):
        MoLoRAConfig(router="sparse")
    with pytest.raises(AllocationError, match="'exact'"):
        MoLoRAConfig(aux_loss_mode="exact")
    with pytest.raises(AllocationError, match="-0.1"):
        MoLoRAConfig(aux_loss_coef=-0.1)
    with pytest.raises(AllocationError, match="1.0"):
        MoLoRAConfig(lora_dropout=1.0)
    with pytest.raises(AllocationError, match="'cuda-magic'"):
        MoLoRAConfig(backend="cuda-magic")


def test_target_modules_matching_nothing(tiny_model):
    with pytest.raises(AllocationError) as info:
        get_peft_model(tiny_model("llama"), MoLoRAConfig(target_modules=["qproj", "vproj"]))
    msg = str(info.value)
    assert "qproj" in msg and "vproj" in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in msg  # lists the linear layers there are
    with pytest.raises(AllocationError, match=r"c_attn.*c_fc"):
        get_peft_model(tiny_model("gpt2"), MoLoRAConfig(target_modules=r".*\.attn\.qkv"))
    with pytest.raises(AllocationError, match="target_modules=\\[\\]"):
        MoLoRAConfig(target_modules=[])


@pytest.mark.parametrize("kw,shown", [
    (dict(num_experts="2,4"), "num_experts='2,4'"), (dict(num_experts=[2, 4]), "num_experts=[2, 4]"),
    (dict(top_k="1,2"), "top_k='1,2'"), (dict(r=[2, 4]), "r=[2, 4]"), (dict(expert_budget=8), "expert_budget=8"),
])
def test_per_layer_allocation_with_targets_outside_the_blocks(tiny_model, kw, shown):
    kw = {"num_experts": 4, "top_k": 1, **kw}
    with pytest.raises(AllocationError, match=r"lm_head.*outside") as info:
        get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(target_modules=["q_proj", "lm_head"], **kw))
    assert shown in str(info.value)


def test_uniform_allocation_with_targets_outside_the_blocks(tiny_model):
    model = get_peft_model(tiny_model("llama", num_layers=2),
                           MoLoRAConfig(num_experts=3, top_k=2, r=2, target_modules=["q_proj", "lm_head"]))
    head = model.base_model.model.lm_head
    assert head.layer_index is None and head.num_experts["default"] == 3
    assert [row.layer for row in molora.allocation_table(model)] == [None, 0, 1]
    model(input_ids=torch.randint(0, 64, (1, 5)))
    assert set(model.base_model.router_summary()) == {None, 0, 1}


# --------------------------------------------------------------------------- models without numbered layers
class Bare(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 10)

    def forward(self, x):
        return self.proj(x)


def test_bare_module_with_ints():
    torch.manual_seed(0)
    model = get_peft_model(Bare(), MoLoRAConfig(num_experts=4, top_k=2, r=3, target_modules=["proj"],
                                                init_weights=False))
    layer = model.base_model.model.proj
    assert isinstance(layer, molora.MoLoRALinear)
    assert layer.layer_index is None and layer.num_experts["default"] == 4 and layer.top_k["default"] == 2
    assert model.peft_config["default"].allocation == [{"layer": None, "num_experts": 4, "top_k": 2, "r": 3}]
    y = model(torch.randn(5, 12))
    assert y.shape == (5, 10)
    table = molora.allocation_table(model)
    assert len(table) == 1 and table[0].layer is None and table[0].params == 4 * 3 * (12 + 10) + 4 * 12
    assert "-" in str(table)


@pytest.mark.parametrize("field,kw", [
    ("num_experts", dict(num_experts=[4])), ("num_experts", dict(num_experts="2,4")),
    ("num_experts", dict(num_experts="▽")), ("num_experts", dict(num_experts="inverted_triangle")),
    ("top_k", dict(num_experts=4, top_k=[1])), ("r", dict(num_experts=4, r="4,8")),
    ("num_experts", dict(num_experts=4, expert_budget=8)),
])
def test_bare_module_with_a_per_layer_allocation_fails_clearly(field, kw):
    kw.setdefault("top_k", 1)
    with pytest.raises(AllocationError, match="no numbered layers") as info:
        get_peft_model(Bare(), MoLoRAConfig(target_modules=["proj"], **kw))
    assert str(info.value).startswith(f"{field}={kw[field]!r}")


def test_bare_module_needs_target_modules():
    with pytest.raises(AllocationError, match=r"no such blocks.*proj"):
        get_peft_model(Bare(), MoLoRAConfig(num_experts=2, top_k=1))
