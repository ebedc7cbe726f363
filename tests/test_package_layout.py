"""The package's shape (issue 10): three wings as folders, no import loop (lazy imports inside functions
included), the kernels importing nothing from molora, the old flat import paths working with a warning, and no
long file without a reason at its top."""
from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WINGS = ("tuner", "allocation", "run")
#: the allocation wing's pure core: no torch, nothing of molora outside it but the (pure) router registry; recipes
#: validate with it before torch is imported (test_recipe.test_recipe_module_needs_no_torch)
PURE_ALLOCATION = ("molora.allocation.adapter_fields", "molora.allocation.specs", "molora.allocation.methods",
                   "molora.allocation.expert_inits",
                   "molora.allocation.mapping", "molora_kernels.routers", "molora_kernels.layouts")
MAX_LINES = 400


def _modules(pkg_root: Path, prefix: str) -> dict[str, Path]:
    out = {}
    for p in pkg_root.rglob("*.py"):
        parts = list(p.relative_to(pkg_root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([prefix, *parts])] = p
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module of ``known`` that ``name`` imports anywhere in its file (top level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            found.update(subs)
            if target in known and len(subs) < len(node.names):  # names of the module itself, not submodules
                found.add(target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    found.add(alias.name)
                elif alias.name.split(".")[0] in ("molora", "molora_kernels"):
                    found.add(alias.name.split(".")[0])
    found.discard(name)
    return found


def _graph():
    known = {**_modules(ROOT / "molora", "molora"), **_modules(ROOT / "kernels" / "molora_kernels", "molora_kernels")}
    return known, {m: _imports(m, p, known) for m, p in known.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def _wing(module: str):
    parts = module.split(".")
    return parts[1] if parts[0] == "molora" and len(parts) > 1 and parts[1] in WINGS else None


def test_wings_are_folders_and_the_package_root_holds_no_module_of_theirs():
    for wing in WINGS:
        assert (ROOT / "molora" / wing / "__init__.py").is_file(), wing
    top = sorted(p.name for p in (ROOT / "molora").glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "_moved.py"], top


def test_no_import_loop_lazy_imports_included():
    _, edges = _graph()
    assert _cycles(edges) == []


def test_dependencies_point_one_way():
    _, edges = _graph()
    wrong = []
    for m, targets in edges.items():
        for t in targets:
            if m.startswith("molora_kernels") and t.split(".")[0] == "molora":
                wrong.append(f"{m} -> {t} (the kernels import nothing from molora)")
            if _wing(m) in ("tuner", "allocation") and _wing(t) == "run":
                wrong.append(f"{m} -> {t} (only the run wing uses the run wing)")
            if m in PURE_ALLOCATION and t.startswith("molora") and t not in PURE_ALLOCATION:
                wrong.append(f"{m} -> {t} (the allocation core is pure)")
    assert wrong == []


def test_the_graph_sees_lazy_imports():
    """The checks above would be hollow if function-level imports were missed."""
    _, edges = _graph()
    assert "molora.run.allocate" in edges["molora.run.train_steps"]  # imported inside build_model()
    assert "molora.tuner.config" in edges["molora.allocation.signals"]  # inside grad_norm()


def test_long_files_say_why_at_the_top():
    long = []
    for p in list((ROOT / "molora").rglob("*.py")) + list((ROOT / "kernels" / "molora_kernels").rglob("*.py")):
        text = p.read_text(encoding="utf-8")
        if text.count("\n") > MAX_LINES:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if "Over 400 lines" not in doc:
                long.append(f"{p.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert long == [], "files over 400 lines need a reason in their docstring ('Over 400 lines ...')"


def test_no_file_over_600_lines_and_no_function_over_150():
    """Issue 22.5: modules and functions small enough to read; a run is named steps (molora.run.train_steps), not
    one 300-line function."""
    big = []
    for p in list((ROOT / "molora").rglob("*.py")) + list((ROOT / "kernels" / "molora_kernels").rglob("*.py")):
        text = p.read_text(encoding="utf-8")
        if text.count("\n") > 600:
            big.append(f"{p.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 150:
                big.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert big == []


@pytest.mark.parametrize("old,new", [("molora.config", "molora.tuner.config"), ("molora.train", "molora.run.train"),
                                     ("molora.recipe", "molora.run.recipe"), ("molora.layer", "molora.tuner.layer")])
def test_old_import_paths_work_with_a_warning(old, new):
    code = (f"import warnings, importlib\nwarnings.simplefilter('error', FutureWarning)\nimport molora\n"
            f"try:\n    importlib.import_module({old!r})\nexcept FutureWarning as w:\n    print('warned:', w)\n"
            f"warnings.simplefilter('ignore', FutureWarning)\nold = importlib.import_module({old!r})\n"
            f"print('same:', old is importlib.import_module({new!r}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert f"warned: {old} has moved to {new}" in out.stdout and "same: True" in out.stdout, out.stdout


def test_old_module_paths_still_run_as_commands(tmp_path):
    for old in ("molora.train", "molora.run.train", "molora"):
        args = ["train", "--help"] if old == "molora" else ["--help"]
        out = subprocess.run([sys.executable, "-m", old, *args], capture_output=True, text=True, timeout=300,
                             cwd=ROOT)
        assert out.returncode == 0, (old, out.stderr)
        assert "usage: molora train" in out.stdout, (old, out.stdout)
    out = subprocess.run([sys.executable, "-m", "molora.train", "--help"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert "molora.train has moved to molora.run.train" in out.stderr


def test_public_api_is_unchanged():
    import molora

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("MoLoRAConfig", "MoLoRAModel", "MoLoRALayer", "MoLoRALinear", "AllocationError",
                     "RoutedMergeError", "PRESETS", "resolve_allocation", "allocation_table", "router_summary"):
            assert getattr(molora, name) is not None
    assert molora.MoLoRAConfig.__module__ == "molora.tuner.config"


@pytest.mark.parametrize("command", [c for c in __import__("molora.run.cli", fromlist=["COMMANDS"]).COMMANDS
                                     if c not in ("lm-eval",)])  # lm-eval prints lm_eval's own help
def test_every_command_help_is_plain_text_and_exits_0(command):
    """Issue 21.7: `merge-experts --help` showed raw reST markup (``...``, :mod:`...`); every command's --help exits
    0 and prints plain text."""
    out = subprocess.run([sys.executable, "-m", "molora", command, "--help"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-1500:]
    text = out.stdout
    assert "usage" in text.lower() and "``" not in text and ":mod:`" not in text and ":func:`" not in text, text


def test_design_doc_names_every_registered_extension_and_its_contract_test():
    """Issue 22.8: docs/design.md is checked against the code -- every registered backend, layout, router, row
    format and allocation method is named there, and every test file its extension table cites exists."""
    import re

    from molora.allocation.methods import METHODS
    from molora.run.formats import format_names
    from molora_kernels.backends import BACKEND_REGISTRY
    from molora_kernels.layouts import LAYOUTS
    from molora_kernels.routers import ROUTERS

    doc = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    names = {"backend": list(BACKEND_REGISTRY), "layout": list(LAYOUTS), "router": list(ROUTERS),
             "row format": [n for n in format_names() if n != "auto"]}
    missing = [f"{kind} {n!r}" for kind, ns in names.items() for n in ns if f"`{n}`" not in doc]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing += [f"allocation method {m!r} (README)" for m in METHODS if m not in readme]
    assert missing == [], f"not named in docs/design.md: {missing}"
    cited = set(re.findall(r"`(tests/[\w/]+\.py)`", doc))
    assert cited and all((ROOT / c).is_file() for c in cited), sorted(c for c in cited if not (ROOT / c).is_file())


def test_readme_names_every_adapter_field():
    """The README's allocation section keeps up with the adapter-field table (issue 22.3)."""
    import re

    from molora.allocation.adapter_fields import FIELD_NAMES

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert [f for f in FIELD_NAMES if not re.search(rf"\b{f}\b", readme)] == []


def test_no_test_hooks_in_the_package():
    """Fault injection lives in tests/faults (issue 22.7): molora and molora_kernels read no test-only environment
    variable."""
    hooks = [f"{p.relative_to(ROOT)}" for p in list((ROOT / "molora").rglob("*.py"))
             + list((ROOT / "kernels" / "molora_kernels").rglob("*.py")) if "MOLORA_TEST" in p.read_text()]
    assert hooks == []
