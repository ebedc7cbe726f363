"""Recipe validation and overrides (molora.recipe): errors name the key and come before anything heavy."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from molora.run.recipe import Recipe, RecipeError, load_recipe, parse_overrides, recipe_from_dict

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"


def _write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"input": "a", "choices": ["x", "y"], "label": 0}\n', encoding="utf-8")
    return p


def _error(fn, *args, **kwargs) -> str:
    t0 = time.perf_counter()
    with pytest.raises(RecipeError) as ei:
        fn(*args, **kwargs)
    assert time.perf_counter() - t0 < 1.0, "validation must fail fast"
    return str(ei.value)


def test_unknown_key_is_named_with_suggestion(tmp_path, data_file):
    p = _write(tmp_path, f"""
        data: {{train_file: {data_file}}}
        train: {{lerning_rate: 0.001}}
    """)
    msg = _error(load_recipe, p)
    assert "train.lerning_rate: unknown key" in msg
    assert "did you mean 'learning_rate'" in msg


def test_unknown_section_is_named(tmp_path, data_file):
    msg = _error(load_recipe, _write(tmp_path, f"data: {{train_file: {data_file}}}\ntrainer: {{max_steps: 3}}\n"))
    assert "trainer: unknown key" in msg and "did you mean 'train'" in msg


def test_wrong_type_is_named(tmp_path, data_file):
    p = _write(tmp_path, f"""
        data: {{train_file: {data_file}}}
        train: {{max_steps: ten, per_device_train_batch_size: 0}}
        allocation: {{lora_dropout: 1.5}}
    """)
    msg = _error(load_recipe, p)
    assert "train.max_steps" in msg and "valid integer" in msg
    assert "train.per_device_train_batch_size" in msg
    assert "allocation.lora_dropout" in msg


def test_bad_allocation_spec_is_named_without_torch(tmp_path, data_file):
    msg = _error(load_recipe, _write(tmp_path, f"""
        data: {{train_file: {data_file}}}
        allocation: {{num_experts: "2,x,6"}}
    """))
    assert "allocation.num_experts" in msg and "block notation" in msg


def test_missing_files_are_named(tmp_path, data_file):
    p = _write(tmp_path, f"""
        data: {{train_file: {tmp_path / 'nope.jsonl'}, eval_file: {data_file}}}
        train: {{deepspeed: {tmp_path / 'ds.json'}}}
        model: {{name_or_path: ./no/such/model}}
    """)
    msg = _error(load_recipe, p)
    assert "data.train_file: file not found" in msg
    assert "train.deepspeed: file not found" in msg
    assert "model.name_or_path: directory not found" in msg


def test_data_source_required_and_exclusive(tmp_path, data_file):
    assert "data: required key missing" in _error(recipe_from_dict, {"train": {"max_steps": 1}})
    msg = _error(recipe_from_dict, {"data": {"packaged": "bbc-news", "train_file": str(data_file)}})
    assert "exclusive" in msg
    assert "unknown packaged data set" in _error(recipe_from_dict, {"data": {"packaged": "imagenet"}})


def test_overrides_apply_and_are_typed(tmp_path, data_file):
    p = _write(tmp_path, f"data: {{train_file: {data_file}}}\n")
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2}}')
    r = load_recipe(p, ["--train.max_steps", "20", "--data.cutoff_len=64", "--allocation.num_experts", "2,4,6,8",
                        "--allocation.top_k", "[1, 2, 2, 2]", "--train.bf16", "true", "--train.eval_strategy", "no",
                        "--deepspeed", str(ds), "--train.learning_rate", "1e-4", "--train.seed", "-3"])
    assert r.train.max_steps == 20 and r.data.cutoff_len == 64
    assert r.allocation.num_experts == "2,4,6,8" and r.allocation.top_k == [1, 2, 2, 2]
    assert r.train.bf16 is True and r.train.eval_strategy == "no"  # YAML's bare `no` is not False here
    assert r.train.deepspeed == str(ds.resolve()) and r.train.learning_rate == 1e-4 and r.train.seed == -3


def test_bad_overrides_fail_with_the_key(tmp_path, data_file):
    p = _write(tmp_path, f"data: {{train_file: {data_file}}}\n")
    assert "train.max_stepz: unknown key" in _error(load_recipe, p, ["--train.max_stepz", "3"])
    assert "needs a value" in _error(load_recipe, p, ["--train.max_steps"])
    assert "train.max_steps" in _error(load_recipe, p, ["--train.max_steps", "many"])
    assert "unexpected argument" in _error(parse_overrides, ["max_steps=3"])


def test_parse_cli_drops_launcher_args_and_reads_resume():
    from molora.run.train import parse_cli

    o = parse_cli(["--local_rank=1", "r.yaml", "--resume", "latest", "--train.max_steps", "5", "--local_rank", "0"])
    assert o.recipe == "r.yaml" and o.resume == "latest" and o.overrides == [("train.max_steps", 5)]
    assert parse_cli(["r.yaml", "--resume=runs/x/checkpoint-4", "--validate"]).resume == "runs/x/checkpoint-4"


def test_main_reports_recipe_errors_fast_without_loading_a_model(tmp_path, data_file, capsys, monkeypatch):
    import molora.run.assets
    from molora.run.train import main

    def boom(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("a model was loaded before the recipe was validated")

    monkeypatch.setattr(molora.run.assets, "load_model_and_tokenizer", boom)
    p = _write(tmp_path, f"data: {{train_file: {data_file}}}\ntrain: {{warmup_steps: -1}}\n")
    t0 = time.perf_counter()
    assert main([str(p)]) == 2
    assert time.perf_counter() - t0 < 1.0
    err = capsys.readouterr().err
    assert "molora train: error" in err and "train.warmup_steps" in err
    assert main([str(p), "--train.warmup_steps", "3", "--validate"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["warmup_steps"] == 3


def test_recipe_module_needs_no_torch():
    """The recipe schema validates with pydantic + PyYAML only: imported through the package as the `molora` command
    imports it (deferred: no PEFT registration), the allocation specs and the router registry it checks against
    import no torch (issue 22.1: no module is loaded by file path any more)."""
    code = textwrap.dedent("""
        import os, sys
        os.environ["MOLORA_DEFER_IMPORT"] = "1"
        from molora.run import recipe as m
        from molora.allocation import specs
        import molora_kernels
        try:
            m.recipe_from_dict({"data": {"packaged": "bbc-news"}, "allocation": {"num_experts": "9,x"}})
        except m.RecipeError as e:
            assert "allocation.num_experts" in str(e)
        try:
            m.recipe_from_dict({"data": {"packaged": "bbc-news"}, "allocation": {"router": "nope"}})
        except m.RecipeError as e:
            assert "not a known router" in str(e)
        assert specs.router_registry() is sys.modules["molora_kernels.routers"]
        assert "torch" not in sys.modules, "torch was imported"
        assert molora_kernels.get_router("topk").name == "topk" and "torch" not in sys.modules
        molora_kernels.moe_lora  # a tensor op: now torch is loaded
        assert "torch" in sys.modules
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_no_module_is_loaded_by_file_path():
    """Issue 22.1: loading a module from its file made a second copy of its classes (two AllocationError classes,
    compared by name) and hid the import edge from import checks."""
    offenders = [p.relative_to(ROOT).as_posix() for d in ("molora", "kernels") for p in (ROOT / d).rglob("*.py")
                 if "spec_from_file_location" in p.read_text()]
    assert offenders == []


def test_user_errors_are_recognised_by_class_not_by_name():
    from molora.allocation import AllocationError
    from molora.run.common import is_user_error
    from molora.tuner.merge import MergeError

    class Narrower(AllocationError):
        pass

    AllocationError2 = type("AllocationError", (ValueError,), {})  # a foreign class of the same name
    assert is_user_error(AllocationError("x")) and is_user_error(Narrower("x"))
    assert not is_user_error(AllocationError2("x")) and not is_user_error(ValueError("x"))
    assert not is_user_error(MergeError("x"))  # merge-experts names it itself


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").rglob("*.yaml")), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shipped_recipes_validate(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # dev recipes give ../shared paths relative to the repository root
    needs_shared = "../shared" in path.read_text()
    generated = "runs/data/" in path.read_text()  # slices `molora split` carves first (recipes/study)
    check_files = (SHARED.is_dir() or not needs_shared) and not generated
    r = load_recipe(path, check_files=check_files)
    assert isinstance(r, Recipe)
    if r.train.deepspeed and check_files:
        assert Path(r.train.deepspeed).is_file()
    if path.name == "quickstart_cpu.yaml":  # the default job needs nothing beside the package
        assert not needs_shared and r.data.packaged == "bbc-news" and r.model.name_or_path == "smollm2-135m"
        assert r.allocation.num_experts == "2,4,6,8" and r.allocation.top_k == 2 and r.allocation.r == 8


def test_deepspeed_configs_are_valid_json():
    import json

    for name in ("zero2", "zero3", "zero3_offload"):
        cfg = json.loads((ROOT / "recipes" / "deepspeed" / f"{name}.json").read_text())
        assert cfg["zero_optimization"]["stage"] == (2 if name == "zero2" else 3)
        assert cfg["optimizer"]["params"]["torch_adam"] is True  # no fused-Adam compilation
        assert cfg["train_micro_batch_size_per_gpu"] == "auto"  # resolved from the recipe by the HF integration


@pytest.mark.parametrize("stage,init,refused", [(3, "svd", True), (3, "orthogonal", False), (2, "svd", False)])
def test_an_expert_init_that_reads_the_base_weight_is_refused_under_zero3_before_the_model_loads(
        monkeypatch, stage, init, refused):
    """ZeRO-3 loads the model partitioned: an init that factors each base weight (svd) cannot run; refused at the
    DeepSpeed step, before any model is loaded, naming the key and the config."""
    from molora.run.common import RunError
    from molora.run.train_steps import TrainRun, deepspeed_config

    monkeypatch.chdir(ROOT)
    ds = f"recipes/deepspeed/zero{stage}.json"
    recipe = load_recipe(ROOT / "recipes" / "quickstart_cpu.yaml",
                         parse_overrides(["--train.deepspeed", ds, "--allocation.expert_init", init,
                                          "--train.router_lr_multiplier", "1"]))
    run = TrainRun(recipe=recipe)
    if refused:
        with pytest.raises(RunError, match=rf"allocation.expert_init='svd'.*{ds} is ZeRO stage 3.*orthogonal"):
            deepspeed_config(run)
    else:
        deepspeed_config(run)
        assert run.zero_stage == stage


def _run_command(args, tmp_path, timeout=120):
    """Run the `molora` console entry point (molora_cli.main) in a fresh interpreter; report what it imported."""
    import os

    code = textwrap.dedent(f"""
        import os, sys, time
        t0 = time.perf_counter()
        import molora_cli
        sys.argv = ["molora", *{list(args)!r}]
        try:
            rc = molora_cli.main()
        except SystemExit as e:
            rc = e.code
        print("RESULT", rc, "torch" in sys.modules, round(time.perf_counter() - t0, 3),
              "MOLORA_DEFER_IMPORT" in os.environ)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels")]))
    env.pop("MOLORA_DEFER_IMPORT", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                         cwd=tmp_path)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")]
    assert line, out.stderr
    _, rc, torch_loaded, seconds, leaked = line[-1].split()
    assert leaked == "False", "MOLORA_DEFER_IMPORT leaked out of the molora command"
    return int(rc), torch_loaded == "True", float(seconds), out.stderr


def test_molora_command_rejects_a_bad_recipe_without_importing_torch(tmp_path, data_file):
    """`molora train bad.yaml` fails before torch, transformers or peft are imported (well under a second on an
    idle machine; the test only asserts what was imported, not the time)."""
    p = _write(tmp_path, f"data: {{train_file: {data_file}}}\ntrain: {{max_stepz: 3}}\n")
    rc, torch_loaded, _, err = _run_command(["train", str(p)], tmp_path)
    assert rc == 2 and "train.max_stepz" in err and "did you mean 'max_steps'" in err
    assert not torch_loaded
    rc, torch_loaded, _, err = _run_command(["train", str(tmp_path / "missing.yaml")], tmp_path)
    assert rc == 2 and "missing.yaml" in err and not torch_loaded


def test_unknown_keys_suggest_the_close_ones_and_the_missing_section(tmp_path, data_file):
    """Issue 21.7: `--max_steps` (no section) suggests train.max_steps; a long key list is cut to the similar keys."""
    from molora.run.recipe import RecipeError

    p = _write(tmp_path, f"data: {{train_file: {data_file}}}\n")
    with pytest.raises(RecipeError, match=r"max_steps: unknown key \(did you mean 'train.max_steps'\?\)"):
        load_recipe(p, [("max_steps", 3)])
    with pytest.raises(RecipeError) as e:
        load_recipe(p, [("train.max_stepz", 3)])
    msg = str(e.value)
    assert "did you mean 'max_steps'?" in msg and "similar keys here: max_steps" in msg and "in all)" in msg
    assert "adam_beta1" not in msg, "the whole list of train keys is no longer printed"


def test_a_model_that_cannot_be_found_fails_at_validate_in_one_line(tmp_path, data_file):
    """Issue 21.4: a mistyped packaged name used to pass --validate and fail 70 s later with a hub traceback."""
    p = _write(tmp_path, f"model: {{name_or_path: smollm2-135M}}\ndata: {{train_file: {data_file}}}\n")
    rc, torch_loaded, _, err = _run_command(["train", str(p), "--validate"], tmp_path)
    assert rc == 2 and not torch_loaded
    assert "model.name_or_path='smollm2-135M' is not a packaged model" in err and "Did you mean 'smollm2-135m'?" in err
    assert len(err.strip().splitlines()) == 1
    p = _write(tmp_path, f"model: {{name_or_path: {tmp_path}}}\ndata: {{train_file: {data_file}}}\n")
    rc, _, _, err = _run_command(["train", str(p), "--validate"], tmp_path)
    assert rc == 2 and "has no config.json" in err


def test_deferred_import_registers_on_first_use(tmp_path):
    """Under MOLORA_DEFER_IMPORT the package imports without torch; the first public name used registers the
    PEFT method (so get_peft_model works), and the variable does not leak out of the `molora` command."""
    import os

    code = textwrap.dedent("""
        import os, sys
        os.environ["MOLORA_DEFER_IMPORT"] = "1"
        import molora
        assert "torch" not in sys.modules and "peft" not in sys.modules
        molora.register()  # explicit (what `molora eval` does before PeftModel.from_pretrained)
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
        assert "MOLORA" in PEFT_TYPE_TO_CONFIG_MAPPING
        cfg = molora.MoLoRAConfig(num_experts=2, top_k=1, r=2)
        assert type(cfg) in PEFT_TYPE_TO_CONFIG_MAPPING.values()
        from molora import allocation_table  # from-import of a public name works too
        try:
            molora.not_a_name
        except AttributeError as e:
            assert "not_a_name" in str(e)
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    rc, torch_loaded, _, _ = _run_command(["--help"], tmp_path)
    assert rc == 0 and not torch_loaded


def test_installed_command_is_the_light_entry_point(tmp_path):
    """The `molora` console script points at molora_cli (fast errors); when installed, it runs."""
    import importlib.metadata
    import shutil

    eps = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "molora"]
    if not eps:
        pytest.skip("molora is not installed (tests run from the checkout)")
    assert eps[0].value == "molora_cli:main"
    exe = shutil.which("molora")
    if exe is not None:
        out = subprocess.run([exe, "train", str(tmp_path / "nope.yaml")], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "nope.yaml" in out.stderr


# --------------------------------------------------------------------------- issue 8, item 12
@pytest.mark.parametrize("key,value", [("train.learning_rate", ".inf"), ("train.learning_rate", ".nan"),
                                       ("allocation.aux_loss_coef", ".inf"), ("train.max_grad_norm", ".nan"),
                                       ("allocation.lora_alpha", ".inf"), ("train.weight_decay", "-.inf"),
                                       ("train.adam_epsilon", ".nan")])
def test_non_finite_values_are_refused(tmp_path, data_file, key, value):
    recipe = _write(tmp_path, f"data: {{train_file: {data_file}}}\n")
    msg = _error(load_recipe, recipe, [f"--{key}", value])
    assert key in msg and "finite" in msg, msg


def test_non_finite_in_the_yaml_file_is_refused(tmp_path, data_file):
    recipe = _write(tmp_path, f"data: {{train_file: {data_file}}}\ntrain: {{learning_rate: .inf}}\n")
    assert "train.learning_rate" in _error(load_recipe, recipe)


def test_molora_config_refuses_non_finite_coefficients():
    from molora import AllocationError, MoLoRAConfig

    for kw in (dict(aux_loss_coef=float("inf")), dict(aux_loss_coef=float("nan")), dict(lora_alpha=float("inf"))):
        with pytest.raises(AllocationError, match="finite"):
            MoLoRAConfig(**kw)


def test_non_utf8_recipe_names_the_byte_and_line(tmp_path, data_file):
    p = tmp_path / "latin1.yaml"
    p.write_bytes(f"data: {{train_file: {data_file}}}\n# caf\xe9 recipe\n".encode("latin-1"))
    msg = _error(load_recipe, p)
    assert "not UTF-8" in msg and "0xe9" in msg and "line 2" in msg and str(p) in msg


def test_every_user_field_of_the_config_is_a_recipe_key():
    """Issue 22.3: the recipe's allocation section is built from the adapter's fields, so every MoLoRAConfig field a
    user sets is a recipe key (``share_sibling_shrink``, which the README tells users to set, was once refused as an
    unknown key), with the same help; only the data-driven ``auto_*`` keys are the recipe's own."""
    import dataclasses

    from peft.config import PeftConfig

    from molora import MoLoRAConfig
    from molora.allocation.adapter_fields import FIELD_NAMES, field_help
    from molora.run.recipe import AllocationSection

    internal = {"allocation", "num_layers", "output_fingerprint", "target_parameters"}
    user = {f.name for f in dataclasses.fields(MoLoRAConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
    assert user - internal == set(FIELD_NAMES)
    recipe_keys = set(AllocationSection.model_fields)
    assert recipe_keys - set(FIELD_NAMES) == {"auto_beta", "auto_min", "auto_max", "auto_groups",
                                               "auto_calib_examples"}
    for name in FIELD_NAMES:
        assert AllocationSection.model_fields[name].description == field_help(name)


def test_every_adapter_field_has_a_check_that_accepts_its_defaults():
    """Contract of the adapter-field table: each field's check accepts its config default and its recipe default (a
    field added without a check fails here, not in a user's run)."""
    import dataclasses

    from molora.allocation.adapter_fields import AdapterFields, check_field
    from molora.run.recipe import AllocationSection

    for f in dataclasses.fields(AdapterFields):
        check_field(f.name, f.default)
        check_field(f.name, AllocationSection.model_fields[f.name].default)


@pytest.mark.parametrize("bad", [
    {"num_experts": 0}, {"top_k": "x"}, {"expert_budget": 0}, {"lora_alpha": 0.0}, {"lora_dropout": 1.0},
    {"aux_loss_coef": -1.0}, {"aux_loss_mode": "sum"}, {"router": "nope"}, {"backend": "nope"}, {"layout": "nope"},
    {"router_init": "ones"}, {"expert_init": "pissa"}, {"shared_expert_r": -1}, {"target_modules": []},
    {"num_experts": 2, "top_k": 3}, {"router": "topk", "router_options": {"top_p": 0.5}},
    {"layout": "shared_a", "backend": "sparse"}, {"num_experts": "auto:block-influence", "num_experts_mlp": 4},
])
def test_config_and_recipe_refuse_a_bad_value_with_the_same_message(bad):
    """One check per field (issue 22.3): MoLoRAConfig and a recipe's allocation section refuse the same values with
    the same words (the recipe adds where: ``allocation.<key>``)."""
    from molora import MoLoRAConfig
    from molora.allocation import AllocationError

    with pytest.raises(AllocationError) as err:
        MoLoRAConfig(**bad)
    msg = str(err.value)
    recipe_msg = _error(recipe_from_dict, {"data": {"packaged": "bbc-news"}, "allocation": bad})
    assert msg in recipe_msg and "allocation" in recipe_msg


@pytest.mark.parametrize("alloc,message", [
    ({"layout": "nope"}, "allocation.layout: layout='nope' is not a known expert layout; allowed: stacked, shared_a"),
    ({"backend": "nope"}, "allocation.backend: backend='nope' is not a known backend; allowed: auto, torch, "
                          "reference, sparse, triton"),
    ({"layout": "shared_a", "backend": "sparse"}, "backend='sparse' does not implement layout='shared_a'; backends "
                                                  "for it: torch, reference (or 'auto')"),
])
def test_unknown_layout_and_backend_are_refused_by_the_recipe(alloc, message):
    """Issue 19.10: `--validate` accepted an unknown layout (and backend); the run failed only after loading."""
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"data": {"packaged": "bbc-news"}, "allocation": alloc})
    assert message in str(e.value)
    recipe_from_dict({"data": {"packaged": "bbc-news"}, "allocation": {"layout": "shared_a", "backend": "torch"}})


def test_train_keys_lists_every_key_with_the_adapter_fields_help(capsys):
    """``molora train --keys [SECTION]``: every recipe key with its default; the allocation keys carry the adapter
    field table's help (a new field is documented there by itself); an unknown section is one line, exit 2."""
    from molora.allocation.adapter_fields import FIELD_NAMES, field_help
    from molora.run.train import main

    assert main(["--keys", "allocation"]) == 0
    out = capsys.readouterr().out
    for name in FIELD_NAMES:
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(f"allocation.{name} = "))
        assert field_help(name) in line
    assert "allocation.auto_calib_examples = 64" in out and "train." not in out
    assert main(["--keys"]) == 0
    everything = capsys.readouterr().out
    assert "train.learning_rate = " in everything and "model.name_or_path = 'smollm2-135m'" in everything
    assert main(["--keys", "optim"]) == 2
    assert "not a recipe section; sections: model, data, allocation, train, eval, report" in capsys.readouterr().err
