"""Public data formats (docs/data_formats.md, docs/steerlm.md), read natively as typed records.

Formats (the names used by ``--format`` and :func:`detect_format`):

=======================  ====================================================================
``sft``                  NeMo-style conversation: ``{"system", "conversations": [{"from": "User"|
                         "Assistant", "value"}]}``
``openai``               ``{"messages": [{"role": "system"|"user"|"assistant", "content"}]}``
``sharegpt``             ``{"conversations": [{"from": "system"|"human"|"gpt", "value"}]}``
``steerlm``              ``sft`` rows whose assistant turns carry an attribute ``label``
                         (``"helpfulness:4,correctness:4,..."``), or a top-level ``label``
``helpsteer2``           ``prompt``, ``response`` and the five attributes (integers 0..4);
                         rows 2k and 2k+1 share a prompt
``helpsteer2_preference`` ``split``, ``prompt``, ``response_1``, ``response_2``,
                         ``preference_strength`` (-3..3; < 0 means response_1 is better)
``pairwise``             ``prompt``, ``chosen``, ``rejected`` (+ optional numbers ``margin``,
                         ``strength``, ``chosen_reward``, ``rejected_reward``; the two
                         rewards come together). Where they are used: ``strength`` by
                         scaled BT / scaled DPO (and margin losses without a ``margin``),
                         ``margin`` by margin BT (``rm.bt_kind=margin``) and
                         ``dpo.loss_type=margin_dpo``, the reward difference by the RPO
                         losses (``dpo.loss_type=rpo_*``), see docs/data_formats.md.
                         TRL's conversational preference rows read as these too: ``prompt``
                         a list of messages, ``chosen`` / ``rejected`` one assistant message each
``rewardbench``          ``prompt``, ``chosen``, ``rejected``, ``subset``, ``id``
``prompt_completion``    TRL's prompt-completion rows: ``{"prompt", "completion"}``, each a string
                         or a list of messages (``{"role", "content"}``)
``unpaired``             one response labelled desirable or not (KTO): ``prompt`` and
                         ``completion`` (or ``response``) as in ``prompt_completion``, or a
                         ``conversations`` / ``messages`` conversation ending with the
                         assistant turn, and ``label``: ``true`` | ``false`` (a boolean: a
                         ``label`` of another type leaves the row in its other format)
``prompt``               ``{"prompt"}`` (any other row with a ``prompt`` also reads as one)
``steerlm2``             ``system``, ``prompt_turns``, ``label``, ``responses[]`` with ``value``,
                         ``log(P(a|x,y))``, ``log(P(y|x))``, ``log(Q(y|a,x))``
=======================  ====================================================================

Wherever a ``prompt`` is a string, a multi-turn prompt is one string with the turns joined
the HelpSteer2 way; wherever it is a list of messages (TRL's conversational formats), a
``system`` message becomes the system prompt and the rest are the turns.

This module is pure (no I/O): :func:`aligner.data.datasets.validate_row` checks rows, and
:func:`parse_row` turns a checked row into a record.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

HELPSTEER2_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
"""The five HelpSteer2 attributes, each an integer 0..4, in the dataset's column order."""

NINE_ATTRIBUTES = ("quality", "toxicity", "humor", "creativity") + HELPSTEER2_ATTRIBUTES
"""The 9-output head layout HelpSteer2 used; the first four are never labelled there."""

STEERLM_DEFAULT_LABEL = "helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:2"
"""The SteerLM inference default attributes (docs/data_formats.md)."""

FORMATS = (
    "sft",
    "openai",
    "sharegpt",
    "steerlm",
    "helpsteer2",
    "helpsteer2_preference",
    "pairwise",
    "rewardbench",
    "prompt_completion",
    "unpaired",
    "prompt",
    "steerlm2",
)

STEERLM2_LOG_FIELDS = ("log(P(a|x,y))", "log(P(y|x))", "log(Q(y|a,x))")

USER, ASSISTANT = "user", "assistant"

# ShareGPT's speaker names (case-insensitive) -> roles; a "system" turn may only come first
SHAREGPT_ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT, "system": "system"}

# HelpSteer2 joins the turns of a multi-turn prompt into one string with these separators.
HELPSTEER2_TURN_SEPARATOR = {USER: "\n<extra_id_1>User\n", ASSISTANT: "\n<extra_id_1>Assistant\n"}
_TURN_SPLIT = re.compile(r"\n<extra_id_1>(User|Assistant)\n")


@dataclass
class Turn:
    """One turn of a conversation. ``label`` is a SteerLM attribute string (assistant turns)."""

    role: str  # "user" | "assistant"
    content: str
    label: str | None = None


@dataclass
class Conversation:
    """A system prompt (None: the template's default) and alternating user/assistant turns."""

    turns: list[Turn]
    system: str | None = None

    @property
    def ends_with_assistant(self) -> bool:
        return bool(self.turns) and self.turns[-1].role == ASSISTANT

    def prompt(self) -> "Conversation":
        """The conversation up to and including its last user turn."""
        last_user = max(i for i, t in enumerate(self.turns) if t.role == USER)
        return Conversation(self.turns[: last_user + 1], self.system)

    def with_response(self, response: str, label: str | None = None) -> "Conversation":
        """This (prompt) conversation followed by one assistant turn."""
        return Conversation(self.turns + [Turn(ASSISTANT, response, label)], self.system)

    def to_prompt_string(self) -> str:
        """The turns joined the HelpSteer2 way (``{u1}\\n<extra_id_1>Assistant\\n{a1}\\n<extra_id_1>User\\n{u2}``)."""
        parts = [self.turns[0].content]
        for turn in self.turns[1:]:
            parts.append(HELPSTEER2_TURN_SEPARATOR[turn.role] + turn.content)
        return "".join(parts)


@dataclass
class RegressionRecord:
    """A HelpSteer2 row: prompt, one response and its attribute ratings (None = unlabelled)."""

    prompt: Conversation
    response: str
    attributes: dict[str, int | None]


@dataclass
class PairRecord:
    """A preference pair.

    ``strength`` is the preference magnitude m (|preference_strength| for HelpSteer2-Preference,
    the row's ``strength`` for plain pairs, else 1.0); ``margin`` the margin used by margin
    losses (HelpSteer2-Preference: m; plain pairs: the row's ``margin``, else None, and
    margin losses then use ``strength``). ``chosen_reward`` / ``rejected_reward``: the
    ground-truth rewards r* of the RPO losses (both or neither).
    ``preference_strength`` keeps the signed HelpSteer2-Preference value (0 = tie).
    """

    prompt: Conversation
    chosen: str
    rejected: str
    strength: float = 1.0
    margin: float | None = None
    chosen_reward: float | None = None
    rejected_reward: float | None = None
    preference_strength: int | None = None
    subset: str | None = None
    id: str | int | None = None

    @property
    def is_tie(self) -> bool:
        return self.preference_strength == 0

    @property
    def reward_gap(self) -> float | None:
        """``r*_chosen − r*_rejected`` (RPO), or None when the row gives no rewards."""
        if self.chosen_reward is None or self.rejected_reward is None:
            return None
        return self.chosen_reward - self.rejected_reward


@dataclass
class UnpairedRecord:
    """One response with its label (KTO): ``desirable`` True or False."""

    prompt: Conversation
    response: str
    desirable: bool


@dataclass
class PromptRecord:
    """A prompt to generate from (``label``: SteerLM attributes to condition on, if any)."""

    prompt: Conversation
    label: str | None = None


@dataclass
class SteerLM2Response:
    value: str
    log_p_attributes: float  # log P(a|x,y), from the regression reward model
    log_p_sft: float  # log P(y|x), from the SFT model
    log_q: float  # log Q'(y|a,x), from the SteerLM model that sampled it


@dataclass
class SteerLM2Record:
    prompt: Conversation
    label: str
    responses: list[SteerLM2Response] = field(default_factory=list)


# --------------------------------------------------------------------------------------- detection
def detect_format(row: dict) -> str | None:
    """The format a row's fields identify, or None. Checked most specific first."""
    keys = set(row)
    if "prompt_turns" in keys and "responses" in keys:
        return "steerlm2"
    if is_unpaired(row):
        return "unpaired"
    if "conversations" in keys:
        convs = row.get("conversations")
        speakers = {str(t.get("from")).strip().lower() for t in convs if isinstance(t, dict)} if isinstance(
            convs, list) else set()
        if speakers & {"human", "gpt", "system"}:
            return "sharegpt"
        labelled = isinstance(convs, list) and any(
            isinstance(t, dict) and t.get("label") not in (None, "") for t in convs
        )
        return "steerlm" if labelled or row.get("label") not in (None, "") else "sft"
    if "messages" in keys:
        return "openai"
    if "response_1" in keys and "response_2" in keys:
        return "helpsteer2_preference"
    if "chosen" in keys and "rejected" in keys:
        return "rewardbench" if "subset" in keys else "pairwise"
    if "response" in keys and "prompt" in keys and keys & set(NINE_ATTRIBUTES):
        return "helpsteer2"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "prompt" in keys:
        return "prompt"
    return None


def is_unpaired(row: dict) -> bool:
    """A labelled response (KTO): a boolean ``label`` (true: desirable, false: undesirable)
    beside a response (``completion`` or ``response`` after a ``prompt``) or beside a
    conversation. A ``label`` of another type is not KTO's (a string beside a conversation
    is SteerLM's; beside a prompt and completion it is a field the row merely carries)."""
    keys = set(row)
    if not isinstance(row.get("label"), bool):
        return False
    if "prompt" in keys and keys & {"completion", "response"} and not keys & set(NINE_ATTRIBUTES):
        return True
    return bool(keys & {"conversations", "messages"})


# --------------------------------------------------------------------------------------- parsing
def split_prompt_turns(prompt: str) -> list[Turn]:
    """Split a HelpSteer2 prompt string into turns (single-turn prompts give one user turn)."""
    pieces = _TURN_SPLIT.split(prompt)
    turns = [Turn(USER, pieces[0])]
    for i in range(1, len(pieces), 2):
        turns.append(Turn(USER if pieces[i] == "User" else ASSISTANT, pieces[i + 1]))
    return turns


def parse_attribute_label(label: str) -> dict[str, int]:
    """``"helpfulness:4,correctness:3"`` -> ``{"helpfulness": 4, "correctness": 3}``."""
    out = {}
    for item in label.strip().split(","):
        name, _, value = item.partition(":")
        out[name.strip()] = int(value)
    return out


def format_attribute_label(attributes: dict[str, int], order: tuple[str, ...] = HELPSTEER2_ATTRIBUTES) -> str:
    """The SteerLM attribute string, attributes in ``order`` (others after, sorted)."""
    names = [a for a in order if a in attributes] + sorted(set(attributes) - set(order))
    return ",".join(f"{name}:{int(attributes[name])}" for name in names)


def steerlm_label(request: str, defaults: str = STEERLM_DEFAULT_LABEL) -> str:
    """The attribute string SteerLM is conditioned on, from a request such as
    ``"helpfulness=4,verbosity=1"`` (``name=value`` or ``name:value`` pairs, values 0..4).

    Attributes the request does not name take their value from ``defaults`` (SteerLM's
    inference default, 4/4/4/2/2 for the five HelpSteer2 attributes), so the string has
    the attributes, in the order, a model trained on labelled HelpSteer2-style rows saw.
    Pass ``defaults=""`` to render only what is named. A ValueError names the bad item; with
    defaults, a name that is not one of theirs is refused (a misspelt attribute would
    otherwise be rendered beside the default it meant to change).
    """
    values = parse_attribute_label(defaults) if defaults else {}
    named = {}
    for item in request.split(","):
        if not item.strip():
            continue
        sep = "=" if "=" in item else ":"
        name, _, value = item.partition(sep)
        name = name.strip()
        if not name or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"attribute request {item.strip()!r}: expected name=value with an integer value 0..4")
        level = int(value)
        if not 0 <= level <= 4:
            raise ValueError(f"attribute request {item.strip()!r}: the value must be in 0..4")
        if name in named:  # which one was meant is not for us to guess
            raise ValueError(f"attribute request {request!r}: {name!r} is named twice")
        named[name] = level
    if not named:
        raise ValueError(f"attribute request {request!r}: expected name=value pairs, e.g. helpfulness=4,verbosity=1")
    unknown = [name for name in named if values and name not in values]
    if unknown:
        raise ValueError(f"attribute request {request!r}: {', '.join(map(repr, unknown))} is not one of the"
                         f" attributes {', '.join(values)} (to condition on other attributes, give no defaults"
                         f" and name every attribute)")
    values.update(named)
    return format_attribute_label(values)


def _role(value: str) -> str:
    return value.strip().lower()


def _nemo_conversation(row: dict) -> Conversation:
    turns = [
        Turn(_role(t["from"]), t["value"], t.get("label") or None) for t in row["conversations"]
    ]
    if row.get("label") and turns:
        # a row-level label applies to every assistant turn that has none
        for t in turns:
            if t.role == ASSISTANT and t.label is None:
                t.label = row["label"]
    return Conversation(turns, row.get("system"))


def _sharegpt_conversation(row: dict) -> Conversation:
    turns = [Turn(SHAREGPT_ROLES[_role(t["from"])], t["value"]) for t in row["conversations"]]
    system = row.get("system")
    if turns[0].role == "system":
        system = turns.pop(0).content
    return Conversation(turns, system)


def _messages_conversation(messages: list, system: str | None = None) -> Conversation:
    """Messages (``{"role", "content"}``) as a conversation; a system message is its system prompt."""
    turns = []
    for message in messages:
        if message["role"] == "system":
            system = message["content"]
        else:
            turns.append(Turn(message["role"], message["content"]))
    return Conversation(turns, system)


def _prompt_conversation(prompt, system: str | None = None) -> Conversation:
    """A row's ``prompt``: a string (turns joined the HelpSteer2 way) or a list of messages."""
    if isinstance(prompt, list):
        return _messages_conversation(prompt, system)
    return Conversation(split_prompt_turns(prompt), system)


def _response_text(value) -> str:
    """A response: a string, or (TRL's conversational rows) a list of one assistant message."""
    return value[0]["content"] if isinstance(value, list) else value


def _number(row: dict, name: str) -> float | None:
    value = row.get(name)
    return None if value is None else float(value)


def parse_row(row: dict, fmt: str):
    """A validated row as its record type.

    sft/openai/sharegpt/steerlm/prompt_completion -> Conversation; helpsteer2 -> RegressionRecord;
    helpsteer2_preference/pairwise/rewardbench -> PairRecord; unpaired -> UnpairedRecord; prompt -> PromptRecord;
    steerlm2 -> SteerLM2Record.
    """
    system = row.get("system") if isinstance(row.get("system"), str) else None
    if fmt in ("sft", "steerlm"):
        return _nemo_conversation(row)
    if fmt == "openai":
        return _messages_conversation(row["messages"])
    if fmt == "sharegpt":
        return _sharegpt_conversation(row)
    if fmt == "prompt_completion":
        conv = _prompt_conversation(row["prompt"], system)
        completion = row["completion"]
        if isinstance(completion, list):
            conv.turns += _messages_conversation(completion).turns
        else:
            conv.turns.append(Turn(ASSISTANT, completion))
        return conv
    if fmt == "helpsteer2":
        attributes = {a: row.get(a) for a in NINE_ATTRIBUTES if a in row}
        attributes = {a: (None if v is None else int(v)) for a, v in attributes.items()}
        return RegressionRecord(_prompt_conversation(row["prompt"], system), row["response"], attributes)
    if fmt == "helpsteer2_preference":
        s = int(row["preference_strength"])
        first_better = s <= 0  # a tie keeps response_1 first; ties are dropped for training
        return PairRecord(
            prompt=_prompt_conversation(row["prompt"], system),
            chosen=row["response_1"] if first_better else row["response_2"],
            rejected=row["response_2"] if first_better else row["response_1"],
            strength=float(abs(s)),
            margin=float(abs(s)),
            preference_strength=s,
            id=row.get("id"),
        )
    if fmt in ("pairwise", "rewardbench"):
        strength = _number(row, "strength")
        margin = _number(row, "margin")
        return PairRecord(
            prompt=_prompt_conversation(row["prompt"], system),
            chosen=_response_text(row["chosen"]),
            rejected=_response_text(row["rejected"]),
            strength=1.0 if strength is None else abs(strength),
            margin=margin,
            chosen_reward=_number(row, "chosen_reward"),
            rejected_reward=_number(row, "rejected_reward"),
            subset=row.get("subset"),
            id=row.get("id"),
        )
    if fmt == "unpaired":
        if "conversations" in row or "messages" in row:
            conv = _nemo_conversation(row | {"label": None}) if "conversations" in row else _messages_conversation(
                row["messages"], system)
            response = conv.turns.pop().content
        else:
            conv = _prompt_conversation(row["prompt"], system)
            response = _response_text(row["completion"] if "completion" in row else row["response"])
        return UnpairedRecord(conv, response, row["label"])
    if fmt == "prompt":
        return PromptRecord(_prompt_conversation(row["prompt"], system), row.get("label") or None)
    if fmt == "steerlm2":
        turns = [Turn(_role(t["from"]), t["value"]) for t in row["prompt_turns"]]
        responses = [
            SteerLM2Response(r["value"], *(float(r[k]) for k in STEERLM2_LOG_FIELDS)) for r in row["responses"]
        ]
        return SteerLM2Record(Conversation(turns, system), row["label"], responses)
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def prompt_of(record) -> PromptRecord:
    """The prompt any record carries (for prompt-only datasets)."""
    if isinstance(record, PromptRecord):
        return record
    if isinstance(record, Conversation):
        prompt = record.prompt()
        label = next((t.label for t in record.turns[len(prompt.turns):] if t.label), None)
        return PromptRecord(prompt, label)
    if isinstance(record, (RegressionRecord, PairRecord, UnpairedRecord)):
        return PromptRecord(record.prompt)
    if isinstance(record, SteerLM2Record):
        return PromptRecord(record.prompt, record.label)
    raise TypeError(f"no prompt in a {type(record).__name__}")
