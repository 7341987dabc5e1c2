"""`slicemoe serve` as real clients lean on it: the official OpenAI client's request shapes honoured
or refused by name, abandoned work stopped at once, a bounded queue, and a clean stop on SIGTERM.

Each test starts its own server process on 127.0.0.1 and talks to it over real sockets.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from helpers import Server, rss_anon_bytes
from slicemoe_gguf import Model
from slicemoe_gguf.embedded import embedded_gguf

PROMPT = "ROMEO.\nBut soft, what light"
CACHE_FLAGS = ("--cache-budget", "50%", "--policy", "dbsc")


@pytest.fixture(scope="module")
def embedded():
    return embedded_gguf(progress=False)


@pytest.fixture
def server(embedded, tmp_path):
    running = Server(embedded, tmp_path, "-c", "2048", *CACHE_FLAGS)
    yield running
    assert running.stop() == 0


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", timeout=120, max_retries=0)


def _post(base: str, path: str, body: dict, timeout: float = 60) -> tuple[int, dict, "http.client.HTTPMessage"]:
    """(status, JSON body, headers) of a POST with a plain HTTP client."""
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers


def _metric(base: str, name: str) -> float:
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    return float(next(line.split(" ")[1] for line in text.splitlines() if line.startswith(name + " ")))


def _open_stream(base: str, max_tokens: int, *, chat: bool = True) -> http.client.HTTPResponse:
    """A streamed request under way (its first chunk has arrived)."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    body = ({"messages": [{"role": "user", "content": PROMPT}]} if chat else {"prompt": PROMPT})
    connection.request("POST", "/v1/chat/completions" if chat else "/v1/completions",
                       json.dumps({**body, "max_tokens": max_tokens, "temperature": 0, "stream": True}),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: {")
    return response


# -- the OpenAI parameters people send ------------------------------------------------------------

def test_content_as_a_list_of_text_parts_is_the_same_as_the_joined_string(client):
    parts = [{"type": "text", "text": "ROMEO.\n"}, {"type": "text", "text": "But soft, what light"}]
    as_parts = client.chat.completions.create(model="m", messages=[{"role": "user", "content": parts}],
                                              max_tokens=8, temperature=0)
    as_string = client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}],
                                               max_tokens=8, temperature=0)
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content != ""


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    import torch   # an independent log-softmax

    return torch.log_softmax(torch.from_numpy(logits).double(), dim=-1).numpy()


def _half_budget(path) -> int:
    from slicemoe_gguf.model_info import describe

    info = describe(path)
    return (info["expert_msb_bytes"] + info["expert_lsb_bytes"]) // 2   # what --cache-budget 50% means


def test_logprobs_are_the_engines_log_softmax_in_both_endpoints_shapes(client, embedded):
    messages = [{"role": "user", "content": PROMPT}]
    chat = client.chat.completions.create(model="m", messages=messages, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=3)
    completion = client.completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)

    # the same engine in this process, with the server's flags and its two requests in its order
    with Model(embedded, n_ctx=2048, cache_budget=_half_budget(embedded), policy="dbsc") as model:
        def expected(prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
            tokens, rows = [], []
            model.reset()
            model.eval(prompt)
            for _ in range(n):
                rows.append(_log_softmax(model.logits()))
                tokens.append(int(np.argmax(rows[-1])))
                model.eval([tokens[-1]])
            return tokens, rows

        chat_tokens, chat_rows = expected(model.chat_tokens(messages), 4)
        plain_tokens, plain_rows = expected(model.tokenize(PROMPT), 4)
        chat_pieces = [model.token_bytes(t) for t in chat_tokens]
        plain_pieces = [model.token_bytes(t) for t in plain_tokens]

    entries = chat.choices[0].logprobs.content
    assert [bytes(e.bytes) for e in entries] == chat_pieces
    for entry, token, row in zip(entries, chat_tokens, chat_rows):
        assert entry.logprob == pytest.approx(row[token], abs=1e-5)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token   # greedy: the chosen token is the likeliest
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(sorted(row, reverse=True)[:3], abs=1e-5)

    logprobs = completion.choices[0].logprobs
    assert [t.encode() for t in logprobs.tokens] == plain_pieces
    assert logprobs.token_logprobs == pytest.approx([row[t] for t, row in zip(plain_tokens, plain_rows)], abs=1e-5)
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)


def test_json_schema_mode_gives_json_that_parses_and_fits_the_schema(client):
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}}}
    reply = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Who speaks first?"}], max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "speaker", "schema": schema}})
    value = json.loads(reply.choices[0].message.content)
    assert reply.choices[0].finish_reason == "stop"
    assert set(value) == {"name", "age"} and isinstance(value["name"], str) and isinstance(value["age"], int)


def test_json_object_mode_constrains_the_text_to_json(client):
    messages = [{"role": "user", "content": PROMPT}]
    free = client.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0)
    constrained = client.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0,
                                                 response_format={"type": "json_object"})
    assert not free.choices[0].message.content.lstrip().startswith("{")
    assert constrained.choices[0].message.content.startswith("{")


def test_frequency_and_presence_penalties_change_the_text_and_cut_repeats(client):
    def tokens(**penalties) -> list[str]:
        reply = client.completions.create(model="m", prompt=PROMPT, max_tokens=48, temperature=0, logprobs=0,
                                          **penalties)
        return reply.choices[0].logprobs.tokens

    plain = tokens()
    penalised = tokens(frequency_penalty=2.0, presence_penalty=1.0)
    assert penalised != plain
    assert len(set(penalised)) > len(set(plain))   # fewer repeats: more distinct tokens


def test_max_tokens_zero_evaluates_the_prompt_and_returns_no_tokens(server):
    status, body, _ = _post(server.base, "/v1/completions", {"prompt": PROMPT, "max_tokens": 0})
    assert status == 200
    assert body["choices"][0]["text"] == "" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] > 0


@pytest.mark.parametrize("extra, named", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"n": 2}, "n"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"modalities": ["audio"]}, "modalities"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
])
def test_what_the_server_does_not_honour_is_a_400_that_names_it(server, extra, named):
    status, body, _ = _post(server.base, "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra})
    assert status == 400
    assert body["error"]["message"].startswith(named)


def test_a_refused_tools_request_through_the_openai_client_names_tools(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="tools: not supported"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])


def test_a_part_that_is_not_text_is_refused_by_its_type(server):
    parts = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    status, body, _ = _post(server.base, "/v1/chat/completions", {"messages": [{"role": "user", "content": parts}]})
    assert status == 400 and "messages[0].content[1]" in body["error"]["message"]
    assert "image_url" in body["error"]["message"]


# -- abandoned work, the queue, shutdown ----------------------------------------------------------

def test_a_non_streaming_client_that_goes_away_frees_the_model_at_once(server):
    body = json.dumps({"prompt": PROMPT, "max_tokens": 2000, "temperature": 0}).encode()
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    time.sleep(0.3)   # the decode is under way
    raw.close()

    started = time.monotonic()
    status, reply, _ = _post(server.base, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1, "temperature": 0})
    assert status == 200 and reply["usage"]["completion_tokens"] == 1
    assert time.monotonic() - started < 1.0
    assert _metric(server.base, "slicemoe_completion_tokens_total") < 1000


def test_a_malformed_request_is_answered_at_once_while_the_model_is_busy(server):
    with _open_stream(server.base, 1500):
        started = time.monotonic()
        status, body, _ = _post(server.base, "/v1/completions", {"prompt": PROMPT, "max_tokens": -1})
        assert status == 400 and "max_tokens" in body["error"]["message"]
        assert time.monotonic() - started < 1.0


def test_past_max_queue_a_request_gets_503_with_retry_after(embedded, tmp_path):
    running = Server(embedded, tmp_path, "-c", "2048", "--max-queue", "1", *CACHE_FLAGS)
    try:
        stream = _open_stream(running.base, 1500)   # holds the model
        waiting: list = []
        waiter = threading.Thread(target=lambda: waiting.append(
            _post(running.base, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "temperature": 0}, 120)))
        waiter.start()
        deadline = time.monotonic() + 10
        while _metric(running.base, "slicemoe_queue_depth") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _metric(running.base, "slicemoe_queue_depth") == 1

        status, body, headers = _post(running.base, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
        assert status == 503 and "--max-queue" in body["error"]["message"]
        assert int(headers["Retry-After"]) >= 1

        stream.close()   # the streaming client goes away: the one in line gets the model
        waiter.join(60)
        assert waiting and waiting[0][0] == 200 and waiting[0][1]["usage"]["completion_tokens"] == 2
        assert _metric(running.base, "slicemoe_queue_rejected_total") == 1
    finally:
        assert running.stop() == 0


def test_a_request_that_waits_past_max_wait_gets_503(embedded, tmp_path):
    running = Server(embedded, tmp_path, "-c", "2048", "--max-wait", "0.5", *CACHE_FLAGS)
    try:
        with _open_stream(running.base, 1500):
            started = time.monotonic()
            status, body, headers = _post(running.base, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
            assert status == 503 and "--max-wait" in body["error"]["message"] and "Retry-After" in headers
            assert 0.5 <= time.monotonic() - started < 5
    finally:
        assert running.stop() == 0


def test_sigterm_ends_a_long_stream_with_a_finish_reason_and_exits_0_within_5_s(embedded, tmp_path):
    running = Server(embedded, tmp_path, "-c", "8192", *CACHE_FLAGS)
    stream = _open_stream(running.base, 5000)
    running.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()

    chunks, finish = 0, None
    for line in stream:
        if line.startswith(b"data: {"):
            chunks += 1
            choice = json.loads(line[6:])["choices"][0]
            finish = choice["finish_reason"] or finish
    assert finish == "cancelled"
    assert chunks < 20, "the stream must end within a few tokens of the signal"
    assert running.proc.wait(timeout=5) == 0
    assert time.monotonic() - signalled < 5
    running.stop()
    assert "stopped" in running.log


# -- parallel slots -------------------------------------------------------------------------------

PARALLEL_PROMPTS = ["ROMEO.\nBut soft, what light", "JULIET.\nO Romeo, Romeo", "HAMLET.\nTo be, or not",
                    "KING RICHARD.\nNow is the winter"]


def test_four_clients_on_parallel_4_each_get_their_single_client_stream(embedded, tmp_path):
    import openai

    # fixed precision: what a sequence computes does not depend on what else is in the pools
    running = Server(embedded, tmp_path, "-c", "4096", "--parallel", "4", "--cache-budget", "50%",
                     "--precision", "high")
    try:
        client = openai.OpenAI(base_url=running.base + "/v1", api_key="unused", timeout=120, max_retries=0)

        def stream(prompt: str) -> tuple[str, dict]:
            chunks = list(client.completions.create(model="m", prompt=prompt, max_tokens=48, temperature=0,
                                                    stream=True))
            return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].model_extra["slicemoe"]

        alone = [stream(prompt) for prompt in PARALLEL_PROMPTS]
        together: list = [None] * len(PARALLEL_PROMPTS)
        barrier = threading.Barrier(len(PARALLEL_PROMPTS))

        def client_thread(i: int) -> None:
            barrier.wait()
            together[i] = stream(PARALLEL_PROMPTS[i])

        threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(len(PARALLEL_PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [text for text, _ in together] == [text for text, _ in alone]
        assert not any(extra["cache"]["shared"] for _, extra in alone)
        assert sum(extra["cache"]["shared"] for _, extra in together) >= 2, "the requests must have shared batches"
        assert _metric(running.base, "slicemoe_slots") == 4
    finally:
        assert running.stop() == 0


def test_release_idle_hands_the_pools_back_and_the_next_request_answers_the_same(embedded, tmp_path):
    running = Server(embedded, tmp_path, "-c", "2048", "--cache-budget", "50%", "--policy", "lru8",
                     "--release-idle", "0.5")
    try:
        request = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
        status, first, _ = _post(running.base, "/v1/completions", request)
        assert status == 200
        held = rss_anon_bytes(running.proc.pid)
        deadline = time.monotonic() + 20
        while _metric(running.base, "slicemoe_cache_releases_total") < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _metric(running.base, "slicemoe_cache_releases_total") == 1   # once per idle period
        released = rss_anon_bytes(running.proc.pid)
        misses = _metric(running.base, 'slicemoe_cache_misses_total{slice="msb"}')
        status, again, _ = _post(running.base, "/v1/completions", request)
        assert status == 200 and again["choices"][0]["text"] == first["choices"][0]["text"]
        assert _metric(running.base, 'slicemoe_cache_misses_total{slice="msb"}') > misses   # read again
        assert held - released > 2**20   # the embedded model's pools at 50%: about 4 MiB
    finally:
        assert running.stop() == 0
