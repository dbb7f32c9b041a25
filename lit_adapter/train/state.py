"""A run's state on disk: ``out_dir/step-NNNNNN/`` holds the adapter, the hyperparameters and the training state to
resume from (adapter, optimizer, schedule, data position, random state); ``out_dir`` holds the final adapter and
hyperparameters and the lock of the live run, which keeps one run per folder. Also the reading of a Trainer
``.ckpt``'s adapter, and its extraction to an adapter file (``scripts/extract_adapter.py``)."""

import fcntl
import re
import uuid
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from lit_adapter.adapter import AdapterConfig, AdapterLLaMA, is_adapter_param
from lit_adapter.checkpoint import ADAPTER_FILE, check_state_dict, save_adapter
from lit_adapter.cli import process_rank
from lit_adapter.errors import UserError, message_line
from lit_adapter.files import (atomic_path, check_not_an_input, preview_keys, read_yaml_mapping, shapes_of,
                               torch_load, write_yaml)
from lit_adapter.prompts import get_style

STATE_FILE = "training_state.pt"
HPARAMS_FILE = "hyperparameters.yaml"
STEP_DIR = re.compile(r"step-(\d+)$")
RUN_LOCK = ".run.lock"
VERSION_DIR = re.compile(r"version_\d+")


def adapter_and_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded, CPU) adapter weights and optimizer state, whatever the strategy."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def save_training_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: Any, progress: dict, config: AdapterConfig, hparams: dict, is_rank_zero: bool,
                        prompt_style: str, name: str, fingerprint: dict[str, str]) -> None:
    """Write ``adapter.safetensors``, ``hyperparameters.yaml`` and last ``training_state.pt`` (each atomically);
    ``fingerprint`` is the base's (``BaseCheckpoint.fingerprint``)."""
    adapter, optimizer_state = adapter_and_optimizer_state(model, optimizer)
    if not is_rank_zero:
        return
    directory.mkdir(parents=True, exist_ok=True)
    save_adapter(directory / ADAPTER_FILE, model, config, prompt_style, state_dict=adapter, name=name,
                 fingerprint=fingerprint)
    save_hparams(directory, hparams)
    state = {
        "adapter": adapter,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "progress": progress,
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "model_config": asdict(config),
        "prompt_style": prompt_style,
        "name": name,
        "base_fingerprint": fingerprint,
    }
    with atomic_path(directory / STATE_FILE) as tmp:
        torch.save(state, tmp)


def save_hparams(directory: Path, hparams: dict) -> None:
    write_yaml(directory / HPARAMS_FILE, hparams)


def load_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        data_layout: dict) -> dict:
    """Restore adapter, optimizer, scheduler and RNG from a training state file; return its progress.

    The state's data position counts optimizer steps, so it only means the same with the same ``data_layout``
    (global batch size, seed); another one is refused. Devices and micro-batches may change.
    """
    state = read_training_state(path)
    saved_layout = {key: state["progress"].get(key) for key in data_layout}
    if saved_layout != data_layout:
        raise UserError(f"{path} was written with {saved_layout}, but this run has {data_layout}: resume with "
                        "the same --train.global_batch_size and --seed")
    options = StateDictOptions(full_state_dict=True, strict=False)  # the frozen base is not in the state
    try:
        keys = set_model_state_dict(model, state["adapter"], options=options)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    except (KeyError, RuntimeError, ValueError) as err:
        raise UserError(f"{path} does not fit this model and optimizer: {message_line(err)}") from None
    missing = [key for key in keys.missing_keys if is_adapter_param(key)]
    if missing or keys.unexpected_keys:
        raise UserError(f"{path} does not fit this model's adapter: missing {missing[:3]}, "
                        f"unexpected {keys.unexpected_keys[:3]}")
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["progress"]


STATE_KEYS = {"adapter", "optimizer", "scheduler", "progress", "rng", "model_config"}


def read_training_state(path: Path) -> dict:
    """A training state of finetune/adapter.py; any other file is refused in one line."""
    state = torch_load(path)
    if not isinstance(state, dict) or not STATE_KEYS <= state.keys():
        missing = sorted(STATE_KEYS - state.keys()) if isinstance(state, dict) else "a dict of its parts"
        raise UserError(f"{path} is not a training state of finetune/adapter.py (it lacks {missing})")
    return state


TRAINER_CHECKPOINT_KEYS = {"state_dict", "model_config", "loops"}
"""A Lightning checkpoint of finetune/adapter_trainer.py: Lightning's keys, and the adapter's model config and prompt
style that ``AdapterModule.on_save_checkpoint`` adds (its state_dict holds only the adapter)."""


def is_trainer_checkpoint(checkpoint: Any) -> bool:
    return isinstance(checkpoint, dict) and TRAINER_CHECKPOINT_KEYS <= checkpoint.keys()


@dataclass(frozen=True)
class SavedAdapter:
    """The adapter of a training state or a Trainer checkpoint: its weights, shape, prompt style, name and base
    fingerprint (None where the state is older than these)."""

    weights: dict[str, torch.Tensor]
    config: AdapterConfig
    prompt_style: str
    name: Optional[str]
    fingerprint: Optional[dict[str, str]]


def read_state_adapter(path: Path) -> SavedAdapter:
    """The adapter of a training state of finetune/adapter.py (its training_state.pt) or of a checkpoint of
    finetune/adapter_trainer.py (states from before prompt styles were recorded: the legacy style; from before
    names were: none)."""
    state = torch_load(path)
    if is_trainer_checkpoint(state):
        weights = {key.removeprefix("model."): value for key, value in state["state_dict"].items()}
        name = (state.get("run_options") or {}).get("model", {}).get("name")
    elif isinstance(state, dict) and {"adapter", "model_config"} <= state.keys():
        weights, name = state["adapter"], state.get("name")
    else:
        raise UserError(f"{path} is not a training state of finetune/adapter.py nor a checkpoint of "
                        "finetune/adapter_trainer.py (it has no adapter weights and model config)")
    try:
        return SavedAdapter(weights, AdapterConfig(**state["model_config"]), get_style(state.get("prompt_style")).name,
                            name, state.get("base_fingerprint"))
    except (TypeError, UserError) as err:
        raise UserError(f"{path} holds an unreadable model config or prompt style: {err}") from None


def find_resume_state(resume: Union[bool, str, Path, None], out_dir: Path) -> Optional[Path]:
    """The training state to resume from: a file or step directory, or with "auto" the latest in ``out_dir``."""
    if resume in (None, False):
        return None
    if resume in ("auto", True):
        steps = sorted((int(m.group(1)), p) for p in out_dir.glob("step-*")
                       if (m := STEP_DIR.search(p.name)) and (p / STATE_FILE).is_file())
        return steps[-1][1] / STATE_FILE if steps else None
    path = Path(resume)
    path = path / STATE_FILE if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"--resume {resume}: no training state found at {path}")
    if not zipfile.is_zipfile(path):
        raise UserError(f"--resume {resume}: {path} is not a training state (pass a step-NNNNNN directory of "
                        "finetune/adapter.py or its training_state.pt)")
    return path


def log_version(logs_dir: Path, resumed: Optional[Path]) -> Optional[int]:
    """The TensorBoard version folder (logs_dir/version_N) a run writes to: a resumed run continues the one that
    holds the state it resumes, else the newest; a fresh run gets the next (None)."""
    if resumed is None:
        return None
    logs_dir = Path(logs_dir).resolve()
    for folder in Path(resumed).resolve().parents:
        if folder.parent == logs_dir and VERSION_DIR.fullmatch(folder.name):
            return int(folder.name.removeprefix("version_"))
    versions = sorted(int(p.name.removeprefix("version_")) for p in logs_dir.glob("version_*")
                      if VERSION_DIR.fullmatch(p.name))
    return versions[-1] if versions else None


@contextmanager
def claim_out_dir(out_dir: Path, state_path: Optional[Path]) -> Iterator[Optional[str]]:
    """Hold ``out_dir`` for this run; yield the run id that its states record (in the hyperparameters beside them).

    A second live run in the folder is refused (an ``flock`` that ends with the process, even when killed), and
    so is mixing runs: a fresh run needs a folder without training states, a resumed one a folder whose states
    are all of the run it resumes. Only the first process of a multi-process run claims the folder.
    """
    if process_rank() != 0:
        yield None
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / RUN_LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another run is writing to {out_dir} now: wait for it to end, or choose another "
                            "--out_dir") from None
        yield check_one_run(out_dir, state_path)


def check_one_run(out_dir: Path, state_path: Optional[Path]) -> str:
    """The run id of this run: new, or that of the resumed state; refuse states of another run in ``out_dir``."""
    runs = {p.name: run_id_of(p) for p in sorted(out_dir.glob("step-*")) if (p / STATE_FILE).is_file()}
    if state_path is None:
        if runs:
            raise UserError(f"{out_dir} already holds the training states of a run (up to {max(runs)}): continue "
                            "it with --resume auto, or choose another --out_dir")
        return uuid.uuid4().hex
    run_id = run_id_of(state_path.parent)
    others = sorted(name for name, other in runs.items() if other != run_id)
    if others:
        raise UserError(f"{out_dir} holds training states of another run than {state_path} ({preview_keys(others)}): "
                        "resume into that run's own --out_dir, or choose an empty one")
    return run_id


def run_id_of(step_dir: Path) -> Optional[str]:
    """The run id recorded beside a training state (None for states of older versions)."""
    path = step_dir / HPARAMS_FILE
    return read_yaml_mapping(path).get("run_id") if path.is_file() else None


def extract_adapter(state_path: Path, output_path: Optional[Path] = None) -> None:
    """Write the adapter weights of a training state to a .safetensors file for generate/adapter.py.

    Args:
        state_path: A training state from finetune/adapter.py (a step-NNNNNN directory or the training_state.pt in
            it), or a Lightning checkpoint (.ckpt) from finetune/adapter_trainer.py.
        output_path: The adapter file to write (replaced atomically if it exists). Default: adapter.safetensors
            beside the training state.
    """
    state_path = Path(state_path)
    state_path = state_path / STATE_FILE if state_path.is_dir() else state_path
    output_path = Path(output_path) if output_path is not None else state_path.parent / ADAPTER_FILE
    check_not_an_input(output_path, state_path, "--output_path")
    saved = read_state_adapter(state_path)
    check_state_dict(AdapterLLaMA, saved.config, shapes_of(saved.weights), source=str(state_path), only_adapter=True)
    save_adapter(output_path, None, saved.config, saved.prompt_style, state_dict=saved.weights, name=saved.name,
                 fingerprint=saved.fingerprint)
    print(f"wrote the adapter of {state_path} ({sum(t.numel() for t in saved.weights.values()):,} parameters) "
          f"to {output_path}")
