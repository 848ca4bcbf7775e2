"""Overhead and scaling: a TiKMiX run against a static run as the domains and the probe budget grow.

Two sweeps on the tiny Llama of ``callback_overhead.py`` (hidden 128, 4 layers, vocab 384, 128-token
sequences), whose ``domains()``, ``model()`` and ``run()`` this script reuses:

* domains: 4, 8, 16, 26 domains at 8 probe sequences per domain;
* probe budget: 4, 8, 16, 32 probe sequences per domain at 8 domains (the one validation task
  gets as many sequences as each domain: ``run()`` ties the two).

At every point a static run and a TiKMiX run of the same steps run back to back (static first;
with ``--repeats N`` they alternate N times and the fastest of each arm is kept), so the wall
ratio TiKMiX / static is measured side by side and machine load hits both arms alike. TiKMiX
re-decides at the default stage boundaries, measuring on probes (``tikmix_influence_source="probes"``, so
that every token the measurement reads is one it forwards beyond training). Recorded per point:
the wall ratio and overhead, the predicted overhead (probe tokens / training tokens, both counted
as labelled tokens, SEQ - 1 per sequence), the CPU-time ratio of ``train()``, TiKMiX's share of
the wall time (the history's ``seconds.total``), and per stage the influence seconds
(``seconds.influence``), the solver seconds (``seconds.solve``) and the rest (probe draws and
collation). A least-squares line of TiKMiX seconds per stage against probe tokens per stage gives
the cost per 1k probe tokens (slope), the fixed per-stage cost (intercept) and R^2; the cost is
linear in (domains + 1) x probe sequences when R^2 is near 1 and both sweeps give the same slope.

Budget, one torch thread: full = 7 points x 2 arms x 200 steps of 8 x 128 tokens (about 0.1 s a
step, 21 s a run) plus about 2,800 probe sequences of influence passes (about 30 s): an estimated
6 minutes on an idle core, 6-8 on a shared one. At 200 steps the 4-domain point is the setting of
``callback_overhead.py``. ``--quick``: 3 points x 2 arms x 12 steps, about 30 s.

    python benchmarks/scaling.py [--quick] [--out DIR] [--repeats N] [--steps N]

Writes ``<out>/scaling.json`` and ``<out>/scaling.md``.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import callback_overhead as co  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import parser, table, write  # noqa: E402  (sets the offline environment first)
from tqdm.auto import tqdm  # noqa: E402

from tikmix_hf.stage_record import measurement_tokens  # noqa: E402

BATCH = 8
FULL = {"steps": 200, "domains": (4, 8, 16, 26), "probes": (4, 8, 16, 32),
        "fixed_probes": 8, "fixed_domains": 8}
QUICK = {"steps": 12, "domains": (4, 8), "probes": (4, 8), "fixed_probes": 8, "fixed_domains": 8}
LINEAR_R2 = 0.98  # the fit counts as linear from here
SAME_SLOPE = 0.15  # the two sweeps' slopes count as the same within this relative gap


class _Recorder(co.TiKMiXCallback):
    """The library's callback, remembered so that its per-stage history can be read after ``co.run``."""

    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _Recorder.made.append(self)


class _CpuTimedTrainer(co.Trainer):
    """The Trainer, with the process CPU time of ``train()`` kept next to ``co.run``'s wall time."""

    cpu_s: float = 0.0

    def train(self, *args, **kwargs):
        start = time.process_time()
        try:
            return super().train(*args, **kwargs)
        finally:
            _CpuTimedTrainer.cpu_s = time.process_time() - start


# co.run() looks both names up at call time (in this process only)
co.TiKMiXCallback = _Recorder
co.Trainer = _CpuTimedTrainer


def measure(arm: str, steps: int, probes: int, n_domains: int) -> dict:
    """One ``callback_overhead.run``, plus its CPU time and, for TiKMiX, the per-stage history."""
    _Recorder.made.clear()
    with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints every log dict when tqdm is off
        # on probes: the measurement's cost is its probe and validation tokens, which the sweep varies
        result = co.run(arm, steps, BATCH, probes, n_domains, source="probes")
    result["cpu_s"] = _CpuTimedTrainer.cpu_s
    if arm == "tikmix":
        result["per_stage"] = [
            {
                "stage": h["stage"], "step": h["step"], "status": h["status"],
                "total_s": h["seconds"]["total"], "influence_s": h["seconds"]["influence"],
                "solve_s": h["seconds"]["solve"],
                # tokens forwarded beyond training (a training window's sequences are training's own)
                "probe_tokens": measurement_tokens(h["influence"]),
                "hook_s": (h["influence"].get("window") or {}).get("hook_seconds", 0.0),
            }
            for h in _Recorder.made[-1].history
        ]
    return result


def summarise(n_domains: int, probes: int, steps: int, runs: dict) -> dict:
    static = min(runs["static"], key=lambda r: r["wall_s"])
    tikmix = min(runs["tikmix"], key=lambda r: r["wall_s"])
    stages = tikmix["per_stage"]
    k = max(len(stages), 1)
    keys = ("total_s", "influence_s", "solve_s", "probe_tokens")
    mean = {key: sum(s[key] for s in stages) / k for key in keys}
    # every stage of a point does the same work: the fastest one is the cost least disturbed by machine load
    fastest = min(stages, key=lambda s: s["total_s"])
    train_labelled = steps * BATCH * (co.SEQ - 1)
    overhead = tikmix["wall_s"] / static["wall_s"] - 1
    predicted = tikmix["probe_tokens"] / train_labelled
    return {
        "domains": n_domains, "probe_sequences": probes, "steps": steps, "batch": BATCH, "seq": co.SEQ,
        "stages": len(stages), "statuses": sorted({s["status"] for s in stages}),
        "train_labelled_tokens": train_labelled, "probe_tokens": tikmix["probe_tokens"],
        "static_wall_s": static["wall_s"], "tikmix_wall_s": tikmix["wall_s"],
        "wall_ratio": tikmix["wall_s"] / static["wall_s"], "overhead": overhead,
        "predicted_overhead": predicted,
        "excess_pp": 100 * (overhead - predicted),
        "static_cpu_s": static["cpu_s"], "tikmix_cpu_s": tikmix["cpu_s"],
        "cpu_ratio": tikmix["cpu_s"] / static["cpu_s"],
        "tikmix_share": tikmix["tikmix_s"] / tikmix["wall_s"],
        "stage_probe_tokens": mean["probe_tokens"],
        "mean_stage_s": mean["total_s"], "mean_stage_influence_s": mean["influence_s"],
        "mean_stage_solve_s": mean["solve_s"],
        "stage_s": fastest["total_s"], "stage_influence_s": fastest["influence_s"],
        "stage_solve_s": fastest["solve_s"],
        "stage_other_s": fastest["total_s"] - fastest["influence_s"] - fastest["solve_s"],
        "solve_share_of_tikmix": fastest["solve_s"] / fastest["total_s"] if fastest["total_s"] else 0.0,
        "train_s_per_1k_tokens": 1000 * static["wall_s"] / train_labelled,
        "per_stage": stages, "all_runs": runs,
    }


def fit(points: list[dict], y: str) -> dict | None:
    """Least squares ``y = intercept + slope * probe tokens per stage`` over the points."""
    x = np.array([p["stage_probe_tokens"] for p in points], dtype=float)
    v = np.array([p[y] for p in points], dtype=float)
    if len(points) < 2 or np.ptp(x) == 0:
        return None
    slope, intercept = np.polyfit(x, v, 1)
    resid = v - (intercept + slope * x)
    spread = float(np.sum((v - v.mean()) ** 2))
    r2 = 1 - float(np.sum(resid**2)) / spread if spread > 0 else 1.0
    return {"s_per_1k_tokens": 1000 * float(slope), "intercept_s": float(intercept), "r2": r2,
            "n": len(points)}


HEADER = [
    "domains", "probe seqs / domain", "probe tokens / stage", "probe / training tokens (predicted overhead)",
    "wall ratio TiKMiX / static", "overhead", "overhead - predicted (pp)", "CPU-time ratio TiKMiX / static",
    "TiKMiX share of wall", "influence s / stage*", "solver ms / stage*", "TiKMiX s / stage*",
]


def row(p: dict) -> list:
    return [
        p["domains"], p["probe_sequences"], f"{p['stage_probe_tokens']:,.0f}",
        f"{p['predicted_overhead']:.1%}",
        f"{p['wall_ratio']:.3f}", f"{p['overhead']:.1%}", f"{p['excess_pp']:+.1f}", f"{p['cpu_ratio']:.3f}",
        f"{p['tikmix_share']:.1%}", f"{p['stage_influence_s']:.2f}", f"{1000 * p['stage_solve_s']:.1f}",
        f"{p['stage_s']:.2f}",
    ]


def _line(f: dict) -> str:
    return (f"{f['s_per_1k_tokens']:.3f} s per 1k probe tokens, intercept {f['intercept_s']:.3f} s "
            f"(R^2 = {f['r2']:.3f}, {f['n']} points)")


def conclusions(points: list[dict], by_domains: list[dict], fits: dict) -> list[str]:
    """The bullet conclusions, every claim decided by the numbers."""
    out = []
    total, infl = fits["total"], fits["influence"]
    train_per_1k = float(np.median([p["train_s_per_1k_tokens"] for p in points]))
    if total is not None:
        shape = "linear" if total["r2"] >= LINEAR_R2 else f"not clearly linear (R^2 < {LINEAR_R2})"
        if total["n"] < 4:
            shape = f"fitted by a line (only {total['n']} points: too few to judge whether it is linear)"
        smallest = min(p["stage_s"] for p in points)
        fixed = ("none measurable" if total["intercept_s"] <= 0.1 * smallest
                 else f"{total['intercept_s'] / smallest:.0%} of the cheapest point's stage")
        out.append(
            f"TiKMiX time per stage against probe tokens per stage, i.e. (domains + 1) x probe sequences, is "
            f"{shape}: "
            f"{total['s_per_1k_tokens']:.3f} s per 1k probe tokens plus a fixed {total['intercept_s']:.3f} s "
            f"per stage ({fixed}; R^2 = {total['r2']:.3f} over {total['n']} points)."
        )
        out.append(
            f"A probe token costs {total['s_per_1k_tokens'] / train_per_1k:.2f}x a training token "
            f"({train_per_1k:.3f} s per 1k labelled training tokens in the static runs, median)."
        )
    if infl is not None:
        out.append(f"The influence pass alone: {_line(infl)}.")
    sweeps = {"domains": fits.get("domains_sweep"), "probe-budget": fits.get("probes_sweep")}
    for name, f in sweeps.items():
        if f is not None:
            out.append(f"The {name} sweep alone: {_line(f)}.")
    if all(sweeps.values()):
        if min(f["n"] for f in sweeps.values()) < 3:
            out.append("Two points per sweep: too few to compare the two sweeps' slopes.")
        else:
            a, b = (f["s_per_1k_tokens"] for f in sweeps.values())
            gap = abs(a - b) / max(abs(a), abs(b))
            out.append(
                f"The two sweeps' slopes differ by {gap:.0%}: "
                + ("a probe token costs the same whether it comes from more domains or from more sequences "
                   "per domain." if gap <= SAME_SLOPE else
                   f"more than {SAME_SLOPE:.0%}, so a probe token's cost depends on whether it comes "
                   "from more domains or from more sequences per domain.")
            )
    solver = max(points, key=lambda p: p["stage_solve_s"])
    out.append(
        f"The solver is {'cheap' if solver['solve_share_of_tikmix'] < 0.05 else 'not negligible'}: at most "
        f"{1000 * solver['stage_solve_s']:.1f} ms per stage ({solver['domains']} domains, "
        f"{solver['solve_share_of_tikmix']:.1%} of that stage's TiKMiX time); over the domains sweep "
        + " -> ".join(f"{1000 * p['stage_solve_s']:.1f}" for p in by_domains) + " ms."
    )
    excess = [p["excess_pp"] for p in points]
    ratios = [p["overhead"] / p["predicted_overhead"] for p in points if p["predicted_overhead"] > 0]
    out.append(
        f"Measured wall overhead against the predicted probe share: overhead / predicted from "
        f"{min(ratios):.2f} to {max(ratios):.2f}, excess from {min(excess):+.1f} to {max(excess):+.1f} pp; "
        f"{sum(e <= 2 for e in excess)} of {len(points)} points within predicted + 2 pp."
    )
    walls = [p["static_wall_s"] for p in points]
    out.append(
        f"Run-to-run noise: the static runs (same work at every point) took {min(walls):.1f} to "
        f"{max(walls):.1f} s, a spread of {max(walls) / min(walls) - 1:.1%}; a point's overhead is uncertain "
        "by about that much (--repeats N keeps the fastest of N runs an arm)."
    )
    cpu_excess = [100 * (p["cpu_ratio"] - 1 - p["predicted_overhead"]) for p in points]
    out.append(
        f"In CPU time of train() (time descheduled by other processes left out): excess over the predicted "
        f"probe share from {min(cpu_excess):+.1f} to {max(cpu_excess):+.1f} pp; "
        f"{sum(e <= 2 for e in cpu_excess)} of {len(points)} points within predicted + 2 pp."
    )
    big = max(points, key=lambda p: p["predicted_overhead"])
    out.append(
        f"Largest probe share ({big['domains']} domains x {big['probe_sequences']} sequences, predicted "
        f"{big['predicted_overhead']:.1%}): wall ratio {big['wall_ratio']:.3f}, TiKMiX "
        f"{big['tikmix_share']:.1%} of the wall time."
    )
    bad = [p for p in points if p["statuses"] != ["converged"]]
    if bad:
        out.append("Stages whose solver did not converge: "
                   + "; ".join(f"{p['domains']}x{p['probe_sequences']}: {p['statuses']}" for p in bad))
    return out


def main() -> None:
    started = time.perf_counter()
    p = parser(__doc__)
    p.add_argument("--repeats", type=int, default=1,
                   help="static/TiKMiX pairs per point; the fastest of each arm is kept (default 1)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 200, quick 12)")
    cli = p.parse_args()
    torch.set_num_threads(1)  # 2-thread kernels stall behind any other process on a small machine
    plan = QUICK if cli.quick else FULL
    steps = cli.steps or plan["steps"]
    keys = [(d, plan["fixed_probes"]) for d in plan["domains"]]
    keys += [(plan["fixed_domains"], q) for q in plan["probes"] if (plan["fixed_domains"], q) not in keys]
    runs = {key: {"static": [], "tikmix": []} for key in keys}
    # one unmeasured TiKMiX run first: lazy imports (scipy's SLSQP, ...) would otherwise land on point one
    measure("tikmix", 8, 2, 2)
    bar = tqdm(total=len(keys) * 2 * cli.repeats, desc="scaling runs", unit="run", file=sys.stderr)
    for key in keys:
        for _ in range(cli.repeats):
            for arm in ("static", "tikmix"):
                bar.set_postfix_str(f"{key[0]} domains x {key[1]} seqs, {arm}")
                runs[key][arm].append(measure(arm, steps, key[1], key[0]))
                bar.update(1)
    bar.close()
    points = {key: summarise(key[0], key[1], steps, runs[key]) for key in keys}
    by_domains = [points[(d, plan["fixed_probes"])] for d in plan["domains"]]
    by_probes = [points[(plan["fixed_domains"], q)] for q in plan["probes"]]
    every = list(points.values())
    fits = {
        "total": fit(every, "stage_s"), "influence": fit(every, "stage_influence_s"),
        "solve": fit(every, "stage_solve_s"),
        "domains_sweep": fit(by_domains, "stage_s"), "probes_sweep": fit(by_probes, "stage_s"),
    }
    notes = conclusions(every, by_domains, fits)
    stages = by_domains[0]["stages"]
    setup = (
        f"Setup: tiny Llama (hidden 128, 4 layers, vocab {co.VOCAB}), {steps} steps of {BATCH} x {co.SEQ} "
        f"tokens per run on one CPU thread; TiKMiX-D re-decides at 25/50/75 % ({stages} stages); one "
        f"validation task with as many sequences as each domain's probe budget; static and TiKMiX runs back "
        f"to back at each point, fastest of {cli.repeats} kept. Tokens are labelled tokens ({co.SEQ - 1} per "
        "sequence)."
    )
    md = "\n\n".join([  # no title: RESULTS.md has the section heading around this block
        ("Quick run (`--quick`). " if cli.quick else "") + setup,
        f"Domains sweep ({plan['fixed_probes']} probe sequences per domain):",
        table(HEADER, [row(x) for x in by_domains]),
        f"Probe-budget sweep ({plan['fixed_domains']} domains):",
        table(HEADER, [row(x) for x in by_probes]),
        f"\\* per stage: the fastest of the point's {stages} stages (all do the same work; the means are in "
        "the JSON).",
        "\n".join(f"- {n}" for n in notes),
    ])
    doc = {
        "benchmark": "scaling", "quick": cli.quick, "steps": steps, "batch": BATCH, "seq": co.SEQ,
        "repeats": cli.repeats, "domains_sweep": by_domains, "probes_sweep": by_probes, "fits": fits,
        "conclusions": notes,
    }
    write("scaling", cli.out, doc, md, started=started)


if __name__ == "__main__":
    main()
