"""``molora report OUTPUT_DIR``: plots of a training run from its ``metrics.jsonl``.

Writes into ``OUTPUT_DIR/plots`` (or ``--out DIR``) and prints the paths:

* ``loss.png`` — training loss (total and task) and eval loss over steps; the MoLA aux loss (unweighted) below.
* ``expert_load.png`` — heatmap layers x experts of each expert's share of its layer's top-k selections relative to
  the uniform share (load x E_l: 1 = uniform, white; blue less used, red more), averaged over the whole run
  (token-weighted) and over the last logging interval. Layers have different expert counts (e.g. 2-4-6-8): cells
  past a layer's last expert are masked (hatched grey). Beside it the diagnostics' suggested change of experts
  per layer, or, when none is suggested, the count of layers per state.
* ``router.png`` — normalised router entropy (1 = uniform router) and load imbalance (max load x E; 1 =
  balanced) per layer over the logging steps (layers with a single expert route nothing: grey), and, when a
  capacity router (Switch, expert choice) dropped tokens, the fraction of tokens no expert computed.

A resumed run appends to the same metrics.jsonl; records past the checkpoint it resumed from are superseded by
the resumed run's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["main", "render", "load_run", "save_figure"]


def save_figure(fig, path: Path, dpi: int = 100, **kwargs) -> Path:
    """Write a matplotlib figure atomically (temporary file, then rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=dpi, **kwargs)
    plt.close(fig)
    tmp.replace(path)
    return path


def load_run(path: Path) -> dict[str, Any]:
    """Records of a metrics.jsonl grouped by type, with resumed runs stitched (later records win)."""
    from .telemetry import read_metrics

    records = read_metrics(path)
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    accuracy: dict[str, dict] = {}
    runs, summary = [], None
    for r in records:
        kind = r.get("type")
        if kind == "run":
            runs.append(r)
            step = r.get("resume_step")
            if step is not None:
                for d in (train, evals):
                    for s in [s for s in d if s > step]:
                        del d[s]
        elif kind == "train":
            train[int(r["step"])] = r
        elif kind == "eval":
            evals[int(r["step"])] = r
        elif kind == "accuracy":
            accuracy[r.get("stage", "?")] = r
        elif kind == "summary":
            summary = r
    return {"train": [train[s] for s in sorted(train)], "eval": [evals[s] for s in sorted(evals)],
            "accuracy": accuracy, "runs": runs, "summary": summary}


def _title(run: dict[str, Any], output_dir: Path) -> str:
    parts = [output_dir.name]
    acc = run["accuracy"]
    for kind in ("loglik", "generation"):
        b = (acc.get("before") or {}).get(kind)
        a = (acc.get("after") or {}).get(kind)
        if a:
            parts.append(f"{kind} acc {b['accuracy']:.3f} -> {a['accuracy']:.3f}" if b else
                         f"{kind} acc {a['accuracy']:.3f}")
    return "  |  ".join(parts)


def _plot_loss(run, out: Path, title: str) -> Optional[Path]:
    import matplotlib.pyplot as plt

    train = run["train"]
    if not train:
        return None
    steps = [r["step"] for r in train]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    ax.plot(steps, [r.get("loss") for r in train], label="loss (task + coef x aux)", color="tab:blue")
    if any("task_loss" in r for r in train):
        ax.plot(steps, [r.get("task_loss") for r in train], label="task loss", color="tab:green", ls="--")
    ev = [r for r in run["eval"] if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval loss", color="tab:red")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    aux = [(r["step"], r["aux_loss"]) for r in train if r.get("aux_loss") is not None]
    if aux:
        ax2.plot([s for s, _ in aux], [v for _, v in aux], color="tab:purple", label="aux loss (unweighted)")
        ax2.legend(loc="upper right")
    else:
        ax2.text(0.5, 0.5, "no aux loss logged", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_xlabel("step")
    ax2.set_ylabel("MoLA aux loss")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _router_records(run) -> list[dict]:
    return [r for r in run["train"] if r.get("router") and r["router"].get("layers")]


def _load_matrix(routers: list[dict]):
    """(layers, max_E, masked mean matrix, masked last matrix, num_experts)."""
    import numpy as np

    last = routers[-1]["router"]
    layers = last["layers"]
    n_exp = last["num_experts"]
    max_e = max(n_exp)
    mean = np.zeros((len(layers), max_e))
    weight = np.zeros(len(layers))
    for rec in routers:
        r = rec["router"]
        for i, layer in enumerate(r["layers"]):
            if layer not in layers:
                continue
            j = layers.index(layer)
            w = float(r["tokens"][i])
            mean[j, : len(r["load"][i])] += np.asarray(r["load"][i]) * w
            weight[j] += w
    mean /= np.maximum(weight, 1e-12)[:, None]
    lastm = np.zeros((len(layers), max_e))
    for i, load in enumerate(last["load"]):
        lastm[i, : len(load)] = load
    mask = np.array([[e >= n_exp[i] for e in range(max_e)] for i in range(len(layers))])
    return layers, max_e, np.ma.array(mean, mask=mask), np.ma.array(lastm, mask=mask), n_exp


def _plot_expert_load(run, out: Path, title: str, diags=None) -> Optional[Path]:
    import matplotlib.pyplot as plt
    import numpy as np

    routers = _router_records(run)
    if not routers:
        return None
    from matplotlib.colors import TwoSlopeNorm

    layers, max_e, mean, lastm, n_exp = _load_matrix(routers)
    # each layer relative to its uniform share (load x E_l: 1 = uniform, 2 = twice its share, 0 = unused), so a
    # 2-expert layer (share 0.5) does not outshine an 8-expert one (share 0.125) by its share alone
    share = np.asarray(n_exp, dtype=float)[:, None]
    mean, lastm = mean * share, lastm * share
    vmax = float(max(2.0, mean.max(), lastm.max()))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    height = max(3.5, 0.22 * len(layers) + 1.8)
    fig, axes = plt.subplots(1, 3, figsize=(7.0 + 1.1 * max_e, height), squeeze=False,
                             gridspec_kw={"width_ratios": [max_e, max_e, max(3.0, 0.6 * max_e)]})
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#dddddd")
    labels = ["-" if l is None else str(l) for l in layers]
    im = None
    for ax, mat, sub in ((axes[0][0], mean, f"mean over the run ({len(routers)} logging steps)"),
                         (axes[0][1], lastm, f"last logging interval (step {routers[-1]['step']})")):
        im = ax.imshow(mat, aspect="auto", cmap=cmap, norm=norm, origin="lower", interpolation="nearest")
        ax.set_xticks(range(max_e))
        ax.set_xticklabels([str(e) for e in range(max_e)])
        step = max(1, len(layers) // 16)
        ax.set_yticks(range(0, len(layers), step))
        ax.set_yticklabels(labels[::step])
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title(sub, fontsize=9)
        # hatch the masked cells so "no such expert" reads differently from "load 0"
        for i, e_l in enumerate(n_exp):
            if e_l < max_e:
                ax.add_patch(plt.Rectangle((e_l - 0.5, i - 0.5), max_e - e_l, 1, fill=False, hatch="///",
                                           edgecolor="#aaaaaa", lw=0))
        if len(layers) * max_e <= 80:
            for i in range(len(layers)):
                for e in range(n_exp[i]):
                    v = float(mat[i, e])
                    ax.text(e, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if (v < 0.25 or v > 0.8 * vmax) else "black")
        if diags and ax is axes[0][1]:  # the diagnostics' verdict on the end of training: x dead, ^ dominant
            by_layer = {d.layer: d for d in diags}
            for i, layer in enumerate(layers):
                d = by_layer.get(layer)
                for e in (d.dead if d else []):
                    ax.plot(e, i, marker="x", color="red", ms=8, mew=2)
                for e in (d.dominant if d else []):
                    ax.plot(e, i, marker="^", color="orange", ms=7)
    fig.colorbar(im, ax=[axes[0][0], axes[0][1]], label="load / uniform share (load x E; 1 = uniform)",
                 shrink=0.9)
    _plot_diagnosis_panel(axes[0][2], layers, diags or [])
    fig.suptitle("expert load per layer relative to the uniform share 1/E (blue: less used, red: more)  —  " + title,
                 fontsize=9)
    path = out / "expert_load.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _plot_diagnosis_panel(ax, layers, diags) -> None:
    """Suggested change of experts per layer (bars) with each layer's state (see molora.run.diagnostics)."""
    colors = {"dead": "tab:red", "dominant": "tab:orange", "near-uniform": "tab:gray", "all-used": "#bbbbbb",
              "single": "#dddddd", "ok": "tab:green"}
    by_layer = {d.layer: d for d in diags}
    if not any(d.suggested_experts != d.num_experts for d in diags):  # nothing to draw but zeros: say so instead
        from collections import Counter

        counts = Counter(d.state for d in diags)
        lines = ["no change of experts", "suggested", ""] + [f"{n} layer(s) {state}" for state, n in
                                                             counts.most_common()]
        ax.text(0.5, 0.5, "\n".join(lines) if diags else "no diagnostics", ha="center", va="center", fontsize=8,
                transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("router diagnostics", fontsize=8)
        return
    span = 1.5 + max([abs(d.suggested_experts - d.num_experts) for d in diags] or [0])
    for i, layer in enumerate(layers):
        d = by_layer.get(layer)
        if d is None:
            continue
        change = d.suggested_experts - d.num_experts
        color = colors.get(d.state, "tab:blue")
        if change:
            ax.barh(i, change, color=color, height=0.8)
        else:
            ax.plot(0, i, marker="s", color=color, ms=5)
        ax.text(0.02, i, d.state, transform=ax.get_yaxis_transform(), va="center", fontsize=6)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlim(-span, span)
    ax.set_ylim(-0.5, len(layers) - 0.5)
    ax.set_yticks([])
    ax.set_xlabel("suggested Δ experts")
    ax.set_title("router diagnostics\n(x dead, ^ dominant)", fontsize=8)


def _plot_router(run, out: Path, title: str) -> Optional[Path]:
    import matplotlib.pyplot as plt
    import numpy as np

    routers = _router_records(run)
    if not routers:
        return None
    layers = routers[-1]["router"]["layers"]
    steps = [r["step"] for r in routers]

    def matrix(key):
        m = np.full((len(layers), len(routers)), np.nan)
        for j, rec in enumerate(routers):
            r = rec["router"]
            if r.get(key) is None:  # a record written before the key existed (e.g. "dropped")
                continue
            for i, layer in enumerate(r["layers"]):
                if layer in layers and r["num_experts"][i] > 1:  # a single expert routes nothing: masked
                    m[layers.index(layer), j] = r[key][i]
        return np.ma.masked_invalid(m)

    height = max(3.5, 0.18 * len(layers) + 1.8)
    panels = [("entropy_norm", "magma", "router entropy / log E (1 = uniform)"),
              ("imbalance", "viridis", "load imbalance (max load x E; 1 = balanced)")]
    if any(any(rec["router"].get("dropped") or [0]) for rec in routers):  # a capacity router dropped tokens
        panels.append(("dropped", "Reds", "tokens no expert computed (fraction)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), height), squeeze=False)
    axes = axes[0]
    labels = ["-" if l is None else str(l) for l in layers]
    for ax, (key, cmap, sub) in zip(axes, panels):
        im = ax.imshow(matrix(key), aspect="auto", cmap=plt.get_cmap(cmap).with_extremes(bad="#dddddd"),
                       origin="lower", interpolation="nearest")
        ax.set_ylabel("layer")
        ax.set_xlabel("logging step")
        tick = max(1, len(steps) // 8)
        ax.set_xticks(range(0, len(steps), tick))
        ax.set_xticklabels([str(s) for s in steps[::tick]])
        ys = max(1, len(layers) // 16)
        ax.set_yticks(range(0, len(layers), ys))
        ax.set_yticklabels(labels[::ys])
        ax.set_title(sub, fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = out / "router.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render(output_dir: Path | str, out_dir: Optional[Path | str] = None) -> list[Path]:
    """Render the PNGs of a run directory; returns their paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    output_dir = Path(output_dir)
    metrics = output_dir / "metrics.jsonl" if output_dir.is_dir() else output_dir
    if metrics.is_file() and output_dir.is_file():
        output_dir = output_dir.parent
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found: give the output_dir of a `molora train` run")
    run = load_run(metrics)
    if not run["train"]:
        raise ValueError(f"{metrics} has no training records yet (logging_steps not reached?)")
    out = Path(out_dir) if out_dir is not None else output_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    title = _title(run, output_dir)
    from .diagnostics import as_json, diagnose, diagnosis_text

    diags = diagnose(run)
    paths = [p for p in (_plot_loss(run, out, title), _plot_expert_load(run, out, title, diags),
                         _plot_router(run, out, title)) if p is not None]
    if diags:
        import json

        (out / "router_diagnostics.json").write_text(json.dumps(as_json(diags), indent=1), encoding="utf-8")
        (out / "router_diagnostics.txt").write_text(diagnosis_text(diags) + "\n", encoding="utf-8")
        paths += [out / "router_diagnostics.json", out / "router_diagnostics.txt"]
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="molora report", description="Plot a training run: loss curves (task and aux), "
                                "expert-load heatmap, router entropy/imbalance.")
    p.add_argument("output_dir", help="the train.output_dir of a run (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="where to write the PNGs (default: OUTPUT_DIR/plots)")
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        paths = render(a.output_dir, a.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"molora report: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    text = next((p for p in paths if p.name == "router_diagnostics.txt"), None)
    if text is not None:
        print(text.read_text(encoding="utf-8"), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
