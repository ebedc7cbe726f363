"""The README's code blocks stay true (issue 21.2): Python blocks parse, YAML blocks are valid recipe sections, and
every `molora` command and every `--flag` a bash block gives it exists (each command's --help is asked, in one
process per command). Running every block is the job of the tests of each feature; this keeps the text in step."""
from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)


def test_python_blocks_parse():
    blocks = [code for lang, code in BLOCKS if lang == "python"]
    assert blocks
    for code in blocks:
        ast.parse(code)


def test_yaml_blocks_are_recipe_sections():
    from molora.run.recipe import Recipe

    for lang, code in BLOCKS:
        if lang == "yaml":
            doc = yaml.safe_load(code)
            assert set(doc) <= set(Recipe.model_fields), doc


def _molora_commands() -> dict[str, set[str]]:
    """{subcommand: flags used with it} over the README's bash blocks (continuation lines joined)."""
    used: dict[str, set[str]] = {}
    for lang, code in BLOCKS:
        if lang != "bash":
            continue
        for line in code.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0]
            for part in re.split(r"&&|;|\|", line):
                words = shlex.split(part) if part.strip() else []
                if "molora" in words:
                    i = words.index("molora")
                    if i + 1 < len(words) and not words[i + 1].startswith("-"):
                        cmd, rest = words[i + 1], words[i + 2:]
                        if cmd == "bench" and rest and not rest[0].startswith("-"):
                            cmd, rest = f"bench {rest[0]}", rest[1:]
                        flags = {w.split("=")[0] for w in rest if w.startswith("--")}
                        used.setdefault(cmd, set()).update(flags)
    return used


def test_bash_blocks_use_existing_commands_and_flags():
    used = _molora_commands()
    assert {"train", "sweep"} <= set(used)
    for cmd, flags in used.items():
        out = subprocess.run([sys.executable, "-m", "molora", *cmd.split(), "--help"], capture_output=True,
                             text=True, timeout=300, cwd=ROOT)
        if cmd == "lm-eval":  # the rest are lm_eval's own options, passed through
            flags = {f for f in flags if f in ("--jsonl-task", "--template", "--task-max-examples")}
        assert out.returncode == 0, (cmd, out.stderr[-500:])
        text = out.stdout + out.stderr
        for f in flags:
            if re.fullmatch(r"--[a-z_]+\.[a-z_0-9]+", f):  # a recipe key override: checked by the recipe schema
                section, key = f[2:].split(".")
                from molora.run.recipe import Recipe

                assert key in Recipe.model_fields[section].annotation.model_fields, f
                continue
            assert f in text, f"README uses `molora {cmd} {f}`, which its --help does not list"
