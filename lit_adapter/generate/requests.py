"""Requests to answer: a prompt, the adapter that answers it (by name; none: the base model), its length and
sampling options; read from a JSON-lines file, checked, and answered back as JSON lines."""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from lit_adapter.errors import UserError
from lit_adapter.files import BAD_JSON, atomic_path, json_problem, read_text
from lit_adapter.generate.engine import Sampling


@dataclass(frozen=True)
class Request:
    """One prompt to answer, the adapter (by name; None: the base model) and its sampling options."""

    prompt: str
    adapter: Optional[str] = None
    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: Optional[int] = 200
    top_p: float = 1.0

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.top_p)


def check_request(request: Request) -> None:
    """Raise a one-line ``UserError`` for options generation cannot use."""
    whole = {"max_new_tokens": request.max_new_tokens, "top_k": 1 if request.top_k is None else request.top_k}
    real = {"temperature": request.temperature, "top_p": request.top_p}
    wrong = [k for k, v in whole.items() if not isinstance(v, int) or isinstance(v, bool)]
    wrong += [k for k, v in real.items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
    if not isinstance(request.prompt, str) or not isinstance(request.adapter, (str, type(None))):
        raise UserError("prompt must be a string, adapter a string or null")
    if wrong:
        raise UserError(f"{', '.join(wrong)} must be numbers (max_new_tokens and top_k whole numbers)")
    if request.max_new_tokens < 1:
        raise UserError("max_new_tokens must be at least 1")
    if not 0 <= request.temperature < math.inf or not 0 < request.top_p <= 1 or \
            (request.top_k is not None and request.top_k < 1):
        raise UserError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 1")


def read_requests(path: Path, defaults: Request) -> list[Request]:
    """The requests of a JSON-lines file (``{"prompt": ..., "adapter": ..., "temperature": ...}`` per line).

    Options a line leaves out come from ``defaults`` (the command line's).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"requests file {path} not found")
    requests = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip():
            requests.append(parse_request(line, defaults, f"{path} line {number}"))
    if not requests:
        raise UserError(f"{path} holds no requests (one JSON object per line)")
    return requests


def parse_request(line: str, defaults: Request, where: str) -> Request:
    try:
        fields = json.loads(line)
    except BAD_JSON as err:
        raise UserError(f"{where} is not JSON: {json_problem(err)}") from None
    if not isinstance(fields, dict) or "prompt" not in fields:
        raise UserError(f"{where}: expected a JSON object with a \"prompt\"")
    unknown = sorted(set(fields) - set(asdict(defaults)))
    if unknown:
        raise UserError(f"{where}: unknown keys {unknown}; known: {', '.join(asdict(defaults))}")
    request = Request(**{**asdict(defaults), **fields})
    try:
        check_request(request)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    return request


def write_results(path: Optional[Path], requests: Sequence[Request], responses: Sequence[str],
                  num_tokens: Sequence[int]) -> list[str]:
    """One JSON line per request (its fields, ``response`` and ``num_tokens``), in the requests' order, to ``path``."""
    lines = [json.dumps({**asdict(r), "response": text, "num_tokens": n}, ensure_ascii=False)
             for r, text, n in zip(requests, responses, num_tokens)]
    if path is not None:
        with atomic_path(Path(path)) as tmp:
            tmp.write_text("".join(line + "\n" for line in lines))
    return lines
