"""Record formats -> one internal shape: a conversation (chat) or a document (pretraining).

Every chat format becomes a tuple of :class:`Message` (role, content, loss). ``loss`` marks the
turns the model learns to produce: by default every assistant turn, so multi-turn data trains every
reply; OpenAI-format records may switch a turn off with ``"loss": false`` (as XTuner's openai format).
Pretraining records become a plain ``str``.

A mapper raises :class:`RecordError` with what is wrong; the caller adds the file and line.

Formats (config ``data.format``):
    alpaca        {"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}
    openai        {"messages": [{"role", "content", "loss"?}]} or a bare list of messages
    sharegpt      {"conversations": [{"from", "value"}], "system"?}
    conversation  XTuner's {"conversation": [{"system"?, "input", "output"}]}
    pretrain      {"text": ...} (or a line of a .txt file)
    chatterbot    chatterbot-corpus: [q, a, (more turns...)] alternating user/assistant
    preference    {"prompt"?, "chosen", "rejected"} (TRL's forms, XTuner's DPO records): tunex.data.preference
    chatterbot_pairs  chatterbot-corpus made into preference pairs (tunex.data.preference)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str
    loss: bool = False  # learn to produce this turn's content (and its end-of-turn token)

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.content, "loss": self.loss}


Conversation = tuple[Message, ...]
Sample = Conversation | str


class RecordError(ValueError):
    """A record does not have the shape its format needs (message says which field, what was expected)."""


def fields_present(record: dict) -> str:
    """The record's field names for an error line: as they are, or quoted with escapes where a
    name holds a line break or another unprintable character (the message stays one line)."""
    names = [str(k) if str(k).isprintable() else repr(str(k)) for k in record]
    return ", ".join(names) or "none"


def _field(record: Any, name: str, *, required: bool = True, default: str = "") -> str:
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object with field {name!r}, got {_kind(record)}")
    if name not in record or record[name] is None:
        if required:
            raise RecordError(f"missing field {name!r} (fields present: {fields_present(record)})")
        return default
    value = record[name]
    if not isinstance(value, str):
        raise RecordError(f"field {name!r}: expected a string, got {_kind(value)}")
    return value


def _list_field(record: Any, name: str) -> list:
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object with field {name!r}, got {_kind(record)}")
    if name not in record:
        raise RecordError(f"missing field {name!r} (fields present: {fields_present(record)})")
    value = record[name]
    if not isinstance(value, list):
        raise RecordError(f"field {name!r}: expected a list, got {_kind(value)}")
    return value


def _kind(v: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(v), f"a {type(v).__name__}")


def _user(text: str) -> Message:
    return Message("user", text)


def _assistant(text: str, loss: bool = True) -> Message:
    return Message("assistant", text, loss)


def alpaca(record: Any) -> Conversation:
    instruction = _field(record, "instruction")
    extra = _field(record, "input", required=False)
    output = _field(record, "output")
    system = _field(record, "system", required=False)
    prompt = f"{instruction}\n{extra}" if extra else instruction
    turns: list[Message] = [Message("system", system)] if system else []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise RecordError(f"field 'history': expected a list of [question, answer] pairs, got {_kind(history)}")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RecordError(f"field 'history', item {i}: expected a [question, answer] pair of strings")
        turns += [_user(pair[0]), _assistant(pair[1])]
    # '<nooutput>' marks alpaca rows without an answer (XTuner skips them): nothing to learn.
    turns += [_user(prompt), _assistant(output, loss=output != "<nooutput>")]
    return tuple(turns)


def role_and_content(m: Any, where: str) -> tuple[str, str]:
    """A chat message's role (one of ROLES) and string content, checked; ``where`` names it in errors."""
    if not isinstance(m, dict):
        raise RecordError(f"{where}: expected an object with 'role' and 'content', got {_kind(m)}")
    role = m.get("role")
    if role not in ROLES:
        raise RecordError(f"{where}.role: expected one of {', '.join(ROLES)}, got {role!r}")
    content = m.get("content")
    if not isinstance(content, str):
        raise RecordError(
            f"{where}.content: expected a string, got {_kind(content)}"
            if "content" in m
            else f"{where}: missing field 'content'"
        )
    return role, content


def openai(record: Any) -> Conversation:
    messages = record if isinstance(record, list) else _list_field(record, "messages")
    turns = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role, content = role_and_content(m, where)
        loss = m.get("loss", role == "assistant")
        if not isinstance(loss, bool):
            raise RecordError(f"{where}.loss: expected true or false, got {loss!r}")
        if loss and role != "assistant":
            raise RecordError(f"{where}.loss: only assistant turns can be trained, this one is {role!r}")
        turns.append(Message(role, content, loss))
    return tuple(turns)


_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}


def sharegpt(record: Any) -> Conversation:
    system = _field(record, "system", required=False)
    turns = [Message("system", system)] if system else []
    for i, m in enumerate(_list_field(record, "conversations")):
        where = f"conversations[{i}]"
        if not isinstance(m, dict):
            raise RecordError(f"{where}: expected an object with 'from' and 'value', got {_kind(m)}")
        who = m.get("from")
        if who not in _SHAREGPT_ROLES:
            raise RecordError(f"{where}.from: expected one of {', '.join(_SHAREGPT_ROLES)}, got {who!r}")
        value = m.get("value")
        if not isinstance(value, str):
            raise RecordError(
                f"{where}.value: expected a string, got {_kind(value)}"
                if "value" in m
                else f"{where}: missing field 'value'"
            )
        role = _SHAREGPT_ROLES[who]
        turns.append(Message(role, value, role == "assistant"))
    return tuple(turns)


def conversation(record: Any) -> Conversation:
    turns = []
    for i, turn in enumerate(_list_field(record, "conversation")):
        try:
            system = _field(turn, "system", required=False)
            user, reply = _field(turn, "input"), _field(turn, "output")
        except RecordError as e:
            raise RecordError(f"conversation[{i}]: {e}") from None
        if system:
            turns.append(Message("system", system))
        turns += [_user(user), _assistant(reply)]
    return tuple(turns)


def chatterbot(record: Any) -> Conversation:
    if isinstance(record, str):  # a question without an answer (the corpus has a few): nothing to learn
        record = [record]
    if not isinstance(record, list) or not all(isinstance(x, str) for x in record):
        raise RecordError(f"expected a list of strings (question, answer, ...), got {_kind(record)}")
    # A trailing question has no answer to learn; keep only complete user/assistant pairs.
    usable = record[: len(record) - len(record) % 2]
    return tuple(Message("user" if i % 2 == 0 else "assistant", text, i % 2 == 1) for i, text in enumerate(usable))


def pretrain(record: Any) -> str:
    if isinstance(record, str):
        return record
    return _field(record, "text")


def preference(record: Any) -> Any:
    """(prompt, chosen, rejected) records -> a :class:`tunex.data.preference.Pair`."""
    from tunex.data.preference import pair

    return pair(record)


def chatterbot_pairs(record: Any) -> Any:
    """chatterbot-corpus conversations -> preference pairs (see :mod:`tunex.data.preference`)."""
    from tunex.data.preference import chatterbot_pair

    return chatterbot_pair(record)


FORMATS: dict[str, Callable[[Any], Sample]] = {
    "alpaca": alpaca,
    "openai": openai,
    "sharegpt": sharegpt,
    "conversation": conversation,
    "pretrain": pretrain,
    "chatterbot": chatterbot,
    "preference": preference,
    "chatterbot_pairs": chatterbot_pairs,
}


def mapper(fmt: str) -> Callable[[Any], Sample]:
    """The record -> sample function of ``fmt``; ValueError lists the valid formats."""
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown data format {fmt!r}; valid formats: {', '.join(FORMATS)}") from None


def with_system(conv: Conversation, system: str) -> Conversation:
    """Put the config's system prompt first unless the conversation brings its own."""
    if not system or (conv and conv[0].role == "system"):
        return conv
    return (Message("system", system), *conv)


def has_target(sample: Sample) -> bool:
    if isinstance(sample, str):
        return bool(sample)
    return any(m.loss for m in sample)
