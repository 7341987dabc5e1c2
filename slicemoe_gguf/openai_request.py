"""What an OpenAI completion or chat request asks for, checked before it waits for the model.

A parameter is honoured or refused with a 400 that names it, never accepted and ignored: a client
that asked for JSON, tools or four choices must not believe it got them. `parse` does everything
that needs no context (tokenizing the prompt, compiling a grammar), so that a malformed request
never queues behind a running one.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from typing import Any

from ._native import SliceMoEError
from .runtime import Model, Sampling

DEFAULT_MAX_TOKENS = 16   # OpenAI's default for completions; a chat's default is the rest of the context
MAX_TOP_LOGPROBS = 20     # OpenAI's limit for chat (completions: 5; we allow 20 on both)

# Any JSON value whose outermost value is an object (OpenAI's JSON mode asks for an object).
# Whitespace is bounded so that a model cannot spend its tokens on blanks.
JSON_OBJECT_GRAMMAR = r'''
root    ::= object
value   ::= object | array | string | number | ("true" | "false" | "null") ws
object  ::= "{" ws ( member ( "," ws member )* )? "}" ws
member  ::= string ":" ws value
array   ::= "[" ws ( value ( "," ws value )* )? "]" ws
string  ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} ) )* "\"" ws
number  ::= "-"? ( "0" | [1-9] [0-9]{0,15} ) ( "." [0-9]+ )? ( [eE] [-+]? [0-9]{1,4} )? ws
ws      ::= [ \t\n]{0,8}
'''

# Parameters of both endpoints that are honoured (anything else is refused by name).
COMMON = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed", "stop", "n",
          "frequency_penalty", "presence_penalty", "repeat_penalty", "top_k", "min_p", "logit_bias", "user",
          "response_format", "logprobs"}
CHAT_ONLY = {"messages", "max_completion_tokens", "top_logprobs",
             # refused unless they ask for nothing (null, [], "none"): no tool calling
             "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls"}
COMPLETION_ONLY = {"prompt", "echo", "best_of", "suffix"}
ROLES = ("system", "developer", "user", "assistant")


class BadRequest(Exception):
    """A request the server will not run; the message names the parameter."""


@dataclass
class Job:
    """One validated request: its prompt, how far to decode and how to sample."""

    chat: bool
    prompt: list[int]
    max_tokens: int
    sampler: object            # the native sampler (Model.sampler), its grammar compiled
    stop: list[str]
    stream: bool
    top_logprobs: int | None   # None: no logprobs; 0..MAX_TOP_LOGPROBS alternatives per token


def _number(body: dict, name: str, default: float, low: float, high: float, *, open_low: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (low < value if open_low else low <= value) and value <= high):
        interval = f"{'(' if open_low else '['}{low}, {high}]"
        raise BadRequest(f"{name} must be a number in {interval}")
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{name} must be an integer in [{low}, {high}]")
    return value


def _refuse_unknown(body: dict, chat: bool) -> None:
    known = COMMON | (CHAT_ONLY if chat else COMPLETION_ONLY)
    for name in body:
        if name not in known:
            raise BadRequest(f"{name}: not supported by this server (it honours {', '.join(sorted(known))})")
    asks_for_nothing = {"tools": ([], None), "functions": ([], None), "tool_choice": ("none", None),
                        "function_call": ("none", None), "echo": (False, None), "best_of": (1, None),
                        "suffix": ("", None), "n": (1, None)}
    for name, nothing in asks_for_nothing.items():
        if name in body and body[name] not in nothing:
            what = {"n": "one choice per request", "best_of": "one candidate per request",
                    "echo": "no echo of the prompt", "suffix": "no insertion (suffix)"}.get(name, "no tool calling")
            raise BadRequest(f"{name}: not supported ({what}), got {json.dumps(body[name])[:80]}")
    if body.get("parallel_tool_calls") not in (None, True, False):
        raise BadRequest("parallel_tool_calls must be a boolean")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise BadRequest("stream_options: only include_usage is supported (the last chunk always carries usage)")


def message_text(message: Any, index: int) -> tuple[str, str]:
    """(role, text) of one chat message; content is a string or a list of text parts."""
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise BadRequest(f"{where} must be an object with role and content")
    for key, value in message.items():
        if key not in ("role", "content") and value is not None:
            raise BadRequest(f"{where}.{key}: not supported (messages carry a role and text content)")
    role = message.get("role")
    if role not in ROLES:
        raise BadRequest(f"{where}.role must be one of {', '.join(ROLES)}, got {json.dumps(role)[:40]}")
    content = message.get("content")
    if isinstance(content, str):
        return role, content
    if not isinstance(content, list) or not content:
        raise BadRequest(f"{where}.content must be a string or a non-empty list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise BadRequest(f"{where}.content[{j}]: part type {json.dumps(kind)[:40]} is not supported "
                             "(this model reads text parts only)")
        if not isinstance(part.get("text"), str):
            raise BadRequest(f"{where}.content[{j}].text must be a string")
        texts.append(part["text"])
    return role, "".join(texts)


def _prompt(model: Model, body: dict, chat: bool) -> list[int]:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list of {role, content} objects")
        turns = [message_text(m, i) for i, m in enumerate(messages)]
        # the developer role is OpenAI's new name for the system role; built-in templates know "system"
        return model.chat_tokens([{"role": "system" if r == "developer" else r, "content": c} for r, c in turns])
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("prompt must be a non-empty string (one prompt per request)")
    return model.tokenize(prompt)


@functools.lru_cache(maxsize=1)
def _schema_converter():
    """llama-cpp-python's llama_grammar module (the `llama` extra), loaded once, and alone: a
    pure-Python file, whose package would load its own libllama; None when it is not installed."""
    found = importlib.util.find_spec("llama_cpp")
    location = next(iter(found.submodule_search_locations or []), None) if found else None
    if location is None:
        return None
    spec = importlib.util.spec_from_file_location("slicemoe_gguf._llama_grammar", f"{location}/llama_grammar.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _json_schema_grammar(format_: dict) -> str:
    spec = format_.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise BadRequest("response_format.json_schema.schema must be a JSON schema object")
    module = _schema_converter()
    if module is None:
        raise BadRequest("response_format json_schema needs llama-cpp-python's schema converter: "
                         "pip install 'slicemoe-gguf[llama]' (json_object works without it)")
    try:
        grammar = module.json_schema_to_gbnf(json.dumps(spec["schema"]))
    except Exception as exc:   # noqa: BLE001 - the converter's own reason, for the client
        raise BadRequest(f"response_format.json_schema: {exc}") from exc
    # its string character rule admits raw control characters, which JSON forbids (json.loads
    # refuses a newline inside a string): narrowed to what JSON allows
    return grammar.replace('char ::= [^"\\\\] |', 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |')


def _grammar(body: dict) -> str | None:
    format_ = body.get("response_format")
    if format_ is None:
        return None
    kind = format_.get("type") if isinstance(format_, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_GRAMMAR
    if kind == "json_schema":
        return _json_schema_grammar(format_)
    raise BadRequest("response_format.type must be text, json_object or json_schema")


def _logit_bias(body: dict, n_vocab: int) -> dict[int, float]:
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict):
        raise BadRequest("logit_bias must map token ids to numbers in [-100, 100]")
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise BadRequest(f"logit_bias: {key!r} is not a token id") from None
        if not 0 <= token < n_vocab:
            raise BadRequest(f"logit_bias: token {token} is not in the vocabulary of {n_vocab} tokens")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise BadRequest(f"logit_bias[{key}] must be a number in [-100, 100]")
        # OpenAI's -100 bans the token; llama.cpp bans with -inf
        out[token] = float("-inf") if value == -100 else float(value)
    return out


def _top_logprobs(body: dict, chat: bool) -> int | None:
    if chat:
        wanted = body.get("logprobs")
        if wanted not in (None, True, False):
            raise BadRequest("logprobs must be a boolean (chat); top_logprobs gives the alternatives")
        top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        if body.get("top_logprobs") is not None and not wanted:
            raise BadRequest("top_logprobs needs logprobs: true")
        return top if wanted else None
    return _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest("stop must be a string or a list of strings")
    return stop


def _sampler(body: dict, model: Model):
    """The request's native sampler; made here so that a grammar that does not compile is the
    client's error before the request waits, and the decode uses this one."""
    seed = body.get("seed", 0)
    if seed is None:
        seed = 0
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise BadRequest("seed must be an integer in [0, 2^32)")
    penalties = {name: _number(body, name, 0.0, -2.0, 2.0) for name in ("frequency_penalty", "presence_penalty")}
    sampling = Sampling(temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True), seed=seed,
                        top_k=_integer(body, "top_k", 0, 0, model.n_vocab), min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
                        repeat_penalty=_number(body, "repeat_penalty", 1.0, 0.0, 10.0, open_low=True),
                        # OpenAI's penalties count every token of the completion so far
                        penalty_last_n=-1, grammar=_grammar(body), logit_bias=_logit_bias(body, model.n_vocab),
                        **penalties)
    try:
        return model.sampler(sampling)
    except SliceMoEError as exc:
        raise BadRequest(f"response_format: {exc}") from exc


def parse(model: Model, body: Any, chat: bool) -> Job:
    """The request as a Job, or BadRequest naming what is wrong. Needs the model's vocabulary but not
    its context: it may run while another request decodes."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    _refuse_unknown(body, chat)
    if body.get("stream") not in (None, True, False):
        raise BadRequest("stream must be a boolean")
    prompt = _prompt(model, body, chat)
    room = model.n_ctx - len(prompt)
    if room < 1:
        raise BadRequest(f"the prompt has {len(prompt)} tokens, the context holds {model.n_ctx}")
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, None if chat else DEFAULT_MAX_TOKENS, 0, 2**31 - 1)
    return Job(chat=chat, prompt=prompt, max_tokens=room if max_tokens is None else min(max_tokens, room),
               sampler=_sampler(body, model), stop=_stop(body), stream=bool(body.get("stream")),
               top_logprobs=_top_logprobs(body, chat))
