"""Fine-tuning records (`plait data prepare --format sft`): rendered to text, tokens and loss mask.

A record is one JSON line, either

    {"prompt": "...", "response": "..."}      the prompt's text, then the response's, verbatim
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}

Rendering gives segments (text, trained): the response, and each message whose role is
`assistant`, is trained; everything else (prompts, system and user turns, role headers) is
context only. Messages are rendered with the tokenizer's chat template when its folder's
tokenizer_config.json has one (`chat_template`, a Jinja template as transformers renders it),
else plainly as `<role>: <content>\n` per message (`assistant: ` itself is not trained). A
template is rendered message by message: the text a message adds is the difference between the
conversation rendered with and without it, and an assistant turn's header is what the template's
generation prompt adds; a template that does not render conversations prefix by prefix is
refused.

Tokens come from encoding the whole rendered text at once (so tokens across a segment boundary
are those the tokenizer makes of the whole); a token is trained when its last character lies in a
trained segment. Each record ends with the end-of-text id, trained when the record's last token
is. With a chat template the text is encoded with its special tokens recognized (as transformers
does), so a special token's text inside a message also becomes that token; the plain rendering
encodes them as text.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from plait.errors import ConfigError

Segments = list[tuple[str, bool]]  # (text, trained) in order
TRAINED_ROLE = "assistant"


def chat_template(tokenizer: str) -> dict | None:
    """{"template", "bos_token", "eos_token"} from a tokenizer folder's tokenizer_config.json, or
    None (byte, train:VOCAB, or no `chat_template` there)."""
    p = Path(tokenizer)
    folder = p if p.is_dir() else p.parent
    f = folder / "tokenizer_config.json"
    if tokenizer == "byte" or tokenizer.startswith("train:") or not f.is_file():
        return None
    try:
        conf = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{f} is not readable JSON ({e}): fix or remove it") from e
    tpl = conf.get("chat_template")
    if isinstance(tpl, list):  # named templates: the default one
        tpl = next((t.get("template") for t in tpl if t.get("name") == "default"), None)
    if not isinstance(tpl, str) or not tpl:
        return None

    def token(name):
        v = conf.get(name)
        return v.get("content", "") if isinstance(v, dict) else (v or "")

    return {"template": tpl, "bos_token": token("bos_token"), "eos_token": token("eos_token")}


def _renderer(spec: dict) -> Callable[[list, bool], str]:
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ConfigError("a tokenizer with a chat template needs jinja2 to render it: pip "
                          "install jinja2") from e

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    tpl = env.from_string(spec["template"])

    def render(messages: list, generation_prompt: bool) -> str:
        return tpl.render(messages=messages, add_generation_prompt=generation_prompt,
                          bos_token=spec["bos_token"], eos_token=spec["eos_token"])

    return render


def _messages(obj: dict, where: Callable[[], str]) -> list[dict]:
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ConfigError(f"{where()}: 'messages' must be a non-empty list of "
                          f'{{"role": ..., "content": ...}} objects')
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise ConfigError(f"{where()}: messages[{i}] is not an object with text 'role' and "
                              f"'content' fields: fix the record")
    return msgs


def _templated(msgs: list[dict], render, where: Callable[[], str]) -> Segments:
    segments: Segments = []
    done = ""
    for i, m in enumerate(msgs):
        try:
            head = render(msgs[:i], True) if m["role"] == TRAINED_ROLE else done
            full = render(msgs[: i + 1], False)
        except Exception as e:  # jinja2's TemplateError and errors raised by the template
            raise ConfigError(f"{where()}: the chat template failed on this record ({e}): fix "
                              f"the record or the template") from e
        if not (head.startswith(done) and full.startswith(head)):
            raise ConfigError(f"{where()}: the chat template renders the conversation differently "
                              f"from its beginning, so the assistant turns cannot be located: "
                              f"remove `chat_template` from the tokenizer_config.json to use the "
                              f"plain `<role>: content` rendering")
        segments += [(head[len(done):], False), (full[len(head):], m["role"] == TRAINED_ROLE)]
        done = full
    return segments


def parse_record(template: dict | None) -> Callable[[object, Callable[[], str]], Segments | None]:
    """A function (JSON object, where) -> segments, or None for an empty record; `where()` names
    the file and line in errors."""
    render = _renderer(template) if template else None

    def parse(obj, where: Callable[[], str]) -> Segments | None:
        if not isinstance(obj, dict):
            raise ConfigError(f"{where()} is a JSON {type(obj).__name__}, not an object: a "
                              f"fine-tuning record has prompt and response, or messages")
        if "messages" in obj:
            msgs = _messages(obj, where)
            if render is not None:
                segments = _templated(msgs, render, where)
            else:
                segments = []
                for m in msgs:
                    trained = m["role"] == TRAINED_ROLE
                    segments += [(f"{m['role']}: ", False), (m["content"] + "\n", trained)]
        elif "prompt" in obj and "response" in obj:
            if not (isinstance(obj["prompt"], str) and isinstance(obj["response"], str)):
                raise ConfigError(f"{where()}: 'prompt' and 'response' must be text")
            segments = [(obj["prompt"], False), (obj["response"], True)]
        else:
            raise ConfigError(f"{where()} is no fine-tuning record (it has: "
                              f"{', '.join(list(obj)[:10])}): give prompt and response, or "
                              f"messages, or prepare it without --format sft")
        segments = [(t, m) for t, m in segments if t]
        return segments or None

    return parse


def text_of(segments: Segments) -> str:
    return "".join(t for t, _ in segments)


def char_mask(segments: Segments) -> np.ndarray:
    """One bool per character of the rendered text: inside a trained segment."""
    return np.concatenate([np.full(len(t), m, dtype=bool) for t, m in segments])


def byte_ids_and_mask(segments: Segments) -> tuple[np.ndarray, np.ndarray]:
    """Byte tokenization: the ids are the UTF-8 bytes, each with its segment's flag."""
    parts = [t.encode("utf-8", "replace") for t, _ in segments]
    ids = np.frombuffer(b"".join(parts), dtype=np.uint8)
    mask = np.concatenate([np.full(len(p), m, dtype=np.uint8) for p, (_, m) in
                           zip(parts, segments)])
    return ids, mask


def token_mask(offsets: list[tuple[int, int]], chars: np.ndarray) -> np.ndarray:
    """Per token (character offsets [start, end)): 1 when its last character is trained."""
    if not offsets:
        return np.zeros(0, dtype=np.uint8)
    last = np.array([max(s, e - 1) for s, e in offsets], dtype=np.int64)
    return chars[np.clip(last, 0, len(chars) - 1)].astype(np.uint8)
