"""Where the text of the domains and validation sets comes from.

Domains and validation sets are given as ``NAME=PATH`` (a text file, a ``.jsonl``/``.json`` file of
rows with a text column, or a folder of such files), as a YAML/JSON mapping file, or inline JSON::

    # domains.yaml
    code: data/code/                        # a folder: every text/jsonl file in it, recursively
    web: data/web.jsonl                     # rows {"text": ...}
    wiki: {dataset: wikitext, config: wikitext-2-raw-v1, split: train, column: text}   # datasets
    saved: {dataset: data/saved_dataset}    # a folder written by Dataset.save_to_disk

Mistakes in the command line or in these files print one message (the argument, the value and
what to do instead) and exit with status 2; no traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import FileReadError, read_structured
from .errors import UsageError

MAPPING_SUFFIXES = (".yaml", ".yml", ".json")
ROW_SUFFIXES = (".jsonl", ".json")
DATASET_KEYS = {"dataset", "config", "split", "column", "data_files", "data_dir"}


@dataclass
class Source:
    """Where the text of one domain or validation set comes from."""

    name: str
    origin: str  # how the user gave it, for messages: "--domain code=data/code"
    path: Path | None = None
    dataset: dict | None = None


_SOURCE_FIX = (
    "give NAME=PATH (a text file, a .jsonl/.json file of rows, or a folder of them), a YAML/JSON mapping file "
    "NAME: PATH, or inline JSON '{\"NAME\": \"PATH\"}'"
)


def parse_sources(values: Sequence[str], flag: str) -> dict[str, Source]:
    """``NAME=PATH`` items, mapping files and inline JSON mappings, merged into ``{name: Source}``.

    Every path is checked now, so a typo fails before any model is built.
    """
    sources: dict[str, Source] = {}

    def add(source: Source) -> None:
        if source.name in sources:
            raise UsageError(
                f"{source.origin}: the name {source.name!r} is already given by {sources[source.name].origin}; "
                "every name must be unique"
            )
        sources[source.name] = source

    for value in values:
        value = str(value)
        if value.lstrip().startswith("{"):
            try:
                mapping = json.loads(value)
            except json.JSONDecodeError as err:
                raise UsageError(f"{flag} {value!r}: not valid JSON ({err}); {_SOURCE_FIX}") from None
            for source in _mapping_sources(mapping, f"{flag} (inline JSON)", Path.cwd()):
                add(source)
            continue
        path = Path(value)
        name, sep, spec = value.partition("=")
        if not (sep and os.sep not in name):
            if path.is_file() and path.suffix.lower() in MAPPING_SUFFIXES:
                for source in _mapping_sources(_read_mapping_file(path, flag), f"{flag} {value}", path.parent):
                    add(source)
                continue
            if path.exists():
                raise UsageError(
                    f"{flag} {value}: a path without a name; write {flag} NAME={value} "
                    "(or use a YAML/JSON mapping file)"
                )
            raise UsageError(f"{flag} {value}: no such file, and not NAME=PATH; {_SOURCE_FIX}")
        name, spec = name.strip(), spec.strip()
        origin = f"{flag} {value}"
        if not name:
            raise UsageError(f"{origin}: the name before '=' is empty; write {flag} NAME={spec}")
        if not spec:
            raise UsageError(f"{origin}: the path after '=' is empty; write {flag} {name}=PATH")
        add(_path_source(name, spec, origin, Path.cwd()))
    return sources


def _read_mapping_file(path: Path, flag: str) -> Any:
    try:
        return read_structured(path, f"{flag} {path}")
    except FileReadError as err:
        raise UsageError(f"{err}; {_SOURCE_FIX}") from None
    except ImportError as err:
        raise UsageError(str(err)) from None


def _mapping_sources(mapping: Any, origin: str, base: Path) -> list[Source]:
    if not isinstance(mapping, Mapping) or not mapping:
        kind = "an empty mapping" if isinstance(mapping, Mapping) else f"a {type(mapping).__name__}"
        raise UsageError(f"{origin}: expected a mapping of names to sources, got {kind}; {_SOURCE_FIX}")
    out = []
    for name, spec in mapping.items():
        where = f"{origin}: {name}"
        if not isinstance(name, str) or not name.strip():
            raise UsageError(f"{origin}: names must be non-empty strings, got {name!r}")
        if isinstance(spec, str):
            out.append(_path_source(name, spec, where, base))
        elif isinstance(spec, Mapping):
            out.append(_dict_source(name, dict(spec), where, base))
        else:
            raise UsageError(
                f"{where}: expected a path or a mapping such as {{dataset: NAME, split: train, column: text}}, "
                f"got {spec!r}"
            )
    return out


def _path_source(name: str, spec: str, origin: str, base: Path) -> Source:
    path = Path(os.path.expanduser(spec))
    if not path.is_absolute():
        path = base / path
    if not path.exists():
        raise UsageError(f"{origin}: no such file or folder {path}; {_SOURCE_FIX}")
    return Source(name, origin, path=path)


def _dict_source(name: str, spec: dict, origin: str, base: Path) -> Source:
    if set(spec) == {"path"}:
        return _path_source(name, str(spec["path"]), origin, base)
    unknown = sorted(set(spec) - DATASET_KEYS)
    if unknown or "dataset" not in spec:
        raise UsageError(
            f"{origin}: {'unknown keys ' + str(unknown) if unknown else 'no dataset key'}; a dataset source is "
            f"{{dataset: NAME_OR_FOLDER, config: ..., split: train, column: text}} (keys {sorted(DATASET_KEYS)}), "
            "a file or folder is {path: PATH}"
        )
    if not isinstance(spec["dataset"], str) or not spec["dataset"]:
        raise UsageError(f"{origin}: dataset must be a non-empty string, got {spec['dataset']!r}")
    local = Path(os.path.expanduser(spec["dataset"]))
    local = local if local.is_absolute() else base / local
    if local.exists():
        spec["dataset"] = str(local)
    return Source(name, origin, dataset=spec)


def _text_files(folder: Path) -> list[Path]:
    files: list[Path] = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(Path(root, n) for n in sorted(names) if not n.startswith("."))
    return files


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as fh:
        return b"\0" in fh.read(8192)


def load_texts(source: Source, text_column: str = "text") -> list[str]:
    """The documents of one source: a file (one document, or one per row of a ``.jsonl``/``.json``),
    a folder of files (binary files skipped), or a ``datasets`` dataset's text column."""
    if source.dataset is not None:
        docs = _dataset_texts(source, source.dataset, text_column)
    elif source.path is None:
        raise ValueError(f"{source.origin}: the source {source.name!r} has neither a path nor a dataset")
    elif source.path.is_dir():
        docs = []
        for path in _text_files(source.path):
            if path.suffix.lower() in ROW_SUFFIXES:
                docs.extend(_row_texts(path, source, text_column))
            elif not _is_binary(path):
                docs.append(path.read_text(encoding="utf-8", errors="replace"))
    elif source.path.suffix.lower() in ROW_SUFFIXES:
        docs = _row_texts(source.path, source, text_column)
    else:
        docs = [source.path.read_text(encoding="utf-8", errors="replace")]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UsageError(f"{source.origin}: no text found (empty files, or no text files in the folder)")
    return docs


def _row_texts(path: Path, source: Source, column: str) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UsageError(f"{source.origin}: {path} line {number} is not valid JSON ({err.msg})") from None
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"{source.origin}: {path} is not valid JSON ({err})") from None
        if isinstance(rows, Mapping) and isinstance(rows.get("data"), list):
            rows = rows["data"]
        if not isinstance(rows, list):
            raise UsageError(f"{source.origin}: {path} must hold a list of rows (or of strings)")
    docs = []
    for number, row in enumerate(rows, start=1):
        if isinstance(row, str):
            docs.append(row)
        elif isinstance(row, Mapping) and isinstance(row.get(column), str):
            docs.append(row[column])
        else:
            keys = sorted(row) if isinstance(row, Mapping) else type(row).__name__
            raise UsageError(
                f"{source.origin}: row {number} of {path} has no text column {column!r} (it has {keys}); "
                "pass --text_column NAME"
            )
    return docs


def _dataset_texts(source: Source, spec: dict, default_column: str) -> list[str]:
    import datasets

    column = spec.get("column", default_column)
    name = spec["dataset"]
    try:
        local = Path(name)
        if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()):
            data = datasets.load_from_disk(name)
            if isinstance(data, datasets.DatasetDict):
                split = spec.get("split", "train")
                if split not in data:
                    raise UsageError(f"{source.origin}: {name} has splits {list(data)}, not {split!r}; set split:")
                data = data[split]
        else:
            data = datasets.load_dataset(
                name, spec.get("config"), split=spec.get("split", "train"), data_files=spec.get("data_files"),
                data_dir=spec.get("data_dir"),
            )
    except UsageError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets raises many types; all mean "cannot load this"
        raise UsageError(
            f"{source.origin}: cannot load dataset {name!r} ({type(err).__name__}: {str(err).splitlines()[0][:300]}); "
            "without network only local files and folders, Dataset.save_to_disk folders and datasets already in "
            "the cache work"
        ) from None
    if column not in data.column_names:
        raise UsageError(
            f"{source.origin}: dataset {name!r} has no column {column!r} (it has {data.column_names}); set column:"
        )
    return [t for t in data[column] if isinstance(t, str)]


def pack_all(texts: Mapping[str, list[str]], tokenizer, block_size: int, sources: Mapping[str, Source]) -> dict:
    from ..testing import pack_blocks

    packed = {}
    for name, docs in texts.items():
        blocks = pack_blocks(docs, tokenizer, block_size)
        if len(blocks) == 0:
            raise UsageError(
                f"{sources[name].origin}: its text is shorter than one block of {block_size} tokens; give more text "
                "or a smaller --block_size"
            )
        packed[name] = blocks
    return packed


def parse_weights(value: str, flag: str) -> str | dict:
    if value in ("natural", "uniform"):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise UsageError(
            f"{flag} {value!r}: use natural, uniform or a JSON mapping such as '{{\"code\": 0.6, \"web\": 0.4}}'"
        )
    return parsed
