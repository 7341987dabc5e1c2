"""The interfaces people already use, on the engine: the official OpenAI client against
`slicemoe serve`, llama-cpp-python's Llama on our library, `slicemoe chat` typed into a terminal,
and one model's cache shared by two contexts decoding on two threads.

Every front end must give what `slicemoe run` gives with the same cache flags: the same greedy text
and, on a fresh cache, the same counters.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import Server, run_json
from slicemoe_gguf import Model
from slicemoe_gguf._internals import NativeContext, NativeSampler
from slicemoe_gguf._native import lib
from slicemoe_gguf.embedded import embedded_gguf

PROMPT = "ROMEO.\nBut soft, what light"
CACHE_FLAGS = ("--cache-budget", "50%", "--policy", "dbsc")
N = 12


@pytest.fixture(scope="module")
def embedded():
    return embedded_gguf(progress=False)


@pytest.fixture(scope="module")
def reference(embedded):
    """`slicemoe run --json` on the prompt, as a completion and as a chat message."""
    plain = run_json("run", "-m", str(embedded), "-p", PROMPT, "-n", str(N), "-c", "512", "--json", *CACHE_FLAGS)
    chat = run_json("run", "-m", str(embedded), "-p", PROMPT, "-n", str(N), "-c", "512", "--json", "--chat", *CACHE_FLAGS)
    return plain, chat


@pytest.fixture
def server(embedded, tmp_path):
    """`slicemoe serve` on 127.0.0.1 with the cache flags; yields its base URL, stopped by SIGINT."""
    running = Server(embedded, tmp_path, "-c", "2048", *CACHE_FLAGS)
    yield running.base
    assert running.stop() == 0, "slicemoe serve must stop cleanly on Ctrl-C"


def _metrics(base: str) -> dict[str, float]:
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}


def test_the_openai_client_gets_what_slicemoe_run_gives(server, reference, embedded):
    import openai

    plain, chat = reference
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", timeout=120, max_retries=0)
    assert [m.id for m in client.models.list().data] == [embedded.name]

    completion = client.completions.create(model="any", prompt=PROMPT, max_tokens=N, temperature=0)
    assert completion.choices[0].text == plain["text"]
    assert completion.usage.completion_tokens == N
    own = completion.model_extra["slicemoe"]["cache"]
    # a fresh cache, the same flags: the same reads as the command line
    for name in ("hits", "misses", "flash_bytes", "loads", "evictions"):
        assert own[name] == plain["cache"][name], name

    before = _metrics(server)
    stream = client.chat.completions.create(model="any", messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=N, temperature=0, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat["text"]
    assert len(chunks) > 3, "the reply must arrive in pieces"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].model_extra["slicemoe"]["completion_tokens"] == N

    after = _metrics(server)
    assert after["slicemoe_requests_total"] == before["slicemoe_requests_total"] + 1 == 2
    assert after["slicemoe_completion_tokens_total"] == 2 * N
    hits = lambda m: m['slicemoe_cache_hits_total{slice="msb"}'] + m['slicemoe_cache_hits_total{slice="lsb"}']
    assert hits(after) > hits(before)
    assert after["slicemoe_flash_read_bytes_total"] >= before["slicemoe_flash_read_bytes_total"] > 0


def test_serve_answers_a_bad_request_with_a_400_and_keeps_serving(server):
    def post(path: str, body: bytes) -> tuple[int, dict]:
        request = urllib.request.Request(server + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    assert post("/v1/completions", b"not json")[0] == 400
    status, body = post("/v1/completions", json.dumps({"prompt": "x", "max_tokens": -1}).encode())
    assert status == 400 and "max_tokens" in body["error"]["message"]
    status, body = post("/v1/chat/completions", json.dumps({"messages": []}).encode())
    assert status == 400 and "messages" in body["error"]["message"]
    status, body = post("/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 2, "temperature": 0}).encode())
    assert status == 200 and body["usage"]["completion_tokens"] == 2


def _streaming_client(server: str, max_tokens: int) -> socket.socket:
    """A raw connection with a streamed completion under way (closing it is a client going away)."""
    host, port = server.removeprefix("http://").split(":")
    body = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}).encode()
    client = socket.create_connection((host, int(port)), timeout=60)
    client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert b"200 OK" in client.recv(4096)   # the stream has started
    return client


def test_a_client_that_goes_away_stops_its_decode_and_frees_the_server(server):
    _streaming_client(server, 2000).close()   # the client goes away mid-stream

    request = urllib.request.Request(server + "/v1/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"prompt": PROMPT, "max_tokens": 4, "temperature": 0}).encode())
    with urllib.request.urlopen(request, timeout=120) as answer:
        assert json.loads(answer.read())["usage"]["completion_tokens"] == 4
    # the abandoned request stopped early instead of decoding its 2000 tokens for nobody
    assert _metrics(server)["slicemoe_completion_tokens_total"] < 1000


def test_metrics_answer_while_a_request_streams(server):
    with _streaming_client(server, 1500):
        # answered during the stream: the streaming request is not counted yet (it counts when done)
        assert _metrics(server)["slicemoe_requests_total"] == 0


def _python(script: str, tmp_path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    # a process of its own: llama-cpp-python installs its log callback in the library it loads
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={**os.environ, **(env or {})})


def test_llama_cpp_python_runs_on_our_library_with_the_cache(embedded, reference, tmp_path):
    plain, _ = reference
    proc = _python(f"""
        import json
        from slicemoe_gguf.llama import Llama
        import llama_cpp
        llm = Llama({str(embedded)!r}, cache_budget="50%", policy="dbsc", n_ctx=512, n_threads=2)
        tokens = []
        for token in llm.generate(llm.tokenize({PROMPT!r}.encode()), temp=0.0):
            tokens.append(token)
            if len(tokens) == {N}:
                break
        from slicemoe_gguf._native import library_path
        cache = llm.cache_stats()
        llm.release_cache()   # going idle: the pools are emptied, the next tokens read them again
        llm.reset()
        again = []
        for token in llm.generate(llm.tokenize({PROMPT!r}.encode()), temp=0.0):
            again.append(token)
            if len(again) == {N}:
                break
        print(json.dumps({{"tokens": tokens, "cache": cache, "ours": str(library_path()),
                          "library": llama_cpp.llama_cpp._lib._name, "again": again,
                          "misses_again": llm.cache_stats()["misses"] - cache["misses"]}}))
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["library"]).resolve() == Path(out["ours"]).resolve()   # (SLICEMOE_LIB may name another build)
    assert out["tokens"] == plain["tokens"]
    assert out["cache"]["misses"] > 0 and out["cache"]["hits"] > 0
    assert out["cache"]["misses"] == plain["cache"]["misses"]
    assert out["again"] == out["tokens"] and out["misses_again"] > 0


def test_a_context_that_brings_its_own_eval_callback_runs_it_after_the_engine(embedded, reference, tmp_path):
    """llama.cpp's cb_eval (imatrix, debugging tools) is chained after the engine's, not refused:
    the caller's callback sees every node it asks for, and the decode is the engine's own."""
    plain, _ = reference
    proc = _python(f"""
        import ctypes, json
        import numpy as np
        from slicemoe_gguf.llama import Llama
        import llama_cpp
        llm = Llama({str(embedded)!r}, cache_budget="50%", policy="dbsc", n_ctx=512, n_threads=2)
        asked, observed = [0], [0]
        def callback(tensor, ask, user_data):
            if ask:
                asked[0] += 1
                return True          # every node: the graph stops at each one
            observed[0] += 1
            return True              # go on computing
        user_callback = llama_cpp.ggml_backend_sched_eval_callback(callback)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_threads, params.n_threads_batch = 512, 512, 2, 2
        params.cb_eval = user_callback
        ctx = llama_cpp.llama_init_from_model(llm.model, params)
        assert ctx, "a context with its own cb_eval must be created"
        tokens = list(llm.tokenize({PROMPT!r}.encode()))
        out = []
        batch = tokens
        for _ in range({N}):
            array = (llama_cpp.llama_token * len(batch))(*batch)
            assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(array, len(batch))) == 0
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(llm.n_vocab(),))
            batch = [int(np.argmax(logits))]
            out.append(batch[0])
        llama_cpp.llama_free(ctx)
        print(json.dumps({{"tokens": out, "asked": asked[0], "observed": observed[0], "cache": llm.cache_stats()}}))
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["tokens"] == plain["tokens"]
    assert out["observed"] > 0 and out["observed"] == out["asked"]
    assert out["cache"]["misses"] > 0


def test_a_logger_set_before_or_after_the_engine_gets_every_line_and_errors_keep_their_detail(embedded, tmp_path):
    """The engine chains to the logger it finds (llama-cpp-python installs one) instead of replacing
    it, and a failure of llama.cpp still comes back with what llama.cpp logged about it."""
    proc = _python(f"""
        import json
        import slicemoe_gguf.llama
        import llama_cpp
        from slicemoe_gguf import Model, SliceMoEError
        early, late = [], []
        @llama_cpp.llama_log_callback
        def early_logger(level, text, user_data):
            early.append(text.decode())
        llama_cpp.llama_log_set(early_logger, None)
        with Model({str(embedded)!r}):
            pass
        @llama_cpp.llama_log_callback
        def late_logger(level, text, user_data):
            late.append((level, text.decode()))
        llama_cpp.llama_log_set(late_logger, None)
        # a context of 2^30 tokens, with the address space capped so that its allocation fails on
        # any machine (with overcommit, an uncapped one may succeed and then fill the RAM)
        import resource
        with open("/proc/self/status") as status:
            mapped = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (mapped + (2 << 30), mapped + (2 << 30)))
        try:
            Model({str(embedded)!r}, n_ctx=1 << 30)
            error = ""
        except SliceMoEError as exc:
            error = str(exc)
        print(json.dumps({{"early": early, "late": late, "error": error}}))
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any("llama_model_loader" in line for line in out["early"])
    assert any("llama_model_loader" in text for _, text in out["late"])
    errors = [text for level, text in out["late"] if level == 4]   # GGML_LOG_LEVEL_ERROR
    assert errors, "the late logger gets llama.cpp's error lines"
    assert out["error"].startswith("llama.cpp could not create a context: ")
    assert errors[0].strip().split(":")[0] in out["error"], "the message carries llama.cpp's own detail"


@pytest.mark.parametrize("key, value, words", [
    ("slicemoe.policy", "nope", "is not one of dbsc"),
    ("slicemoe.cache_budget", "lots", "expected a size"),
    ("slicemoe.cache_budget", "1KB", "below the minimum"),
    ("slicemoe.high_threshold", "high", "expected a number"),
    ("slicemoe.high_threshold", 1.5, "high_threshold must be in [0, 1]"),
    ("slicemoe.budget", 1, "not a slicemoe setting"),
])
def test_a_bad_slicemoe_override_is_refused_with_its_reason(embedded, tmp_path, key, value, words):
    proc = _python(f"""
        from slicemoe_gguf.llama import Llama
        try:
            Llama({str(embedded)!r}, kv_overrides={{{key!r}: {value!r}}}, verbose=True)
        except ValueError:
            print("REFUSED")
    """, tmp_path)
    assert "REFUSED" in proc.stdout, proc.stderr
    assert words in proc.stderr
    name = key.replace("slicemoe.", "")
    assert name in proc.stderr or name.replace("_", " ") in proc.stderr, "the message names the setting"


def test_the_environment_configures_a_stock_load_and_a_bad_value_is_refused(embedded, tmp_path):
    script = f"""
        from slicemoe_gguf.llama import Llama, cache_stats
        import llama_cpp
        try:
            llm = llama_cpp.Llama({str(embedded)!r}, n_ctx=256, verbose=True)
        except ValueError:
            print("REFUSED")
        else:
            llm({PROMPT!r}, max_tokens=4, temperature=0)
            print("STATS", cache_stats(llm)["budget_bytes"])
    """
    good = _python(script, tmp_path, {"SLICEMOE_CACHE_BUDGET": "4MiB", "SLICEMOE_POLICY": "lru8"})
    assert f"STATS {4 * 2**20}" in good.stdout, good.stderr
    bad = _python(script, tmp_path, {"SLICEMOE_POLICY": "fastest"})
    assert "REFUSED" in bad.stdout and "SLICEMOE_POLICY: 'fastest' is not one of" in bad.stderr


def test_under_a_cache_a_batch_of_sequences_decodes_one_token_each_and_mixed_batches_are_refused(embedded, tmp_path):
    proc = _python(f"""
        from slicemoe_gguf.llama import Llama
        import llama_cpp
        llm = Llama({str(embedded)!r}, cache_budget="50%", n_ctx=256, verbose=True)
        params = llama_cpp.llama_context_default_params()
        # one KV stream for both sequences: llama.cpp then splits a batch in order, not sequence by sequence
        params.n_ctx, params.n_seq_max, params.kv_unified = 256, 2, True
        ctx = llama_cpp.llama_init_from_model(llm._model.model, params)

        def decode(rows):   # (token, position, sequence) per row
            batch = llama_cpp.llama_batch_init(len(rows), 0, 1)
            for i, (token, pos, seq) in enumerate(rows):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, True
                batch.seq_id[i][0] = seq
            batch.n_tokens = len(rows)
            return llama_cpp.llama_decode(ctx, batch)

        print("ONE_EACH", decode([(100, 0, 0), (101, 0, 1)]))              # a decode step of two sequences
        print("MIXED", decode([(102, 1, 0), (103, 2, 0), (104, 1, 1)]))    # a prompt beside a decode token
        print("AFTER", decode([(105, 1, 0), (106, 1, 1)]))
    """, tmp_path)
    assert "ONE_EACH 0" in proc.stdout, proc.stdout + proc.stderr
    assert "MIXED -3" in proc.stdout
    assert "the slice cache serves a prompt of one sequence, or one decode token of each sequence" in proc.stderr
    assert "AFTER 0" in proc.stdout, "the context stays usable"


def _decode(model: Model, prompt: list[int], n: int) -> list[int]:
    """Greedy decode on a context of its own (a second NativeContext of the model), on the calling thread."""
    native = lib()
    params = native.slicemoe_context_default_params()
    params.n_ctx, params.n_threads = 256, 1
    ctx = NativeContext(model._model, params)
    sampler = NativeSampler(model._model, native.slicemoe_sampling_default_params())
    ctx.eval(prompt)
    tokens = []
    for _ in range(n):
        tokens.append(ctx.sample(sampler))
        ctx.eval([tokens[-1]])
    return tokens


def test_two_contexts_of_one_model_decode_on_two_threads_as_each_does_alone(embedded):
    with Model(embedded, n_ctx=256, cache_budget=embedded.stat().st_size // 8) as model:
        prompts = [model.tokenize(PROMPT), model.tokenize("JULIET.\nO Romeo, Romeo")]
        alone = [_decode(model, p, 48) for p in prompts]
        together: list = [None, None]

        def work(i: int) -> None:
            together[i] = _decode(model, prompts[i], 48)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert together == alone
        assert alone[0] != alone[1]
        assert model.cache_stats()["misses"] > 0


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is installed by .ci/run")
def test_slicemoe_chat_typed_into_a_terminal(embedded, tmp_path):
    line = "But soft, what light"
    chat = run_json("run", "-m", str(embedded), "-p", line, "-n", str(N), "-c", "512", "--json", "--chat", *CACHE_FLAGS)
    session = f"slicemoe-chat-{os.getpid()}"
    command = (f"cd {tmp_path} && slicemoe chat -m {embedded} -n {N} -c 512 {' '.join(CACHE_FLAGS)}; "
               f"echo CHAT-EXITED-$?; sleep 30")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", command], check=True)

    def screen() -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", session, "-S", "-200"], capture_output=True,
                              text=True).stdout

    def wait_for(predicate, what: str) -> str:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = screen()
            if predicate(text):
                return text
            time.sleep(0.3)
        pytest.fail(f"no {what} on the screen:\n{screen()}")

    try:
        wait_for(lambda s: s.rstrip().endswith(">"), "prompt")
        subprocess.run(["tmux", "send-keys", "-t", session, "-l", line], check=True)
        subprocess.run(["tmux", "send-keys", "-t", session, "Enter"], check=True)
        first = wait_for(lambda s: s.count(f"[{N} tokens") == 1, "summary of the first reply")
        assert "MB/token from flash" in first and "hits" in first
        subprocess.run(["tmux", "send-keys", "-t", session, "-l", "And then?"], check=True)
        subprocess.run(["tmux", "send-keys", "-t", session, "Enter"], check=True)
        wait_for(lambda s: s.count("tokens, ") == 2, "summary of the second reply")
        subprocess.run(["tmux", "send-keys", "-t", session, "C-d"], check=True)
        wait_for(lambda s: "CHAT-EXITED-0" in s, "clean exit after Ctrl-D")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    # the first reply is what `slicemoe run --chat` gives, line by line
    reply_lines = [text.strip() for text in chat["text"].splitlines() if text.strip()]
    assert reply_lines and all(text in first for text in reply_lines), (chat["text"], first)
