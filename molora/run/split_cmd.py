"""``molora split FILE.jsonl --out DIR --sizes dev=500,test=500 [--seed 0]``: carve disjoint slices out of a data file.

Settings must be chosen on validation data and reported on data nobody tuned on. Tasks that ship only a train file
(OpenBookQA here) or whose test labels are private need both carved from train. This command shuffles the rows
with a fixed seed, takes the named slices in order, and writes ``DIR/<name>.jsonl`` for each and ``DIR/train.jsonl``
for the rest (original order kept inside each file), plus ``DIR/split.json`` recording the source, its SHA-256,
the seed and the row ids of every slice. Writes are atomic; running it again with the same arguments gives the same
files byte for byte. A row that is not a JSON object fails naming its line.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "carve"]


class SplitError(ValueError):
    pass


def _parse_sizes(text: str) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(\d+)\s*", part)
        if not m:
            raise SplitError(f"--sizes: {part!r} is not NAME=ROWS (e.g. dev=500,test=500)")
        name, n = m.group(1), int(m.group(2))
        if name == "train":
            raise SplitError("--sizes: 'train' is the remainder; name the carved slices otherwise (dev, test, ...)")
        if n < 1:
            raise SplitError(f"--sizes: {name}={n} must be at least 1")
        if name in (x for x, _ in out):
            raise SplitError(f"--sizes: {name} is given twice")
        out.append((name, n))
    return out


def carve(src: Path, out: Path, sizes: Sequence[tuple[str, int]], seed: int = 0) -> dict:
    """Write the slices and the remainder; returns the record written to ``split.json``."""
    from .common import write_json_atomic, write_text_atomic

    raw = src.read_bytes()
    lines = [ln for ln in raw.decode("utf-8").splitlines() if ln.strip()]
    for i, ln in enumerate(lines, 1):
        try:
            if not isinstance(json.loads(ln), dict):
                raise ValueError
        except ValueError:
            raise SplitError(f"{src}: row {i} is not a JSON object") from None
    need = sum(n for _, n in sizes)
    if need >= len(lines):
        raise SplitError(f"{src} has {len(lines)} rows; the slices ask for {need}, leaving no training rows")
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    taken, pos = {}, 0
    for name, n in sizes:
        taken[name] = sorted(order[pos:pos + n])
        pos += n
    taken["train"] = sorted(order[pos:])
    out.mkdir(parents=True, exist_ok=True)
    record = {"source": str(src.resolve()), "sha256": hashlib.sha256(raw).hexdigest(), "seed": seed,
              "rows": {name: len(idx) for name, idx in taken.items()}, "ids": {}}
    for name, idx in taken.items():
        write_text_atomic(out / f"{name}.jsonl", "".join(lines[i] + "\n" for i in idx))
        record["ids"][name] = [json.loads(lines[i]).get("id", i) for i in idx]
    write_json_atomic(out / "split.json", record)
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .common import plain_doc

    p = argparse.ArgumentParser(prog="molora split", description=plain_doc(__doc__.split("\n\n")[1]))
    p.add_argument("file", help="JSONL data file (one JSON object per line)")
    p.add_argument("--out", required=True, help="folder for <slice>.jsonl, train.jsonl (the rest) and split.json")
    p.add_argument("--sizes", required=True, help="slices to carve, e.g. dev=500,test=500")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    a = p.parse_args(argv)
    src = Path(a.file)
    try:
        if not src.is_file():
            raise SplitError(f"{src}: no such file")
        rec = carve(src, Path(a.out), _parse_sizes(a.sizes), a.seed)
    except (SplitError, UnicodeDecodeError) as e:
        print(f"molora split: error: {e}", file=sys.stderr)
        return 2
    print("molora split: " + ", ".join(f"{k} {v} rows" for k, v in rec["rows"].items()) + f" -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
