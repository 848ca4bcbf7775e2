"""Real multi-domain text found on this machine, read with no network.

Python standard-library code split by package, its docstrings and pydoc topics and, when
``scripts/install_corpora.sh`` has run, Debian text packages: fortunes, the KJV Bible,
dictionaries, C man pages and the Python documentation sources. :func:`describe_corpus`
tabulates a corpus.
"""

from __future__ import annotations

import ast
import gzip
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Long files are cut into documents of at most this many characters, so that subsampling a
# domain picks many places from many files rather than a few whole files.
MAX_DOC_CHARS = 4000
# Fragments shorter than this (a lone brace, an empty docstring) are not documents.
MIN_DOC_CHARS = 16

# ---------------------------------------------------------------------------------------------
# Real text found on this machine
# ---------------------------------------------------------------------------------------------

# Large standard-library packages with distinct styles (async networking, MIME parsing, a GUI
# IDE, process pools, Tk bindings, a test framework, XML parsers).
CODE_PACKAGES = ("asyncio", "email", "idlelib", "multiprocessing", "tkinter", "unittest", "xml")
# English fortune files that are large (120-240 KB) and differ in register.
FORTUNE_CATEGORIES = ("computers", "people", "science", "songs-poems")
DICTIONARIES = ("foldoc", "gcide", "jargon")

_SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}
_FORTUNE_DIRS = (Path("/usr/share/games/fortunes"), Path("/usr/share/fortune"), Path("/usr/share/fortunes"))
_DICTD_DIR = Path("/usr/share/dictd")
_DPKG_INFO = Path("/var/lib/dpkg/info")
_DOC_ROOT = Path("/usr/share/doc")


@dataclass(frozen=True)
class _Source:
    """One domain to read: ``load(key)`` gives the raw documents of one key (a file, an entry).

    Keys are in a canonical order; loading is lazy so that a 40 MB dictionary or a thousand
    man pages cost only what the character budget takes.
    """

    name: str
    keys: Sequence[Any]
    load: Callable[[Any], list[str]]


def local_corpus(
    *, max_chars_per_domain: int = 400_000, min_chars: int = 20_000, seed: int = 0, debian: bool = True
) -> dict[str, list[str]]:
    """Real multi-domain text from this machine, as ``{domain: [document, ...]}``.

    Sources, each detected and skipped (with a debug log) when absent:

    - ``code/<package>``: the ``.py`` files of large standard-library packages
      (:data:`CODE_PACKAGES`, without their ``test`` folders), docstrings removed.
    - ``python/docstrings``: the docstrings of the whole standard library (tests excluded).
    - ``python/pydoc-topics``: the language-reference topics of ``pydoc_data.topics``.
    - ``python/docs-rst``: reST sources of the Python documentation (Debian ``python3.x-doc``),
      without the pages that ``pydoc_data.topics`` is rendered from.
    - ``fortunes/<category>``: English fortune files (:data:`FORTUNE_CATEGORIES`), one
      document per fortune.
    - ``bible/kjv``: the King James Bible from the ``bible`` program, one document per chapter.
    - ``dict/<name>``: dictd dictionaries (:data:`DICTIONARIES`), one document per entry.
    - ``man/libc``: sections 2 and 3 of ``manpages-dev``, troff macros crudely stripped.

    With the standard library alone (or ``debian=False``, which ignores the Debian packages
    even when installed, for results comparable across machines) this gives 9 domains; with
    the Debian packages of ``scripts/install_corpora.sh`` it gives 19.

    Each domain is subsampled to at most ``max_chars_per_domain`` characters: keys (files,
    entries) are visited in an order shuffled by ``seed`` and the domain name, files longer than
    :data:`MAX_DOC_CHARS` are cut at paragraph boundaries, exact duplicates are dropped, and the
    kept documents are returned in their canonical (path, position) order. Domains with fewer
    than ``min_chars`` characters are left out. The result is a pure function of the arguments
    and the installed files; its keys are sorted.
    """
    if max_chars_per_domain <= 0:
        raise ValueError(f"max_chars_per_domain must be positive, got {max_chars_per_domain}")
    corpus: dict[str, list[str]] = {}
    for source in _local_sources(debian):
        try:
            docs = _sample_documents(source, max_chars=max_chars_per_domain, seed=seed)
        except (OSError, UnicodeError, subprocess.SubprocessError) as err:
            logger.warning("skipping domain %s: reading it failed: %s", source.name, err)
            continue
        chars = sum(map(len, docs))
        if chars < min_chars:
            logger.debug("skipping domain %s: %d chars < min_chars=%d", source.name, chars, min_chars)
            continue
        corpus[source.name] = docs
    return dict(sorted(corpus.items()))


def describe_corpus(corpus: Mapping[str, Sequence[str]]) -> list[tuple[str, int, int]]:
    """Rows ``(domain, documents, characters)`` in the corpus's order."""
    return [(name, len(docs), sum(map(len, docs))) for name, docs in corpus.items()]


def _local_sources(debian: bool) -> list[_Source]:
    finders: tuple[Callable[[], list[_Source]], ...] = (_stdlib_sources,)
    if debian:
        finders += (_fortune_sources, _bible_sources, _dictionary_sources, _manpage_sources,
                    _python_doc_sources)
    sources: list[_Source] = []
    for find in finders:
        try:
            sources.extend(find())
        except (OSError, UnicodeError, subprocess.SubprocessError) as err:
            logger.warning("skipping %s: %s", find.__name__.strip("_"), err)
    return sources


def _sample_documents(source: _Source, *, max_chars: int, seed: int) -> list[str]:
    # String seeds hash with SHA-512 in `random`, so this does not depend on PYTHONHASHSEED.
    rng = random.Random(f"{seed}:{source.name}")
    order = list(range(len(source.keys)))
    rng.shuffle(order)
    picked: list[tuple[int, int, str]] = []
    seen: set[str] = set()
    total = 0
    doc_chars = min(MAX_DOC_CHARS, max_chars)
    for k in order:
        pieces = [c for doc in source.load(source.keys[k]) for c in _chunks(doc, doc_chars)]
        for j, doc in enumerate(pieces):
            if doc in seen:
                continue
            # Stop at the first piece that does not fit rather than hunting for smaller ones:
            # that would load every file of a large source for a few characters.
            if total + len(doc) > max_chars:
                picked.sort()
                return [doc for _, _, doc in picked]
            seen.add(doc)
            picked.append((k, j, doc))
            total += len(doc)
    picked.sort()
    return [doc for _, _, doc in picked]


def _chunks(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars``, at blank lines where possible."""
    text = text.strip()
    if len(text) < MIN_DOC_CHARS:
        return []
    if len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    current = ""
    for block in re.split(r"\n\s*\n", text):
        for part in _split_long(block, max_chars):
            if current and len(current) + 2 + len(part) > max_chars:
                pieces.append(current)
                current = part
            else:
                current = f"{current}\n\n{part}" if current else part
    if current:
        pieces.append(current)
    return [p for p in pieces if len(p.strip()) >= MIN_DOC_CHARS]


def _split_long(block: str, max_chars: int) -> list[str]:
    if len(block) <= max_chars:
        return [block]
    parts: list[str] = []
    current = ""
    for line in block.split("\n"):
        while len(line) > max_chars:  # a single giant line (a data table): hard cut
            parts.append(line[:max_chars])
            line = line[max_chars:]
        if current and len(current) + 1 + len(line) > max_chars:
            parts.append(current)
            current = line
        else:
            current = f"{current}\n{line}" if current else line
    if current:
        parts.append(current)
    return parts


# --- Python standard library ---------------------------------------------------------------

def _stdlib_sources() -> list[_Source]:
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = []
    for package in CODE_PACKAGES:
        files = _python_files(root / package)
        if files:
            sources.append(_Source(f"code/{package}", files, _load_code))
        else:
            logger.debug("no standard-library package %s under %s", package, root)
    everything = [p for p in _python_files(root) if "pydoc_data" not in p.parts]
    if everything:
        sources.append(_Source("python/docstrings", everything, _load_docstrings))
    try:
        from pydoc_data.topics import topics
    except ImportError:
        logger.debug("pydoc_data.topics is not available")
    else:
        sources.append(_Source("python/pydoc-topics", sorted(topics), lambda key: [topics[key]]))
    return sources


def _python_files(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files)


def _split_docstrings(source: str) -> tuple[str, list[str]]:
    """Return (the source without its docstrings, the docstrings in source order)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes in old modules
            tree = ast.parse(source)
    except SyntaxError:
        return source, []
    lines = source.splitlines(keepends=True)
    drop: set[int] = set()
    docs: list[tuple[int, str]] = []
    for node in _scopes(tree):
        doc = ast.get_docstring(node, clean=True)
        if not doc:
            continue
        expr = node.body[0]
        docs.append((expr.lineno, doc))
        first, last = expr.lineno - 1, (expr.end_lineno or expr.lineno) - 1  # a parsed node has its end
        # Remove the lines only when they hold nothing but the docstring.
        if not lines[first][: expr.col_offset].strip() and not lines[last][expr.end_col_offset:].strip():
            drop.update(range(first, last + 1))
    code = "".join(line for i, line in enumerate(lines) if i not in drop)
    return code, [doc for _, doc in sorted(docs)]


_SCOPES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _scopes(tree: ast.Module) -> Iterator[ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef]:
    """The nodes that can carry a docstring, walking statements only (expressions are most of a
    tree and never hold a def or class)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _SCOPES):
            yield node
        stack.extend(
            child for child in ast.iter_child_nodes(node)
            if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case))
        )


def _load_code(path: Path) -> list[str]:
    return [_split_docstrings(path.read_text(encoding="utf-8", errors="replace"))[0]]


def _load_docstrings(path: Path) -> list[str]:
    docs = _split_docstrings(path.read_text(encoding="utf-8", errors="replace"))[1]
    return ["\n\n".join(docs)] if docs else []


# --- Debian text packages ------------------------------------------------------------------

def _fortune_sources() -> list[_Source]:
    folder = next((d for d in _FORTUNE_DIRS if d.is_dir()), None)
    if folder is None:
        logger.debug("no fortunes folder among %s", [str(d) for d in _FORTUNE_DIRS])
        return []
    sources = []
    for category in FORTUNE_CATEGORIES:
        path = folder / category
        if not path.is_file():
            logger.debug("no fortune category %s in %s", category, folder)
            continue
        entries = path.read_text(encoding="utf-8", errors="replace").split("\n%\n")
        sources.append(_Source(f"fortunes/{category}", entries, lambda entry: [entry]))
    return sources


_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def _bible_sources() -> list[_Source]:
    program = shutil.which("bible")
    if program is None:
        logger.debug("no `bible` program (Debian package bible-kjv)")
        return []
    out = subprocess.run(
        [program, "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    chapters: dict[tuple[str, str], list[str]] = {}
    for line in out.splitlines():
        match = _VERSE.match(line)
        if match:
            book, chapter, _, verse = match.groups()
            chapters.setdefault((book, chapter), []).append(verse.strip())
    if not chapters:
        logger.debug("`bible -f` printed no verses")
        return []
    # Dicts keep insertion order, which is canonical (Genesis 1 .. Revelation 22).
    texts = ["\n".join(verses) for verses in chapters.values()]
    return [_Source("bible/kjv", texts, lambda text: [text])]


_DICTD_DIGITS = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(digits: str) -> int:
    """Decode an offset or length of a dictd ``.index`` line (base-64 digits, big-endian)."""
    value = 0
    for c in digits:
        value = value * 64 + _DICTD_DIGITS[c]
    return value


def _dictionary_sources() -> list[_Source]:
    sources = []
    for name in DICTIONARIES:
        index, data = _DICTD_DIR / f"{name}.index", _DICTD_DIR / f"{name}.dict.dz"
        if not (index.is_file() and data.is_file()):
            logger.debug("no dictd dictionary %s in %s", name, _DICTD_DIR)
            continue
        # Keys are the encoded (offset, length) pairs in index order, each entry once (several
        # headwords can share an entry); only the visited ones are decoded.
        spans: dict[tuple[str, str], None] = {}
        for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
            fields = line.split("\t")
            if len(fields) >= 3 and not fields[0].startswith(("00-database", "00database")):
                spans[fields[1], fields[2]] = None
        sources.append(_Source(f"dict/{name}", list(spans), _DictdEntries(data)))
    return sources


class _DictdEntries:
    """Loader of dictd entries by encoded (offset, length); decompresses the data file on first use."""

    def __init__(self, path: Path):
        self.path = path
        self.data: bytes | None = None

    def __call__(self, span: tuple[str, str]) -> list[str]:
        if self.data is None:
            with gzip.open(self.path) as f:  # .dict.dz is gzip with a seek table
                self.data = f.read()
        offset, length = map(_dictd_number, span)
        return [self.data[offset : offset + length].decode("utf-8", errors="replace")]


def _manpage_sources() -> list[_Source]:
    listing = _DPKG_INFO / "manpages-dev.list"
    if not listing.is_file():
        logger.debug("manpages-dev is not installed (%s missing)", listing)
        return []
    pages = sorted(
        Path(line) for line in listing.read_text().splitlines()
        if re.search(r"/man[23]/[^/]+\.[23]\.gz$", line) and Path(line).is_file()
    )
    return [_Source("man/libc", pages, _load_manpage)] if pages else []


def _load_manpage(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        source = f.read()
    if source.lstrip().startswith(".so "):  # an alias of another page
        return []
    return [_strip_troff(source)]


_TEXT_MACROS = {"SH", "SS", "B", "I", "SM", "SB"}
_ALTERNATING_MACROS = {"BR", "RB", "IR", "RI", "BI", "IB"}  # fonts alternate with no space
_BREAK_MACROS = {"PP", "P", "LP", "TP", "IP", "HP", "sp", "br"}
_TROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),
    (re.compile(r"\\\(aq"), "'"),
    (re.compile(r"\\\((dq|lq|rq)"), '"'),
    (re.compile(r"\\\((em|en|hy)"), "-"),
    (re.compile(r"\\\(.."), ""),
    (re.compile(r"\\\*(\(..|\[[^\]]*\]|.)"), ""),
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\[~ ]"), " "),
    (re.compile(r"\\[&|^%:,/]"), ""),
]


def _strip_troff(source: str) -> str:
    """Crude troff-to-text: keep running text and macro arguments, drop the markup."""
    out: list[str] = []
    for line in source.splitlines():
        if line.startswith((".\\\"", "'\\\"", "\\\"")):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].strip().partition(" ")
            args = [a or b for a, b in re.findall(r'"([^"]*)"|(\S+)', rest)]
            if macro in _TEXT_MACROS:
                line = " ".join(args)
            elif macro in _ALTERNATING_MACROS:
                line = "".join(args)
            elif macro in _BREAK_MACROS:
                line = ""
            else:
                continue
        for pattern, replacement in _TROFF_ESCAPES:
            line = pattern.sub(replacement, line)
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


# pydoc_data.topics is rendered from these pages; leaving them out keeps the two domains apart.
_PYDOC_TOPIC_PAGES = ("reference/", "library/stdtypes.rst.txt")


def _python_doc_sources() -> list[_Source]:
    candidates = _DOC_ROOT.glob("python3*/html/_sources")
    by_version = {tuple(map(int, re.findall(r"\d+", c.parts[-3]))): c for c in candidates}
    if not by_version:
        logger.debug("no Python documentation sources under %s (Debian python3.x-doc)", _DOC_ROOT)
        return []
    # The running Python's version if present, else the newest.
    folder = by_version.get(tuple(sys.version_info[:2]), by_version[max(by_version)]).resolve()
    files = sorted(
        path for path in folder.rglob("*.rst.txt")
        if not path.relative_to(folder).as_posix().startswith(_PYDOC_TOPIC_PAGES)
    )
    loader = lambda path: [path.read_text(encoding="utf-8", errors="replace")]  # noqa: E731
    return [_Source("python/docs-rst", files, loader)] if files else []
