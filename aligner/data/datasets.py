"""Rows -> tokenised training samples: validation, templates, the over-length policy.

A source (:mod:`aligner.data.readers`: jsonl, jsonl.gz, parquet, Arrow folders) is read by
:func:`read_rows` (format detected per source from its first row, or given; every row
checked) and each row becomes a sample of a *kind* by :func:`render_sample`, the one
rendering that both :func:`read_samples` (into memory) and prepared datasets
(aligner.data.prepare, what training reads: aligner.data.loading.load_dataset) use.
Samples are dicts of 1-D tensors, the trainers' contract:

- ``sft``: ``{"tokens", "loss_mask"}`` (loss on assistant-turn tokens and the turn end).
- ``regression``: ``{"tokens", "labels" [N], "label_mask" [N]}`` for attribute names N.
- ``pairs``: ``{"chosen", "chosen_loss_mask", "rejected", "rejected_loss_mask", "strength",
  "margin", "reward_gap", "subset", "line"}`` (``margin``: the row's margin or None;
  ``reward_gap``: ``chosen_reward − rejected_reward`` or None); HelpSteer2-Preference ties
  (strength 0) are dropped and counted. With ``packing`` a pair must fit one bin of
  ``max_length`` tokens, so the over-length policy applies to chosen + rejected together.
- ``unpaired`` (KTO): ``{"responses": [(tokens, loss_mask)], "labels" [n] bool, "line"}``: one
  labelled response per ``unpaired`` row, or a pair's two (chosen: True, rejected: False);
  the loss mask covers the last assistant turn only (what comes before it is the prompt).
- ``prompts``: ``{"prompt_tokens", "prompt", "meta", "conversation", "label"}`` (``meta``: the
  row's extra fields; ``conversation``: the prompt as a :class:`Conversation`, to render
  again, whole: ``prompt_tokens`` alone is fitted to ``max_length``; ``label``: SteerLM
  attributes or None).
- ``any_scored``: rows with a response to score: regression rows give ``tokens`` (and
  ``line``), pairs give ``chosen`` / ``rejected`` (``subset`` kept).
- ``steerlm2``: pre-scored SteerLM 2.0 groups: ``{"responses": [(tokens, loss_mask)],
  "log_p_attr", "log_p_sft", "log_q_prime": [n] float64, "line"}`` (extra_id template, the
  attribute string after the assistant header); a response that does not fit drops its
  whole group.

Templates: ``extra_id`` (``<extra_id_0>System\\n{system}\\n<extra_id_1>User\\n
{prompt}\\n<extra_id_1>Assistant\\n{response}\\n<extra_id_2>`` for reward models, which read the
reward at the final ``<extra_id_2>``; for generation models a response's target tokens end
with the end-of-sequence token instead), ``chat`` (the tokenizer's own chat template),
``raw`` (prompt tokens + response tokens + EOS, no wrapping: plain prompt/completion data,
:func:`render_raw`) and ``auto`` (:func:`resolve_template`: ``extra_id`` for reward rows,
otherwise the chat template when the tokenizer has one, else ``extra_id``). Reward rows
(regression, pairs for a reward model, anything scored) go through :func:`render_reward`,
the rendering training, validation and the scoring commands share (docs/data_formats.md).
Errors name ``file:line``, the field and what was expected; with ``skip_invalid`` bad rows
are skipped and counted by reason (printed, and kept in the returned samples' ``report``).
Over-length samples (more than ``max_length`` tokens): ``truncate_left`` drops prompt tokens
from the left, ``drop`` drops the sample, both counted; ``error`` refuses the row (one line
naming ``file:line`` and the lengths). A ``prompts`` sample is its rendered prompt, fitted
by the same policy (:func:`fit_prompt`: truncation keeps the prompt's end).
"""
from __future__ import annotations

import math
import sys
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from aligner.data.formats import (
    ASSISTANT,
    USER,
    HELPSTEER2_ATTRIBUTES,
    NINE_ATTRIBUTES,
    SHAREGPT_ROLES,
    Conversation,
    STEERLM2_LOG_FIELDS,
    PairRecord,
    detect_format,
    parse_row,
    prompt_of,
)
from aligner.data.readers import (  # noqa: F401  DataFormatError and the jsonl readers: imported from here too
    DataFormatError,
    iter_json_objects,
    iter_rows,
    parse_json_line,
    row_of,
)

DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)

KIND_FORMATS = {
    "sft": ("sft", "openai", "sharegpt", "steerlm", "prompt_completion"),
    "regression": ("helpsteer2",),
    "pairs": ("helpsteer2_preference", "pairwise", "rewardbench"),
    "unpaired": ("unpaired", "helpsteer2_preference", "pairwise", "rewardbench"),
    "prompts": ("prompt", "sft", "openai", "sharegpt", "steerlm", "prompt_completion", "helpsteer2",
                "helpsteer2_preference", "pairwise", "rewardbench", "unpaired"),
    "any_scored": ("helpsteer2", "helpsteer2_preference", "pairwise", "rewardbench"),
    "steerlm2": ("steerlm2",),
}
KIND_ALIASES = {"prompt": "prompts", "pair": "pairs", "sft_conversations": "sft"}


# ------------------------------------------------------------------------------ validation
def _text(row, field, where, allow_empty=False):
    if field not in row:
        raise DataFormatError(f"{where}: missing field {field!r}")
    v = row[field]
    if not isinstance(v, str):
        raise DataFormatError(f"{where}: field {field!r} must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise DataFormatError(f"{where}: field {field!r} is empty")
    return v


def _int_range(row, field, lo, hi, where, required=True):
    if field not in row or row[field] is None:
        if required:
            raise DataFormatError(f"{where}: missing field {field!r}")
        return None
    v = row[field]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise DataFormatError(f"{where}: field {field!r} must be an integer {lo}..{hi}, got {v!r}")
    if not lo <= v <= hi:
        raise DataFormatError(f"{where}: field {field!r} = {v} is outside {lo}..{hi}")
    return int(v)


# optional numeric fields of plain pairs (formats.py says which loss uses which)
PAIR_NUMBERS = ("margin", "strength", "chosen_reward", "rejected_reward")


def _optional_number(row, field, where):
    v = row.get(field)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
        raise DataFormatError(f"{where}: field {field!r} must be a finite number, got {v!r}")
    return float(v)


def validate_row(row, fmt: str, where: str) -> None:
    if not isinstance(row, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if fmt in ("sft", "steerlm"):
        _conversations(row, where, lambda speaker, i: speaker if speaker in (USER, ASSISTANT) else None,
                       "'User' or 'Assistant'", "Assistant")
    elif fmt == "openai":
        msgs = _messages(row, "messages", where)
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataFormatError(f"{where}: field 'messages' has no assistant message")
    elif fmt == "sharegpt":
        _conversations(row, where, _sharegpt_role, "'human' or 'gpt' ('system' first only)", "'gpt'")
    elif fmt == "prompt_completion":
        _prompt(row, where)
        _text_or_messages(row, "completion", where, last="assistant")
    elif fmt == "helpsteer2":
        _text(row, "prompt", where)
        _text(row, "response", where)
        for a in HELPSTEER2_ATTRIBUTES:
            _int_range(row, a, 0, 4, where, required=False)
        if all(row.get(a) is None for a in NINE_ATTRIBUTES):
            raise DataFormatError(f"{where}: no attribute rating (expected {', '.join(HELPSTEER2_ATTRIBUTES)})")
    elif fmt == "helpsteer2_preference":
        for f in ("prompt", "response_1", "response_2"):
            _text(row, f, where)
        _int_range(row, "preference_strength", -3, 3, where)
    elif fmt in ("pairwise", "rewardbench"):
        _prompt(row, where)
        for f in ("chosen", "rejected"):
            _response(row, f, where)
        if fmt == "rewardbench":
            _text(row, "subset", where)
        for f in PAIR_NUMBERS:
            _optional_number(row, f, where)
        given = [f for f in ("chosen_reward", "rejected_reward") if row.get(f) is not None]
        if len(given) == 1:
            other = "rejected_reward" if given[0] == "chosen_reward" else "chosen_reward"
            raise DataFormatError(f"{where}: field {given[0]!r} is given without {other!r}; the RPO losses use both")
    elif fmt == "unpaired":
        _validate_unpaired(row, where)
    elif fmt == "prompt":
        _prompt(row, where)
    elif fmt == "steerlm2":
        _validate_steerlm2(row, where)
    else:
        raise DataFormatError(f"{where}: format {fmt!r} is not readable here")


def _validate_unpaired(row, where: str) -> None:
    """A labelled response (KTO): ``label`` true or false, and a prompt with a response."""
    if "label" not in row:
        raise DataFormatError(f"{where}: missing field 'label' (true: a desirable response, false: an undesirable one)")
    label = row["label"]
    if not isinstance(label, bool):
        raise DataFormatError(f"{where}: field 'label' must be true (desirable) or false (undesirable), got {label!r}")
    if "conversations" in row:
        _conversations(row, where, lambda speaker, i: speaker if speaker in (USER, ASSISTANT) else None,
                       "'User' or 'Assistant'", "Assistant")
        if str(row["conversations"][-1].get("from")).strip().lower() != ASSISTANT:
            raise DataFormatError(f"{where}: the last of 'conversations' must be the Assistant turn the label rates")
    elif "messages" in row:
        if _messages(row, "messages", where)[-1]["role"] != "assistant":
            raise DataFormatError(f"{where}: the last of 'messages' must be the assistant message the label rates")
    else:
        _prompt(row, where)
        _response(row, "completion" if "completion" in row else "response", where)


def _messages(row, field, where) -> list:
    """A non-empty list of ``{"role": system|user|assistant, "content": str}`` messages."""
    msgs = row.get(field)
    if not isinstance(msgs, list) or not msgs:
        raise DataFormatError(f"{where}: field {field!r} must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise DataFormatError(f"{where}: {field}[{i}].role must be system, user or assistant")
        _text(m, "content", f"{where}: {field}[{i}]")
    return msgs


def _text_or_messages(row, field, where, last: str) -> None:
    """A string, or (TRL's conversational rows) messages ending with a ``last`` message."""
    if isinstance(row.get(field), list):
        if _messages(row, field, where)[-1]["role"] != last:
            raise DataFormatError(f"{where}: the last of {field!r} must be a{'n' if last[0] in 'aeiou' else ''}"
                                  f" {last} message")
    else:
        _text(row, field, where)


def _prompt(row, where) -> None:
    """``prompt``: a string, or messages ending with a user message."""
    _text_or_messages(row, "prompt", where, last="user")


def _response(row, field, where) -> None:
    """A response: a string, or (TRL's conversational rows) a list of one assistant message."""
    value = row.get(field)
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise DataFormatError(f"{where}: field {field!r} must be a string or a list of one assistant message")
        _text(value[0], "content", f"{where}: {field}[0]")
    else:
        _text(row, field, where)


def _conversations(row, where: str, role_of, expected: str, target: str) -> None:
    """A non-empty ``conversations`` list of ``{"from", "value"}`` turns whose speakers (lower
    case) ``role_of(speaker, position)`` maps to roles (None: refused, the error says
    ``expected``), with an assistant turn (called ``target`` in the error) to learn from."""
    convs = row.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise DataFormatError(f"{where}: field 'conversations' must be a non-empty list")
    if "system" in row and not isinstance(row["system"], str):
        raise DataFormatError(f"{where}: field 'system' must be a string")
    roles = []
    for i, t in enumerate(convs):
        if not isinstance(t, dict):
            raise DataFormatError(f"{where}: conversations[{i}] must be an object")
        speaker = t.get("from")
        role = role_of(speaker.strip().lower(), i) if isinstance(speaker, str) else None
        if role is None:
            raise DataFormatError(f"{where}: conversations[{i}].from must be {expected}, got {speaker!r}")
        _text(t, "value", f"{where}: conversations[{i}]")
        roles.append(role)
    if ASSISTANT not in roles:
        raise DataFormatError(f"{where}: field 'conversations' has no {target} turn to learn from")


def _sharegpt_role(speaker: str, position: int):
    role = SHAREGPT_ROLES.get(speaker)
    return None if role == "system" and position > 0 else role


def _validate_steerlm2(row, where: str) -> None:
    turns = row.get("prompt_turns")
    if not isinstance(turns, list) or not turns:
        raise DataFormatError(f"{where}: field 'prompt_turns' must be a non-empty list")
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise DataFormatError(f"{where}: prompt_turns[{i}] must be an object")
        role = t.get("from")
        if not isinstance(role, str) or role.strip().lower() not in ("user", "assistant"):
            raise DataFormatError(f"{where}: prompt_turns[{i}].from must be 'User' or 'Assistant', got {role!r}")
        _text(t, "value", f"{where}: prompt_turns[{i}]")
    if str(turns[-1]["from"]).strip().lower() != "user":
        raise DataFormatError(f"{where}: the last of 'prompt_turns' must be a User turn")
    if "system" in row and not isinstance(row["system"], str):
        raise DataFormatError(f"{where}: field 'system' must be a string")
    _text(row, "label", where)
    responses = row.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataFormatError(f"{where}: field 'responses' must be a list of at least 2 scored responses")
    for i, r in enumerate(responses):
        if not isinstance(r, dict):
            raise DataFormatError(f"{where}: responses[{i}] must be an object")
        # an empty response (the model stopped at once) is a sample like any other
        _text(r, "value", f"{where}: responses[{i}]", allow_empty=True)
        for key in STEERLM2_LOG_FIELDS:
            v = r.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise DataFormatError(f"{where}: responses[{i}] field {key!r} must be a finite number, got {v!r}")


# ------------------------------------------------------------------------------ rendering
def _enc(tok, text: str) -> List[int]:
    return tok.encode(text)


def render_extra_id(tok, conv: Conversation, response: Optional[str] = None, *, end: str = "eos",
                    label: Optional[str] = None) -> Tuple[List[int], List[float]]:
    """Tokens and target mask of a conversation (plus ``response`` as a final assistant turn).

    Assistant turns are targets: their text, ``\\n`` and the turn end (the next header, or
    for the last turn ``<extra_id_2>`` when ``end='extra_id'`` (reward models) or the EOS
    token when ``end='eos'`` (generation)). A conversation ending with a user turn ends
    with the assistant header (a generation prompt); ``label`` (a SteerLM attribute
    string) goes after that header, as in training (``<extra_id_2>{label}\\n``), so the
    generation prompt is exactly the prompt part of a labelled training row.
    """
    turns = list(conv.turns) + ([] if response is None else [type(conv.turns[0])(ASSISTANT, response, label)])
    tokens: List[int] = []
    mask: List[float] = []

    def add(text, target):
        ids = _enc(tok, text)
        tokens.extend(ids)
        mask.extend([1.0 if target else 0.0] * len(ids))

    add(f"<extra_id_0>System\n{conv.system if conv.system is not None else DEFAULT_SYSTEM}\n", False)
    for i, t in enumerate(turns):
        if t.role == ASSISTANT:
            header = "<extra_id_1>Assistant\n" + (f"<extra_id_2>{t.label}\n" if t.label else "")
            add(header, False)
            add(t.content, True)
            last = i == len(turns) - 1
            if last and end == "eos":
                tokens.append(tok.eos_id)
                mask.append(1.0)
            elif last:
                add("\n<extra_id_2>", True)
            else:
                add("\n", True)
        else:
            add(f"<extra_id_1>User\n{t.content}\n", False)
    if turns[-1].role != ASSISTANT:
        add("<extra_id_1>Assistant\n" + (f"<extra_id_2>{label}\n" if label else ""), False)
    return tokens, mask


def render_chat(tok, conv: Conversation, response: Optional[str] = None) -> Tuple[List[int], List[float]]:
    """The tokenizer's chat template; targets are the tokens each assistant turn adds."""
    if not getattr(tok, "chat_template", None):
        raise DataFormatError("data.template = chat, but the tokenizer has no chat_template")
    messages = ([{"role": "system", "content": conv.system}] if conv.system else []) + [
        {"role": t.role, "content": t.content} for t in conv.turns
    ]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    tokens: List[int] = []
    mask: List[float] = []

    def apply(msgs, gen):
        out = tok.tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        if hasattr(out, "keys"):  # transformers >= 5 returns a BatchEncoding
            out = out["input_ids"]
        return list(out)

    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            # the header comes with the generation prompt (no loss); what the turn adds is the target
            prefix = apply(messages[:i], True)
            full = apply(messages[: i + 1], False)
            if full[: len(prefix)] != prefix or prefix[: len(tokens)] != tokens:
                raise DataFormatError("the tokenizer's chat template does not render turn by turn as a prefix")
            mask.extend([0.0] * (len(prefix) - len(tokens)) + [1.0] * (len(full) - len(prefix)))
            tokens = full
        else:
            gen = i == len(messages) - 1
            ids = apply(messages[: i + 1], gen)
            if ids[: len(tokens)] != tokens:
                raise DataFormatError("the tokenizer's chat template does not render turn by turn as a prefix")
            mask.extend([0.0] * (len(ids) - len(tokens)))
            tokens = ids
    return tokens, mask


def render_raw(tok, conv: Conversation, response: Optional[str] = None) -> Tuple[List[int], List[float]]:
    """``data.template = raw``: prompt tokens + response tokens + EOS, no wrapping.

    The plain prompt/completion rendering (TRL's "standard" format): the prompt text
    (turns joined the HelpSteer2 way when a row has several, see
    :meth:`Conversation.to_prompt_string`) and the response text are encoded separately
    (no BOS, no template markers) and concatenated; the targets are the response's tokens
    and the EOS token. The response is ``response``, else the conversation's last turn
    when it is an assistant turn; without one the tokens are the prompt's alone (a
    generation prompt). Rows with a system prompt or SteerLM labels are refused by
    :func:`check_raw` (raw has no place for them).
    """
    turns = list(conv.turns)
    if response is None and turns and turns[-1].role == ASSISTANT:
        response = turns.pop().content
    prompt = _enc(tok, Conversation(turns).to_prompt_string()) if turns else []
    if response is None:
        return prompt, [0.0] * len(prompt)
    target = _enc(tok, response) + [tok.eos_id]
    return prompt + target, [0.0] * len(prompt) + [1.0] * len(target)


def check_raw(record, where: str) -> None:
    """Refuse what ``data.template = raw`` cannot render (a system prompt, SteerLM labels)."""
    conv = record if isinstance(record, Conversation) else getattr(record, "prompt", None)
    if isinstance(conv, Conversation):
        if conv.system is not None:
            raise DataFormatError(f"{where}: field 'system' is set, but data.template = raw renders no system"
                                  " prompt (use extra_id or chat)")
        if any(t.label for t in conv.turns) or getattr(record, "label", None):
            raise DataFormatError(f"{where}: the row has a SteerLM 'label', but data.template = raw renders no"
                                  " labels (use extra_id)")


def _check_labels_render(tok, template: str, where: str) -> None:
    """SteerLM labels render only with the extra_id template: refuse the others, naming the row."""
    resolved = resolve_template(tok, template)
    if resolved != "extra_id":
        raise DataFormatError(f"{where}: the row has a SteerLM 'label', but data.template = {template} ({resolved})"
                              " renders no labels (use extra_id)")


def resolve_template(tok, template: str, reward_model: bool = False) -> str:
    """The template that ``template`` stands for with this tokenizer: ``auto`` is
    ``extra_id`` for reward models (the HelpSteer2 reward models' format, read at the final
    ``<extra_id_2>``), else the tokenizer's chat template if it has one, else ``extra_id``;
    any other name stands for itself. Training records the resolved name in its HF export
    so that scoring renders rows as training did (docs/reward_models.md)."""
    if template != "auto":
        return template
    if not reward_model and getattr(tok, "chat_template", None):
        return "chat"
    return "extra_id"


def render_reward(tok, template: str, conv: Conversation, response: str) -> Tuple[List[int], List[float]]:
    """A (prompt, response) as a reward model reads it: the one rendering of reward rows
    shared by training, validation, ``aligner rm score`` and ``aligner eval rewardbench``
    (the extra_id template ends with ``\n<extra_id_2>``, where the reward is read)."""
    return _render(tok, template, conv, response, end="extra_id")


def _render(tok, template, conv, response=None, end="eos"):
    if template == "raw":
        return render_raw(tok, conv, response)
    if template == "chat" or (template == "auto" and getattr(tok, "chat_template", None) and end == "eos"):
        return render_chat(tok, conv, response)
    return render_extra_id(tok, conv, response, end=end)


def _fit_pair(chosen, rejected, max_length, overlong, counts, where):
    """Packing: the over-length policy on a pair as a whole (chosen + rejected share one bin).

    ``truncate_left`` drops prompt tokens from the left of both responses' sequences
    (half the excess from each, more from one when the other's prompt is too short);
    ``drop`` (or a pair whose prompts cannot give enough) drops the pair; both counted
    (``truncated_left_pair`` / ``dropped_overlong_pair``); ``error`` refuses the row
    (``where``: its ``file:line``). None when dropped.
    """
    (ct, cm), (rt, rm) = chosen, rejected
    excess = len(ct) + len(rt) - max_length
    if excess <= 0:
        return chosen, rejected
    if overlong == "error":
        raise overlong_error(where, f"pair (chosen + rejected, one packing bin) has {len(ct) + len(rt)} tokens",
                             max_length)
    room_c = next((i for i, m in enumerate(cm) if m > 0), len(cm))
    room_r = next((i for i, m in enumerate(rm) if m > 0), len(rm))
    if overlong == "truncate_left" and room_c + room_r >= excess:
        cut_c = min(room_c, (excess + 1) // 2)
        cut_r = excess - cut_c
        if cut_r > room_r:
            cut_r, cut_c = room_r, excess - room_r
        counts["truncated_left_pair"] += 1
        return (ct[cut_c:], cm[cut_c:]), (rt[cut_r:], rm[cut_r:])
    counts["dropped_overlong_pair"] += 1
    return None


def last_turn_target(tokens, mask):
    """``(tokens, mask)`` with the targets of the last assistant turn only (the last run of
    target tokens): a multi-turn conversation's earlier answers are part of the prompt."""
    start = len(mask)
    while start > 0 and not mask[start - 1] > 0:
        start -= 1
    while start > 0 and mask[start - 1] > 0:
        start -= 1
    return tokens, [0.0] * start + list(mask[start:])


OVERLONG = ("truncate_left", "drop", "error")  # the over-length policies (data.overlong)
NO_BOUND = 2**62  # a max_length no sample reaches: prompts rendered whole, to be fitted by their user


def overlong_error(where: str, what: str, max_length: int, names=("max_length", "overlong")) -> DataFormatError:
    """The one-line refusal of an over-length row under ``overlong = error``; ``names``: what
    the length bound and the policy are called where they were set."""
    return DataFormatError(f"{where}: the {what}, more than {names[0]} = {max_length} ({names[1]} = error;"
                           " truncate_left or drop would fit the row)")


def fit_to_length(tokens, mask, max_length, overlong, counts, where: str):
    """Apply the over-length policy ``overlong`` to a rendered sample of ``tokens`` and
    ``mask``: ``truncate_left`` drops prompt tokens from the left, never a target token
    (a sample whose targets alone are too long is dropped), ``drop`` drops the sample,
    ``error`` refuses it (a DataFormatError naming ``where``, the row's ``file:line``).
    Counts what it did in ``counts``. None when dropped."""
    if len(tokens) <= max_length:
        return tokens, mask
    if overlong == "error":
        raise overlong_error(where, f"sample has {len(tokens)} tokens", max_length)
    first_target = next((i for i, m in enumerate(mask) if m > 0), len(mask))
    cut = len(tokens) - max_length
    if overlong == "truncate_left" and cut <= first_target:
        counts["truncated_left"] += 1
        return tokens[cut:], mask[cut:]
    counts["dropped_overlong"] += 1
    return None


def fit_prompt(tokens, max_length, overlong, counts, where: str, names=("max_length", "overlong")):
    """The over-length policy on a generation prompt (every token is prompt, none a
    target): ``truncate_left`` keeps its last ``max_length`` tokens (the end, next to the
    response), ``drop`` drops it, ``error`` refuses it (naming ``where``, ``file:line``,
    and the options by ``names``); counted as for samples (``truncated_left``,
    ``dropped_overlong``). None when dropped."""
    if len(tokens) <= max_length:
        return tokens
    if overlong == "error":
        raise overlong_error(where, f"prompt has {len(tokens)} tokens", max_length, names)
    if overlong == "truncate_left":
        counts["truncated_left"] += 1
        return tokens[len(tokens) - max_length:]
    counts["dropped_overlong"] += 1
    return None


# ------------------------------------------------------------------------------ rows
def _refuse_format(row: dict, fmt: str, allowed: Sequence[str], where: str) -> None:
    """The error for a row of format ``fmt`` read where only ``allowed`` may be: precise where
    the row is a labelled response's near miss, or a labelled response where none is read."""
    if "unpaired" in allowed and fmt in ("prompt_completion", "prompt", "sft", "openai", "steerlm"):
        if "label" not in row:
            raise DataFormatError(f"{where}: missing field 'label' (true: a desirable response, false: an"
                                  " undesirable one), or give pairs (prompt, chosen, rejected)")
        _validate_unpaired(row, where)  # a label of another type than boolean: names the field
    if fmt == "unpaired":
        others = [f for f in ("prompt_completion", "sft", "openai") if f in allowed]
        fix = f" to read the row as {others[0]!r}" if others else ""
        raise DataFormatError(f"{where}: field 'label' = {row['label']!r} marks the row as format 'unpaired' (a"
                              f" response labelled desirable or undesirable, KTO's), which cannot be used here"
                              f" (expected one of {list(allowed)}); remove the field{fix}, or train KTO on the file")
    raise DataFormatError(f"{where}: format {fmt!r} cannot be used here; expected one of {list(allowed)}")


def read_rows(path, fmt: str = "auto", allowed: Sequence[str] = (), skip_invalid: bool = False,
              counts: Optional[Counter] = None):
    """(number, row, format) for every valid row of a source (:mod:`aligner.data.readers`:
    jsonl, jsonl.gz, parquet, an Arrow folder). The format is ``fmt``, or detected from the
    first row; a row of another format, or of a format not in ``allowed``, is an error.
    With ``skip_invalid`` bad rows are counted by reason in ``counts`` instead."""
    counts = Counter() if counts is None else counts
    file_fmt = None if fmt == "auto" else fmt
    pending = None  # HelpSteer2: the prompt the next row must repeat
    for number, item in iter_rows(path):
        where = f"{path}:{number}"
        try:
            row = row_of(item)
            if row is None:
                continue
            detected = file_fmt is None
            if detected:
                file_fmt = detect_format(row)
                if file_fmt is None:
                    raise DataFormatError(f"{where}: cannot tell the format from fields {sorted(row)} (the formats"
                                          " and their fields: docs/data_formats.md; or name the format)")
            if allowed and file_fmt not in allowed:
                refused, file_fmt = file_fmt, (None if detected else file_fmt)  # a skipped row names no format
                _refuse_format(row, refused, allowed, where)
            validate_row(row, file_fmt, where)
            if file_fmt == "helpsteer2":
                # rows 2k and 2k+1 rate two responses to one prompt
                if pending is None:
                    pending = row["prompt"]
                else:
                    if row["prompt"] != pending:
                        pending = None
                        raise DataFormatError(
                            f"{where}: field 'prompt' differs from the previous row's; HelpSteer2 rows 2k and"
                            " 2k+1 must share their prompt")
                    pending = None
            yield number, row, file_fmt
        except DataFormatError as exc:
            if not skip_invalid or "cannot be used here" in str(exc):
                raise
            reason = str(exc).split(": ", 1)[1]
            counts[f"invalid: {reason.split(' (')[0]}"] += 1


# ------------------------------------------------------------------------------ samples
def render_sample(tokenizer, kind: str, row: dict, fmt: str, number: int, where: str, *, template: str = "auto",
                  max_length: int = 4096, overlong: str = "truncate_left",
                  attributes: Sequence[str] = HELPSTEER2_ATTRIBUTES, reward_model: bool = False,
                  packing: bool = False, counts: Counter) -> Optional[dict]:
    """The sample of one valid row (see the module docstring for each ``kind``), or None when
    the row gives none (a dropped tie, an over-length sample); what was dropped or cut is
    counted in ``counts``. ``number`` is the row's line (kept as ``line`` where the kind has
    one), ``where`` its ``file:line`` for errors. The one rendering of rows into samples:
    read into memory (:func:`read_samples`) and prepared (aligner.data.prepare) alike."""
    T = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    F = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    rec = parse_row(row, fmt)
    if template == "raw" and kind != "steerlm2":
        check_raw(rec, where)
    if kind == "sft":
        if any(t.label for t in rec.turns):
            _check_labels_render(tokenizer, template, where)
        fitted = fit_to_length(*_render(tokenizer, template, rec), max_length, overlong, counts, where)
        return {"tokens": T(fitted[0]), "loss_mask": F(fitted[1])} if fitted else None
    if kind == "regression" or (kind == "any_scored" and fmt == "helpsteer2"):
        fitted = fit_to_length(*render_reward(tokenizer, template, rec.prompt, rec.response), max_length, overlong,
                               counts, where)
        if not fitted:
            return None
        labels = [rec.attributes.get(a) for a in attributes]
        sample = {"tokens": T(fitted[0]),
                  "labels": F([0.0 if v is None else float(v) for v in labels]),
                  "label_mask": F([0.0 if v is None else 1.0 for v in labels])}
        if kind == "any_scored":
            sample["line"] = number
        return sample
    if kind in ("pairs", "any_scored"):
        assert isinstance(rec, PairRecord)
        if rec.is_tie and kind == "pairs":
            counts["dropped_tie"] += 1
            return None
        # a reward model reads a pair as it scores it; a policy (DPO) ends with EOS except
        # under an explicit extra_id template, which keeps the template's own end
        end = "extra_id" if (reward_model or kind == "any_scored" or template == "extra_id") else "eos"
        c = fit_to_length(*(_render(tokenizer, template, rec.prompt, rec.chosen, end=end)), max_length, overlong,
                          counts, where)
        r = fit_to_length(*(_render(tokenizer, template, rec.prompt, rec.rejected, end=end)), max_length, overlong,
                          counts, where)
        if not c or not r:
            return None
        if packing and kind == "pairs":  # a pair is packed into one bin of max_length tokens
            fitted = _fit_pair(c, r, max_length, overlong, counts, where)
            if not fitted:
                return None
            c, r = fitted
        return {"chosen": T(c[0]), "chosen_loss_mask": F(c[1]), "rejected": T(r[0]),
                "rejected_loss_mask": F(r[1]), "strength": float(rec.strength), "margin": rec.margin,
                "reward_gap": rec.reward_gap, "subset": rec.subset or "", "line": number}
    if kind == "unpaired":
        # a policy's responses end with EOS except under an explicit extra_id template (as pairs)
        end = "extra_id" if template == "extra_id" else "eos"
        if isinstance(rec, PairRecord):
            if rec.is_tie:
                counts["dropped_tie"] += 1
                return None
            rated = [(rec.prompt, rec.chosen, True), (rec.prompt, rec.rejected, False)]
        else:
            rated = [(rec.prompt, rec.response, bool(rec.desirable))]
        responses, labels = [], []
        for prompt, response, desirable in rated:
            fitted = fit_to_length(*last_turn_target(*_render(tokenizer, template, prompt, response, end=end)),
                                   max_length, overlong, counts, where)
            if fitted:
                responses.append((T(fitted[0]), F(fitted[1])))
                labels.append(desirable)
        if not responses:
            return None
        return {"responses": responses, "labels": torch.tensor(labels, dtype=torch.bool), "line": number}
    if kind == "prompts":
        p = prompt_of(rec)
        if p.label:  # SteerLM: the attribute turn after the assistant header, as in training
            _check_labels_render(tokenizer, template, where)
            tokens, _ = render_extra_id(tokenizer, p.prompt, label=p.label)
        else:
            tokens, _ = _render(tokenizer, template, p.prompt)
        tokens = fit_prompt(tokens, max_length, overlong, counts, where)
        if tokens is None:
            return None
        meta = {k: v for k, v in row.items() if k not in ("prompt",)}
        return {"prompt_tokens": T(tokens), "prompt": p.prompt.to_prompt_string(), "meta": meta,
                "conversation": p.prompt, "label": p.label}
    if kind == "steerlm2":
        # every response of the group, labelled as the SteerLM model saw it; one that does not
        # fit drops the whole group (the group's softmaxes need every member)
        items = []
        for resp in rec.responses:
            tokens, mask = render_extra_id(tokenizer, rec.prompt, resp.value, end="eos", label=rec.label)
            fitted = fit_to_length(tokens, mask, max_length, overlong, counts, where)
            if fitted is None:
                break
            items.append((T(fitted[0]), F(fitted[1])))
        if len(items) < len(rec.responses):
            counts["dropped_group_overlong"] += 1
            return None
        return {"responses": items,
                "log_p_attr": torch.tensor([r.log_p_attributes for r in rec.responses], dtype=torch.float64),
                "log_p_sft": torch.tensor([r.log_p_sft for r in rec.responses], dtype=torch.float64),
                "log_q_prime": torch.tensor([r.log_q for r in rec.responses], dtype=torch.float64),
                "line": number}
    raise ValueError(f"unknown dataset kind {kind!r}; one of {sorted(KIND_FORMATS)}")


def dataset_kind(kind: str) -> str:
    """``kind`` by its canonical name (``prompt`` -> ``prompts``, ...); a ValueError names the kinds."""
    kind = KIND_ALIASES.get(kind, kind)
    if kind not in KIND_FORMATS:
        raise ValueError(f"unknown dataset kind {kind!r}; one of {sorted(KIND_FORMATS)}")
    return kind


UNITS = {"steerlm2": "SteerLM 2.0 groups"}  # what a kind's samples are called in reports


def read_samples(path, kind: str, tokenizer, fmt: str = "auto", template: str = "auto", max_length: int = 4096,
                 overlong: str = "truncate_left", skip_invalid: bool = False,
                 attributes: Sequence[str] = HELPSTEER2_ATTRIBUTES, reward_model: bool = False,
                 packing: bool = False) -> "SampleList":
    """Samples of ``kind`` from the source ``path``, read and tokenised into memory (see the
    module docstring). The reference for prepared datasets (aligner.data.prepared), which
    give the same samples token for token without holding them; training reads those.

    ``reward_model``: pairs are rendered for a reward model (:func:`render_reward`) rather
    than for a policy; ``regression`` and ``any_scored`` rows always are.
    """
    kind = dataset_kind(kind)
    counts: Counter = Counter()
    out: List[dict] = []
    for number, row, rfmt in read_rows(path, fmt, KIND_FORMATS[kind], skip_invalid, counts):
        sample = render_sample(tokenizer, kind, row, rfmt, number, f"{path}:{number}", template=template,
                               max_length=max_length, overlong=overlong, attributes=attributes,
                               reward_model=reward_model, packing=packing, counts=counts)
        if sample is not None:
            out.append(sample)
    return finish_loading(path, kind, out, counts, unit=UNITS.get(kind, "samples"))


class SampleList(list):
    """Samples held in memory, with ``report``: what loading them counted (``file``, ``kind``,
    ``samples`` and a count per reason a row was skipped, dropped or cut)."""

    report: Dict[str, object]


def load_report(path, kind: str, samples: int, counts: Counter) -> Dict[str, object]:
    """The report of loading ``path``: ``{"file", "kind", "samples", <reason>: count, ...}``."""
    return {"file": str(path), "kind": kind, "samples": samples, **dict(counts)}


def print_report(path, samples: int, counts, unit: str = "samples") -> None:
    """One line on stderr with what loading ``path`` skipped, dropped or cut (nothing when nothing was)."""
    if counts:
        print(f"aligner data: {path}: {samples} {unit}; " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())),
              file=sys.stderr)


def finish_loading(path, kind: str, samples: list, counts: Counter, unit: str = "samples") -> SampleList:
    """``samples`` with their report (:class:`SampleList`), printed when something was skipped,
    dropped or cut; refuse a source that gave no ``samples``."""
    print_report(path, len(samples), counts, unit)
    if not samples:
        raise DataFormatError(f"{path}: no usable {unit} ({dict(counts) or 'empty file'})")
    out = SampleList(samples)
    out.report = load_report(path, kind, len(samples), counts)
    return out


# ------------------------------------------------------------------------------ lengths
def _sequences(sample: dict) -> List[torch.Tensor]:
    """The token sequences of a sample of any kind."""
    found = [sample[k] for k in ("tokens", "chosen", "rejected", "prompt_tokens") if k in sample]
    return found + [tokens for tokens, _ in sample.get("responses", ())]


def token_counts(samples) -> np.ndarray:
    """[n] tokens each sample puts through the model (every sequence counted): from the mapped
    index files for prepared data and blends, from the tensors for samples in memory."""
    if hasattr(samples, "sample_tokens"):
        return samples.sample_tokens()
    return np.array([sum(int(t.numel()) for t in _sequences(s)) for s in samples], dtype=np.int64)


def longest_sequences(samples) -> np.ndarray:
    """[n] each sample's longest sequence (what a padded row must hold), as :func:`token_counts`."""
    if hasattr(samples, "longest_sequences"):
        return samples.longest_sequences()
    return np.array([max(int(t.numel()) for t in _sequences(s)) for s in samples], dtype=np.int64)
