"""How big one demo run is: the model, the data and the TiKMiX budget of each preset."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoSize:
    """How big one demo run is. ``SIZES`` holds the presets; times are for 2 busy CPU cores."""

    name: str
    max_chars_per_domain: int  # local corpus: characters read per domain
    synthetic_docs: int  # synthetic corpus: documents per domain
    vocab_size: int
    block_size: int
    hidden_size: int
    layers: int
    heads: int
    batch_size: int
    max_steps: int
    learning_rate: float
    eval_every: int  # steps between held-out evaluations
    test_blocks: int  # reported held-out blocks per text task
    choice_items: int  # reported continuation-choice items
    validation_sequences: int  # TiKMiX validation sequences per task
    probe_sequences: int  # TiKMiX probe sequences per domain and stage
    surrogate_candidates: int  # TiKMiX-M look-ahead evaluations per stage
    stage_fractions: tuple[float, ...]
    all_domain_blocks: int  # held-out blocks per domain for the all-domains loss


SIZES: dict[str, DemoSize] = {
    "default": DemoSize(
        name="default", max_chars_per_domain=400_000, synthetic_docs=300, vocab_size=1024, block_size=128,
        hidden_size=96, layers=3, heads=4, batch_size=16, max_steps=1000, learning_rate=3e-3, eval_every=100,
        test_blocks=32, choice_items=120, validation_sequences=32, probe_sequences=8, surrogate_candidates=24,
        stage_fractions=(0.2, 0.4, 0.6, 0.8), all_domain_blocks=8,
    ),
    "quick": DemoSize(
        name="quick", max_chars_per_domain=120_000, synthetic_docs=150, vocab_size=768, block_size=64,
        hidden_size=64, layers=2, heads=4, batch_size=16, max_steps=240, learning_rate=3e-3, eval_every=40,
        test_blocks=32, choice_items=100, validation_sequences=24, probe_sequences=8, surrogate_candidates=16,
        stage_fractions=(1 / 3, 2 / 3), all_domain_blocks=4,
    ),
    # For tests: every code path, in seconds; the numbers mean nothing.
    "tiny": DemoSize(
        name="tiny", max_chars_per_domain=80_000, synthetic_docs=40, vocab_size=300, block_size=32,
        hidden_size=32, layers=1, heads=2, batch_size=8, max_steps=24, learning_rate=3e-3, eval_every=8,
        test_blocks=8, choice_items=16, validation_sequences=8, probe_sequences=4, surrogate_candidates=16,
        stage_fractions=(0.5,), all_domain_blocks=2,
    ),
}
