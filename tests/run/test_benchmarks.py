"""The kernel benchmark runs end to end at a tiny size (a smoke test, no timing asserted): it writes its JSON
and PNG with a row per registered router and layout the torch backend implements."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_benchmark_has_a_row_per_router_and_layout(tmp_path):
    from molora_kernels import LAYOUTS, ROUTERS

    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--T", "64", "--d", "64", "--configs",
           "4,2,4", "--dtypes", "fp32", "--modes", "fwdbwd", "--backends", "torch", "--reps", "1", "--warmup", "0",
           "--min-time", "0", "--threads", "1", "--no-loop", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "bench_kernels.json").read_text())
    times = data["results"][0]["times"]
    want = {f"molora/torch[{n}]" for n, r in ROUTERS.items() if n != "topk" and "torch" in r.backends}
    want |= {f"molora/torch[{n}]" for n in LAYOUTS if n != "stacked"}
    assert want <= set(times), sorted(set(times))
    assert all(t["median"] > 0 for t in times.values())
    assert (tmp_path / "bench_kernels_fwdbwd.png").stat().st_size > 1000


def test_gpu_check_script_runs_tiny_on_cpu(tmp_path):
    """`bash benchmarks/gpu_check.sh --tiny`: without a GPU the Triton kernels run under the interpreter; every
    correctness case (fp32/bf16/fp16, outputs and gradients vs the reference) passes, the layer table has the
    compared variants, the train section both models, and JSON + PNG are written."""
    import shutil

    if shutil.which("bash") is None:
        import pytest

        pytest.skip("no bash")
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-2000:])
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    cases = data["correctness"]
    assert {c["dtype"] for c in cases} == {"fp32", "bf16", "fp16"} and all(c["ok"] for c in cases)
    assert all(set(c["errors"]) == {"y", "x", "A", "B", "router"} for c in cases)
    layer = data["layer"][0]
    assert {"frozen", "peft-r", "loop", "molora/torch", "molora/sparse"} <= set(layer["ms"])
    assert layer["ratio_to_peft_r8"]["peft-r"] == 1.0
    assert [r["variant"] for r in data["train"]] == ["peft-lora-r8", "molora-▽"]
    assert data["train"][1]["params_trainable"] > data["train"][0]["params_trainable"]
    assert (tmp_path / "gpu_check.png").stat().st_size > 1000


def test_generation_benchmark_runs_tiny(tmp_path):
    """`molora bench generate --tiny`: every variant generates the requested tokens; JSON and PNG are written."""
    cmd = [sys.executable, "-m", "molora", "bench", "generate", "--tiny", "--batch", "2", "--prompt", "8",
           "--new-tokens", "4", "--reps", "1", "--warmup", "0", "--threads", "1", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "bench_generate.json").read_text())
    assert [r["variant"] for r in data["results"]] == ["frozen", "lora-r8", "lora-r8 merged", "molora-▽",
                                                        "molora-▽ +stats"]
    assert all(r["median_s"] > 0 for r in data["results"])
    assert (tmp_path / "bench_generate.png").stat().st_size > 1000
    bad = subprocess.run([*cmd[:5], "--tiny", "--new-tokens", "0"], capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert bad.returncode == 2 and "--new-tokens=0 must be at least 1" in bad.stderr


def test_bench_eval_tiny(tmp_path):
    """Issue 20.6: `molora bench eval --tiny` times molora's scoring against lm-eval's HF backend on the same rows,
    and both tools compute the same scores (the check the benchmark reports), so the same accuracy."""
    pytest.importorskip("lm_eval")
    rows = [{"input": f"which word is number {i}?", "choices": ["cat", "a dog", "bird fish tree"], "label": i % 3}
            for i in range(6)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, "-m", "molora", "bench", "eval", "--tiny", "--data", str(data), "--batch", "4", "--reps",
           "1", "--warmup", "0", "--threads", "1", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads((tmp_path / "bench_eval.json").read_text())
    assert got["rows"] == 6 and got["options"] == 18 and got["max_abs_score_diff"] < 1e-3
    by = {r["variant"]: r for r in got["results"]}
    assert set(by) == {"lm-eval", "molora"} and by["lm-eval"]["ratio_to_lm_eval"] == 1.0
    assert by["molora"]["accuracy"] == by["lm-eval"]["accuracy"] and by["molora"]["examples_per_s"] > 0
    assert (tmp_path / "bench_eval.png").stat().st_size > 1000
    bad = subprocess.run([*cmd[:5], "--tiny", "--data", str(tmp_path / "nope.jsonl")], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert bad.returncode == 2 and "--data: " in bad.stderr and "nope.jsonl: file not found" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_benchmark_run_writes_its_own_folder_and_publishing_is_explicit(tmp_path):
    """Issue 21.3: `bench kernels` used to overwrite the tracked figures the README shows. Without --out a run writes
    into runs/bench/<name>-<time>/ under the working directory; only --publish writes benchmarks/results/."""
    published = {p.name: p.read_bytes() for p in (ROOT / "benchmarks" / "results").glob("bench_kernels*")}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--T", "32", "--d", "32", "--configs",
           "2,1,2", "--dtypes", "fp32", "--modes", "fwd", "--backends", "torch", "--reps", "1", "--warmup", "0",
           "--min-time", "0", "--threads", "1", "--no-loop"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    (run,) = (tmp_path / "runs" / "bench").glob("bench_kernels-*")
    assert (run / "bench_kernels.json").is_file()
    assert {p.name: p.read_bytes() for p in (ROOT / "benchmarks" / "results").glob("bench_kernels*")} == published
    bad = subprocess.run(cmd + ["--out", str(tmp_path / "x"), "--publish"], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert bad.returncode != 0 and "exclusive" in bad.stderr
