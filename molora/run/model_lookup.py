"""Where a recipe's model is, from its name alone and before torch loads: the packaged names, a local checkpoint
folder's config.json, or the local Hugging Face cache (nothing is downloaded at run time)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

#: Kept in sync with molora.run.assets (which imports torch, so it is not imported here).
PACKAGED_MODEL_NAMES = ("smollm2-135m",)
#: decoder layers of each packaged model (tests check this against the loaded model)
PACKAGED_MODEL_LAYERS = {"smollm2-135m": 30}
#: config.json keys that hold the number of blocks, by architecture family
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def model_num_layers(name_or_path: str) -> Optional[int]:
    """The block count of a model from its ``config.json`` alone (no torch, no weights): packaged names, local
    checkpoint directories and models in the local Hugging Face cache. None when it cannot be known."""
    if name_or_path in PACKAGED_MODEL_LAYERS:
        return PACKAGED_MODEL_LAYERS[name_or_path]
    cfg_path = Path(os.path.expanduser(name_or_path)) / "config.json"
    if not cfg_path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name_or_path, "config.json")
        except Exception:  # noqa: BLE001 - not a repo id, hub library missing: unknown
            return None
        if not isinstance(cached, str):
            return None
        cfg_path = Path(cached)
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    cfgs = [cfg, cfg.get("text_config") or {}]
    for c in cfgs:
        for key in LAYER_COUNT_KEYS:
            if isinstance(c.get(key), int):
                return c[key]
    return None


def model_location_problem(name_or_path: str) -> Optional[str]:
    """Why ``model.name_or_path`` cannot be loaded without a download (None when it can): a packaged name, a local
    folder with config.json, or a model in the local Hugging Face cache. Skipped when ``HF_HUB_OFFLINE=0`` (the
    user allows downloads)."""
    import difflib

    if name_or_path in PACKAGED_MODEL_NAMES or os.environ.get("HF_HUB_OFFLINE", "1") == "0":
        return None
    path = Path(os.path.expanduser(name_or_path))
    if (path / "config.json").is_file():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
            return None
    except Exception:  # noqa: BLE001 - not a valid repo id: not in the cache
        pass
    close = difflib.get_close_matches(name_or_path.lower(), list(PACKAGED_MODEL_NAMES), n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    where = (f"{path} has no config.json" if path.exists() else f"no folder {path}")
    return (f"model.name_or_path={name_or_path!r} is not a packaged model ({', '.join(PACKAGED_MODEL_NAMES)}), not a "
            f"local checkpoint ({where}) and not in the local Hugging Face cache; nothing is downloaded at run "
            f"time (HF_HUB_OFFLINE=0 allows it).{hint}")
