"""Generated "languages" whose domains have KNOWN roles with respect to the validation tasks.

Helpful, related, redundant, irrelevant and noise domains, for checking that a mixing method
moves weight where it should.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field
from random import Random

import numpy as np

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

    def document(self, rng: Random, n_chars: int) -> str:  # Random: the classmethod random shadows the module
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
