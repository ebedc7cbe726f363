"""Accuracy of a causal LM on classification / multiple-choice rows.

Works with any Hugging Face causal LM and with a ``peft.PeftModel`` (or molora model) wrapping one:
the model is only called as ``model(input_ids=..., attention_mask=..., ...)`` and
``model.generate(...)``.

Two protocols:

* :func:`evaluate_loglik` -- score every option by the summed log-probability of its tokens after
  the prompt and pick the best (``accuracy``); also the best by log-probability per byte of the
  option text (``accuracy_norm``, as lm-evaluation-harness's ``acc_norm``). Never fails to parse.
  By default the prompt is run once per row and its KV cache shared by all options
  (``share_prompt=True``), which is several times faster for 4-5 options and gives the same
  scores as scoring each (prompt + option) sequence separately (``share_prompt=False``).
* :func:`evaluate_generation` -- greedy generation from the prompt (left padded), then the answer
  is extracted from the generated text as the original MoLA evaluation did: the first option name
  found (case-insensitive; ``_`` and spaces interchangeable), or, when the prompt lists lettered
  options (``{choices}`` in the template), the first option letter. Texts with no option are
  counted wrong and reported as ``unparsed``.

Prompts, targets and token ids come from :mod:`molora.run.data`, so evaluation sees exactly the token
sequences training does.

Over 400 lines because the two protocols (option log-likelihood with a shared prompt cache, and
generation with answer parsing) share batching, token accounting and the result records.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import (
    DEFAULT_CUTOFF_LEN,
    OPTION_LETTERS,
    DataError,
    PromptTemplate,
    _special_prefix,
    _truncate,
    choice_target,
    encode_prompt_target,
    validate_rows,
)
from .host_memory import release_free_memory
from .label_logits import accepts_logits_to_keep

__all__ = ["evaluate_loglik", "evaluate_generation", "extract_choice", "score_options"]


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no grad inside; the previous train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def _prepare_rows(rows: Sequence[Mapping[str, Any]], max_examples: int | None) -> list[dict[str, Any]]:
    rows = list(rows)[: max_examples if max_examples is not None else None]
    if not rows:
        raise DataError("evaluation got no rows (empty dataset)")
    return validate_rows(rows, format="choices", source="evaluation rows")


def _pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, L]`` ids right-padded with ``pad_id`` and the ``[N, L]`` attention mask."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _encode_options(
    tokenizer, prompt: str, choices: Sequence[str], cutoff_len: int | None
) -> tuple[list[int], list[list[int]]]:
    """Prompt ids shared by all options and each option's ids (no eos).

    The prompt is truncated once (for the longest option) so every option continues the same
    prompt: ``len(prompt_ids) + len(option_ids) <= cutoff_len`` for every option.
    """
    encoded = [encode_prompt_target(tokenizer, prompt, choice_target(prompt, c), None, add_eos=False) for c in choices]
    p_ids = encoded[0][0]
    options = [t for _, t in encoded]
    for i, t in enumerate(options):
        if not t:
            raise DataError(f"option {choices[i]!r} encodes to no tokens")
    if cutoff_len is not None:
        longest = max(len(t) for t in options)
        n_front = len(_special_prefix(tokenizer))
        p_ids, _ = _truncate(p_ids, [0] * longest, cutoff_len, n_front, "left")
        room = cutoff_len - len(p_ids)
        options = [t[:room] for t in options]
    if not p_ids:
        raise DataError(f"prompt {prompt[:60]!r} encodes to no tokens; nothing to condition the options on")
    return p_ids, options


def _score_direct(model, pad_id: int, items: list[tuple[list[int], list[int]]], device) -> list[float]:
    """Summed log p(option | prompt) for (prompt_ids, option_ids) pairs, one sequence each."""
    ids, mask = _pad_right([p + t for p, t in items], pad_id, device)
    logp_all = _logits(model(input_ids=ids, attention_mask=mask))
    scores = []
    for i, (p, t) in enumerate(items):
        # logits at position j predict token j + 1
        logits = logp_all[i, len(p) - 1 : len(p) + len(t) - 1].float()
        target = torch.tensor(t, device=logits.device)
        scores.append(F.log_softmax(logits, dim=-1).gather(-1, target[:, None]).sum().item())
    return scores


def _select_cache(cache: Any, index: torch.Tensor) -> Any:
    """Batch rows ``index`` (repeats allowed) of a KV cache (``Cache`` object or legacy tuples)."""
    if hasattr(cache, "reorder_cache"):
        cache.reorder_cache(index)
        return cache
    return tuple(tuple(t.index_select(0, index) for t in layer) for layer in cache)


def _score_shared(
    model, pad_id: int, groups: list[tuple[list[int], list[list[int]]]], device, last_logits_only: bool = False
) -> list[list[float]] | None:
    """Scores of the options of several prompts, running each prompt once.

    ``groups`` = ``[(prompt_ids, [option_ids, ...]), ...]``. The prompts are right-padded and run
    with ``use_cache=True``; the cache is repeated per option and the options are run after it,
    with explicit ``position_ids`` continuing each prompt and the prompt's padding masked out.
    ``last_logits_only``: pass ``logits_to_keep`` so the LM head runs only at each prompt's last
    position (for models whose forward takes it). Returns ``None`` if the model returns no cache (the
    caller falls back to the direct path).
    """
    prompts = [p for p, _ in groups]
    p_ids, p_mask = _pad_right(prompts, pad_id, device)
    lens = [len(p) for p in prompts]
    extra = {}
    if last_logits_only:  # the LM head only at each prompt's last position: [N, 1, V]
        extra["logits_to_keep"] = torch.tensor(lens, device=device)[:, None] - 1
    out = model(input_ids=p_ids, attention_mask=p_mask, use_cache=True, **extra)
    # transformers >= 5.2x names the KV cache `cache` (input and output); `past_key_values` is its deprecated alias
    fields = out if hasattr(out, "get") else {}
    cache_key = "cache" if fields.get("cache") is not None else "past_key_values"
    cache = fields.get(cache_key)
    if cache is None:
        return None
    p_logits = _logits(out)
    last = [0] * len(lens) if extra else [n - 1 for n in lens]
    first_logp = [F.log_softmax(p_logits[i, last[i]].float(), dim=-1) for i in range(len(groups))]

    owner = [g for g, (_, opts) in enumerate(groups) for _ in opts]
    options = [t for _, opts in groups for t in opts]
    scores_flat = [first_logp[g][t[0]].item() for g, t in zip(owner, options)]
    if max(len(t) for t in options) > 1:
        index = torch.tensor(owner, device=device)
        cache = _select_cache(cache, index)
        o_in = [t[:-1] for t in options]  # token j of the option predicts token j + 1
        # single-token options need no second pass: give them one masked dummy token
        o_ids, o_mask = _pad_right([t if t else [pad_id] for t in o_in], pad_id, device)
        for k, t in enumerate(o_in):
            if not t:
                o_mask[k, 0] = 0
        mask = torch.cat([p_mask.index_select(0, index), o_mask], dim=1)
        start = torch.tensor([lens[g] for g in owner], device=device)
        position_ids = start[:, None] + torch.arange(o_ids.shape[1], device=device)[None, :]
        o_logits = _logits(
            model(
                input_ids=o_ids,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=True,
                **{cache_key: cache},
            )
        )
        for k, t in enumerate(options):
            if len(t) > 1:
                logp = F.log_softmax(o_logits[k, : len(t) - 1].float(), dim=-1)
                scores_flat[k] += logp.gather(-1, torch.tensor(t[1:], device=device)[:, None]).sum().item()
    result, k = [], 0
    for _, opts in groups:
        result.append(scores_flat[k : k + len(opts)])
        k += len(opts)
    return result


def score_options(
    model: torch.nn.Module,
    tokenizer,
    rows: Sequence[Mapping[str, Any]],
    template: PromptTemplate | str | None = None,
    batch_size: int = 8,
    cutoff_len: int | None = DEFAULT_CUTOFF_LEN,
    share_prompt: bool = True,
    progress: bool = True,
) -> list[list[float]]:
    """Summed log-likelihood of every option of every row (the scores behind :func:`evaluate_loglik`).

    Args:
        rows: validated choices rows.
        batch_size: rows per forward pass with ``share_prompt`` (the options of a batch run in one
            second pass), option sequences per forward pass without.

    Returns:
        ``scores[i][j]`` = log p(option j of row i | prompt of row i), summed over the option's tokens.
    """
    template = template if isinstance(template, PromptTemplate) else PromptTemplate(template)
    device = _device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer needs a pad or eos token")
    groups = [_encode_options(tokenizer, template.prompt(r), r["choices"], cutoff_len) for r in rows]
    scores: list[list[float]] = []
    last_logits_only = accepts_logits_to_keep(model)
    bar = tqdm(total=len(groups), desc="loglik eval", unit="ex", disable=not progress, leave=False)
    # eval mode and no gradient here too (evaluate_loglik sets them; a direct call got autograd and the routers'
    # training statistics: 1.9x the time of lm-eval's scoring in `molora bench eval`)
    with _eval_mode(model):
        _score_all(model, pad_id, groups, device, batch_size, share_prompt, last_logits_only, bar, scores)
    _refuse_nonfinite(model, scores, groups, rows, device)
    return scores


def _score_all(model, pad_id: int, groups, device, batch_size: int, share_prompt: bool, last_logits_only: bool,
               bar, scores: list[list[float]]) -> None:
    """Fill ``scores`` with every group's option scores (see :func:`score_options`)."""
    try:
        if share_prompt:
            for start in range(0, len(groups), batch_size):
                chunk = groups[start : start + batch_size]
                got = _score_shared(model, pad_id, chunk, device, last_logits_only)
                if got is None:  # the model keeps no KV cache: score the sequences one by one
                    scores.clear()
                    share_prompt = False
                    break
                scores.extend(got)
                bar.update(len(chunk))
                release_free_memory()  # batches of varying length fragment the C heap (see host_memory)
        if not share_prompt:
            flat = [(g, p, t) for g, (p, opts) in enumerate(groups) for t in opts]
            flat_scores: list[float] = []
            for start in range(0, len(flat), batch_size):
                chunk = flat[start : start + batch_size]
                flat_scores.extend(_score_direct(model, pad_id, [(p, t) for _, p, t in chunk], device))
                release_free_memory()
                rows_done = chunk[-1][0] + (start + len(chunk) == len(flat))  # rows fully scored
                bar.update(rows_done - bar.n)
            k = 0
            for _, opts in groups:
                scores.append(flat_scores[k : k + len(opts)])
                k += len(opts)
    finally:
        bar.close()


def _refuse_nonfinite_generation(model, step_logits, ids, mask, rows, start: int, device) -> None:
    """Greedy decoding over non-finite logits picks arbitrary tokens: refuse it (NonFiniteError naming the row and the
    first module whose output is not finite) instead of scoring the text."""
    from .nonfinite import NonFiniteError, first_nonfinite_module

    for step, logits in enumerate(step_logits or ()):
        ok = torch.isfinite(logits).all(dim=-1)
        if bool(ok.all()):
            continue
        k = int((~ok).nonzero()[0, 0])
        keep = mask[k].bool()
        where = first_nonfinite_module(model, input_ids=ids[k][keep][None].to(device))
        rid = rows[start + k].get("id", start + k)
        raise NonFiniteError(
            f"row {start + k} (id {rid!r}): the model's logits at generated token {step} are not finite, so the "
            f"generated text would be arbitrary; first module with a non-finite output: "
            f"{where or 'none on the prompt alone'}. The adapter's weights or activations overflowed: train with a "
            f"smaller learning rate, or evaluate an earlier checkpoint")


def _refuse_nonfinite(model, scores: list[list[float]], groups, rows, device) -> None:
    """A non-finite option score means non-finite logits (log_softmax of finite logits is finite): never count it
    as a prediction. Raise NonFiniteError naming the row and the first module whose output is not finite."""
    import math

    from .nonfinite import NonFiniteError, first_nonfinite_module

    bad = next((i for i, s in enumerate(scores) if not all(math.isfinite(v) for v in s)), None)
    if bad is None:
        return
    prompt, options = groups[bad]
    ids = torch.tensor([prompt + options[0]], device=device)
    where = first_nonfinite_module(model, input_ids=ids)
    rid = rows[bad].get("id", bad) if bad < len(rows) else bad
    raise NonFiniteError(
        f"row {bad} (id {rid!r}): the model's output is not finite (option scores {scores[bad]}), so no accuracy "
        f"can be computed; first module with a non-finite output: {where or 'none on a re-run (nondeterministic)'}. "
        f"The adapter's weights or activations overflowed: check them (molora report, or load the adapter: "
        f"non-finite weights are refused), train with a smaller learning rate, or evaluate an earlier checkpoint")


def evaluate_loglik(
    model: torch.nn.Module,
    tokenizer,
    rows: Sequence[Mapping[str, Any]],
    template: PromptTemplate | str | None = None,
    batch_size: int = 8,
    max_examples: int | None = None,
    cutoff_len: int | None = DEFAULT_CUTOFF_LEN,
    share_prompt: bool = True,
    return_predictions: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Multiple-choice accuracy by option log-likelihood.

    Each option's continuation (``" " + option``) is scored as the sum of its tokens' log-probs after
    the prompt (``template``, default ``"{input}\\nAnswer:"``); the prediction is the argmax
    (first on ties). ``accuracy_norm`` uses the sum divided by the option's UTF-8 byte length.

    Args:
        model: a causal LM (or PEFT / molora wrapper); put in eval mode for the call and restored.
        rows: choices rows (``input``, ``choices``, ``label``); validated.
        batch_size: rows per forward pass (see :func:`score_options`).
        max_examples: evaluate only the first ``max_examples`` rows.
        cutoff_len: prompt + option are truncated to this many tokens (prompt loses its start).
        share_prompt: run each prompt once and share its KV cache among the options.
        return_predictions: add ``"predictions"``: per row ``{"id", "label", "pred", "pred_norm",
            "scores"}``.

    Returns:
        ``{"accuracy": float, "accuracy_norm": float, "n": int}`` (+ ``"predictions"``).
    """
    rows = _prepare_rows(rows, max_examples)
    with _eval_mode(model):
        scores = score_options(model, tokenizer, rows, template, batch_size, cutoff_len, share_prompt, progress)
    correct = correct_norm = 0
    predictions = []
    for i, (row, s) in enumerate(zip(rows, scores)):
        pred = max(range(len(s)), key=lambda j: (s[j], -j))
        norm = [s[j] / max(1, len(row["choices"][j].encode("utf-8"))) for j in range(len(s))]
        pred_norm = max(range(len(s)), key=lambda j: (norm[j], -j))
        correct += pred == row["label"]
        correct_norm += pred_norm == row["label"]
        if return_predictions:
            predictions.append(
                {"id": row.get("id", i), "label": row["label"], "pred": pred, "pred_norm": pred_norm, "scores": s}
            )
    n = len(rows)
    result: dict[str, Any] = {"accuracy": correct / n, "accuracy_norm": correct_norm / n, "n": n}
    if return_predictions:
        result["predictions"] = predictions
    return result


def _choice_pattern(choice: str) -> re.Pattern:
    words = [re.escape(w) for w in re.split(r"[\s_]+", choice.strip()) if w]
    body = r"[\s_]+".join(words)
    return re.compile(rf"(?<![\w]){body}(?![\w])", re.IGNORECASE)


def extract_choice(text: str, choices: Sequence[str], letters: bool = False) -> int | None:
    """Index of the option the generated ``text`` answers, or ``None`` if none is found.

    The earliest match in ``text`` wins: an option name (case-insensitive, whole words, ``_`` and
    whitespace interchangeable; the longest option on ties), or with ``letters`` an option letter:
    a standalone capital (``"B"``, ``"The answer is B."``) or a lower-case letter in an explicit
    form (``"(b)"``, ``"b)"``, ``"b."`` at the start, ``"answer: b"``).
    """
    best: tuple[int, int, int] | None = None  # (position, -length, index)
    for j, choice in enumerate(choices):
        m = _choice_pattern(choice).search(text)
        if m:
            cand = (m.start(), -(m.end() - m.start()), j)
            best = cand if best is None or cand < best else best
    if letters and len(choices) <= len(OPTION_LETTERS):
        valid = OPTION_LETTERS[: len(choices)]
        patterns = [
            re.compile(rf"(?<![A-Za-z0-9])([{valid}])(?![A-Za-z0-9])"),
            re.compile(rf"\(([{valid.lower()}])\)"),
            re.compile(rf"^\s*([{valid.lower()}])[\.\):](?!\w)"),
            re.compile(rf"answer(?: is)?\s*:?\s*([{valid.lower()}])(?![A-Za-z0-9])", re.IGNORECASE),
        ]
        for pat in patterns:
            for m in pat.finditer(text):
                j = valid.index(m.group(1).upper())
                cand = (m.start(1), 0, j)  # option names beat letters at the same position
                best = cand if best is None or cand < best else best
                break
    return None if best is None else best[2]


def evaluate_generation(
    model: torch.nn.Module,
    tokenizer,
    rows: Sequence[Mapping[str, Any]],
    template: PromptTemplate | str | None = None,
    max_new_tokens: int = 8,
    batch_size: int = 8,
    max_examples: int | None = None,
    cutoff_len: int | None = DEFAULT_CUTOFF_LEN,
    letters: bool | None = None,
    return_predictions: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Multiple-choice accuracy by greedy generation and answer extraction.

    Prompts are left-padded (truncated from the left to ``cutoff_len - max_new_tokens`` tokens),
    ``max_new_tokens`` tokens are generated greedily, and :func:`extract_choice` finds the answer
    in the decoded continuation. Unparseable answers count as wrong.

    Args:
        letters: accept option letters; default: only if the template shows the lettered options
            (``{choices}``).
        return_predictions: add ``"predictions"``: per row ``{"id", "label", "pred", "text"}``
            (``pred`` is ``None`` when unparsed).

    Returns:
        ``{"accuracy": float, "n": int, "unparsed": int}`` (+ ``"predictions"``).
    """
    rows = _prepare_rows(rows, max_examples)
    template = template if isinstance(template, PromptTemplate) else PromptTemplate(template)
    letters = template.uses_choices if letters is None else letters
    device = _device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    budget = None if cutoff_len is None else max(1, cutoff_len - max_new_tokens)
    n_front = len(_special_prefix(tokenizer))
    prompts = []
    for r in rows:
        p_ids, _ = encode_prompt_target(tokenizer, template.prompt(r), "", None, add_eos=False)
        if budget is not None:
            p_ids, _ = _truncate(p_ids, [], budget, n_front, "left")
        prompts.append(p_ids)

    correct = unparsed = 0
    predictions = []
    with _eval_mode(model):
        for start in tqdm(range(0, len(rows), batch_size), desc="generation eval", unit="batch",
                          disable=not progress, leave=False):
            release_free_memory()
            chunk = prompts[start : start + batch_size]
            length = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), length), dtype=torch.long)
            for i, p in enumerate(chunk):  # left padding
                ids[i, length - len(p) :] = torch.tensor(p, dtype=torch.long)
                mask[i, length - len(p) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
            _refuse_nonfinite_generation(model, out.logits, ids, mask, rows, start, device)
            new_tokens = out.sequences[:, length:]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for k, text in enumerate(texts):
                row = rows[start + k]
                pred = extract_choice(text, row["choices"], letters=letters)
                unparsed += pred is None
                correct += pred == row["label"]
                if return_predictions:
                    predictions.append({"id": row.get("id", start + k), "label": row["label"], "pred": pred, "text": text})
    n = len(rows)
    result: dict[str, Any] = {"accuracy": correct / n, "n": n, "unparsed": unparsed}
    if return_predictions:
        result["predictions"] = predictions
    return result
