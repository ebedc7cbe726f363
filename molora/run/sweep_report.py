"""The tables of ``molora sweep``: accuracy and accuracy_norm per arm and split, the untuned model beside them,
paired comparisons over questions and seeds, router statistics; ``sweep/summary.{json,md,png}``.

Metric names are ``"<split> <kind> <metric>"``: ``split`` is ``val`` (the recipe's ``eval_file``, scored after
training) or the stem of an ``--eval-file``; ``kind`` ``loglik`` or ``generation``; ``metric`` ``accuracy`` or
``accuracy_norm`` (log-likelihood per byte of the option, lm-eval's ``acc_norm``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from .paired_stats import correct_by_question, paired_bootstrap, t_interval

__all__ = ["SweepError", "cell_metrics", "cell_predictions", "summarise", "summary_markdown", "REFERENCES",
           "best_on_validation", "reference_arms"]

#: arms every other arm is compared with, when present (▽, the two matched LoRAs, the untuned model); ``--compare``
#: adds more and the best arm on validation is always added (:func:`reference_arms`)
REFERENCES = ("inverted_triangle", "lora", "lora-active", "base")
_SIDE = ("trainable params", "experts", "active rank", "train seconds", "router entropy", "near-uniform layers",
         "expert cosine")


class SweepError(ValueError):
    """A sweep that cannot start or report (the message names the value or file and what is allowed)."""


def edge_note(arm_selection: dict) -> str:
    """For one arm of ``search.json``: ``"; on the grid's edge (KEY VALUE is the largest searched): ..."`` when the
    selected value of a numeric axis is the smallest or largest searched (``at_edge``), else ``""``."""
    edges = arm_selection.get("at_edge") or []
    if not edges:
        return ""
    return ("; on the grid's edge (" + ", ".join(f"{e['key']} {e['value']} is the {e['edge']} searched" for e in edges)
            + "): the best value may lie outside the grid, widen it for every arm")


def _read(path: Path) -> Optional[dict]:
    """The JSON object in ``path``, or None when there is no such file; a file that is there but not a readable
    JSON object is a SweepError naming it (its numbers would silently drop out of the tables)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        return _unreadable(path, e.strerror or type(e).__name__)
    try:
        data = json.loads(text)
    except ValueError as e:
        return _unreadable(path, f"not JSON: {e}")
    return data if isinstance(data, dict) else _unreadable(path, f"a JSON {type(data).__name__}, not an object")


def _unreadable(path: Path, why: str):
    raise SweepError(f"{path} is unreadable ({why}); delete it (or its cell folder) and run the sweep again to "
                     f"redo that part")


def _add(out: dict, split: str, acc: dict) -> None:
    for kind, v in (acc or {}).items():
        if not isinstance(v, dict) or "accuracy" not in v:
            continue
        out[f"{split} {kind} accuracy"] = v["accuracy"]
        if v.get("accuracy_norm") is not None:
            out[f"{split} {kind} accuracy_norm"] = v["accuracy_norm"]


def cell_metrics(cell_dir: Path) -> dict[str, float]:
    """Accuracies of one cell (trained: results.json + eval-*.json; untuned: eval-*.json) and side statistics."""
    out: dict[str, float] = {}
    res = _read(cell_dir / "results.json")
    if res is not None:
        _add(out, "val", (res.get("accuracy") or {}).get("after") or {})
        out["train seconds"] = (res.get("timings") or {}).get("total_s")
    for f in sorted(cell_dir.glob("eval-*.json")):
        rec = _read(f)
        if rec is not None:
            _add(out, f.stem[5:], rec.get("accuracy") or {})
    if res is None:
        return out
    try:
        from .telemetry import read_metrics

        run = next(r for r in read_metrics(cell_dir / "metrics.jsonl") if r.get("type") == "run")
        out["trainable params"] = run.get("trainable_params")
        # per layer; a layer whose attention and MLP have their own counts counts their mean (as the budget does)
        out["experts"] = sum((x["num_experts"] + x["num_experts_mlp"]) / 2 if x.get("num_experts_mlp") is not None
                             else x["num_experts"] for x in run.get("allocation") or [])
        rows = run.get("allocation") or []
        if rows:  # rank each token is computed with: top_k x r (a LoRA: its r), mean over layers; + a shared expert
            shared = ((run.get("recipe") or {}).get("allocation") or {}).get("shared_expert_r") or 0
            out["active rank"] = sum(x["top_k"] * x["r"] for x in rows) / len(rows) + shared
    except (OSError, StopIteration, ValueError):
        pass
    out.update(_router_stats(cell_dir))
    return out


def _router_stats(cell_dir: Path) -> dict[str, float]:
    """Mean normalised router entropy over the routed layers (E > k) at the end of training, how many of them
    route near-uniformly, and the mean pairwise cosine of the experts' updates B_e A_e."""
    stats: dict[str, float] = {}
    try:
        from .diagnostics import UNIFORM_ENTROPY, diagnose
        from .report import load_run

        diags = [d for d in diagnose(load_run(cell_dir / "metrics.jsonl")) if d.num_experts > d.top_k
                 and d.entropy_norm is not None]
        if diags:
            stats["router entropy"] = sum(d.entropy_norm for d in diags) / len(diags)
            stats["near-uniform layers"] = sum(d.entropy_norm >= UNIFORM_ENTROPY for d in diags) / len(diags)
    except Exception:  # noqa: BLE001 - statistics are a side column; a run without telemetry has none
        pass
    try:
        from .expert_diversity import adapter_expert_similarity

        sim = adapter_expert_similarity(cell_dir / "adapter")
        if sim:
            stats["expert cosine"] = sum(sim.values()) / len(sim)
    except Exception:  # noqa: BLE001
        pass
    return stats


def cell_predictions(cell_dir: Path) -> dict[str, list]:
    """``{split: per-question predictions}`` of one cell (loglik scoring)."""
    out: dict[str, list] = {}
    rec = _read(cell_dir / "predictions_after.json")
    if rec and rec.get("predictions"):
        out["val"] = rec["predictions"]
    for f in sorted(cell_dir.glob("eval-*.json")):
        rec = _read(f)
        preds = (((rec or {}).get("accuracy") or {}).get("loglik") or {}).get("predictions")
        if preds:
            out[f.stem[5:]] = preds
    return out


def best_on_validation(selection: Optional[dict]) -> Optional[str]:
    """The trained arm whose selected search setting scored highest on validation (ties: the earlier arm), or None
    without a search. Chosen on validation only, so comparing every arm with it on held-out splits is fair."""
    arms = (selection or {}).get("arms") or {}
    scored = [(s["scores"][s["selected"]], -i, slug) for i, (slug, s) in enumerate(arms.items())
              if s["scores"][s["selected"]] is not None]
    return max(scored)[2] if scored else None


def reference_arms(selection: Optional[dict], compare: Sequence[str] = ()) -> dict[str, str]:
    """The arms every other arm is compared with, in order, each with why: :data:`REFERENCES`, the ``--compare``
    arms, and the best arm on validation."""
    refs = {r: "reference" for r in REFERENCES}
    for r in compare:
        refs.setdefault(r, "--compare")
    best = best_on_validation(selection)
    if best is not None:
        refs[best] = refs[best] + ", best on validation" if best in refs else "best on validation"
    return refs


def summarise(out: Path, cells: Sequence, primary: str = "accuracy", selection: Optional[dict] = None,
              compare: Sequence[str] = ()) -> dict[str, Any]:
    """Merge the finished cells' results and write summary.{json,md,png}.

    ``cells``: the final cells (:class:`molora.run.sweep.Cell`); ``primary``: the recipe's ``eval.primary_metric``
    (listed first); ``selection``: the search's result (:func:`molora.run.sweep.select_settings`), reported;
    ``compare``: slugs of further arms every arm is paired with (besides :data:`REFERENCES` and the best arm on
    validation, :func:`reference_arms`)."""
    by_arm: dict[str, dict[Any, dict[str, float]]] = {}
    preds: dict[str, dict[Any, dict[str, list]]] = {}
    for c in cells:
        d = out / c.folder
        done = (d / "results.json").is_file() if c.seed is not None else any(d.glob("eval-*.json"))
        if done:
            by_arm.setdefault(c.slug, {})[c.seed] = cell_metrics(d)
            preds.setdefault(c.slug, {})[c.seed] = cell_predictions(d)
    names = {k for runs in by_arm.values() for r in runs.values() for k in r if k not in _SIDE}

    def order(m: str) -> tuple:
        split, _, rest = m.partition(" ")
        return (split == "val", split, not rest.endswith(" " + primary), rest)

    metrics = sorted(names, key=order)
    rows = []
    for slug, runs in by_arm.items():
        row: dict[str, Any] = {"allocation": slug, "seeds": sorted(s for s in runs if s is not None),
                               "untuned": slug == "base"}
        for m in metrics + list(_SIDE):
            vals = [r[m] for r in runs.values() if r.get(m) is not None]
            if vals:
                mean, sd, half = t_interval(vals)
                row[m] = {"mean": mean, "std": sd, "ci95": half, "n": len(vals), "values": vals}
        if selection and slug in selection.get("arms", {}):
            row["selected"] = selection["arms"][slug]["setting"]
        rows.append(row)
    paired: dict[str, list] = {}
    references = reference_arms(selection, compare)
    for ref in references:
        if ref not in by_arm:
            continue
        for slug, runs in by_arm.items():
            if slug == ref or slug == "base":
                continue
            for m in metrics:
                split, kind, metric = (m.split(" ") + ["", ""])[:3]
                ref_runs = by_arm[ref]
                seeds = [s for s in runs if m in runs[s] and (None in ref_runs or s in ref_runs)]
                if not seeds:
                    continue
                diffs = [runs[s][m] - ref_runs[None if None in ref_runs else s][m] for s in seeds
                         if m in ref_runs[None if None in ref_runs else s]]
                if not diffs:
                    continue
                mean, _, half = t_interval(diffs)
                item = {"allocation": slug, "metric": m, "seeds": seeds, "diff_mean": mean, "diff_ci95": half,
                        "wins": sum(d > 0 for d in diffs), "losses": sum(d < 0 for d in diffs)}
                if kind == "loglik" and metric in ("accuracy", "accuracy_norm"):
                    a = {s: correct_by_question(preds[slug][s][split], metric) for s in seeds
                         if split in preds[slug].get(s, {})}
                    b = {s: correct_by_question(p[split], metric) for s, p in preds[ref].items() if split in p}
                    boot = paired_bootstrap(a, b) if a and b else None
                    if boot:
                        item["bootstrap"] = boot
                paired.setdefault(f"vs {ref}", []).append(item)
    summary = {"cells_done": sum(len(r) for r in by_arm.values()), "cells_planned": len(cells), "primary": primary,
               "metrics": metrics, "rows": rows, "paired": paired, "selection": selection,
               "references": {r: why for r, why in references.items() if f"vs {r}" in paired}}
    from .common import write_json_atomic

    write_json_atomic(out / "summary.json", summary)
    (out / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")
    _plot(summary, out / "summary.png")
    return summary


def _fmt(cell: Optional[dict]) -> str:
    if not cell:
        return "-"
    if cell["n"] < 2 or math.isnan(cell.get("std", float("nan"))):
        return f"{cell['mean']:.3f} (n=1)" if cell["n"] < 2 else f"{cell['mean']:.3f}"
    return f"{cell['mean']:.3f} ± {cell['std']:.3f} [±{cell['ci95']:.3f}]"


def _side(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    return format(v["mean"], fmt) if v else "-"


def summary_markdown(summary: dict[str, Any]) -> str:
    metrics = summary["metrics"]
    head = ("| arm | seeds | " + " | ".join(metrics) + " | experts | trainable params | active rank | router entropy | "
            "near-uniform layers | expert cosine | s/cell |")
    lines = [f"{summary['cells_done']} of {summary['cells_planned']} cells finished. Accuracy mean ± std over "
             f"seeds [95 % t-interval half-width]; `base` is the untuned model (no seeds). Primary metric: "
             f"{summary.get('primary', 'accuracy')}.", "", head, "|" + "---|" * (len(metrics) + 9)]
    for row in summary["rows"]:
        name = row["allocation"] + (" (untuned)" if row.get("untuned") else "")
        cells = [name, str(len(row["seeds"])) if row["seeds"] else "-"] + [_fmt(row.get(m)) for m in metrics]
        cells += [_side(row, "experts", ".0f"), _side(row, "trainable params", ",.0f"),
                  _side(row, "active rank", ".0f"),
                  _side(row, "router entropy", ".3f"), _side(row, "near-uniform layers", ".0%"),
                  _side(row, "expert cosine", ".3f"), _side(row, "train seconds", ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    sel = summary.get("selection")
    if sel and sel.get("arms"):
        lines += ["", f"Settings selected on validation by {sel['primary']} (same grid of {len(sel['grid'])} for "
                  f"every arm; the val columns of the final cells are therefore optimistic, report the held-out "
                  f"ones):", ""]
        for slug, s in sel["arms"].items():
            scores = ", ".join("-" if v is None else f"{v:.3f}" for v in s["scores"])
            lines.append(f"- {slug}: {s['setting']} (grid scores {scores}){edge_note(s)}")
    heldout = any(not m.startswith("val ") for m in metrics)
    why = summary.get("references") or {}
    for ref, items in summary["paired"].items():
        note = why.get(ref[3:], "reference")
        lines += ["", f"Paired {ref}{f' ({note})' if note != 'reference' else ''}: A − ref; over seeds (mean [95 % t half-width], wins/losses) and, for "
                      f"log-likelihood, over questions × seeds (bootstrap 95 % interval, smallest resolvable "
                      f"difference){'; held-out splits only (summary.json has all)' if heldout else ''}:", ""]
        for it in items:
            if heldout and it["metric"].startswith("val "):
                continue
            half = "n/a" if math.isnan(it["diff_ci95"]) else f"±{it['diff_ci95']:.3f}"
            text = (f"- {it['allocation']}, {it['metric']}: {it['diff_mean']:+.3f} [{half}], "
                    f"{it['wins']}/{it['losses']} over seeds {it['seeds']}")
            b = it.get("bootstrap")
            if b:
                verdict = "resolved" if b["lo"] > 0 or b["hi"] < 0 else "inside the noise"
                text += (f"; paired over {b['n_questions']} questions × {b['n_seeds']} seeds: {b['diff']:+.3f} "
                         f"[{b['lo']:+.3f}, {b['hi']:+.3f}], p={b['p']:.3f}, resolvable ≥ {b['mde']:.3f}: {verdict}")
            lines.append(text)
    return "\n".join(lines) + "\n"


_SYMBOLS = {"inverted_triangle": "▽", "uniform": "□", "triangle": "△", "hourglass": "⋈", "diamond": "◇"}


def _short_label(slug: str, width: int = 16) -> str:
    """An arm's name for a plot axis: shapes as their symbols, overrides one per line, long parts shortened."""
    head, *rest = slug.split("-", 1)
    parts = [_SYMBOLS.get(head, head)] + (rest[0].split("-") if rest and head in _SYMBOLS else
                                          ([rest[0]] if rest else []))
    return "\n".join(p if len(p) <= width else p[: width - 1] + "…" for p in parts)


def _plot(summary: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return
    metrics = [m for m in summary["metrics"] if "loglik" in m or "generation" in m]
    rows = summary["rows"]
    if not rows or not metrics:
        return
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.8), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        trained = [r for r in rows if m in r and not r.get("untuned")]
        names = [r["allocation"] for r in trained]
        means = [r[m]["mean"] for r in trained]
        errs = [0.0 if math.isnan(r[m]["ci95"]) else r[m]["ci95"] for r in trained]
        # points, not bars: the axis does not start at 0, and a bar's length would exaggerate the differences
        ax.errorbar(range(len(names)), means, yerr=errs, fmt="o", capsize=4, color="tab:blue")
        base = next((r for r in rows if r.get("untuned") and m in r), None)
        if base is not None:
            ax.axhline(base[m]["mean"], color="tab:red", linestyle="--", label="untuned")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([_short_label(n) for n in names], fontsize=7)
        ax.set_title(m, fontsize=9)
        ax.set_ylabel("accuracy (95 % t over seeds)", fontsize=8)
        ax.set_xlim(-0.5, len(names) - 0.5)
        if means:
            lo = min(means + ([base[m]["mean"]] if base else [])) - max(errs + [0.0]) - 0.05
            ax.set_ylim(max(0.0, lo), None)
    fig.tight_layout()
    from .report import save_figure

    save_figure(fig, path)
