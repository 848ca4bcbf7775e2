"""What TiKMiX's measurement costs as a share of a pre-training run, from per-layer FLOPs, from this
repository's bench model up to a 7B Llama.

Nothing is trained: every number is arithmetic on the model's shapes and the run's settings, so
the table shows which part of the share measured on this machine is an artifact of a tiny model
trained on tiny batches. Counted per decision, with the library's defaults:

- **validation passes**: each task's ``tikmix_validation_sequences`` sequences, forward and backward
  (3x a forward's FLOPs per token), once per decision (at the window's start);
- **window hooks**: for each sequence the window reads, per covered ``Linear`` of shape ``o x i``, the
  sequence's own weight gradient ``G^T A`` (``2 T o i``) and its ``n`` dot products with the tasks'
  gradients (``2 n o i``); per embedding the gathered dot products (``2 n T d``); and the fit of the
  loss's scale from the logits (about ``LOSS_FIT`` FLOPs per logit). By default the window reads the
  probe budget's sequences of each domain (``tikmix_window_sequences`` unset); with ``0``, every
  sequence of its steps (up to 64 steps, or half the stage);
- **probes** (``tikmix_influence_source="probes"``): each domain's probe sequences, forward and
  backward, instead of the hooks;
- **top-ups**: none at scale (a window of 64 steps of a real batch sees every domain far more often
  than its probe budget); at the bench size they are charged as the quality benchmark measured them;
- the solve: a few milliseconds of CPU; no FLOPs worth counting.

A forward costs ``2 N`` FLOPs per token for ``N`` matrix parameters (the output layer included, the
input embedding a lookup) plus ``2 L T d`` for attention (Kaplan et al. 2020); training ``3x`` that.

    python benchmarks/cost_model.py [--out benchmarks/out]
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, table, write  # noqa: E402

#: FLOPs per logit of the window's loss-scale fit: log-sum-exp, the probabilities and two dot products.
LOSS_FIT = 10


@dataclasses.dataclass(frozen=True)
class Llama:
    name: str
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    tied: bool

    def linears(self) -> list[tuple[int, int]]:
        """``(out, in)`` of every ``nn.Linear``: attention q, k, v, o and the SwiGLU MLP, then the output layer."""
        d, kv = self.hidden, self.hidden * self.kv_heads // self.heads
        block = [(d, d), (kv, d), (kv, d), (d, d), (self.intermediate, d), (self.intermediate, d),
                 (d, self.intermediate)]
        return block * self.layers + [(self.vocab, d)]

    @property
    def matrix_params(self) -> int:
        return sum(o * i for o, i in self.linears())

    @property
    def params(self) -> int:
        return self.matrix_params + (0 if self.tied else self.vocab * self.hidden)

    def forward_flops(self, seq: int) -> float:
        """FLOPs of one sequence's forward."""
        return seq * (2 * self.matrix_params + 2 * self.layers * seq * self.hidden)

    def hook_flops(self, seq: int, tasks: int) -> float:
        """FLOPs the window's hooks spend on one sequence (module docstring)."""
        linear = sum(2 * seq * o * i + 2 * tasks * o * i for o, i in self.linears())
        embedding = 2 * tasks * seq * self.hidden
        return linear + embedding + LOSS_FIT * seq * self.vocab


@dataclasses.dataclass(frozen=True)
class Run:
    model: Llama
    seq: int
    batch: int  # sequences per optimizer step, all ranks together
    steps: int
    domains: int
    tasks: int
    decisions: int = 4
    validation_sequences: int = 16
    probe_sequences: int = 16
    window_steps: int = 64
    top_up_sequences: float = 0.0  # per decision (the bench measures them; none at scale)


BENCH = Llama("bench (0.17M)", vocab=1024, hidden=64, layers=2, intermediate=176, heads=4, kv_heads=4, tied=True)
RUNS = [
    # the quality benchmark's run: 19 local domains, 3 tasks, 8 probe sequences per domain
    Run(BENCH, seq=128, batch=16, steps=400, domains=19, tasks=3, probe_sequences=8, top_up_sequences=4.0),
    Run(Llama("124M", vocab=32000, hidden=768, layers=12, intermediate=2048, heads=12, kv_heads=12, tied=True),
        seq=1024, batch=512, steps=20_000, domains=26, tasks=9),
    Run(Llama("1B", vocab=128_256, hidden=2048, layers=16, intermediate=8192, heads=32, kv_heads=8, tied=True),
        seq=2048, batch=1024, steps=50_000, domains=26, tasks=9),
    Run(Llama("7B", vocab=32000, hidden=4096, layers=32, intermediate=11008, heads=32, kv_heads=32, tied=False),
        seq=4096, batch=1024, steps=250_000, domains=26, tasks=9),
]


def shares(run: Run) -> dict:
    m, T = run.model, run.seq
    train = 3 * m.forward_flops(T) * run.batch * run.steps
    per_sequence_pass = 3 * m.forward_flops(T)
    validation = run.decisions * run.tasks * run.validation_sequences * per_sequence_pass
    top_ups = run.decisions * run.top_up_sequences * per_sequence_pass
    hook = m.hook_flops(T, run.tasks)
    every = run.decisions * min(run.window_steps, run.steps // (2 * run.decisions)) * run.batch * hook
    quota = run.decisions * run.domains * run.probe_sequences * hook
    probes = run.decisions * run.domains * run.probe_sequences * per_sequence_pass
    return {
        "model": m.name, "params": m.params, "seq": T, "batch": run.batch, "steps": run.steps,
        "tokens": T * run.batch * run.steps, "domains": run.domains, "tasks": run.tasks,
        "train_flops": train,
        "hook_per_sequence_over_training": hook / per_sequence_pass,
        "validation": validation / train,
        "window_every_sequence": (validation + top_ups + every) / train,
        "window_quota": (validation + top_ups + quota) / train,
        "probes": (validation + probes) / train,
    }


def markdown(rows: list[dict]) -> str:
    header = ["model", "parameters", "tokens (seq × batch × steps)", "domains / tasks",
              "hooks per sequence / its training", "validation passes", "window, every sequence",
              "window, probe budget per domain (default)", "probes"]
    body = [[r["model"], f"{r['params'] / 1e6:,.1f}M",
             f"{r['tokens']:.2e} ({r['seq']} × {r['batch']} × {r['steps']:,})",
             f"{r['domains']} / {r['tasks']}", f"{r['hook_per_sequence_over_training']:.0%}",
             f"{r['validation']:.3%}", f"{r['window_every_sequence']:.3%}", f"{r['window_quota']:.3%}",
             f"{r['probes']:.3%}"] for r in rows]
    note = ("The measurement's FLOPs as a share of the run's training FLOPs, four decisions with the defaults "
            "(16 validation sequences per task, 16 probe sequences per domain, a window of 64 steps or half the "
            "stage that reads the probe budget of each domain, or with tikmix_window_sequences=0 every sequence; "
            "the bench row: the quality benchmark's settings and its measured top-ups). The hooks cost "
            "about a third of their sequence's training FLOPs at every size; what shrinks with scale is the share "
            "of the run's sequences that are measured at all.")
    return note + "\n\n" + table(header, body)


def main(argv=None) -> dict:
    p = parser(__doc__)
    args = p.parse_args(argv)
    started = time.perf_counter()
    rows = [shares(run) for run in RUNS]
    doc = {"rows": rows, "loss_fit_flops_per_logit": LOSS_FIT}
    write("cost_model", args.out, doc, markdown(rows), started=started)
    return doc


if __name__ == "__main__":
    main()
