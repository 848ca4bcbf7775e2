"""Small file helpers shared by the layers: atomic text, JSON and safetensors writes, reads with clear errors
(one reader of the JSON and YAML files that people write, :func:`read_structured`), strict-JSON values."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

#: Temporary files of the atomic writes start with this; a killed write can leave one behind.
TEMPORARY_PREFIX = ".tmp-"


def fsync_directory(directory: str | os.PathLike) -> None:
    """Flush ``directory``'s entries (a rename into it, a new file) to disk.

    A rename is durable only once the folder that holds it is: without this, a power cut right after
    an atomic write can bring back the previous file, or no file at all.
    """
    if os.name == "nt":  # folders cannot be opened there, and NTFS journals renames itself
        return
    fd = os.open(os.fspath(directory), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str | os.PathLike, suffix: str, write) -> None:
    """Call ``write(temporary path)``, flush that file to disk, rename it onto ``path`` and flush the folder.

    A crash, a full disk or a read-only folder leaves either the previous file or the new one, never half
    of one, and no temporary file: an ``OSError`` of the write, the flush or the rename reaches the caller
    after the temporary file is removed.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMPORARY_PREFIX, suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        mask = os.umask(0o22)  # mkstemp makes the file 0600: give it the mode of any other output
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_directory(directory)


def save_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` durably through a temporary file in the same folder and a rename (:func:`_write_atomic`)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    _write_atomic(path, os.path.splitext(os.fspath(path))[1], write)


def save_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) durably through a temporary file in the same folder and a rename.

    A crash or a full disk leaves either the previous file or the new one, never half of one.
    """
    save_bytes_atomic(path, text.encode("utf-8"))


def save_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as strict JSON (no NaN) with :func:`save_text_atomic`."""
    save_text_atomic(path, json.dumps(obj, indent=1, allow_nan=False))


def save_tensors_atomic(path: str | os.PathLike, tensors: Mapping, metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` as safetensors (with string ``metadata``) durably, through a temporary file and a rename.

    safetensors reports a failed write (a full disk) as its own error; it reaches the caller as the
    ``OSError`` it is, with its errno, like the other writes' failures.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    def write(tmp: str) -> None:
        try:
            save_file(dict(tensors), tmp, metadata=dict(metadata))
        except SafetensorError as err:
            code = re.search(r"os error (\d+)", str(err))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), tmp) from err

    _write_atomic(path, ".safetensors", write)


def load_tensors(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """The tensors and the metadata of a safetensors file written by :func:`save_tensors_atomic`."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})  # noqa: SIM118 (no __iter__)


def load_json(path: str | os.PathLike, what: str) -> Any:
    """Read a JSON file; a missing or corrupt file raises an error that names ``what`` and the path."""
    path = os.fspath(path)
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found at {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} at {path} is not valid JSON ({err}); it may be truncated or tampered with") from None


class FileReadError(ValueError):
    """A file that could not be read, or is not valid JSON or YAML. The message names the file as the
    caller does (``what``); ``reason`` is what was wrong, e.g. ``not valid YAML at line 2, column 5 (...)``."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what}: {reason}")
        self.reason = reason


def yaml_module(what: str):
    """The ``yaml`` module (pyyaml, imported on first use); without it an ``ImportError`` that names ``what``."""
    try:
        import yaml
    except ImportError:
        raise ImportError(
            f"{what}: YAML needs pyyaml; `pip install pyyaml` (it comes with tikmix_hf[demo]), or use a JSON file "
            "(*.json)"
        ) from None
    return yaml


def read_structured(path: str | os.PathLike, what: str | None = None) -> Any:
    """The document in a JSON file, or a YAML one when the name ends in ``.yaml`` or ``.yml``.

    Command-line files (domain mappings, model configs, histories) and schedule files are read here.
    ``what`` is how errors name the file (default: its path), e.g. ``"--domains d.yaml"``.

    Raises:
        FileReadError: no such file, it cannot be read, or it is not valid JSON or YAML (with the
            line and column of the mistake).
        ImportError: a YAML file without pyyaml installed.
    """
    path = os.fspath(path)
    what = path if what is None else what
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise FileReadError(what, "no such file") from None
    except (OSError, UnicodeError) as err:
        raise FileReadError(what, f"cannot read it ({err})") from None
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".yaml", ".yml"):
        yaml = yaml_module(what)
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise FileReadError(what, f"not valid YAML{at} ({problem})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        named = "" if suffix == ".json" else "; a YAML file must be named *.yaml or *.yml"
        raise FileReadError(what, f"not valid JSON ({err}){named}") from None


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Delete temporary files that a killed atomic write left in ``directory``; returns why any stayed.

    A file that cannot be removed (a read-only folder) is harmless, since nothing reads it: the caller
    shows the reasons instead of failing.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    kept = []
    for name in os.listdir(directory):
        if name.startswith(TEMPORARY_PREFIX) and name.endswith((".json", ".safetensors")):
            try:
                os.remove(os.path.join(directory, name))
            except OSError as err:
                kept.append(f"the stale temporary file {os.path.join(directory, name)} could not be removed ({err})")
    return kept


def jsonable(value: Any) -> Any:
    """``value`` with numpy types, tuples and arrays made plain JSON; non-finite floats become ``None``.

    Strict JSON has no ``NaN`` or ``Infinity``, and everything tikmix_hf saves is strict JSON.
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)
