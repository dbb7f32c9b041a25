"""The server's command line (``generate/serve.py`` runs ``main``): load a base model and its adapters, start the
batch engine, and serve the OpenAI API over HTTP with uvicorn."""

import ipaddress
import logging
import sys
from pathlib import Path
from typing import Optional

import torch

from lit_adapter.checkpoint import QUICK_START_CHECKPOINT, open_checkpoint
from lit_adapter.cli import check_seed
from lit_adapter.errors import UserError
from lit_adapter.generate.adapters import load_generation_model, open_adapters
from lit_adapter.generate.decode import GraphDecode, decode_one_token
from lit_adapter.generate.engine import Engine
from lit_adapter.precision import GenerationPrecision
from lit_adapter.serve.app import build_app
from lit_adapter.serve.server import ModelServer

DEFAULT_CONTEXT = 4096


def main(checkpoint_dir: Path = QUICK_START_CHECKPOINT, adapter_path: Optional[list[str]] = None,
         host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None, max_batch: int = 16,
         max_waiting: int = 64, max_seq_length: Optional[int] = None, prefill_chunk: int = 512,
         precision: Optional[GenerationPrecision] = None, cuda_graph: bool = True, name: Optional[str] = None,
         seed: int = 1234, allow_other_base: bool = False) -> None:
    """Serve a base model and its adapters over the OpenAI API (chat and text completions, streamed or not).

    Args:
        checkpoint_dir: Directory from scripts/convert_checkpoint.py (default: the quick start's SmolLM2).
        adapter_path: Adapter files (.safetensors) served together on the base, each as name=path or a path (named by
            its file name without ".safetensors"). A request's "model" names the adapter, or the base.
        host: The address to listen on (127.0.0.1: this machine only). Another address without --api_key is
            warned about: anyone who reaches it can use the model.
        port: The TCP port to listen on.
        api_key: Refuse requests without the header "Authorization: Bearer <api_key>" (default: no key).
        max_batch: Most requests answered together (the engine's rows); more wait for a free row.
        max_waiting: Most requests waiting for a row; more are answered 429 (retry later).
        max_seq_length: Most positions of one request, prompt and answer (default: the model's context, at most
            4096). It sizes the KV cache: max_batch x max_seq_length positions.
        prefill_chunk: Most prompt tokens prefilled per engine step, so running requests wait at most about a step
            for a new long prompt.
        precision: Weights and compute precision: bf16-true, 16-true or 32-true (default: bf16-true on a GPU
            that supports it, else 32-true), or a quantized base computed in bf16: int8-base, int4-base (Ampere or
            newer GPUs; the fastest to decode), nf4-base (these three need torchao; a training format, slow to
            decode) or fp8-base (Hopper GPUs). One adapter file works on every precision of its base.
        cuda_graph: On a GPU, replay the decoding step as CUDA graphs, one per batch and length bucket.
        name: The base model's name in requests and /v1/models (default: the checkpoint directory's name).
        seed: Seed of the random draws of requests that give no seed of their own.
        allow_other_base: Use adapters trained on another base of the same shape (their recorded fingerprint of
            the weights or tokenizer differs from checkpoint_dir's), which is otherwise refused.
    """
    import uvicorn

    check_options(port, max_batch, max_waiting, prefill_chunk, max_seq_length)
    check_seed(seed)
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = open_checkpoint(checkpoint_dir)
    adapters = open_adapters(adapter_path or [], base, allow_other_base)
    context = min(max_seq_length or min(base.config.block_size, DEFAULT_CONTEXT), base.config.block_size)
    model = load_generation_model(base, adapters, device, precision)
    decode_fn = GraphDecode() if cuda_graph and device.type == "cuda" else decode_one_token
    engine = Engine(model, max_batch, context, decode_fn, prefill_chunk=prefill_chunk, max_waiting=max_waiting)
    server = ModelServer(engine, base.tokenizer, adapters, name or Path(checkpoint_dir).resolve().name)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if api_key is None and not is_local(host):
        logging.getLogger("lit_adapter.serve").warning("listening on %s without --api_key: anyone who reaches this "
                                                       "address can use the model", host)
    print(f"Serving {', '.join(server.model_names())} on http://{host}:{port}/v1 ({max_batch} rows of {context} "
          "positions)", file=sys.stderr, flush=True)
    uvicorn.run(build_app(server, api_key), host=host, port=port, log_level="warning")


def check_options(port: int, max_batch: int, max_waiting: int, prefill_chunk: int,
                  max_seq_length: Optional[int]) -> None:
    if not 0 < port < 65536:
        raise UserError(f"--port must lie in [1, 65535], got {port}")
    if max_batch < 1 or max_waiting < 0 or prefill_chunk < 1 or (max_seq_length is not None and max_seq_length < 2):
        raise UserError("need --max_batch >= 1, --max_waiting >= 0, --prefill_chunk >= 1 and --max_seq_length >= 2")


def is_local(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (a loopback address or localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
