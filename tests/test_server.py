"""`jamba serve`: the real server (uvicorn on a free port, over the tiny checkpoints), driven by the official
`openai` client and by raw HTTP; the CLI and signals through the real `jamba serve` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from helpers import ROOT, jamba, running  # noqa: E402

from jamba_cli import server as srv  # noqa: E402

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be, or not to be"}]


@pytest.fixture(scope="module")
def base(small):
    with running(*small, max_body_size=64 * 1024) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)


def check_error(r: httpx.Response, status: int, code=None, param=None, says: str = "") -> dict:
    """An OpenAI-style error: the status, and exactly {"error": {message, type, param, code}}."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert error["code"] == code and error["param"] == param, error
    assert says in error["message"] and "Traceback" not in error["message"], error
    return error


def test_chat_and_completion_whole(client, small):
    _, tokenizer = small
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "tiny"
    assert r.created > 0 and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    ids = tokenizer.encode_chat(CHAT, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(ids) and r.usage.prompt_tokens_details.cached_tokens == 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the reply is what `generate` gives for the same prompt (greedy)
    from jamba_cli.generation import generate

    assert choice.message.content == generate(*small, ids, max_tokens=12, temperature=0)
    c = client.completions.create(model="tiny", prompt="To be, or not", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert c.id.startswith("cmpl-") and c.object == "text_completion" and c.choices[0].finish_reason == "length"
    assert c.usage.prompt_tokens == len(tokenizer.encode("To be, or not")) and c.usage.completion_tokens == 8
    assert c.choices[0].text == generate(*small, "To be, or not", max_tokens=8, temperature=0, ignore_eos=True)
    # the same prompt as token ids, and as an array of one string
    ids = tokenizer.encode("To be, or not")
    for prompt in (ids, ["To be, or not"]):
        again = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert again.choices[0].text == c.choices[0].text


def test_streaming_matches_whole_and_usage(client, small):
    _, tokenizer = small
    whole = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, seed=3, temperature=0.9)
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, seed=3, temperature=0.9,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    # completions stream, without usage: no usage chunk at all
    parts = list(client.completions.create(model="tiny", prompt="Now is the", max_tokens=6, stream=True,
                                           temperature=0, extra_body={"ignore_eos": True}))
    assert all(len(p.choices) == 1 for p in parts) and parts[-1].choices[0].finish_reason == "length"
    from jamba_cli.generation import generate

    assert "".join(p.choices[0].text for p in parts) == generate(*small, "Now is the", max_tokens=6,
                                                                 temperature=0, ignore_eos=True)


def test_raw_sse_framing(base):
    with httpx.stream("POST", base + "/v1/completions", json={"prompt": "Now", "max_tokens": 3, "stream": True,
                                                                "ignore_eos": True}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])


def test_stop_strings(client, small):
    free = client.completions.create(model="tiny", prompt="To be", max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(free) > 6, free
    stop = free[3:5]  # two characters inside the text: generation must end before them
    r = client.completions.create(model="tiny", prompt="To be", max_tokens=24, temperature=0, stop=[stop, "zzz"],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == free[:free.index(stop)]
    streamed = list(client.completions.create(model="tiny", prompt="To be", max_tokens=24, temperature=0,
                                              stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(p.choices[0].text for p in streamed) == free[:free.index(stop)]
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_seeds_reproducible(client):
    def reply(seed, temperature=1.0):
        return client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=20, seed=seed,
                                              temperature=temperature,
                                              extra_body={"ignore_eos": True}).choices[0].message.content

    a, b, c = reply(11), reply(11), reply(12)
    assert a == b and a != c
    assert reply(None, 0) == reply(None, 0)


def test_models_and_health(base, client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    r = httpx.get(base + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "running": 0, "waiting": 0}


def test_errors(base, client, small):
    post = lambda path, **kw: httpx.post(base + path, timeout=30, **kw)  # noqa: E731
    check_error(post("/v1/chat/completions", content=b"{not json"), 400, says="not valid JSON")
    check_error(post("/v1/chat/completions", content=b"[1, 2]"), 400, says="JSON object")
    check_error(post("/v1/chat/completions", json={"model": "gpt-4o", "messages": CHAT}), 404, "model_not_found",
                "model", "`gpt-4o` does not exist")
    check_error(post("/v1/chat/completions", json={"messages": CHAT, "n": 2}), 400, param="n", says="`n` must be 1")
    check_error(post("/v1/chat/completions", json={"messages": []}), 400, param="messages")
    check_error(post("/v1/chat/completions", json={"messages": [{"role": "function", "content": "x"}]}), 400,
                param="messages[0]", says="role")
    check_error(post("/v1/chat/completions", json={"messages": CHAT, "temperature": "hot"}), 400,
                param="temperature", says="must be a number")
    check_error(post("/v1/chat/completions", json={"messages": CHAT, "top_p": 1.5}), 400, param="top_p",
                says="out of range")
    check_error(post("/v1/chat/completions", json={"messages": CHAT, "frequency_penalty": 0.5}), 400,
                param="frequency_penalty", says="repetition_penalty")
    check_error(post("/v1/chat/completions", json={"messages": CHAT, "logprobs": True}), 400, param="logprobs")
    context = small[0].config.max_position_embeddings
    check_error(post("/v1/completions", json={"prompt": "hi", "max_tokens": context + 1}), 400, param="max_tokens",
                says=str(context))
    check_error(post("/v1/completions", json={"prompt": ["a", "b"]}), 400, param="prompt")
    check_error(post("/v1/completions", json={"prompt": []}), 400, param="prompt", says="empty")
    check_error(post("/v1/completions", json={}), 400, param="prompt")
    check_error(post("/v1/completions", json={"prompt": [5, 99999]}), 400, param="prompt", says="99999")
    check_error(post("/v1/completions", content=b"x" * (64 * 1024 + 1)), 413, "request_too_large")
    check_error(httpx.get(base + "/v1/nothing"), 404, "not_found", says="/v1/nothing")
    check_error(httpx.get(base + "/v1/chat/completions"), 405, says="GET")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=CHAT)


def test_too_long_prompt(small):
    with running(*small, context_size=32) as base:
        long = " ".join(["To be, or not to be"] * 20)
        error = check_error(httpx.post(base + "/v1/completions", json={"prompt": long}), 400,
                            "context_length_exceeded", "prompt")
        n = len(small[1].encode(long))
        assert error["message"] == f"the prompt needs {n} tokens but the context holds 32"
        error = check_error(httpx.post(base + "/v1/chat/completions",
                                       json={"messages": [{"role": "user", "content": long}]}),
                            400, "context_length_exceeded", "messages")
        assert "context holds 32" in error["message"]


def test_api_key(small):
    with running(*small, api_key="s3cret") as base:
        assert httpx.get(base + "/health").status_code == 200  # no key needed
        check_error(httpx.get(base + "/v1/models"), 401, "invalid_api_key", says="no API key")
        check_error(httpx.get(base + "/v1/models", headers={"Authorization": "Bearer nope"}), 401,
                    "invalid_api_key", says="not valid")
        check_error(httpx.get(base + "/nowhere"), 401, "invalid_api_key")  # unknown routes are behind the key
        ok = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "tiny"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="To", max_tokens=2).choices[0].finish_reason


def test_cors(small):
    with running(*small) as base:  # off by default: no CORS headers
        r = httpx.get(base + "/v1/models", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
    with running(*small, cors=["http://app.example"], api_key="k") as base:
        preflight = httpx.options(base + "/v1/chat/completions", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.get(base + "/v1/models", headers={"Origin": "http://other.example", "Authorization": "Bearer k"})
        assert "access-control-allow-origin" not in r.headers


def long_stream(base, **extra):
    """A streamed completion that would run for minutes (ignore_eos, a huge max_tokens)."""
    body = {"prompt": "To be", "max_tokens": 200_000, "stream": True, "ignore_eos": True, "temperature": 0, **extra}
    return httpx.stream("POST", base + "/v1/completions", json=body, timeout=60)


def wait_idle(base, timeout=5.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if httpx.get(base + "/health").json() == {"status": "ok", "running": 0, "waiting": 0}:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"the worker is still busy {timeout} s later: {httpx.get(base + '/health').json()}")


def test_disconnect_frees_the_worker(small):
    with running(*small) as base:
        with long_stream(base) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(20)]  # generation is under way
            assert any(line.startswith("data: {") for line in got)
            assert httpx.get(base + "/health").json()["running"] == 1
        # the connection is closed here: the generation stops at the next token
        assert wait_idle(base, 3.0) < 3.0
        began = time.monotonic()
        r = httpx.post(base + "/v1/completions", json={"prompt": "To", "max_tokens": 4}, timeout=30)
        assert r.status_code == 200 and time.monotonic() - began < 3.0
        # non-streamed too: a client that gives up waiting frees the slot
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/completions", json={"prompt": "To be", "max_tokens": 200_000, "ignore_eos": True},
                       timeout=1.0)
        assert wait_idle(base, 3.0) < 3.0


def test_queue_limit_gives_429(small):
    with running(*small, queue_size=1) as base:
        with long_stream(base) as first:  # runs
            lines = first.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)
            with ThreadPoolExecutor(1) as pool:  # waits in the queue (its headers come with its first chunk)
                second = pool.submit(httpx.post, base + "/v1/completions",
                                     json={"prompt": "To", "max_tokens": 2}, timeout=60)
                deadline = time.monotonic() + 5
                while httpx.get(base + "/health").json()["waiting"] != 1 and time.monotonic() < deadline:
                    time.sleep(0.02)
                check_error(httpx.post(base + "/v1/completions", json={"prompt": "To", "max_tokens": 2}), 429,
                            "queue_full", says="busy")
                first.close()  # the running one goes away: the waiting one is served
                assert second.result(timeout=10).status_code == 200


def test_concurrent_streams_get_their_own_answers(small):
    prompts = [("To be, or not", 1), ("Now is the winter", 2), ("Friends, Romans", 3), ("The slings", 4),
               ("whether 'tis nobler", 5), ("made glorious summer", 6), ("lend me your ears", 7), ("of York", 8)]
    with running(*small) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)

        def ask(prompt, seed, stream):
            messages = [{"role": "user", "content": prompt}]
            kw = dict(model="tiny", messages=messages, max_tokens=24, seed=seed, temperature=1.0)
            if not stream:
                return client.chat.completions.create(**kw).choices[0].message.content
            return "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(**kw, stream=True) if c.choices)

        solo = [ask(p, s, False) for p, s in prompts]
        assert len(set(solo)) == len(solo)  # distinct answers, so a mix-up would show
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(lambda ps: ask(*ps, True), prompts))
        assert together == solo


# -- the `jamba serve` process --

@contextmanager
def serve_process(env, *args):
    proc = subprocess.Popen(jamba("serve", "--port", "0", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=ROOT, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("serving "):
                break
        assert lines and lines[-1].startswith("serving "), "".join(lines)
        yield proc, lines, lines[-1].split(" on ")[1].strip()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_serve_process_and_sigterm(env, ckpt):
    with serve_process(env, "-m", ckpt, "--stats") as (proc, lines, url):
        name = os.path.basename(ckpt)
        assert lines[-1] == f"serving {name} on {url}\n" and url.startswith("http://127.0.0.1:")
        assert not any("warning" in line for line in lines)
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        assert client.models.list().data[0].id == name
        r = client.chat.completions.create(model=name, messages=CHAT, max_tokens=4)
        assert r.usage.completion_tokens >= 1
        # a stream in flight does not hold the exit: it ends with an error event, and the process with 0
        with long_stream(url.removesuffix("/v1")) as stream:
            lines_ = stream.iter_lines()
            next(lines_)
            began = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rest = list(lines_)
        assert proc.wait(timeout=10) == 0 and time.monotonic() - began < 10
        events = [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
        assert events[-1] == {"error": {"message": "the server is shutting down", "type": "server_error",
                                        "param": None, "code": "shutting_down"}}
        assert [line for line in rest if line][-1] == "data: [DONE]"
        out, err = proc.communicate()
        assert out == "" and "Traceback" not in err
        # --stats: a line per request (the chat, then the stream cut by the signal)
        import re

        finishes = re.findall(r"^prompt \d+ tok .* first token .* generated \d+ tok .* finish (\w+)$", err, re.M)
        assert finishes == [r.choices[0].finish_reason, "interrupted"], err


@pytest.mark.slow
def test_serve_warns_on_open_host_without_key(env, ckpt):
    with serve_process(env, "-m", ckpt, "--host", "0.0.0.0") as (proc, lines, url):
        warnings = [line for line in lines if line.startswith("warning:")]
        assert warnings == ["warning: --host 0.0.0.0 lets anyone who reaches this port use the model; set "
                            "--api-key (or JAMBA_API_KEY)\n"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    with serve_process({**env, "JAMBA_API_KEY": "k"}, "-m", ckpt, "--host", "0.0.0.0") as (proc, lines, url):
        assert not any(line.startswith("warning:") for line in lines)
        assert httpx.get(url + "/models").status_code == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_serve_port_in_use(env, ckpt):
    sock = srv.listen("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        r = subprocess.run(jamba("serve", "-m", ckpt, "--port", port), capture_output=True, text=True, env=env,
                           cwd=ROOT, timeout=60)
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}: ") and r.stderr.count("\n") == 1
    finally:
        sock.close()


def test_serve_bad_size_is_a_usage_error(env, ckpt):
    r = subprocess.run(jamba("serve", "-m", ckpt, "--cache-budget", "lots"), capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and r.stderr == "error: --cache-budget 'lots' is not a size like 4GiB or 500MB\n"


@pytest.mark.slow
def test_run_does_not_import_the_server(env, ckpt):
    from helpers import probe

    r = probe(env, "run", "-m", ckpt, "-n", "2", "To be")
    imported = {m.split(".")[0] for m in r.stderr.rsplit("HEAVY=", 1)[1].split(",")}
    assert "torch" in imported and not imported & {"starlette", "uvicorn"}, r.stderr


# -- prompts: message boundaries; failures of ours --

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be, or not"},
            {"role": "assistant", "content": "that is the question"}, {"role": "user", "content": "Now is the winter"}]


@pytest.mark.parametrize("template", [None, "jamba_1_7_chat_template.jinja", "jamba_reasoning_3b_chat_template.jinja"])
def test_message_boundaries(tokenizer_dir, tmp_path, template):
    """Each boundary is where a message ends: the ids of the messages up to it are the prompt's first ids.
    Where a template renders a shorter conversation differently (the 3B one, with a user message last), that
    message gets none; with the built-in format and the 1.7 template every message gets one."""
    import shutil

    from conftest import shared_data

    from jamba_cli.openai_api import chat_prompt
    from jamba_cli.tokenizer import load_tokenizer

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, tmp_path / name)
    if template is not None:
        shutil.copy(shared_data(template), tmp_path / "chat_template.jinja")
    tokenizer = load_tokenizer(tmp_path)
    ids, boundaries, _ = chat_prompt(tokenizer, MESSAGES, 100_000)
    assert ids == tokenizer.encode_chat(MESSAGES, add_generation_prompt=True)
    ends = {len(p) for p in (tokenizer.encode_chat(MESSAGES[:k]) for k in range(1, 5)) if ids[:len(p)] == p}
    assert boundaries and set(boundaries) <= ends and boundaries == sorted(boundaries)
    if template != "jamba_reasoning_3b_chat_template.jinja":
        assert len(boundaries) == 4


def test_internal_error_is_a_500_without_traceback(small, tmp_path, capfd, monkeypatch):
    """A model given a tokenizer whose ids run past its embedding (the loader refuses that pair; the library
    call does not): the engine fails, the client gets a generic 500, stderr one line, and the worker lives on."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from jamba_cli.tokenizer import load_tokenizer

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "small": 5, "big": 5000}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"unk_token": "<unk>"}))
    model, _ = small
    monkeypatch.delenv("JAMBA_DEBUG", raising=False)
    with running(model, load_tokenizer(tmp_path)) as base:
        capfd.readouterr()
        r = httpx.post(base + "/v1/completions", json={"prompt": "big", "max_tokens": 2}, timeout=30)
        error = check_error(r, 500)
        assert error == {"message": "the server failed to complete the request", "type": "server_error",
                         "param": None, "code": None}
        err = capfd.readouterr().err
        assert err.startswith("error: a request failed: IndexError: ") and err.count("\n") == 1, err
        assert "Traceback" not in err and "JAMBA_DEBUG=1" in err
        ok = httpx.post(base + "/v1/completions", json={"prompt": "small", "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200
        with long_stream(base, prompt="small small big") as stream:  # streamed: the status comes with the error
            assert stream.status_code == 500
        monkeypatch.setenv("JAMBA_DEBUG", "1")
        check_error(httpx.post(base + "/v1/completions", json={"prompt": "big"}, timeout=30), 500)
        assert "Traceback" in capfd.readouterr().err
