"""The OpenAI-compatible server as its own process, with the official ``openai`` client: the real SmolLM2-135M-Instruct
and three adapters (two trained in its chat template, one in the Alpaca template) on its base. Greedy answers equal
generate/adapter.py's and each client's one-by-one answer however many run together; bad input gets OpenAI's error
shape and status while the server goes on; a client that leaves frees its row; SIGTERM lets running requests end."""

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx  # the HTTP client that openai itself uses
import openai
import pytest
import torch

from conftest import ROOT, convert_in_this_process, script_env
from lit_adapter.checkpoint import load_model, save_adapter
from lit_adapter.generate.cli import main as generate

API_KEY = "secret"
ADAPTERS = {"chat-a": "chat", "chat-b": "chat", "alpaca-c": "alpaca"}
QUESTIONS = ["Name a color.", "What is 2 + 2?", "Say hello.", "Give me a fruit.", "Who are you?", "Pick a number.",
             "Name an animal.", "What day comes after Monday?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """generate/serve.py as its own process; its log (stderr) goes to a file that tests read."""

    def __init__(self, log: Path, *args: str) -> None:
        self.port, self.log = free_port(), log
        self.process = subprocess.Popen([sys.executable, "generate/serve.py", "--port", str(self.port), *args],
                                        cwd=ROOT, env=script_env(), stdout=subprocess.DEVNULL,
                                        stderr=open(log, "w"))
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while not self.healthy():
            assert self.process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health").json()

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def request_lines(self) -> list[dict[str, str]]:
        """The server's log line of each request so far, as key=value pairs."""
        return [dict(re.findall(r"(\w+)=(\S+)", line)) for line in self.log.read_text().splitlines()
                if " request model=" in line]

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def adapters(smollm2_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Three adapters with random prompts and small random gates: answers that differ from the base's."""
    torch.manual_seed(0)  # the fresh prompts
    model = load_model(smollm2_checkpoint, adapter=True)
    generator = torch.Generator().manual_seed(0)
    paths = {}
    for name, style in ADAPTERS.items():
        for layer in model.adapted_layers():
            layer.adapter_gate.data = 0.05 * torch.randn(layer.adapter_gate.shape, generator=generator)
        paths[name] = tmp_path_factory.mktemp("adapters") / f"{name}.safetensors"
        save_adapter(paths[name], model, model.config, style)
    return paths


@pytest.fixture(scope="module")
def server(smollm2_checkpoint, adapters, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    running = Server(log, "--checkpoint_dir", str(smollm2_checkpoint), "--max_batch", "4", "--max_waiting", "4",
                     "--max_seq_length", "512", "--api_key", API_KEY, "--name", "smollm2",
                     "--adapter_path", *[f"{name}={path}" for name, path in adapters.items()])
    yield running
    assert running.stop() == -signal.SIGTERM  # after a graceful shutdown, the process ends by its signal (143)


def ask(client: openai.OpenAI, model: str, question: str, max_tokens: int = 16, **options) -> str:
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                            max_tokens=max_tokens, temperature=0, **options)
    return answer.choices[0].message.content


def test_models_are_the_base_and_every_adapter(server):
    assert [model.id for model in server.client().models.list()] == ["smollm2", "chat-a", "chat-b", "alpaca-c"]


def test_chat_and_completions_streamed_and_not(server):
    client = server.client()
    whole = client.chat.completions.create(model="chat-a", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                           max_tokens=5, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens == 5 and whole.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(
        model="chat-a", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=5, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-2].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    # a text completion continues the prompt as it is; a stop string ends it before the string
    text = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=12, temperature=0)
    streamed = list(client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=12,
                                              temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text and "Paris" in text.choices[0].text
    cut = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=12,
                                    temperature=0, stop=["Paris"])
    assert cut.choices[0].text == text.choices[0].text.split("Paris")[0] and cut.choices[0].finish_reason == "stop"
    # the instruct model's chat answer ends at its end-of-turn token
    done = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "What is 2 + 2?"}],
                                          max_tokens=50, temperature=0)
    assert done.choices[0].finish_reason == "stop" and "4" in done.choices[0].message.content


def test_greedy_answers_equal_generate_adapter_pys(server, smollm2_checkpoint, adapters):
    client = server.client()
    for name in ("chat-a", "alpaca-c"):
        expected = generate(checkpoint_dir=smollm2_checkpoint, adapter_path=[f"{n}={p}" for n, p in adapters.items()],
                            adapter=name, prompt=QUESTIONS[1], temperature=0, max_new_tokens=24)
        assert ask(client, name, QUESTIONS[1], max_tokens=24) == expected[0]
    base = generate(checkpoint_dir=smollm2_checkpoint, prompt="Once upon a time", temperature=0, max_new_tokens=16)
    completion = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=16, temperature=0)
    assert completion.choices[0].text == base[0]


def test_eight_concurrent_clients_get_their_one_by_one_answers(server):
    client = server.client()
    models = ["chat-a", "chat-b", "alpaca-c", "smollm2"] * 2
    one_by_one = [ask(client, model, question) for model, question in zip(models, QUESTIONS)]
    assert len(set(one_by_one)) == len(one_by_one)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda pair: ask(server.client(), *pair), zip(models, QUESTIONS)))
    assert together == one_by_one


def test_a_short_request_finishes_before_a_long_one_that_started_first(server):
    client, started = server.client(), threading.Event()
    before = len(server.request_lines())

    def long_request() -> None:  # counting goes on to its length
        for _ in client.completions.create(model="smollm2", prompt="1, 2, 3, 4, 5,", max_tokens=150, temperature=0,
                                           stream=True):
            started.set()

    thread = threading.Thread(target=long_request)
    thread.start()
    assert started.wait(timeout=60)
    ask(client, "alpaca-c", QUESTIONS[5], max_tokens=4)
    thread.join()
    lines = server.request_lines()[before:]
    short, long = (next(line for line in lines if line["model"] == model) for model in ("alpaca-c", "smollm2"))
    assert int(short["step"]) < int(long["step"]) and int(long["answer_tokens"]) > 100, lines
    assert lines[0]["model"] == "alpaca-c"  # the engine's log: the short one ended first


@pytest.mark.parametrize("body, status, words", [
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, ["model_not_found", "nope"]),
    ({"model": "chat-a", "messages": [{"role": "user", "content": "hi " * 600}]}, 400, ["context_length_exceeded"]),
    ({"model": "chat-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, ["max_tokens"]),
    ({"model": "chat-a", "messages": []}, 400, ["messages"]),
    ({"model": "chat-a"}, 400, ["messages", "required"]),
    ({"model": "chat-a", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, ["n"]),
    ({"model": "chat-a", "messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 1}, 400,
     ["frequency_penalty"]),
    ({"model": "chat-a", "messages": [{"role": "user", "content": "hi"}], "tools": []}, 400, ["tools"]),
    ('{"model": "chat-a", "messages": [', 400, ["JSON"]),
    ('{"model": "chat-a", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, ["parsing the body"]),
], ids=["unknown model", "too long", "max_tokens 0", "no messages", "missing messages", "n 2", "penalty", "tools",
        "malformed JSON", "JSON nested 100,000 deep"])
def test_bad_input_gets_its_status_and_the_server_goes_on(server, body, status, words):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(f"{server.url}/v1/chat/completions", content=content, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert all(word in json.dumps(error) for word in words), error
    assert ask(server.client(), "chat-a", QUESTIONS[0], max_tokens=2)


def test_a_key_is_needed_when_one_is_set(server):
    for key in ("wrong", "secret2"):
        with pytest.raises(openai.AuthenticationError, match="API key") as refused:
            server.client(api_key=key).models.list()
        assert refused.value.code == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401


def test_a_full_queue_is_429_and_clients_that_leave_free_their_rows(server):
    streams = []
    try:
        for number in range(8):  # 4 rows and 4 waiting: the server holds 8 (counting goes on to max_tokens)
            stream = httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                                  headers={"Authorization": f"Bearer {API_KEY}"},
                                  json={"model": "chat-a", "prompt": f"{number}, 1, 2, 3, 4, 5,", "max_tokens": 400,
                                        "stream": True})
            response = stream.__enter__()
            assert response.status_code == 200
            streams.append(stream)
        with pytest.raises(openai.RateLimitError):
            ask(server.client(), "chat-b", QUESTIONS[0])
        deadline = time.monotonic() + 30  # the engine takes waiting requests into free rows one prefill at a time
        while (health := server.health())["running"] < 4:
            assert time.monotonic() < deadline, health
            time.sleep(0.05)
        assert health == {**health, "running": 4, "waiting": 4}
    finally:
        for stream in streams:  # the clients disconnect mid-answer
            stream.__exit__(None, None, None)
    deadline = time.monotonic() + 30
    while (health := server.health())["running"] or health["waiting"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.1)
    assert ask(server.client(), "chat-b", QUESTIONS[0], max_tokens=2)
    assert sum(line["finish"] == "disconnected" for line in server.request_lines()) >= 4


def test_sigterm_lets_running_requests_end_then_exits(stories260k_bin, tmp_path):
    checkpoint = tmp_path / "stories"
    convert_in_this_process("--format", "llama2c", "--checkpoint_path", str(stories260k_bin), "--output_dir",
                            str(checkpoint))
    server = Server(tmp_path / "log", "--checkpoint_dir", str(checkpoint))
    chunks = []
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={"model": "stories", "prompt": "Once upon a time", "max_tokens": 300, "stream": True,
                            "temperature": 0}) as response:
        for line in response.iter_lines():
            if not chunks:
                server.process.send_signal(signal.SIGTERM)
            chunks.append(line)
    assert chunks[-2] == "data: [DONE]" or chunks[-1] == "data: [DONE]"
    finished = [json.loads(line[6:]) for line in chunks if line.startswith("data: {")]
    assert finished[-1]["choices"][0]["finish_reason"] == "length"
    assert server.process.wait(timeout=60) == -signal.SIGTERM
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health")
