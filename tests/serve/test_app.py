"""The HTTP application in this process (uvicorn on a thread, the tiny stories260K model): a request that fails is
answered 500 and logged while the others go on; a server open beyond this machine without a key is warned about;
an adapter of another base is served only when allowed."""

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx  # the HTTP client that openai itself uses
import pytest
import torch
import uvicorn

from conftest import convert_in_this_process, shared_file
from lit_adapter.checkpoint import load_model, open_checkpoint, save_adapter
from lit_adapter.cli import run_cli
from lit_adapter.generate.adapters import load_generation_model, open_adapters
from lit_adapter.generate.engine import Engine
from lit_adapter.serve import cli
from lit_adapter.serve.app import build_app
from lit_adapter.serve.server import ModelServer
from tests.serve.test_server import free_port

FAILING_LENGTH = 13
"""Requests with this max_tokens fail in their prefill (a fault put in for the test)."""


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    checkpoint = tmp_path_factory.mktemp("stories") / "checkpoint"
    convert_in_this_process("--format", "llama2c", "--checkpoint_path", str(shared_file("stories260K/stories260K.bin")),
                            "--output_dir", str(checkpoint))
    return checkpoint


@pytest.fixture
def served(stories):
    """The app on a thread, its engine's prefill failing for requests of ``FAILING_LENGTH`` tokens."""
    base = open_checkpoint(stories)
    adapters = open_adapters([], base)
    engine = Engine(load_generation_model(base, adapters, torch.device("cpu"), "32-true"), 4, 256)
    prefill = engine.prefill

    def faulty_prefill(rows: list[int]) -> None:
        if any(engine.slots[slot].max_new_tokens == FAILING_LENGTH for slot in rows):
            raise RuntimeError("a fault put in by the test")
        prefill(rows)

    engine.prefill = faulty_prefill
    server = uvicorn.Server(uvicorn.Config(build_app(ModelServer(engine, base.tokenizer, adapters, "stories")),
                                           host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=30)


def complete(url: str, max_tokens: int) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=60,
                      json={"model": "stories", "prompt": "Once upon a time", "max_tokens": max_tokens})


def test_a_failing_request_is_500_and_logged_while_the_others_go_on(served, caplog):
    caplog.set_level(logging.INFO, logger="lit_adapter.serve")
    with ThreadPoolExecutor(3) as pool:
        good, bad, other = pool.map(lambda n: complete(served, n), [40, FAILING_LENGTH, 30])
    assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error", bad.text
    assert "a fault put in by the test" in bad.json()["error"]["message"]
    assert good.status_code == other.status_code == 200
    assert good.json()["usage"]["completion_tokens"] == 40 and other.json()["usage"]["completion_tokens"] == 30
    assert complete(served, 5).status_code == 200
    assert any("failed" in r.message and r.levelno == logging.ERROR for r in caplog.records)
    assert sum("finish=error" in r.message for r in caplog.records) == 1


def test_serving_beyond_this_machine_without_a_key_is_warned_about(stories, monkeypatch, caplog, capsys):
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kwargs: started.append((host, port)))
    cli.main(checkpoint_dir=stories, host="0.0.0.0", port=8011, max_batch=2)
    assert started == [("0.0.0.0", 8011)]
    assert "without --api_key" in caplog.text and "Serving checkpoint on http" in capsys.readouterr().err
    caplog.clear()
    cli.main(checkpoint_dir=stories, host="127.0.0.1", port=8011, max_batch=2)
    cli.main(checkpoint_dir=stories, host="0.0.0.0", port=8011, max_batch=2, api_key="k")
    assert "without --api_key" not in caplog.text
    assert cli.is_local("localhost") and cli.is_local("::1") and not cli.is_local("10.0.0.1")


def test_an_adapter_of_another_base_is_served_only_when_allowed(stories, tmp_path, monkeypatch, capsys):
    """An adapter whose recorded base fingerprint differs from the checkpoint's is refused in one line, and served
    with --allow_other_base true."""
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kwargs: started.append(port))
    model = load_model(stories, adapter=True)
    adapter = tmp_path / "other.safetensors"
    other = {**open_checkpoint(stories).fingerprint, "weights": "0" * 16}
    save_adapter(adapter, model, model.config, fingerprint=other)
    args = ["--checkpoint_dir", str(stories), "--adapter_path", str(adapter), "--port", "8012"]
    with pytest.raises(SystemExit) as exit:
        run_cli(cli.main, args, list_options=("--adapter_path",))
    assert exit.value.code == 1 and not started
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        f"error: {adapter} was trained on another base than {stories}: weights fingerprint {'0' * 16} vs ")
    run_cli(cli.main, [*args, "--allow_other_base", "true"], list_options=("--adapter_path",))
    assert started == [8012]
