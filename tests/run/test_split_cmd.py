"""`molora split`: seeded, disjoint, complete, byte-identical on a re-run, recorded; bad input in one line."""
from __future__ import annotations

import json

from molora.run.split_cmd import main


def test_split_is_disjoint_complete_repeatable_and_recorded(tmp_path, capsys):
    src = tmp_path / "all.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "input": str(i)}) + "\n" for i in range(50)))
    out = tmp_path / "out"
    assert main([str(src), "--out", str(out), "--sizes", "dev=10,test=5", "--seed", "3"]) == 0
    ids = {n: [json.loads(x)["id"] for x in (out / f"{n}.jsonl").read_text().splitlines()]
           for n in ("dev", "test", "train")}
    assert [len(ids[n]) for n in ("dev", "test", "train")] == [10, 5, 35]
    assert sorted(sum(ids.values(), []), key=lambda s: int(s[1:])) == [f"q{i}" for i in range(50)]
    rec = json.loads((out / "split.json").read_text())
    assert rec["ids"] == ids and rec["seed"] == 3 and len(rec["sha256"]) == 64
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([str(src), "--out", str(out), "--sizes", "dev=10,test=5", "--seed", "3"]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main([str(src), "--out", str(tmp_path / "o2"), "--sizes", "dev=10,test=5", "--seed", "4"]) == 0
    assert (tmp_path / "o2" / "dev.jsonl").read_bytes() != before["dev.jsonl"]
    capsys.readouterr()
    for sizes, match in [("dev=abc", "is not NAME=ROWS"), ("train=3", "'train' is the remainder"),
                         ("dev=3,dev=4", "given twice"), ("dev=50", "leaving no training rows")]:
        assert main([str(src), "--out", str(tmp_path / "x"), "--sizes", sizes]) == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1
    src.write_text('{"id": 1}\n[1, 2]\n')
    assert main([str(src), "--out", str(tmp_path / "x"), "--sizes", "dev=1"]) == 2
    assert "row 2 is not a JSON object" in capsys.readouterr().err
