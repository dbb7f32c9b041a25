"""Serving speed: generate/serve.py as its own process, driven by async HTTP clients, beside generate/adapter.py.

    python bench/serve_throughput.py --checkpoint_dir checkpoints/random-7b          # on a GPU
    python bench/serve_throughput.py --checkpoint_dir DIR --new_tokens 16 --rates 2,4 --poisson_requests 6  # CPU smoke

The checkpoint's model serves ``adapters`` random adapters (random prompts, small random gates). Measured, each as
the median of ``runs``: (1) generate/adapter.py at batch 1 on the same prompt and adapter (its own process, its
default decoding path): tokens/s; (2) one client, requests one after another: tokens/s from sending to the last
token, and the time to the first token; (3) ``adapters`` clients at once, each with its own adapter: total tokens/s;
(4) Poisson arrivals at each of ``rates`` (requests/s), random adapters: tokens/s and the latency and time to first
token, p50 and p99. Prompts are ``prompt_tokens`` long, answers ``new_tokens`` (greedy). The table comes last.
"""

import asyncio
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_adapter.adapter import AdapterConfig, AdapterLLaMA, adapter_state_dict  # noqa: E402
from lit_adapter.checkpoint import load_config, save_adapter  # noqa: E402
from lit_adapter.cli import run_cli  # noqa: E402
from lit_adapter.tokenizer import Tokenizer  # noqa: E402

SPEED = re.compile(r"(\d+) tokens in (\d+\.\d+) s: (\d+\.\d) tokens/s")


def random_adapters(checkpoint_dir: Path, n: int, directory: Path) -> list[str]:
    """``n`` adapter files for the checkpoint's base, as name=path."""
    config = AdapterConfig.of(load_config(checkpoint_dir))
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in adapter_state_dict(AdapterLLaMA(config)).items()}
    specs = []
    for i in range(n):
        generator = torch.Generator().manual_seed(i)
        weights = {name: torch.randn(shape, generator=generator) * (0.1 if name.endswith("gate") else 1.0)
                   for name, shape in shapes.items()}
        save_adapter(directory / f"a{i}.safetensors", None, config, "plain", state_dict=weights)
        specs.append(f"a{i}={directory / f'a{i}.safetensors'}")
    return specs


def prompt_of(tokenizer: Tokenizer, tokens: int) -> str:
    """A text that encodes to exactly ``tokens`` ids (BOS included where the tokenizer adds one)."""
    for words in range(tokens + 1):
        text = "Tell me a long story about the sea" + " and the sea" * words
        if tokenizer.encode(text).numel() >= tokens:
            ids = tokenizer.encode(text)[:tokens].tolist()
            return tokenizer.decode([i for i in ids if i != tokenizer.bos_id])
    raise ValueError(f"no prompt of {tokens} tokens")


def cli_speed(checkpoint_dir: Path, adapter: str, prompt: str, new_tokens: int, runs: int) -> list[float]:
    """generate/adapter.py's tokens/s for ``runs`` samples of the prompt, in its own process."""
    result = subprocess.run([sys.executable, "generate/adapter.py", "--checkpoint_dir", str(checkpoint_dir),
                             "--adapter_path", adapter, "--prompt", prompt, "--prompt_style", "plain",
                             "--temperature", "0", "--max_new_tokens", str(new_tokens), "--num_samples",
                             str(runs + 1)], cwd=ROOT, capture_output=True, text=True, check=True)
    speeds = [float(m[3]) for line in result.stderr.splitlines() if (m := SPEED.fullmatch(line))]
    return speeds[1:]  # the first sample warms up


class Client:
    """Streams completions from the server and times them."""

    def __init__(self, url: str, prompt: str, new_tokens: int) -> None:
        self.url, self.prompt, self.new_tokens = url, prompt, new_tokens

    async def complete(self, session: aiohttp.ClientSession, model: str) -> dict[str, float]:
        """One streamed greedy completion: seconds to the first token and in all, and its tokens."""
        body = {"model": model, "prompt": self.prompt, "max_tokens": self.new_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        sent, first, tokens = time.perf_counter(), None, 0
        async with session.post(f"{self.url}/v1/completions", json=body) as response:
            assert response.status == 200, await response.text()
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif first is None and chunk["choices"][0]["text"]:
                    first = time.perf_counter() - sent
        return {"first": first or float("nan"), "total": time.perf_counter() - sent, "tokens": tokens}


async def one_client(client: Client, model: str, runs: int) -> list[dict[str, float]]:
    async with aiohttp.ClientSession() as session:
        return [await client.complete(session, model) for _ in range(runs)]


async def together(client: Client, models: list[str]) -> float:
    """Total tokens/s of one request per model, all sent at once."""
    async with aiohttp.ClientSession() as session:
        start = time.perf_counter()
        results = await asyncio.gather(*(client.complete(session, model) for model in models))
        return sum(r["tokens"] for r in results) / (time.perf_counter() - start)


async def poisson(client: Client, models: list[str], rate: float, requests: int, seed: int) -> dict[str, float]:
    """Requests arriving as a Poisson process of ``rate`` per second, each for a random model."""
    rng = random.Random(seed)
    async with aiohttp.ClientSession() as session:
        start, tasks = time.perf_counter(), []
        for _ in range(requests):
            tasks.append(asyncio.ensure_future(client.complete(session, rng.choice(models))))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    latency, first = sorted(r["total"] for r in results), sorted(r["first"] for r in results)
    return {"tokens_per_s": sum(r["tokens"] for r in results) / elapsed, "p50": percentile(latency, 50),
            "p99": percentile(latency, 99), "first_p50": percentile(first, 50), "first_p99": percentile(first, 99)}


def percentile(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, max(0, round(p / 100 * len(values)) - 1))]


def start_server(checkpoint_dir: Path, adapters: list[str], port: int, max_batch: int, log: Path) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "generate/serve.py", "--checkpoint_dir", str(checkpoint_dir),
                               "--port", str(port), "--max_batch", str(max_batch), "--max_waiting", "1024",
                               "--max_seq_length", "512", "--adapter_path", *adapters], cwd=ROOT,
                              stderr=open(log, "w"), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while "Serving" not in log.read_text() or not port_open(port):
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return server


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def main(checkpoint_dir: Path, adapters: int = 16, prompt_tokens: int = 32, new_tokens: int = 128, runs: int = 5,
         rates: str = "2,4,8,16,32", poisson_requests: int = 64, port: int = 8123) -> None:
    """Measure the server against generate/adapter.py (see the module's docstring).

    Args:
        checkpoint_dir: A converted checkpoint (bench/random_checkpoint.py makes a random one of a preset).
        adapters: Random adapters served, and clients sent at once.
        prompt_tokens: Tokens of every prompt.
        new_tokens: Tokens of every answer (greedy; an answer ends early only at an end token).
        runs: Repetitions of the batch-1 and the all-at-once measurements (their medians are reported).
        rates: Poisson arrival rates (requests per second), comma-separated.
        poisson_requests: Requests sent at each rate.
        port: The server's port on 127.0.0.1.
    """
    tokenizer = Tokenizer(checkpoint_dir)
    prompt = prompt_of(tokenizer, prompt_tokens)
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    specs = random_adapters(checkpoint_dir, adapters, work)
    names = [spec.split("=")[0] for spec in specs]
    cli = cli_speed(checkpoint_dir, specs[0], prompt, new_tokens, runs)
    print(f"generate/adapter.py batch 1: {cli}", flush=True)
    log = work / "server.log"
    server = start_server(checkpoint_dir, specs, port, adapters, log)
    client = Client(f"http://127.0.0.1:{port}", prompt, new_tokens)
    try:
        asyncio.run(together(client, names))  # warm-up: a graph for every batch size on the way to all rows
        single = asyncio.run(one_client(client, names[0], runs + 1))[1:]
        all_at_once = [asyncio.run(together(client, names)) for _ in range(runs)]
        arrivals = {float(r): asyncio.run(poisson(client, names, float(r), poisson_requests, seed=i))
                    for i, r in enumerate(rates.split(","))}
    finally:
        server.terminate()
        server.wait()
    report(cli, single, all_at_once, arrivals, new_tokens)
    print(f"(server log: {log})")


def report(cli: list[float], single: list[dict], all_at_once: list[float], arrivals: dict, new_tokens: int) -> None:
    one = statistics.median(r["tokens"] / r["total"] for r in single)
    base = statistics.median(cli)
    together_speed = statistics.median(all_at_once)
    print("\n| measurement | value |\n|---|---|")
    print(f"| generate/adapter.py batch 1, tokens/s (median of {len(cli)}) | {base:.1f} |")
    print(f"| one client, tokens/s (median of {len(single)}) | {one:.1f} ({one / base:.1%} of generate/adapter.py) |")
    print(f"| one client, time to first token p50 | {statistics.median(r['first'] for r in single) * 1e3:.1f} ms |")
    print(f"| all at once, tokens/s (median of {len(all_at_once)}) | {together_speed:.1f} ({together_speed / one:.1f}x "
          "one client) |")
    print("\n| Poisson rate (requests/s) | tokens/s | latency p50 | latency p99 | first token p50 | first token p99 |")
    print("|---|---|---|---|---|---|")
    for rate, r in arrivals.items():
        print(f"| {rate:g} | {r['tokens_per_s']:.1f} | {r['p50']:.2f} s | {r['p99']:.2f} s | "
              f"{r['first_p50'] * 1e3:.0f} ms | {r['first_p99'] * 1e3:.0f} ms |")


if __name__ == "__main__":
    run_cli(main)
