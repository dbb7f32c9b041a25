"""Files, the ground floor: writes that are complete or absent (``atomic_path``, ``atomic_dir``), a full disk or an
unwritable place as one line, reads that never run code (``torch_load``, safetensors), plain-YAML and JSON readers,
file fingerprints, and the comparison of tensor shapes by name that every loader reports with."""

import errno
import hashlib
import json
import os
import pickle
import re
import resource
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import yaml
from safetensors import SafetensorError, safe_open

from lit_adapter.errors import UserError


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step, else it is removed.

    A reader therefore sees the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a directory; name a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        reason = unwritable_reason(path.parent) or err.strerror
        raise UserError(f"cannot write {path}: {reason}; choose another location") from None
    os.close(fd)
    try:
        with disk_full_is_user_error(path):
            yield Path(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes files private; give them the usual mode
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


FREE_SPACE = "free some space or choose another location"
NO_ROOM = {errno.ENOSPC: f"no space left on device; {FREE_SPACE}",
           errno.EDQUOT: f"no space left on device (disk quota exceeded); {FREE_SPACE}",
           errno.EFBIG: "the file is larger than the file system or the file-size limit (ulimit -f) allows; raise "
                        "the limit or choose another location"}
"""What the user reads for each error number of a write that found no room, and what to do."""
NO_ROOM_MESSAGES = {**{os.strerror(number): number for number in NO_ROOM},
                    **{f"os error {number}": number for number in NO_ROOM}}
"""How messages without an error number say it (safetensors: "File too large (os error 27)")."""
NEARLY_FULL_BYTES = 1 << 20


@contextmanager
def disk_full_is_user_error(path: Path) -> Iterator[None]:
    """Turn a full disk, a quota or a file-size limit met while writing ``path`` into a one-line ``UserError``."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as err:
        reason = ran_out_of_space(err, path.parent)
        if not reason:
            raise
        raise UserError(f"cannot write {path}: {reason} (the unfinished file was removed)") from None


def ran_out_of_space(err: Exception, directory: Path) -> Optional[str]:
    """Why a failed write found no room (None: it did not): ENOSPC, EDQUOT or EFBIG (a file-size limit), by its
    number or said in its message (safetensors), or a failure of torch's zip writer (whose message does not say why)
    on a disk with (almost) no room left or under a file-size limit."""
    number = getattr(err, "errno", None)
    if number not in NO_ROOM:
        number = next((n for message, n in NO_ROOM_MESSAGES.items() if message in str(err)), None)
    if number is None and isinstance(err, RuntimeError):
        if free_bytes(directory) < NEARLY_FULL_BYTES:
            number = errno.ENOSPC
        elif resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
            number = errno.EFBIG
    return NO_ROOM.get(number)


def free_bytes(directory: Path) -> int:
    """Bytes that this user can still write in ``directory``'s file system."""
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``path`` that becomes ``path`` in one rename on success (else it is removed).

    ``path`` must be absent or empty: a reader sees no directory or the complete one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with disk_full_is_user_error(path):
            yield tmp
            os.chmod(tmp, 0o777 & ~current_umask())
            os.replace(tmp, path)  # replaces an empty directory
    except UserError as err:  # name the files where the user will look for them
        raise UserError(str(err).replace(str(tmp), str(path))) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_can_create(directory: Path, option: str) -> None:
    """Fail before any long work if ``directory`` (given by ``option``) can neither be used nor created.

    Nothing is created here.
    """
    reason = unwritable_reason(directory)
    if reason:
        raise UserError(f"cannot write to {option} {directory}: {reason}; choose another location")


def check_not_an_input(output: Path, source: Path, option: str) -> None:
    """Refuse an ``output`` (given by ``option``) that is the file ``source`` it is made from, also under another
    name (a link, ``..``): writing it would destroy that input."""
    if Path(output).exists() and Path(source).exists() and os.path.samefile(output, source):
        raise UserError(f"{option} {output} names the input {source}: writing it would destroy that input; choose "
                        "another path")


def check_can_write_file(path: Path, option: str) -> None:
    """Fail before any long work if file ``path`` (given by ``option``) cannot be written. Nothing is created."""
    if Path(path).is_dir():
        raise UserError(f"{option} {path} is a directory: name a file in it")
    check_can_create(Path(path).absolute().parent, option)


def read_text(path: Path) -> str:
    """The UTF-8 text of file ``path``, or a one-line ``UserError`` where it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None


def unwritable_reason(directory: Path) -> Optional[str]:
    """Why files cannot be created in ``directory`` (made if missing), or None where they can be."""
    directory = Path(directory).absolute()
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK):
        return f"{existing} is not writable"
    return None


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def require_file(path: Path, what: str = "", hint: str = "") -> None:
    """A one-line ``UserError`` unless ``path`` is a file: it is missing, or a directory where a file is expected."""
    label = f"{what} {path}" if what else str(path)
    if path.is_dir():
        raise UserError(f"{label} is a directory, expected a file{hint}")
    if not path.is_file():
        raise UserError(f"{label} not found{hint}")


def torch_load(path: Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` restricted to tensors and plain containers; pickles that would run code are refused."""
    path = Path(path)
    require_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, SafetensorError) as err:
        code = re.search(r"GLOBAL ([\w.]+)", str(err)) if isinstance(err, pickle.UnpicklingError) else None
        if code:  # the pickle names a function or class to call: never run it
            raise UserError(f"{path} was refused: it holds more than tensors (loading it would call {code[1]}, "
                            "which can run code); only tensors and plain containers are read") from None
        raise UserError(f"{path} is not a readable torch checkpoint (truncated, corrupt or another format?): "
                        f"{_torch_load_detail(err)}") from None


def _torch_load_detail(err: Exception) -> str:
    """The informative first sentence of a ``torch.load`` error, without its generic advice about ``weights_only``."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    generic = ("Weights only load failed", "Please file an issue", "Check the documentation")
    detail = next((line for line in lines if not line.startswith(generic)), "empty or unknown content")
    return detail.split(". ")[0].rstrip(".")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, read into CPU memory."""
    with open_safetensors(path) as f:
        return {key: f.get_tensor(key) for key in f.keys()}


@contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """A lazy reader of a safetensors file (``keys()``, ``get_slice(k).get_shape()``, ``get_tensor(k)``,
    ``metadata()``)."""
    path = Path(path)
    require_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from None


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata in a safetensors header."""
    with open_safetensors(path) as f:
        return f.metadata() or {}



def shapes_of(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


ShapeMismatch = tuple[str, tuple[int, ...], tuple[int, ...]]


def compare_shapes(expected: dict[str, tuple[int, ...]],
                   found: dict[str, tuple[int, ...]]) -> tuple[list[str], list[str], list[ShapeMismatch]]:
    """The keys missing from ``found``, those it has in excess, and (key, found shape, expected shape) of the
    common keys whose shapes differ (in ``found``'s order)."""
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    wrong = [(key, tuple(shape), tuple(expected[key])) for key, shape in found.items()
             if key in expected and tuple(shape) != tuple(expected[key])]
    return missing, unexpected, wrong


def preview_keys(keys: list[str], n: int = 3) -> str:
    """The first ``n`` keys, comma-separated, and how many there are in all when more."""
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


BAD_JSON = (json.JSONDecodeError, RecursionError)
"""What ``json.loads`` raises on bad text: a decode error, or a RecursionError for nesting deeper than Python's
stack (a hostile or damaged file)."""
NESTED_TOO_DEEPLY = "nested deeper than can be read (a damaged file?)"


def json_problem(err: Exception) -> str:
    """What is wrong with bad JSON text (one of ``BAD_JSON``), in words."""
    return NESTED_TOO_DEEPLY if isinstance(err, RecursionError) else str(err)


def read_yaml_mapping(path: Path) -> dict:
    """The mapping in a YAML file (plain YAML only: tags that would build objects are refused), or a ``UserError``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory, expected a YAML file")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        detail = " ".join(str(err).split())
        raise UserError(f"{path} is not a readable plain-YAML file ({detail})") from None
    except RecursionError:
        raise UserError(f"{path} is not a readable plain-YAML file: {NESTED_TOO_DEEPLY}") from None
    if not isinstance(values, dict):
        what = "empty" if values is None else f"a YAML {type(values).__name__}"
        raise UserError(f"{path} is {what}, expected a mapping of keys to values (regenerate it)")
    return values

def write_yaml(path: Path, values: dict) -> None:
    """Write ``values`` as plain YAML to ``path``, atomically (keys in their order)."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(yaml.safe_dump(values, sort_keys=False))


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
