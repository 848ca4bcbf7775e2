"""Small file helpers shared by the layers: atomic text, JSON and safetensors writes, reads with clear errors
(one reader of the JSON and YAML files that people write, :func:`read_structured`), strict-JSON values."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np


def save_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) through a temporary file in the same folder and a rename.

    A crash or a full disk leaves either the previous file or the new one, never half of one.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            mask = os.umask(0o22)  # mkstemp makes the file 0600: give it the mode of any other output
            os.umask(mask)
            os.fchmod(fh.fileno(), 0o666 & ~mask)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as strict JSON (no NaN) with :func:`save_text_atomic`."""
    save_text_atomic(path, json.dumps(obj, indent=1, allow_nan=False))


def save_tensors_atomic(path: str | os.PathLike, tensors: Mapping, metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` as safetensors (with string ``metadata``) through a temporary file and a rename."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata=dict(metadata))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_tensors(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """The tensors and the metadata of a safetensors file written by :func:`save_tensors_atomic`."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})


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

    def __init__(self, what: str, reason: str):
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


def remove_stale_temporaries(directory: str | os.PathLike) -> None:
    """Delete temporary files that a killed :func:`save_json_atomic` left in ``directory``."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if name.startswith(".tmp-") and name.endswith((".json", ".safetensors")):
            try:
                os.remove(os.path.join(directory, name))
            except OSError:
                pass


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
