"""Quality: every mixing arm at equal training tokens, on the synthetic and the local real-text corpus.

Each arm trains a fresh copy of the same initial model (per seed) with the demo's engine
(:func:`tikmix_hf.demo.train_arm`) and is scored on held-out text its mixer never saw: the
per-task losses, their average, and the continuation-choice accuracy.

Arms (all at the same training tokens unless marked "equal compute"):

- static: ``uniform``; ``natural`` (token proportions); ``temperature`` (natural^(1/3),
  renormalised); ``targets`` (local corpus only: half natural, half spread evenly over the
  domains the validation text was held out from, what a user who knows the tasks would try);
  ``oracle`` (synthetic corpus only: the known task generators, ``SyntheticCorpus.oracle_weights``);
  ``aligned`` (the library's aligned start, ``tikmix_initial_weights="aligned"``, kept all run);
- TiKMiX: ``tikmix_d`` with the library's defaults (the aligned start, the trust-region objective, S
  read in the training window of 64 steps from the probe budget's sequences per domain, decisions at
  5/25/50/75% of training) and its variants (``DEFAULT_VARIANTS``: the previous release's defaults
  ``tikmix_d_v1``, the defaults from the natural mixture, with the general-ability task, on probes,
  eight decisions, a shorter window, no average over stages, and from the target-tilted mixture);
  ``tikmix_m`` (probes, 5/25/50/75%); ``tikmix_d_paper`` (the paper's Eq. 10, on probes, from the
  natural mixture) at the bench's stage fractions 0.2/0.4/0.6/0.8; all with the adam preconditioner;
- the library's baseline mixers at the same stages: ``odm``, ``doremi`` (its reference model is
  this seed's ``uniform`` model, as in the DoReMi paper) and ``doge``;
- at equal *compute*, ``<arm>_eq`` for every arm that measures (``EQ_ARMS``): the run gives up the
  training steps its measurement's seconds would have bought, at its own seconds per training step
  (window hooks, validation passes, probes and top-ups, look-aheads, the aligned start, solves);
- the hindsight static mixture ``hindsight_d``: the default run's own final weights used from step 0,
  which costs a whole run to know.

``reach`` tables how far each dynamic arm's mixture got early: the KL divergence from the mixture
training drew over the first 25% and 50% of its samples to the run's final weights.

The gap closed, on the synthetic corpus: ``(uniform - arm) / (uniform - oracle)`` of the average
held-out loss.

Runs go two at a time (one torch thread each): 2 corpora x 3 seeds x the default arms of a 400-step
model (108 runs) take about an hour on 2 CPU cores (19 local domains); ``--quick`` (1 seed, tiny model, without the
arms of ``QUICK_SKIPS``) under a minute.

    python benchmarks/quality.py [--quick] [--seeds 0 1 2] [--corpora synthetic local] [--workers 2]
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path
from typing import Any

import numpy as np

from tikmix_hf.config import DEFAULT_FRACTIONS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_size, parser, process_pool, table, write  # noqa: E402

TEMPERATURE = 3.0
DEFAULT_SCHEDULE = DEFAULT_FRACTIONS["trust_region"]  # the default objective's own schedule
EIGHT = [0.05, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875]  # twice as many decisions (arm tikmix_d_eight)
SHORT_WINDOW = 16  # arm tikmix_d_short: a window of a quarter of the default's steps
#: The default TiKMiX-D and its variants: what each changes in the defaults.
DEFAULT_VARIANTS = {
    "tikmix_d": {},
    # the defaults of the previous release: from the mixture's own (natural) weights, every window sequence read
    "tikmix_d_v1": {"tikmix_initial_weights": "keep", "tikmix_window_sequences": 0, "tikmix_window_steps": 32},
    "tikmix_d_natural": {"tikmix_initial_weights": "keep"},  # the defaults without the aligned start
    "tikmix_d_general": {"tikmix_general_sequences": 16},  # with the guard for general ability
    "tikmix_d_probes": {"tikmix_influence_source": "probes"},  # measured on probes, as the paper measures
    "tikmix_d_eight": {"tikmix_stage_fractions": EIGHT},  # twice as many decisions
    "tikmix_d_short": {"tikmix_window_steps": SHORT_WINDOW},  # a shorter window
    "tikmix_d_unsmoothed": {"tikmix_smoothing": 0.0},  # each stage's own S, not averaged over stages
    # the defaults, started from the target-tilted mixture a person would pick (local corpus only)
    "tikmix_d_tilted": {"tikmix_initial_weights": "keep"},
}
#: Variants that start from a static mixture other than the natural one.
VARIANT_INITIAL = {"tikmix_d_tilted": "targets"}
#: The other mixers: (solver, config).
OTHER_MIXERS = {
    "tikmix_d_paper": ("direct", {"tikmix_objective": "paper"}),  # at the bench's stage fractions
    "tikmix_m": ("surrogate", {"tikmix_stage_fractions": list(DEFAULT_SCHEDULE)}),
    "odm": ("odm", {}),
    "doge": ("doge", {}),
    # the natural mixture tilted toward the tasks' token matches before step 0, kept all run
    "aligned": ("static", {"tikmix_initial_weights": "aligned"}),
}
STATIC = ("uniform", "natural", "temperature", "targets", "oracle")

LABELS = {
    "uniform": "static uniform", "natural": "static natural", "temperature": f"static natural^(1/{TEMPERATURE:g})",
    "targets": "static target-tilted", "oracle": "static oracle", "aligned": "static aligned to the tasks' tokens",
    "tikmix_d": "TiKMiX-D", "tikmix_d_paper": "TiKMiX-D (paper objective)", "tikmix_m": "TiKMiX-M",
    "odm": "ODM", "doremi": "DoReMi", "doge": "DoGE",
    "hindsight_d": "hindsight static of TiKMiX-D (costs a whole run)",
    "tikmix_d_probes": "TiKMiX-D on probes",
    "tikmix_d_eight": "TiKMiX-D, eight decisions",
    "tikmix_d_short": "TiKMiX-D, window of the probe budget",
    "tikmix_d_unsmoothed": "TiKMiX-D, S not averaged over stages",
    "tikmix_d_tilted": "TiKMiX-D from the target-tilted mixture",
    "tikmix_d_v1": "TiKMiX-D, previous defaults (natural start, every window sequence)",
    "tikmix_d_natural": "TiKMiX-D from the natural mixture",
    "tikmix_d_general": "TiKMiX-D with the general-ability task",
}
#: Every arm that measures also runs at equal compute, ``<arm>_eq``: it gives up the training steps its
#: measurement's seconds would have bought (window hooks, validation passes, probes and top-ups, look-aheads,
#: probe losses, solves), at the plain run's own seconds per training step.
EQ_ARMS = ["tikmix_d_paper", "tikmix_m", "odm", "doge", *DEFAULT_VARIANTS]
LABELS.update({f"{a}_eq": f"{LABELS[a]} (equal compute)" for a in EQ_ARMS})
ORDER = list(LABELS)
#: Left out of --quick: code other arms run (tikmix_d_eq the equal-compute path, tikmix_d_paper the probes,
#: doge the baseline mixers' path through the same engine).
QUICK_SKIPS = ("tikmix_d_v1", "tikmix_d_v1_eq", "tikmix_d_natural", "tikmix_d_general", "odm", "odm_eq",
               "tikmix_d_tilted", "tikmix_d_tilted_eq")
#: What ``make bench`` compares: the static mixtures (the aligned one among them), the default TiKMiX-D and the
#: previous release's defaults, each at equal training tokens and at equal compute, the default from the natural
#: mixture and with the general-ability task, the paper's objective, TiKMiX-M, two baseline mixers, the default's
#: own hindsight static mixture, and the default started from the mixture a user who knows the targets would pick.
#: The other arms of ORDER run with --arms.
DEFAULT_ARMS = ["uniform", "natural", "targets", "oracle", "aligned", "tikmix_d", "tikmix_d_eq", "tikmix_d_v1",
                "tikmix_d_v1_eq", "tikmix_d_natural", "tikmix_d_general", "tikmix_d_paper", "tikmix_m", "tikmix_m_eq",
                "odm", "odm_eq", "doge", "hindsight_d", "tikmix_d_tilted", "tikmix_d_tilted_eq"]


# ------------------------------------------------------------------------------------------------
# Worker side: one process per core, data prepared once per corpus
# ------------------------------------------------------------------------------------------------

_DATA: dict[str, Any] = {}


def _data(corpus: str, size):
    if corpus not in _DATA:
        from tikmix_hf.demo import prepare_data

        _DATA[corpus] = prepare_data(corpus, size)
    return _DATA[corpus]


def static_weights(corpus: str, size, kind: str) -> dict[str, float]:
    """The static mixtures that need the data: natural, temperature, targets, oracle."""
    data = _data(corpus, size)
    blocks = np.array([len(data.domains[d]) for d in data.domains], dtype=float)
    names = list(data.domains)
    if kind == "natural":
        w = blocks / blocks.sum()
    elif kind == "temperature":
        w = blocks ** (1 / TEMPERATURE)
        w /= w.sum()
    elif kind == "targets":
        from tikmix_hf.demo import LOCAL_CHOICE_TARGETS, LOCAL_TEXT_TARGETS

        wanted = [next(d for d in prefs if d in names) for prefs in (*LOCAL_TEXT_TARGETS, LOCAL_CHOICE_TARGETS)]
        w = 0.5 * blocks / blocks.sum()
        for d in wanted:
            w[names.index(d)] += 0.5 / len(wanted)
    elif kind == "oracle":
        return {d: float(data.oracle_weights.get(d, 0.0)) for d in names}
    else:
        raise ValueError(kind)
    return {d: float(x) for d, x in zip(names, w)}


def run_job(job: dict) -> dict:
    """Train one (corpus, seed, arm) and return its demo row (plus what the dependants need)."""
    from tikmix_hf.demo import Arm, DemoSize, train_arm

    size = DemoSize(**job["size"])
    data = _data(job["corpus"], size)
    initial = job["initial"]
    if isinstance(initial, str) and initial not in ("natural", "uniform"):
        initial = static_weights(job["corpus"], size, initial)
    arm = Arm(job["arm"], LABELS[job["arm"]], initial=initial, solver=job["solver"], config=job["config"])
    if job.get("max_steps"):
        size = dataclasses.replace(size, max_steps=job["max_steps"])
    base = Path(job["base"]) / job["corpus"]
    row, model = train_arm(arm, job["seed"], data, size, base, keep_model=True)
    if job.get("save_model"):
        path = base / "models" / f"seed{job['seed']}_{job['arm']}"
        model.save_pretrained(path)
        row["model_path"] = str(path)
    row["corpus"] = job["corpus"]
    row["max_steps"] = size.max_steps
    row["measurement_share"] = measurement_share(row)
    if row.get("history"):
        from tikmix_hf import load_history

        row["reach"] = reach(load_history(base / row["history"]), size.max_steps * size.batch_size)
    return row


def cumulative_mixture(history: dict, position: int) -> dict[str, float]:
    """The mixture training actually drew over samples ``[0, position)``: each weight swap's weights, by the
    samples it was in effect for."""
    swaps = [(0, history["initial_weights"])]
    swaps += [(int(s["effective_index"]), s["weights_after"]) for s in history["stages"]]
    total = dict.fromkeys(history["domains"], 0.0)
    for (start, weights), (end, _) in zip(swaps, [*swaps[1:], (position, None)]):
        span = max(min(end, position) - start, 0)
        for d in total:
            total[d] += span * weights[d]
    return {d: v / position for d, v in total.items()}


def reach(history: dict, samples: int) -> dict:
    """How early the run trained on its final mixture: KL(cumulative mixture at 25% and 50% || final mixture)."""
    final = cumulative_mixture(history, samples) if not history["stages"] else history["stages"][-1]["weights_after"]
    out = {}
    for f in (0.25, 0.5):
        cum = cumulative_mixture(history, round(f * samples))
        out[f"kl_cumulative_{round(100 * f)}_final"] = sum(
            p * math.log(p / max(final[d], 1e-12)) for d, p in cum.items() if p > 0)
    return out


def pairwise_kl(weights: list[dict]) -> float:
    """Mean KL(w_s || w_t) over ordered pairs of seeds' final weights: how far runs of other seeds end apart."""
    pairs = [(a, b) for i, a in enumerate(weights) for j, b in enumerate(weights) if i != j]
    if not pairs:
        return float("nan")
    return float(np.mean([sum(p * math.log(p / max(b[d], 1e-12)) for d, p in a.items() if p > 0)
                          for a, b in pairs]))


# ------------------------------------------------------------------------------------------------
# Driver side: the jobs and their dependencies
# ------------------------------------------------------------------------------------------------

def plan(corpus: str, seeds: list[int], arms: list[str]) -> list[dict]:
    """Every job, with ``needs``: the (arm) results of the same seed it waits for."""
    jobs = []
    for seed in seeds:
        for arm in arms:
            plain = arm.removesuffix("_eq")
            tilted = arm == "targets" or VARIANT_INITIAL.get(plain) == "targets"
            if arm == "oracle" and corpus != "synthetic" or tilted and corpus != "local":
                continue
            if arm != plain and plain not in EQ_ARMS:
                raise ValueError(f"arm {arm!r}: {plain!r} has no equal-compute run; those are {EQ_ARMS}")
            job = {"corpus": corpus, "seed": seed, "arm": arm, "initial": "natural", "solver": None, "config": {},
                   "needs": []}
            if arm in STATIC:
                job["initial"] = arm
                job["save_model"] = arm == "uniform" and "doremi" in arms
            elif plain in DEFAULT_VARIANTS:
                # TiKMiX-D with the library's defaults (the default schedule), or a variant of them
                job["solver"] = "direct"
                job["initial"] = VARIANT_INITIAL.get(plain, "natural")
                job["config"] = {"tikmix_stage_fractions": list(DEFAULT_SCHEDULE), **DEFAULT_VARIANTS[plain]}
            elif plain in OTHER_MIXERS:
                job["solver"], config = OTHER_MIXERS[plain]
                job["config"] = dict(config)
            elif arm == "doremi":
                job["solver"], job["needs"] = "doremi", ["uniform"]
            elif arm == "hindsight_d":
                job["needs"] = ["tikmix_d"]
            else:
                raise ValueError(f"unknown arm {arm!r}; use any of {ORDER}")
            if arm != plain:  # each "_eq" arm waits for its plain arm's measured cost
                job["needs"] = [*job["needs"], plain]
            jobs.append(job)
    return jobs


def measurement_share(row: dict) -> float:
    """The measurement's seconds over the training's own seconds (the rest of the run, evaluation excluded)."""
    own = row["seconds"]["train"] - row["seconds"]["tikmix"]
    return row["seconds"]["tikmix"] / own if own > 0 else float("inf")


def charged_steps(row: dict) -> int:
    """Training steps a run's measurement costs: its seconds over the run's own seconds per training step."""
    share = measurement_share(row)
    return row["max_steps"] if not math.isfinite(share) else math.ceil(share * row["max_steps"] - 1e-9)


def resolve(job: dict, done: dict, size) -> dict:
    """Fill in what a job takes from the results it waited for."""
    job = dict(job)
    key = (job["corpus"], job["seed"])
    if job["arm"] == "doremi":
        job["config"] = {"tikmix_reference_model": done[key + ("uniform",)]["model_path"]}
    elif job["arm"].endswith("_eq"):
        plain = done[key + (job["needs"][-1],)]
        charged = charged_steps(plain)
        # A preset so small that the measurement costs the whole run (--quick on many domains) still trains a
        # step, and says that the compute could not be matched.
        job["max_steps"] = max(size.max_steps - charged, 1)
        job["compute_matched"] = size.max_steps - charged >= 1
        job["charged_steps"] = charged
    elif job["arm"] == "hindsight_d":
        job["initial"] = dict(done[key + ("tikmix_d",)]["final_weights"])
    return job


def run_all(corpora: list[str], seeds: list[int], arms: list[str], size, workers: int, base: Path,
            show_progress: bool = True) -> list[dict]:
    from tqdm.auto import tqdm

    pending = [j for c in corpora for j in plan(c, seeds, arms)]
    done: dict[tuple, dict] = {}
    rows: list[dict] = []
    size_dict = dataclasses.asdict(size)
    size_dict["stage_fractions"] = tuple(size_dict["stage_fractions"])
    bar = tqdm(total=len(pending), desc="quality arms", unit="run", disable=not show_progress, dynamic_ncols=True)
    with process_pool(workers) as pool:
        running = {}
        while pending or running:
            ready = [j for j in pending
                     if all((j["corpus"], j["seed"], n) in done for n in j["needs"])]
            for job in ready:
                pending.remove(job)
                job = resolve(job, done, size)
                job.update(size=size_dict, base=str(base))
                running[pool.submit(run_job, job)] = job
            if not running:
                raise RuntimeError(f"jobs wait for results that never come: {[j['arm'] for j in pending]}")
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                row = fut.result()
                if "charged_steps" in job:
                    row["charged_steps"] = job["charged_steps"]
                    row["compute_matched"] = job["compute_matched"]
                done[(job["corpus"], job["seed"], job["arm"])] = row
                rows.append(row)
                bar.set_postfix_str(f"{job['corpus']} s{job['seed']} {job['arm']} {row['final']['average']:.3f}")
                bar.update(1)
    bar.close()
    return rows


# ------------------------------------------------------------------------------------------------
# Summary, tables, picture
# ------------------------------------------------------------------------------------------------

def _mean_std(values) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _interval(values) -> list[float]:
    """The 95% t interval of the mean of paired per-seed differences (nan with one seed)."""
    from scipy.stats import t

    a = np.asarray(values, dtype=float)
    if a.size < 2:
        return [float("nan"), float("nan")]
    half = float(t.ppf(0.975, a.size - 1) * a.std(ddof=1) / np.sqrt(a.size))
    return [float(a.mean() - half), float(a.mean() + half)]


def summarise(rows: list[dict]) -> dict:
    out: dict[str, Any] = {}
    for corpus in sorted({r["corpus"] for r in rows}):
        mine = [r for r in rows if r["corpus"] == corpus]
        seeds = sorted({r["seed"] for r in mine})
        by = {(r["seed"], r["arm"]): r for r in mine}
        arms = [a for a in ORDER if any((s, a) in by for s in seeds)]
        tasks = list(mine[0]["final"]["losses"])
        entry: dict[str, Any] = {"seeds": seeds, "tasks": tasks, "arms": {}}
        for arm in arms:
            rs = [by[(s, arm)] for s in seeds if (s, arm) in by]
            avg = _mean_std([r["final"]["average"] for r in rs])
            e = {
                "label": LABELS[arm],
                "average": avg,
                "tasks": {t: _mean_std([r["final"]["losses"][t] for r in rs]) for t in tasks},
                "accuracy": _mean_std([r["final"]["accuracy"] for r in rs]),
                "all_domains_loss": _mean_std([r["final"]["all_domains_loss"] for r in rs]),
                "training_tokens": int(np.mean([r["training_tokens"] for r in rs])),
                "measurement_share": _mean_std([r["measurement_share"] for r in rs]),
                "final_weights": {d: float(np.mean([r["final_weights"][d] for r in rs]))
                                  for d in rs[0]["final_weights"]},
                "seed_kl": pairwise_kl([r["final_weights"] for r in rs]),
            }
            if all("reach" in r for r in rs):
                e["reach"] = {k: _mean_std([r["reach"][k] for r in rs]) for k in rs[0]["reach"]}
            for ref in ("uniform", "natural", "targets", "aligned", "hindsight_d"):
                if all((s, ref) in by for s in seeds) and arm != ref:
                    d = [by[(s, arm)]["final"]["average"] - by[(s, ref)]["final"]["average"]
                         for s in seeds if (s, arm) in by]
                    rel = [-(by[(s, arm)]["final"]["average"] / by[(s, ref)]["final"]["average"] - 1)
                           for s in seeds if (s, arm) in by]
                    e[f"vs_{ref}"] = {"delta": _mean_std(d), "gain": _mean_std(rel), "wins": int(sum(x < 0 for x in d)),
                                      "n": len(d), "per_seed": rel, "ci95": _interval(rel)}
            entry["arms"][arm] = e
        if all((s, "oracle") in by and (s, "uniform") in by for s in seeds):
            for arm in arms:
                gaps = []
                for s in seeds:
                    if (s, arm) not in by:
                        continue
                    u, o, a = (by[(s, k)]["final"]["average"] for k in ("uniform", "oracle", arm))
                    gaps.append((u - a) / (u - o) if u != o else float("nan"))
                entry["arms"][arm]["gap_closed"] = _mean_std(gaps)
        out[corpus] = entry
    return out


def _pm(ms: tuple[float, float], fmt: str = ".3f") -> str:
    return f"{ms[0]:{fmt}} ± {ms[1]:{fmt}}"


def _pct(ms: tuple[float, float]) -> str:
    return f"{100 * ms[0]:+.1f}% ± {100 * ms[1]:.1f}"


def markdown(summary: dict, rows: list[dict], size, seconds: float, plots: dict[str, str]) -> str:
    parts = [
        f"Setup: a Llama of {size.layers} layers x {size.hidden_size} hidden units on {size.block_size}-token blocks, "
        f"{size.max_steps} steps of {size.batch_size} blocks, decisions at {list(DEFAULT_SCHEDULE)} for the default "
        f"objective (TiKMiX-D and -M) and at "
        f"{list(size.stage_fractions)} for the paper's objective and the baselines, "
        f"{size.probe_sequences} probe sequences per domain and {size.validation_sequences} validation sequences per "
        f"task at each stage. Mean ± standard deviation over seeds {summary[next(iter(summary))]['seeds']}. "
        f"Held-out loss: mean token cross-entropy on test text no mixer saw (lower is better). "
        f"Wall time of the whole run: {seconds / 60:.1f} min.",
    ]
    for corpus, entry in summary.items():
        arms = entry["arms"]
        has_gap = any("gap_closed" in e for e in arms.values())
        header = ["arm", "average held-out loss", "vs uniform (gain, wins)", "accuracy", "all-domains loss"]
        header += [f"loss {t}" for t in entry["tasks"]]
        if has_gap:
            header.append("gap closed")
        header.append("training tokens · measurement time")
        body = []
        for e in arms.values():
            vs = e.get("vs_uniform")
            row = [e["label"], _pm(e["average"]),
                   f"{_pct(vs['gain'])} ({vs['wins']}/{vs['n']})" if vs else "—",
                   _pm(e["accuracy"], ".2f"), _pm(e["all_domains_loss"])]
            row += [_pm(e["tasks"][t]) for t in entry["tasks"]]
            if has_gap:
                row.append(_pm(e["gap_closed"], ".2f") if "gap_closed" in e else "")
            share = e["measurement_share"][0]
            row.append(f"{e['training_tokens']:,} · {100 * share:.1f}%" if share else f"{e['training_tokens']:,} · —")
            body.append(row)
        parts.append(f"### {corpus} corpus\n\n" + table(header, body))
        parts.append(paired_table(entry))
        parts.append(reach_table(entry))
        if corpus in plots:
            parts.append(f"![quality on the {corpus} corpus]({plots[corpus]})")
        parts.append(verdicts(corpus, entry))
    return "\n\n".join(parts)


def paired_table(entry: dict) -> str:
    """Paired per-seed gains (same initialisation, same data order) with their 95% t interval."""
    arms = entry["arms"]
    refs = [r for r in ("uniform", "natural", "targets", "aligned", "hindsight_d") if r in arms]
    body = []
    for e in arms.values():
        cells = []
        for ref in refs:
            v = e.get(f"vs_{ref}")
            if v is None:
                cells.append("—")
                continue
            lo, hi = v["ci95"]
            seeds = ", ".join(f"{100 * x:+.1f}" for x in v["per_seed"])
            cells.append(f"{100 * v['gain'][0]:+.1f}% [{100 * lo:+.1f}, {100 * hi:+.1f}] ({seeds})")
        body.append([e["label"], *cells])
    spread = arms.get("uniform", {}).get("average", (float("nan"), float("nan")))[1]
    note = (f"Paired gain in average held-out loss, mean [95% t interval] (per seed), over {len(entry['seeds'])} "
            f"seeds; positive means the arm is better. Uniform's own seed-to-seed sd: {spread:.3f} in loss.")
    return note + "\n\n" + table(["arm", *(f"vs {LABELS[r]}" for r in refs)], body)


def reach_table(entry: dict) -> str:
    """How early each mixing arm trained on its final mixture, and how far apart its seeds ended."""
    body = []
    for e in entry["arms"].values():
        if "reach" not in e:
            continue
        r = e["reach"]
        body.append([e["label"], _pm(r["kl_cumulative_25_final"]), _pm(r["kl_cumulative_50_final"]),
                     f"{e['seed_kl']:.3f}"])
    note = ("Reach: KL(the mixture training drew over the first 25% and 50% of its samples ‖ the run's final "
            "mixture), in nats, mean ± sd over seeds; 0 means the run trained on its final mixture from the start. "
            "Stability: the mean KL between two seeds' final mixtures.")
    return note + "\n\n" + table(["arm", "reach at 25%", "reach at 50%", "seeds' final mixtures apart"], body)


def verdicts(corpus: str, entry: dict) -> str:
    """Bullet conclusions computed from the numbers (so they cannot go stale)."""
    arms = entry["arms"]
    ranked = sorted(arms, key=lambda a: arms[a]["average"][0])
    lines = [f"- **Best average held-out loss:** {arms[ranked[0]]['label']} ({arms[ranked[0]]['average'][0]:.3f}); "
             f"order: " + ", ".join(arms[a]["label"] for a in ranked) + "."]
    for arm in ("tikmix_d", "tikmix_m"):
        if arm not in arms:
            continue
        e = arms[arm]
        beaten = [arms[b]["label"] for b in arms if not b.startswith(("tikmix_d", "tikmix_m"))
                  and arms[b]["average"][0] < e["average"][0]]
        lines.append(f"- **{e['label']}** {_pct(e['vs_uniform']['gain']) if 'vs_uniform' in e else ''} vs uniform; "
                     + (f"behind {', '.join(beaten)}." if beaten
                        else "ahead of every static mixture and baseline mixer."))
    for arm, ref in (("tikmix_d_eq", "hindsight_d"), ("tikmix_d_eq", "targets"), ("tikmix_d_eq", "aligned")):
        if arm in arms and f"vs_{ref}" in arms[arm]:
            v = arms[arm][f"vs_{ref}"]
            lines.append(f"- **{arms[arm]['label']} vs {arms[ref]['label']}:** "
                         f"{_pct(v['gain'])} (better in {v['wins']}/{v['n']} seeds).")
    return "\n".join(lines)


def plot(summary: dict, out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    for corpus, entry in summary.items():
        arms = entry["arms"]
        names = list(arms)
        mean = [arms[a]["average"][0] for a in names]
        std = [arms[a]["average"][1] for a in names]
        colours = ["#4c72b0" if a.startswith("tikmix") else "#dd8452" if a in ("odm", "doremi", "doge")
                   else "#8c8c8c" for a in names]
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.2), layout="constrained")
        y = np.arange(len(names))[::-1]
        ax.barh(y, mean, xerr=std, color=colours, capsize=3)
        ax.set_yticks(y, [arms[a]["label"] for a in names], fontsize=8)
        lo = min(m - s for m, s in zip(mean, std))
        hi = max(m + s for m, s in zip(mean, std))
        ax.set_xlim(lo - 0.15 * (hi - lo) - 1e-3, hi + 0.05 * (hi - lo) + 1e-3)
        ax.set_xlabel("average held-out loss (lower is better), mean ± sd over seeds")
        ax.set_title(f"Mixing arms on the {corpus} corpus")
        name = f"quality_{corpus}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths[corpus] = f"out/{name}" if out.name == "out" else name
    return paths


def main(argv=None) -> dict:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="model seeds (default 0 1 2; quick: 0)")
    p.add_argument("--corpora", nargs="+", default=["synthetic", "local"], choices=["synthetic", "local"])
    p.add_argument("--arms", nargs="+", default=None, choices=ORDER,
                   help="default: DEFAULT_ARMS (--quick leaves out the arms of QUICK_SKIPS, whose code others run)")
    p.add_argument("--workers", type=int, default=2, help="parallel runs, one torch thread each")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers {args.workers}: give at least 1")
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    if args.arms is None:
        args.arms = [a for a in DEFAULT_ARMS if not (args.quick and a in QUICK_SKIPS)]
    size = bench_size(args.quick)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tikmix-quality-") as base:
        rows = run_all(args.corpora, seeds, list(args.arms), size, args.workers, Path(base))
    seconds = time.perf_counter() - started
    summary = summarise(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    plots = plot(summary, args.out)
    for r in rows:
        r.pop("model_path", None)
        r.pop("history", None)
    doc = {"size": dataclasses.asdict(size), "seeds": seeds, "summary": summary, "runs": rows,
           "workers": args.workers, "plots": plots}
    write("quality", args.out, doc, markdown(summary, rows, size, seconds, plots), started=started)
    return doc


if __name__ == "__main__":
    main()
