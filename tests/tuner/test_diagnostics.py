"""Router diagnostics (issue 9, item 4): dead, dominant and near-uniform layers from router telemetry, the
suggestion per layer, the summary, and `molora report` printing and drawing them."""
from __future__ import annotations

import json

from molora.run.diagnostics import diagnose, diagnosis_text


def _run(loads, entropies, num_experts, top_k, steps=6):
    layers = list(range(len(loads)))
    train = []
    for s in range(1, steps + 1):
        train.append({"step": s, "router": {"layers": layers, "num_experts": num_experts, "top_k": top_k,
                                            "tokens": [100.0] * len(layers), "load": loads,
                                            "entropy_norm": entropies, "imbalance": [1.0] * len(layers)}})
    return {"train": train, "eval": [], "accuracy": {}, "runs": [], "summary": None}


def test_states_and_suggestions():
    loads = [[0.5, 0.5],                           # E = k = 2: all used
             [0.02, 0.33, 0.33, 0.32],             # one dead expert (< 0.25/4)
             [0.6, 0.15, 0.15, 0.10],              # one dominant expert (> 2/4)
             [0.26, 0.25, 0.25, 0.24],             # balanced, but the router is near-uniform
             [0.3, 0.2, 0.3, 0.2],                 # balanced and specialised
             [1.0]]                                # a single expert
    d = diagnose(_run(loads, [0.99, 0.8, 0.8, 0.99, 0.7, None], [2, 4, 4, 4, 4, 1], [2, 2, 2, 2, 2, 1]))
    assert [x.state for x in d] == ["all-used", "dead", "dominant", "near-uniform", "ok", "single"]
    assert d[1].dead == [0] and d[1].suggested_experts == 3
    assert d[2].dominant == [0] and d[2].suggested_experts == 5
    assert [x.suggested_experts for x in d[3:]] == [4, 4, 1]
    text = diagnosis_text(d)
    assert "layer 1: E=4 k=2" in text and "dead -> suggest 3 (-1)" in text and "dominant -> suggest 5 (+1)" in text
    assert "drop 1 dead expert(s), add 1" in text


def test_dead_experts_never_go_below_top_k():
    d = diagnose(_run([[0.01, 0.01, 0.49, 0.49]], [0.5], [4], [3]))
    assert d[0].dead == [0, 1] and d[0].suggested_experts == 3


def test_near_uniform_everywhere_is_explained():
    """The state of the shipped CPU runs: router entropy 0.985-0.99 in every layer."""
    loads = [[0.25, 0.26, 0.24, 0.25]] * 4
    d = diagnose(_run(loads, [0.985, 0.99, 0.987, 0.99], [4] * 4, [2] * 4))
    text = diagnosis_text(d)
    assert "every routed layer routes near-uniformly (router entropy 0.985-0.990)" in text
    assert "have not specialised" in text and "molora sweep" in text


def test_the_end_of_training_is_judged():
    """Early steps dead, the last third balanced: not dead."""
    run = _run([[0.01, 0.99 / 2, 0.99 / 2, 0.0]], [0.5], [4], [2], steps=6)
    for r in run["train"][4:]:
        r["router"] = {**r["router"], "load": [[0.25, 0.25, 0.25, 0.25]]}
    assert diagnose(run)[0].state == "ok"


def test_report_prints_and_draws_the_diagnostics(tmp_path, capsys):
    from molora.run.report import main

    loads = [[0.02, 0.33, 0.33, 0.32], [0.25, 0.25, 0.25, 0.25]]
    run = _run(loads, [0.8, 0.99], [4, 4], [2, 2])
    with open(tmp_path / "metrics.jsonl", "w") as fh:
        for r in run["train"]:
            fh.write(json.dumps({"type": "train", "loss": 1.0, **r}) + "\n")
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "router diagnostics" in out and "layer 0: E=4 k=2" in out and "dead -> suggest 3" in out
    data = json.loads((tmp_path / "plots" / "router_diagnostics.json").read_text())
    assert [x["state"] for x in data] == ["dead", "near-uniform"]
    assert (tmp_path / "plots" / "expert_load.png").stat().st_size > 5000


def test_report_draws_and_prints_dropped_tokens(tmp_path, capsys):
    """A Switch run whose capacity drops tokens: router.png gets a third panel (records written before the
    'dropped' key existed are left blank, not an error) and the diagnostics name the layer and the remedy."""
    import matplotlib.image

    from molora.run.report import main

    run = _run([[0.25, 0.25, 0.25, 0.25], [0.3, 0.2, 0.3, 0.2]], [0.7, 0.7], [4, 4], [1, 1])
    for rec in run["train"][1:]:
        rec["router"]["dropped"] = [0.0, 0.2]
    with open(tmp_path / "metrics.jsonl", "w") as fh:
        for r in run["train"]:
            fh.write(json.dumps({"type": "train", "loss": 1.0, **r}) + "\n")
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layer 1: E=4 k=1 entropy 0.700 max load x E 1.20 dropped 20.0%" in out
    assert "capacity: 1 layer(s) leave more than 1% of their tokens to no expert (worst: layer 1, 20.0%)" in out
    width = matplotlib.image.imread(str(tmp_path / "plots" / "router.png")).shape[1]
    for rec in run["train"]:
        rec["router"].pop("dropped", None)
    with open(tmp_path / "metrics.jsonl", "w") as fh:
        for r in run["train"]:
            fh.write(json.dumps({"type": "train", "loss": 1.0, **r}) + "\n")
    assert main([str(tmp_path)]) == 0
    assert "capacity:" not in capsys.readouterr().out
    narrow = matplotlib.image.imread(str(tmp_path / "plots" / "router.png")).shape[1]
    assert width > 1.3 * narrow  # three panels against two
