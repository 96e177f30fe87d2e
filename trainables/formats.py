"""Record shapes: one table, name -> Format (its columns, its checks, its split key, its tokens with loss).

A format named in the config (`contract.config.DATA_FORMATS`) without an entry here is an error, not
a silent fallback. With `data.format: auto` the shape is detected from the columns (`detect`).

Shapes:
  instruction  {prompt, response}            (column names from data.prompt_field / response_field)
  completion   {prompt, completion}          TRL's and OpenAI's prompt/completion: the two texts joined
  alpaca       {instruction, input, output}  input may be missing or empty
  chat         {messages: [{role, content}]} (column from data.messages_field)
  sharegpt     {conversations: [{from, value}]} with from = human | gpt | system
  text         {text}                        (column from data.text_field): loss on every token

Loss is taken on response / completion / output / assistant (gpt) tokens only, plus EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from lora_rank_search.contract.config import DATA_FORMATS, DataConfig

IGNORE = -100

# Alpaca's own prompt, used when the tokenizer has no chat template (or data.use_chat_template: false).
ALPACA_PLAIN = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PLAIN_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """The configured data cannot be read or lacks what the format needs."""


@dataclass(frozen=True)
class Format:
    """One record shape.

    Attributes:
        name: the `data.format` value.
        columns: the columns it needs (given the data config).
        detect: the default column names that identify the shape under `format: auto`.
        texts: (column, has_loss) of the scalar text columns whose values are checked; message
            lists are checked by `messages`.
        messages: the column of a message list and its checker (None for scalar shapes).
        split_key: what the hash split keys on (the prompt, first user turn, or the text).
        segments: (text, has_loss) pieces of one record (tokenizer, template flag given).
        templated: data.use_chat_template applies to it.
    """

    name: str
    columns: Callable[[DataConfig], list]
    detect: tuple
    texts: Callable[[DataConfig], list]
    split_key: Callable[[dict, DataConfig], str]
    segments: Callable[..., list]
    templated: bool = True
    messages: Optional[Callable[[DataConfig], tuple]] = None
    optional: tuple = ()  # columns that may be missing (alpaca's input)


# --------------------------------------------------------------------------- rendering


def render(tokenizer, messages: list, generation_prompt: bool, template: bool) -> str:
    """The conversation through the chat template, or as plain `role: content` lines whose assistant
    turns end with EOS: the adapter learns where an answer ends (as `prompt + response + EOS` does
    for a pair), and a generation for eval.metric stops there instead of running on."""
    if template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    eos = tokenizer.eos_token or ""
    text = "".join(f"{m['role']}: {m['content']}{eos if m['role'] == 'assistant' else ''}\n" for m in messages)
    return text + ("assistant: " if generation_prompt else "")


def chat_segments(tokenizer, messages: list, template: bool) -> list:
    """Split the rendered conversation into (text, has_loss) pieces: loss on assistant turns."""
    full = render(tokenizer, messages, False, template)
    cuts = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], True, template) if i else ""
        upto = render(tokenizer, messages[: i + 1], False, template)
        if not (full.startswith(prefix) and full.startswith(upto)):
            raise DataError("data.format: the chat template does not render conversations prefix by prefix")
        cuts.append((len(prefix), len(upto)))
    segments, pos = [], 0
    for start, end in cuts:
        segments.append((full[pos:start], False))
        segments.append((full[start:end], True))
        pos = end
    segments.append((full[pos:], False))
    return segments


def _pair(tokenizer, prompt: str, response: str, template: bool, joiner: str = "\n") -> list:
    """A prompt and its response: through the chat template (one user and one assistant turn), or
    as plain text `prompt + joiner + response + EOS` with loss on the response and EOS."""
    if template:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return chat_segments(tokenizer, messages, True)
    return [(prompt + joiner, False), (response + (tokenizer.eos_token or ""), True)]


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def alpaca_prompt(record: dict, template: bool) -> str:
    """The user turn of an Alpaca record: the instruction and, when present, the input (a blank
    line between) through a chat template; else Alpaca's own plain template (ALPACA_PLAIN*)."""
    instruction, extra = _text(record.get("instruction")).strip(), _text(record.get("input")).strip()
    if template:
        return instruction + ("\n\n" + extra if extra else "")
    return (ALPACA_PLAIN_INPUT if extra else ALPACA_PLAIN).format(instruction=instruction, input=extra)


def sharegpt_messages(conversations: list) -> list:
    """ShareGPT turns as chat messages (human -> user, gpt -> assistant, system -> system)."""
    return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in conversations]


# --------------------------------------------------------------------------- checks of message lists


def _is_null(value: Any) -> bool:
    import math

    return value is None or (isinstance(value, float) and math.isnan(value))


def chat_problem(messages: Any) -> Optional[str]:
    if not isinstance(messages, list) or not messages:
        return "is not a non-empty list of {role, content} messages"
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m):
            return "holds a message that is not {role, content}"
        if _is_null(m["content"]) or isinstance(m["content"], (dict, list)):
            return "holds a message whose content is null or not text"
    if not any(m["role"] == "assistant" and str(m["content"]).strip() for m in messages):
        return "has no assistant turn with content (loss is taken on assistant turns only)"
    return None


def sharegpt_problem(turns: Any) -> Optional[str]:
    if not isinstance(turns, list) or not turns:
        return "is not a non-empty list of {from, value} turns"
    for t in turns:
        if not (isinstance(t, dict) and "from" in t and "value" in t):
            found = ", ".join(sorted(t)) if isinstance(t, dict) else type(t).__name__
            return f"holds a turn that is not {{from, value}} (found: {found})"
        if t["from"] not in SHAREGPT_ROLES:
            return f"holds a turn from {t['from']!r} (expected one of {', '.join(SHAREGPT_ROLES)})"
        if _is_null(t["value"]) or isinstance(t["value"], (dict, list)):
            return "holds a turn whose value is null or not text"
    if not any(SHAREGPT_ROLES[t["from"]] == "assistant" and str(t["value"]).strip() for t in turns):
        return "has no gpt turn with a value (loss is taken on gpt turns only)"
    return None


def _first_user(messages: Any, role: str = "role", content: str = "content", user: tuple = ("user",)) -> str:
    if not isinstance(messages, list):
        return str(messages)
    users = [m.get(content, "") for m in messages if isinstance(m, dict) and m.get(role) in user]
    return str(users[0] if users else messages)


# --------------------------------------------------------------------------- the table


def _instruction_segments(record, tokenizer, cfg, template):
    return _pair(tokenizer, str(record[cfg.prompt_field]), str(record[cfg.response_field]), template)


def _completion_segments(record, tokenizer, cfg, template):
    # TRL's non-conversational prompt/completion: the completion follows the prompt as written.
    return [(str(record["prompt"]), False), (str(record["completion"]) + (tokenizer.eos_token or ""), True)]


def _alpaca_segments(record, tokenizer, cfg, template):
    return _pair(tokenizer, alpaca_prompt(record, template), str(record["output"]), template, joiner="")


def _chat_segments(record, tokenizer, cfg, template):
    return chat_segments(tokenizer, record[cfg.messages_field], template)


def _sharegpt_segments(record, tokenizer, cfg, template):
    return chat_segments(tokenizer, sharegpt_messages(record["conversations"]), template)


def _text_segments(record, tokenizer, cfg, template):
    return [(str(record[cfg.text_field]) + (tokenizer.eos_token or ""), True)]


FORMATS: dict = {
    f.name: f
    for f in (
        Format("instruction", lambda c: [c.prompt_field, c.response_field], ("prompt", "response"),
               lambda c: [(c.prompt_field, False), (c.response_field, True)],
               lambda r, c: str(r[c.prompt_field]), _instruction_segments),
        Format("completion", lambda c: ["prompt", "completion"], ("prompt", "completion"),
               lambda c: [("prompt", False), ("completion", True)],
               lambda r, c: str(r["prompt"]), _completion_segments, templated=False),
        Format("alpaca", lambda c: ["instruction", "output"], ("instruction", "output"),
               lambda c: [("instruction", False), ("input", False), ("output", True)],
               lambda r, c: f"{r['instruction']}\n{_text(r.get('input'))}", _alpaca_segments, optional=("input",)),
        Format("chat", lambda c: [c.messages_field], ("messages",), lambda c: [],
               lambda r, c: _first_user(r[c.messages_field]), _chat_segments,
               messages=lambda c: (c.messages_field, chat_problem)),
        Format("sharegpt", lambda c: ["conversations"], ("conversations",), lambda c: [],
               lambda r, c: _first_user(r["conversations"], "from", "value", ("human", "user")), _sharegpt_segments,
               messages=lambda c: ("conversations", sharegpt_problem)),
        Format("text", lambda c: [c.text_field], ("text",), lambda c: [(c.text_field, True)],
               lambda r, c: str(r[c.text_field]), _text_segments, templated=False),
    )
}
DETECT_ORDER = ("sharegpt", "chat", "alpaca", "completion", "instruction", "text")  # first match wins


def get_format(name: str) -> Format:
    """The Format of a `data.format` name; a name without an entry is an error."""
    try:
        return FORMATS[name]
    except KeyError:
        raise DataError(f"data.format: no record shape {name!r} (shapes: {', '.join(FORMATS)})") from None


def shape_of(record: Any, cfg: DataConfig) -> Optional[str]:
    """The first shape (DETECT_ORDER) whose identifying columns the record holds, or None. The
    instruction, chat and text shapes are identified by their configured column names."""
    if not isinstance(record, dict):
        return None
    for name in DETECT_ORDER:
        fmt = FORMATS[name]
        needed = fmt.columns(cfg) if name in ("instruction", "chat", "text") else fmt.detect
        if all(c in record for c in needed):
            return name
    return None


def describe_shapes(cfg: DataConfig) -> str:
    """'conversations (sharegpt), messages (chat), ...': what `auto` looks for."""
    parts = []
    for name in DETECT_ORDER:
        fmt = FORMATS[name]
        needed = fmt.columns(cfg) if name in ("instruction", "chat", "text") else fmt.detect
        parts.append(f"{'+'.join(needed)} ({name})")
    return ", ".join(parts)


missing = set(DATA_FORMATS) - {"auto"} - set(FORMATS)
if missing:  # pragma: no cover - a schema name without a table entry must fail at import, not fall back
    raise ImportError(f"lora_rank_search.trainables.formats: no entry for data format(s) {sorted(missing)}")
del missing
