"""Offline demo corpora, tokenizers, tiny models and a downstream-style task for TiKMiX.

Everything here works with no network and no Hugging Face hub:

- :func:`local_corpus`: real multi-domain text found on this machine (Python standard-library
  code split by package, docstrings, pydoc topics and, when ``scripts/install_corpora.sh`` has
  run, Debian text packages: fortunes, the KJV Bible, dictionaries, C man pages, the Python
  documentation sources). :func:`describe_corpus` tabulates it.
- :func:`synthetic_corpus`: generated "languages" whose domains have KNOWN roles with respect
  to the validation tasks (helpful, related, redundant, irrelevant, noise), for checking that
  a mixing method moves weight where it should.
- Plumbing: :func:`train_tokenizer` (byte-level BPE in about a second), :func:`byte_tokenizer`
  (the fallback), :func:`pack_blocks`, :func:`holdout_split` and :func:`tiny_llama`.
- A validation task scored by accuracy: :func:`continuation_choice_items` builds
  "which continuation is the real one" items, :func:`choice_predictions` /
  :func:`choice_accuracy` score a causal LM on them, and :func:`load_metric` loads the same
  accuracy as an ``evaluate`` module shipped inside this package (never a hub name).

Heavy libraries (torch, transformers, datasets, tokenizers, evaluate) are imported inside the
functions that need them, so reading a corpus does not pay for them.
"""

from __future__ import annotations

import ast
import bisect
import gzip
import logging
import math
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import datasets
    import evaluate
    import transformers

logger = logging.getLogger(__name__)

__all__ = [
    "SyntheticCorpus",
    "byte_tokenizer",
    "choice_accuracy",
    "choice_predictions",
    "continuation_choice_items",
    "describe_corpus",
    "holdout_split",
    "load_metric",
    "local_corpus",
    "pack_blocks",
    "synthetic_corpus",
    "tiny_llama",
    "train_tokenizer",
]

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
    files = []
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
        first, last = expr.lineno - 1, expr.end_lineno - 1
        # Remove the lines only when they hold nothing but the docstring.
        if not lines[first][: expr.col_offset].strip() and not lines[last][expr.end_col_offset:].strip():
            drop.update(range(first, last + 1))
    code = "".join(line for i, line in enumerate(lines) if i not in drop)
    return code, [doc for _, doc in sorted(docs)]


_SCOPES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _scopes(tree: ast.Module) -> Iterator[ast.AST]:
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


# ---------------------------------------------------------------------------------------------
# Synthetic corpus with known roles
# ---------------------------------------------------------------------------------------------

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass
class SyntheticCorpus:
    """A generated corpus whose domains have known roles; see :func:`synthetic_corpus`.

    ``domains`` are the training domains, ``validation`` the validation tasks, ``roles`` maps
    each domain to one of ``helpful``, ``related``, ``redundant``, ``irrelevant``, ``noise``,
    and ``task_of`` maps each domain that is built from a task's generator (or a perturbation
    of it) to that task. ``oracle_weights`` is the hint for sanity checks: the mixture that puts
    all mass on the domains whose generator IS a validation task's generator, an equal share
    per task split equally among the domains that carry it.
    """

    domains: dict[str, list[str]]
    validation: dict[str, list[str]]
    roles: dict[str, str]
    task_of: dict[str, str] = field(default_factory=dict)
    oracle_weights: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _WordChain:
    """A first-order Markov chain over a small invented vocabulary."""

    words: tuple[str, ...]
    successors: np.ndarray  # (n_words, k) word indices
    probs: np.ndarray  # (n_words, k) transition probabilities, rows sum to 1

    @classmethod
    def random(cls, rng: np.random.Generator, *, n_letters: int, n_words: int, k: int) -> _WordChain:
        letters = rng.choice(list(LETTERS), size=n_letters, replace=False)
        words: list[str] = []
        while len(words) < n_words:
            word = "".join(rng.choice(letters, size=int(rng.integers(2, 7))))
            if word not in words:
                words.append(word)
        successors, probs = cls._rows(rng, np.arange(n_words), k, n_words)
        return cls(tuple(words), successors, probs)

    @staticmethod
    def _rows(
        rng: np.random.Generator, rows: np.ndarray, k: int, n_words: int
    ) -> tuple[np.ndarray, np.ndarray]:
        # No word follows itself: a likely self-loop would fill documents with one word.
        successors = np.stack([
            (row + 1 + rng.choice(n_words - 1, size=k, replace=False)) % n_words for row in rows
        ])
        probs = rng.dirichlet(np.ones(k), size=len(rows))
        return successors, probs

    def perturbed(self, rng: np.random.Generator, fraction: float) -> _WordChain:
        """Same vocabulary; the transitions of a ``fraction`` of the words redrawn."""
        n_words, k = self.successors.shape
        rows = rng.choice(n_words, size=int(round(fraction * n_words)), replace=False)
        successors, probs = self.successors.copy(), self.probs.copy()
        successors[rows], probs[rows] = self._rows(rng, rows, k, n_words)
        return _WordChain(self.words, successors, probs)

    def document(self, rng: random.Random, n_chars: int) -> str:
        # Plain-Python sampling: numpy's per-call overhead would dominate at one draw per word.
        successors = self.successors.tolist()
        cumulative = np.cumsum(self.probs, axis=1).tolist()
        sentences: list[str] = []
        length = 0
        word = rng.randrange(len(self.words))
        while length < n_chars:
            sentence = []
            for _ in range(rng.randint(5, 12)):
                sentence.append(self.words[word])
                row = cumulative[word]
                word = successors[word][min(bisect.bisect(row, rng.random() * row[-1]), len(row) - 1)]
            sentences.append(" ".join(sentence) + ".")
            length += len(sentences[-1]) + 1
        return " ".join(sentences)


def _noise_document(rng: random.Random, n_chars: int) -> str:
    return "".join(rng.choices(LETTERS + " ", k=n_chars))


def synthetic_corpus(
    *,
    seed: int = 0,
    n_docs: int = 200,
    doc_len: int = 512,
    n_val_docs: int = 50,
    related_shift: float = 0.5,
) -> SyntheticCorpus:
    """A seeded generated corpus whose domains have known roles for two validation tasks.

    Construction. Three "languages" A, B and C are first-order Markov chains over invented
    words: each draws 10 of the 26 letters, spells 48 distinct words of 2-6 of those letters,
    and gives every word 3 possible successors (never itself) with Dirichlet(1, 1, 1)
    probabilities. A document is sentences of 5-12 words, each ending in ".", until it has at
    least ``doc_len`` characters (noise documents have exactly ``doc_len``). The generators
    are drawn from ``seed``; every domain and task then samples from its own random stream, so
    documents are not shared between them.

    ========================  ===========  ===============================================
    domain                    role         generator
    ========================  ===========  ===============================================
    ``helpful_a``             helpful      A (the generator of task ``task_a``)
    ``helpful_b``             helpful      B (the generator of task ``task_b``)
    ``redundant_a``           redundant    A again, another random stream
    ``related_a``             related      A with ``related_shift`` of its words'
                                           transitions redrawn (same vocabulary)
    ``irrelevant_c``          irrelevant   C (no task uses it)
    ``noise``                 noise        uniform over the 26 letters and space
    ========================  ===========  ===============================================

    Validation tasks ``task_a`` and ``task_b`` hold ``n_val_docs`` documents of A and B.

    Learnability (measured in ``tests/test_corpora.py``): a 0.13M-parameter Llama trained for
    100 steps of 16 x 64 BPE tokens on ``helpful_a`` picks the true 8-token continuation of
    ``task_a`` text among 3 distractors from the same language 74-88% of the time over
    corpus and model seeds (chance 25%). Expected influence on ``task_a``: ``helpful_a`` and
    ``redundant_a`` high and equal in expectation, ``related_a`` lower, ``irrelevant_c`` and
    ``noise`` near zero or negative.
    """
    if n_docs < 1 or n_val_docs < 1 or doc_len < 1:
        raise ValueError(
            f"n_docs, n_val_docs and doc_len must be >= 1, got {n_docs}, {n_val_docs}, {doc_len}"
        )
    if not 0.0 <= related_shift <= 1.0:
        raise ValueError(f"related_shift must be in [0, 1], got {related_shift}")
    make = np.random.default_rng([seed, 0])
    chain_a, chain_b, chain_c = (
        _WordChain.random(make, n_letters=10, n_words=48, k=3) for _ in range(3)
    )
    chain_a_related = chain_a.perturbed(make, related_shift)

    def stream(i: int) -> random.Random:
        return random.Random(f"synthetic:{seed}:{i}")

    def docs(chain: _WordChain, i: int, n: int) -> list[str]:
        rng = stream(i)
        return [chain.document(rng, doc_len) for _ in range(n)]

    noise_rng = stream(5)
    domains = {
        "helpful_a": docs(chain_a, 0, n_docs),
        "helpful_b": docs(chain_b, 1, n_docs),
        "irrelevant_c": docs(chain_c, 2, n_docs),
        "noise": [_noise_document(noise_rng, doc_len) for _ in range(n_docs)],
        "redundant_a": docs(chain_a, 3, n_docs),
        "related_a": docs(chain_a_related, 4, n_docs),
    }
    validation = {"task_a": docs(chain_a, 6, n_val_docs), "task_b": docs(chain_b, 7, n_val_docs)}
    roles = {
        "helpful_a": "helpful", "helpful_b": "helpful", "irrelevant_c": "irrelevant",
        "noise": "noise", "redundant_a": "redundant", "related_a": "related",
    }
    task_of = {"helpful_a": "task_a", "helpful_b": "task_b", "redundant_a": "task_a", "related_a": "task_a"}
    oracle = {name: 0.0 for name in domains}
    oracle.update({"helpful_a": 0.25, "redundant_a": 0.25, "helpful_b": 0.5})
    return SyntheticCorpus(domains, validation, roles, task_of, oracle)


# ---------------------------------------------------------------------------------------------
# Tokenizers, packing, splits, models
# ---------------------------------------------------------------------------------------------

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"


def _flatten(texts: Mapping[str, Sequence[str]] | Iterable[str]) -> list[str]:
    if isinstance(texts, Mapping):
        return [doc for name in sorted(texts) for doc in texts[name]]
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of documents, not a single str")
    return list(texts)


def train_tokenizer(
    texts: Mapping[str, Sequence[str]] | Iterable[str],
    vocab_size: int = 1024,
    seed: int = 0,
    *,
    max_chars: int = 2_000_000,
) -> transformers.PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer locally (about a second for a few MB).

    ``texts`` is an iterable of documents or a corpus dict (all domains, in sorted order).
    When they hold more than ``max_chars`` characters, a subsample chosen by ``seed`` is used.
    Special tokens: ``<|endoftext|>`` (eos, id 0) and ``<pad>`` (pad, id 1). No token is added
    automatically when encoding; :func:`pack_blocks` appends eos between documents. Byte-level
    pre-tokenisation means every string round-trips through ``encode``/``decode``.
    """
    import tokenizers
    import transformers

    if vocab_size < 258:
        raise ValueError(f"vocab_size must be >= 258 (256 bytes and 2 special tokens), got {vocab_size}")
    docs = _flatten(texts)
    if not docs:
        raise ValueError("train_tokenizer needs at least one document")
    if sum(map(len, docs)) > max_chars:
        order = list(range(len(docs)))
        random.Random(seed).shuffle(order)
        kept, total = [], 0
        for i in order:
            if total >= max_chars:
                break
            kept.append(i)
            total += len(docs[i])
        docs = [docs[i] for i in sorted(kept)]
    byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def byte_tokenizer() -> transformers.ByT5Tokenizer:
    """The no-training fallback: ByT5's byte tokenizer (vocab 384, pad 0, eos 1).

    Note that it appends ``</s>`` when ``add_special_tokens`` is true (the default).
    """
    import transformers

    return transformers.ByT5Tokenizer()


def _encode(texts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def pack_blocks(texts: Sequence[str], tokenizer: Any, block_size: int) -> datasets.Dataset:
    """Tokenise documents, join them with eos, and cut fixed-length causal-LM blocks.

    Each document is followed by ``tokenizer.eos_token_id``; the stream is cut into
    ``len(stream) // block_size`` blocks and the remainder dropped. Columns: ``input_ids``,
    ``labels`` (equal to ``input_ids``; the model shifts them) and ``attention_mask`` (all
    ones). Deterministic: the same texts give the same rows in the same order.
    """
    import datasets

    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id to join documents with")
    stream = np.fromiter(
        (t for ids in _encode(texts, tokenizer) for t in (*ids, eos)), dtype=np.int64
    )
    n_blocks = len(stream) // block_size
    blocks = stream[: n_blocks * block_size].reshape(n_blocks, block_size).tolist()
    return datasets.Dataset.from_dict(
        {"input_ids": blocks, "labels": [list(b) for b in blocks],
         "attention_mask": [[1] * block_size for _ in blocks]},
        features=datasets.Features({
            "input_ids": datasets.Sequence(datasets.Value("int64")),
            "labels": datasets.Sequence(datasets.Value("int64")),
            "attention_mask": datasets.Sequence(datasets.Value("int64")),
        }),
    )


def holdout_split(
    corpus: Mapping[str, Sequence[str]], fraction: float, seed: int = 0
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Carve ``fraction`` of each domain's documents out as held-out (validation) text.

    Returns ``(train, holdout)`` with the same domain names. Per domain, ``round(fraction * n)``
    documents (at least one when ``fraction > 0`` and the domain has two or more) are chosen
    with a generator seeded by ``seed`` and the domain name; both sides keep the original
    document order. Training documents whose text equals any held-out document (of any domain)
    are dropped, so held-out text never appears verbatim in training.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    holdout: dict[str, list[str]] = {}
    chosen: dict[str, set[int]] = {}
    for name, docs in corpus.items():
        n = len(docs)
        k = round(fraction * n)
        if fraction > 0 and n >= 2:
            k = min(max(k, 1), n - 1)
        picked = set(random.Random(f"{seed}:{name}").sample(range(n), k))
        chosen[name] = picked
        holdout[name] = [doc for i, doc in enumerate(docs) if i in picked]
    held_text = {doc for docs in holdout.values() for doc in docs}
    train = {
        name: [doc for i, doc in enumerate(docs) if i not in chosen[name] and doc not in held_text]
        for name, docs in corpus.items()
    }
    return train, holdout


def tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    layers: int = 4,
    heads: int = 4,
    block_size: int = 128,
    seed: int = 0,
    **config_overrides: Any,
) -> transformers.LlamaForCausalLM:
    """A small Llama built from a config (no download), its weights drawn from ``seed``.

    Defaults give about 0.9M parameters at ``vocab_size=1024``: tied embeddings, SwiGLU width
    ``8/3 * hidden_size`` rounded up to a multiple of 16, SDPA attention. Pass token ids
    (``pad_token_id=``, ``eos_token_id=``, ``bos_token_id=``) or any other ``LlamaConfig`` field
    through ``config_overrides``. The global torch RNG is left untouched.
    """
    import torch
    import transformers

    if hidden_size % heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by heads={heads}")
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=16 * math.ceil(8 * hidden_size / 3 / 16),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=block_size,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    settings.update(config_overrides)
    config = transformers.LlamaConfig(**settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    return model


# ---------------------------------------------------------------------------------------------
# Downstream-style task: pick the true continuation
# ---------------------------------------------------------------------------------------------

def continuation_choice_items(
    texts: Sequence[str],
    tokenizer: Any,
    *,
    n_items: int,
    n_choices: int = 4,
    prefix_tokens: int = 32,
    cont_tokens: int = 8,
    seed: int = 0,
    distractor_texts: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Multiple-choice items "which of these continues the prefix?" built from ``texts``.

    Each item takes a random window of a random document: its first ``prefix_tokens`` tokens
    are the prefix and the next ``cont_tokens`` the true continuation. The ``n_choices - 1``
    distractors are windows of ``cont_tokens`` tokens from ``distractor_texts`` (other domains)
    or, when it is None, from other places of ``texts`` (another document, or the same one at
    least ``cont_tokens`` away). Choices within an item are distinct token sequences.

    Returns dicts ``{"prefix_ids": [...], "choice_ids": [[...], ...], "label": int}`` where
    ``label`` indexes the true continuation; deterministic for a given ``seed``.
    """
    if n_choices < 2:
        raise ValueError(f"n_choices must be >= 2, got {n_choices}")
    if prefix_tokens < 1 or cont_tokens < 1:
        raise ValueError(f"prefix_tokens and cont_tokens must be >= 1, got {prefix_tokens}, {cont_tokens}")
    window = prefix_tokens + cont_tokens
    docs = [ids for ids in _encode(texts, tokenizer) if len(ids) >= window]
    if not docs:
        raise ValueError(f"no document of texts has the {window} tokens an item needs")
    same_pool = distractor_texts is None
    if same_pool:
        pool = docs
    else:
        pool = [ids for ids in _encode(distractor_texts, tokenizer) if len(ids) >= cont_tokens]
    if not pool:
        raise ValueError(f"no document of distractor_texts has {cont_tokens} tokens")
    rng = np.random.default_rng(seed)
    items: list[dict[str, Any]] = []
    for _ in range(20 * n_items):
        if len(items) == n_items:
            break
        d = int(rng.integers(len(docs)))
        start = int(rng.integers(len(docs[d]) - window + 1))
        cont_start = start + prefix_tokens
        choices = [docs[d][cont_start : cont_start + cont_tokens]]
        for _ in range(50 * n_choices):
            if len(choices) == n_choices:
                break
            p = int(rng.integers(len(pool)))
            s = int(rng.integers(len(pool[p]) - cont_tokens + 1))
            if same_pool and p == d and abs(s - cont_start) < cont_tokens:
                continue
            candidate = pool[p][s : s + cont_tokens]
            if candidate not in choices:
                choices.append(candidate)
        if len(choices) < n_choices:
            continue
        label = int(rng.integers(n_choices))
        choices[0], choices[label] = choices[label], choices[0]
        items.append({
            "prefix_ids": list(docs[d][start:cont_start]),
            "choice_ids": [list(c) for c in choices],
            "label": label,
        })
    if len(items) < n_items:
        raise ValueError(
            f"built only {len(items)} of {n_items} items with {n_choices} distinct choices; "
            "give more or longer texts, or fewer choices"
        )
    return items


def choice_predictions(model: Any, items: Sequence[Mapping[str, Any]], *, batch_size: int = 32) -> np.ndarray:
    """Index of the choice with the highest mean log-likelihood of its tokens given the prefix.

    Forward passes only, under ``torch.no_grad()`` and in eval mode; the model's
    training/eval mode is restored afterwards. Choices may differ in length (right padding).
    """
    import torch

    sequences, spans = [], []
    for item in items:
        prefix = list(item["prefix_ids"])
        for choice in item["choice_ids"]:
            sequences.append(prefix + list(choice))
            spans.append((len(prefix), len(prefix) + len(choice)))
    device = next(model.parameters()).device
    scores = np.empty(len(sequences))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for lo in range(0, len(sequences), batch_size):
                batch = sequences[lo : lo + batch_size]
                width = max(map(len, batch))
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                mask = torch.zeros(len(batch), width, dtype=torch.long)
                for row, seq in enumerate(batch):
                    ids[row, : len(seq)] = torch.tensor(seq)
                    mask[row, : len(seq)] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                logp = torch.log_softmax(logits.float(), dim=-1).cpu()
                for row in range(len(batch)):
                    a, b = spans[lo + row]
                    targets = ids[row, a:b]
                    token_logp = logp[row, a - 1 : b - 1].gather(1, targets[:, None])
                    scores[lo + row] = token_logp.mean().item()
    finally:
        model.train(was_training)
    predictions = np.empty(len(items), dtype=np.int64)
    pos = 0
    for i, item in enumerate(items):
        n = len(item["choice_ids"])
        predictions[i] = int(np.argmax(scores[pos : pos + n]))
        pos += n
    return predictions


def choice_accuracy(model: Any, items: Sequence[Mapping[str, Any]], *, batch_size: int = 32) -> float:
    """Fraction of items whose true continuation the model scores highest (see
    :func:`choice_predictions`); chance is ``1 / n_choices``."""
    if not items:
        raise ValueError("choice_accuracy needs at least one item")
    predictions = choice_predictions(model, items, batch_size=batch_size)
    labels = np.array([item["label"] for item in items])
    return float(np.mean(predictions == labels))


def load_metric(name: str = "choice_accuracy", **kwargs: Any) -> evaluate.EvaluationModule:
    """Load an ``evaluate`` metric module shipped in ``tikmix_hf/metrics/<name>/`` (offline).

    ``evaluate`` is imported here, on first use (it takes seconds). Example::

        metric = load_metric()
        metric.compute(predictions=choice_predictions(model, items),
                       references=[it["label"] for it in items])["accuracy"]
    """
    from importlib import resources

    import evaluate

    folder = resources.files("tikmix_hf") / "metrics" / name
    if not (folder / f"{name}.py").is_file():
        raise ValueError(f"no metric module {name!r} shipped in tikmix_hf/metrics/")
    with resources.as_file(folder) as path:
        return evaluate.load(str(path), **kwargs)
