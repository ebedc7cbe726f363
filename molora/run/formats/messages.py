"""The ``messages`` row format: OpenAI-style conversations, rendered with the tokenizer's chat template and trained
on the assistant turns only.

A row::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...], ...any other fields}

Roles: ``system``, ``user``, ``assistant`` (``tool`` is accepted and treated like a user turn); at least one
assistant turn. ShareGPT-style turns (``{"from": "human"|"gpt"|"system", "value": ...}``) are converted.

Labels: the conversation is rendered once with ``tokenizer.apply_chat_template`` (text), tokenised with character
offsets, and a token is a label exactly when its characters lie inside an assistant turn's span. Assistant turn
``i`` spans from the end of ``render(messages[:i], add_generation_prompt=True)`` to the end of
``render(messages[:i + 1])``: its content plus the template's end-of-turn marker (e.g. ``<|im_end|>``), so the
model learns to stop. This needs a template whose render of a conversation's prefix is a prefix of the render of
the whole conversation (ChatML, Llama-3, Mistral, SmolLM2 ...); a template that rewrites earlier turns (e.g.
one that strips the reasoning of past assistant turns) is refused with the turn named. ``train_on_inputs`` labels
every token. Truncation to ``cutoff_len`` keeps the start of the conversation (system prompt, first turns).
"""
from __future__ import annotations

from typing import Any, Mapping

from ..data_errors import IGNORE_INDEX, DataError
from .base import RowFormat, register_format

ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}


def normalise_messages(messages: Any) -> Any:
    """ShareGPT turns (``from``/``value``) -> OpenAI turns (``role``/``content``); anything else unchanged."""
    if isinstance(messages, list) and messages and all(isinstance(m, Mapping) and "from" in m and "value" in m
                                                        for m in messages):
        return [{"role": _SHAREGPT_ROLES.get(str(m["from"]).lower(), m["from"]), "content": m["value"]}
                for m in messages]
    return messages


def check_messages(row: Mapping[str, Any]) -> str | None:
    """What is wrong with a messages row (None: valid)."""
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return f"field 'messages' must be a non-empty list of turns, got {type(msgs).__name__}"
    for i, m in enumerate(msgs):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            return f"messages[{i}] must be an object with 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"messages[{i}].role is {m['role']!r}; allowed: {', '.join(ROLES)}"
        if not isinstance(m["content"], str):
            return f"messages[{i}].content must be a string, got {type(m['content']).__name__}"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        return "no assistant turn with content (nothing to train on)"
    return None


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[Mapping[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans ``[start, end)`` of its assistant turns.

    Raises:
        DataError: the tokenizer has no chat template, or the template is not prefix-stable at a turn.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("messages rows need a tokenizer with a chat template (tokenizer.chat_template is empty); "
                        "use an instruct/chat model's tokenizer or set one")
    text = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else _render_empty_prefix(tokenizer, messages)
        upto = _render(tokenizer, messages[: i + 1], False)
        if not text.startswith(upto) or not upto.startswith(before):
            raise DataError(f"the chat template is not prefix-stable at assistant turn {i} (rendering the "
                            f"conversation up to it is not a prefix of the whole rendering), so the assistant tokens "
                            f"cannot be located; use a template without history rewriting or train_on_inputs: true")
        spans.append((len(before), len(upto)))
    return text, spans


def _render_empty_prefix(tokenizer, messages) -> str:
    """Text before a conversation's first turn when that turn is the assistant's (usually the BOS text or "")."""
    full = _render(tokenizer, messages[:1], False)
    content = messages[0]["content"]
    at = full.find(content) if content else -1
    if at < 0:
        return ""
    header = full[:at]
    # the assistant header (e.g. "<|im_start|>assistant\n") belongs to the prompt, not to the answer
    return header


def tokenize_messages(row: Mapping[str, Any], tokenizer, cutoff_len: int | None, train_on_inputs: bool = False,
                      lengths: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Training features of a messages row: ``{"input_ids", "attention_mask", "labels"}`` (lists of ints, length
    ``<= cutoff_len``), labels -100 outside assistant turns unless ``train_on_inputs``. ``lengths`` receives
    ``prompt`` (unlabelled tokens), ``target`` (labelled tokens) before truncation and ``target_kept`` after."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("messages rows need a fast tokenizer (character offsets locate the assistant turns); "
                        f"{type(tokenizer).__name__} is a slow one")
    messages = normalise_messages(row["messages"])
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    labels = []
    for tok, (s, e) in zip(ids, offsets):
        inside = train_on_inputs or any(a <= s and e <= b and e > s for a, b in spans)
        labels.append(tok if inside else IGNORE_INDEX)
    n_target = sum(1 for x in labels if x != IGNORE_INDEX)
    if cutoff_len is not None and len(ids) > cutoff_len:
        ids, labels = ids[:cutoff_len], labels[:cutoff_len]
    if lengths is not None:
        lengths.update(prompt=len(enc["input_ids"]) - n_target, target=n_target,
                       target_kept=sum(1 for x in labels if x != IGNORE_INDEX))
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


class MessagesFormat(RowFormat):
    """``{"messages": [{"role", "content"}, ...]}``: the tokenizer's chat template renders it; loss on the assistant
    turns (:func:`tokenize_messages`)."""

    name = "messages"
    uses_prompt_template = False

    def detect(self, row):
        return "messages" in row

    def normalise(self, row):
        return dict(row, messages=normalise_messages(row["messages"])) if "messages" in row else row

    def check(self, row):
        return check_messages(row)

    def tokenize(self, row, tokenizer, cutoff_len, train_on_inputs, lengths):
        return tokenize_messages(row, tokenizer, cutoff_len, train_on_inputs, lengths)

    def example(self):
        return {"messages": [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}]}


register_format(MessagesFormat())
