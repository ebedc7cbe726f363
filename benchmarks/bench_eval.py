"""Evaluation speed: molora's log-likelihood scoring vs lm-evaluation-harness's HF backend on the same rows.

Issue 20.6: ``molora eval`` and the sweep's scoring must not be slower than lm-eval's ``hf`` model on the same
multiple-choice rows. Both score every option of every row as ``log p(" " + option | prompt)`` summed over the
option's tokens, with the same model object (a molora ▽ adapter on the base model, eval mode), the same
tokenizer and batch size:

* ``molora``  :func:`molora.run.evaluation.score_options` (what ``molora eval`` and ``molora sweep`` call): each
  prompt runs once, the options continue its KV cache, the LM head only at the scored positions;
* ``lm-eval`` ``HFLM.loglikelihood`` on the same (prompt, " " + option) requests (what ``molora lm-eval
  --jsonl-task`` runs, without the task-loading overhead): every (prompt + option) sequence in full, sorted by
  length, lm-eval's own batching.

Timed alternated in one run (benchmarks/common.py); the table gives the median time per pass over the rows,
examples/s and the ratio to lm-eval, and the largest difference between the two tools' scores (they compute the
same numbers: a check, not a timing). Rows: ``--data FILE`` (choices JSONL; default: OBQA's training file from
``../shared/data`` when it is there, else every k-th of the packaged BBC News rows: title + 64 words, 5 topics).

    python benchmarks/bench_eval.py [--tiny] [--rows 64] [--batch 8] [--reps 3] [--no-adapter]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import TARGETS  # noqa: E402
from common import (add_output_args, environment, format_table, output_dir, plot_ratio_bars,  # noqa: E402
                    ratio_results, time_alternating, write_json)

SHARED_OBQA = Path(__file__).resolve().parents[2] / "shared" / "data" / "obqa" / "train.jsonl"


def load_rows(data: Optional[str], n: int) -> tuple[list[dict], str]:
    from molora.run.data import load_rows as read

    if data is None and SHARED_OBQA.is_file():
        data = str(SHARED_OBQA)
    if data is not None:
        return read(data, format="auto", max_examples=n), Path(data).name
    from molora.run.assets import packaged_dataset_rows

    rows = packaged_dataset_rows("bbc-news")  # in topic order: take every k-th row for all five topics
    return rows[:: max(1, len(rows) // n)][:n], "bbc-news"


def build_model(tiny: bool, model_name: str, adapter: bool):
    from peft import get_peft_model

    import molora
    from molora.run.assets import load_model_and_tokenizer

    if tiny:  # the packaged model's tokenizer on a 4-layer random model
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from molora.run.assets import packaged_model_dir

        tok = AutoTokenizer.from_pretrained(packaged_model_dir("smollm2-135m"))
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=2048, pad_token_id=tok.pad_token_id))
    else:
        base, tok = load_model_and_tokenizer(model_name)
    if adapter:
        torch.manual_seed(0)
        cfg = molora.MoLoRAConfig(num_experts="2,4,6,8", top_k=2, r=8, lora_alpha=16, target_modules=TARGETS,
                                  init_weights=False, lora_dropout=0.0, task_type="CAUSAL_LM")
        base = get_peft_model(base, cfg)
    return base.eval(), tok


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a 4-layer random model and a toy tokenizer (smoke test)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=None, help="choices-format JSONL (default: see the module doc)")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="batch size of both tools")
    p.add_argument("--template", default=None, help="molora prompt template (default: molora's)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-adapter", action="store_true", help="score the base model alone")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_output_args(p, "bench_eval")
    a = p.parse_args(argv)
    for name in ("rows", "batch", "reps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(a, name)} must be at least 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        p.error("lm-eval is not installed (pip install 'lm-eval>=0.4'); it is the baseline of this benchmark")

    from molora.run.data import PromptTemplate, choice_target
    from molora.run.evaluation import score_options

    from molora.run.data_errors import DataError

    try:
        rows, source = load_rows(a.data, a.rows)
    except DataError as e:  # a missing or malformed --data file: one line, not a traceback
        p.error(f"--data: {e}")
    model, tok = build_model(a.tiny, a.model, not a.no_adapter)
    device = next(model.parameters()).device
    template = PromptTemplate(a.template)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=a.batch, max_length=2048)
    requests, owner = [], []
    for i, row in enumerate(rows):
        prompt = template.prompt(row)
        for j, choice in enumerate(row["choices"]):
            target = choice_target(prompt, choice)
            requests.append(Instance(request_type="loglikelihood", doc=row, arguments=(prompt, target),
                                     idx=j, metadata=("bench", i, 1)))
            owner.append(i)
    got: dict[str, list[list[float]]] = {}

    def run_molora():
        got["molora"] = score_options(model, tok, rows, template, batch_size=a.batch, cutoff_len=None,
                                      progress=False)

    def run_lm_eval():
        flat = [float(r[0]) for r in lm.loglikelihood(requests, disable_tqdm=True)]
        out: list[list[float]] = [[] for _ in rows]
        for i, s in zip(owner, flat):
            out[i].append(s)
        got["lm-eval"] = out

    timing = time_alternating({"lm-eval": run_lm_eval, "molora": run_molora}, warmup=a.warmup, reps=a.reps,
                              device=device)
    diff = max(abs(x - y) for r1, r2 in zip(got["molora"], got["lm-eval"]) for x, y in zip(r1, r2))
    acc = {k: sum(int(max(range(len(s)), key=s.__getitem__) == int(r["label"])) for r, s in zip(rows, v)) / len(rows)
           for k, v in got.items()}
    results = ratio_results(timing, "lm-eval", len(rows), rate_key="examples_per_s")
    for r in results:
        r["ratio_to_lm_eval"] = r.pop("ratio_to_lora")
        r["accuracy"] = acc[r["variant"]]
    table = [[r["variant"], r["median_s"], r["examples_per_s"], r["ratio_to_lm_eval"], r["accuracy"]]
             for r in results]
    model_desc = "tiny random Llama" if a.tiny else a.model
    what = "base model" if a.no_adapter else "molora ▽ 2,4,6,8 top-2 r8"
    n_opts = sum(len(r["choices"]) for r in rows)
    print(f"\nLog-likelihood scoring, {model_desc} + {what}, {len(rows)} rows / {n_opts} options of {source}, "
          f"batch {a.batch}, fp32, {device}, {torch.get_num_threads()} threads, median of "
          f"{int(timing['molora']['n'])} alternated reps; largest score difference {diff:.2e} nats")
    print(format_table(["scorer", "s/pass", "examples/s", "x lm-eval", "accuracy"], table))
    out = output_dir(a)
    payload = {"benchmark": "eval", "model": model_desc, "adapter": what, "rows": len(rows), "options": n_opts,
               "data": source, "batch": a.batch, "device": str(device), "max_abs_score_diff": diff,
               "environment": environment(), "results": results}
    jpath = write_json(out / "bench_eval.json", payload)
    ppath = plot_ratio_bars(out / "bench_eval.png", [model_desc],
                            {r["variant"]: [r["ratio_to_lm_eval"]] for r in results},
                            title="Log-likelihood scoring time / lm-eval HF backend (lower is better)",
                            ylabel="ratio to lm-eval")
    print(f"wrote {jpath}" + (f" and {ppath}" if ppath else ""))
    return payload


if __name__ == "__main__":
    main()
