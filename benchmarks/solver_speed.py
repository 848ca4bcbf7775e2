"""How long TiKMiX-D and TiKMiX-M take, next to one Group Influence pass on a tiny model.

The paper's shape: 26 domains x 9 tasks, a synthetic influence matrix (seeded) and a cheap
synthetic ``evaluate`` for TiKMiX-M. The reference is one ``group_influence`` pass of a tiny
Llama (hidden 128, 4 layers, vocab 384) over 26 domains x 4 and 9 tasks x 4 micro-batches of
8 x 128 tokens; when ``tikmix_hf.influence.group_influence`` cannot be imported or called, a
stand-in does the same work (the forward and backward passes and the dot products).

Goals: TiKMiX-D <= 1 % of that pass; TiKMiX-M <= 25 %, excluding the time inside ``evaluate``
(the caller's: in tikmix_hf, forward passes of the look-ahead target). Both are reported.

    python benchmarks/solver_speed.py            # 3 rounds of: 1 pass, 7 direct, 2 surrogate solves
    python benchmarks/solver_speed.py --quick    # 1 round of:  1 pass (1 micro-batch per domain and task,
                                                 # so the shares are 4x larger), 5 direct, 2 surrogate solves

The measurements are interleaved so that all of them see the same machine load; wall and CPU
time (this process, all threads) are both reported, the goals judged on wall time. The pass runs
on one torch thread by default, as the solvers run on one thread: the ratio then compares work,
not parallelism, and a busy machine (OpenMP threads spinning against other processes) does not
distort it. ``--threads N`` gives torch N threads.

Writes ``benchmarks/out/solver_speed.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from tikmix_hf.solvers import normalised_performance, solve_direct, solve_surrogate

ROOT = Path(__file__).resolve().parents[1]
N_DOMAINS, N_TASKS = 26, 9
BATCHES, BATCH_SIZE, SEQ_LEN, VOCAB = 4, 8, 128, 384
GOALS = {"direct": 0.01, "surrogate": 0.25}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for the pass (default 1, like LightGBM's default)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "solver_speed.json"))
    return parser.parse_args(argv)


def synthetic_problem(seed: int):
    """An influence matrix shaped like the paper's: mostly helpful domains, task scales apart."""
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-3, 1, size=(N_TASKS, 1))
    S = (rng.gamma(2.0, 1.0, size=(N_TASKS, N_DOMAINS)) - 0.6) * scales
    prior = rng.dirichlet(np.full(N_DOMAINS, 2.0))
    return S, prior


def synthetic_evaluate(S, w_star):
    """The normalised gain of Eq. 9 plus a curvature term peaked at ``w_star``: cheap, non-linear."""

    def evaluate(W):
        return normalised_performance(S, W).sum(axis=1) - 20.0 * np.sum((W - w_star) ** 2, axis=1)

    return evaluate


def timed(fn):
    """Wall and CPU seconds of ``fn()`` (CPU: this process, all threads), and its value."""
    w0, c0 = time.perf_counter(), time.process_time()
    value = fn()
    return time.perf_counter() - w0, time.process_time() - c0, value


def solver_runs(S, prior, evaluate, n_direct, n_surrogate, seed0):
    direct_runs, surrogate_runs = [], []
    for _ in range(n_direct):
        wall, cpu, res = timed(lambda: solve_direct(S, prior))
        direct_runs.append(
            {"seconds": wall, "cpu_seconds": cpu, "status": res.status, "nit": res.details["nit"]}
        )
    for k in range(n_surrogate):
        calls = []

        def counted(W):  # CPU time inside evaluate, to take out like the wall time
            c0 = time.process_time()
            y = evaluate(W)
            calls.append(time.process_time() - c0)
            return y

        wall, cpu, res = timed(lambda: solve_surrogate(S, prior, counted, seed=seed0 + k))
        surrogate_runs.append({
            "seconds": wall,
            "cpu_seconds": cpu,
            "seconds_evaluate": res.details["seconds_evaluate"],
            "seconds_without_evaluate": wall - res.details["seconds_evaluate"],
            "cpu_seconds_without_evaluate": cpu - sum(calls),
            "status": res.status,
            "r2": res.details.get("surrogate", {}).get("r2"),
            "spearman": res.details.get("surrogate", {}).get("spearman"),
            "y_gain_over_direct": float(
                evaluate(res.weights[None])[0] - evaluate(res.details["direct"]["weights"][None])[0]
            ),
        })
    return direct_runs, surrogate_runs


def tiny_model():
    from tikmix_hf.testing import tiny_llama

    return tiny_llama(VOCAB, hidden_size=128, layers=4, heads=4, block_size=SEQ_LEN, seed=0, intermediate_size=336,
                      tie_word_embeddings=False)


def batches(names, seed, n_batches):
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        out[name] = []
        for _ in range(n_batches):
            ids = torch.randint(0, VOCAB, (BATCH_SIZE, SEQ_LEN), generator=gen)
            out[name].append({"input_ids": ids, "labels": ids.clone()})
    return out


def stand_in_pass(model, domain_batches, validation_batches):
    """What one identity-preconditioned pass does: task gradients once, then each domain's, dotted."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]

    def mean_grad(batch_list):
        model.zero_grad(set_to_none=True)
        for batch in batch_list:
            (model(**batch).loss / len(batch_list)).backward()
        return torch.cat([p.grad.reshape(-1) for p in params])

    task_grads = torch.stack([mean_grad(b) for b in validation_batches.values()])
    S = torch.stack([task_grads @ mean_grad(b) for b in domain_batches.values()], dim=1)
    model.zero_grad(set_to_none=True)
    return S


def influence_pass(n_batches: int = BATCHES):
    """A callable that runs one influence pass of ``n_batches`` micro-batches per domain and task, which one
    it is, and why."""
    model = tiny_model()
    model.train()
    for module in model.modules():  # dropout off, as the real pass does
        if module.__class__.__name__ == "Dropout":
            module.p = 0.0
    domain_batches = batches([f"domain_{j}" for j in range(N_DOMAINS)], seed=1, n_batches=n_batches)
    validation_batches = batches([f"task_{i}" for i in range(N_TASKS)], seed=2, n_batches=n_batches)
    try:
        from tikmix_hf.influence import group_influence

        def run():
            group_influence(
                model, domain_batches, validation_batches, preconditioner="identity", show_progress=False
            )

        run()  # warm-up, and proof that the call works
        return run, "group_influence", "tikmix_hf.influence.group_influence"
    except Exception as exc:  # not written yet, or its signature moved: time the stand-in
        note = f"stand-in (group_influence unavailable: {type(exc).__name__}: {exc})"[:300]

        def run():
            stand_in_pass(model, domain_batches, validation_batches)

        run()
        return run, "stand-in", note


def main(argv=None):
    args = parse_args(argv)
    rounds, n_direct, n_surrogate = (1, 5, 2) if args.quick else (3, 7, 2)
    S, prior = synthetic_problem(args.seed)
    anchor = solve_direct(S, prior).weights
    w_star = anchor * np.random.default_rng(args.seed + 1).uniform(0.6, 1.6, N_DOMAINS)
    evaluate = synthetic_evaluate(S, w_star / w_star.sum())
    import torch

    torch.set_num_threads(args.threads)
    n_batches = 1 if args.quick else BATCHES
    run_pass, which, note = influence_pass(n_batches)

    # Interleaved, so that the pass and the solvers share whatever load the machine has.
    passes, direct_runs, surrogate_runs = [], [], []
    for r in range(rounds):
        wall, cpu, _ = timed(run_pass)
        passes.append({"seconds": wall, "cpu_seconds": cpu})
        d, m = solver_runs(S, prior, evaluate, n_direct, n_surrogate, seed0=r * n_surrogate)
        direct_runs += d
        surrogate_runs += m

    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    base_wall, base_cpu = med(passes, "seconds"), med(passes, "cpu_seconds")
    rows = [
        ("TiKMiX-D `solve_direct`", direct_runs, "seconds", "cpu_seconds", GOALS["direct"]),
        ("TiKMiX-M `solve_surrogate`, excluding `evaluate`", surrogate_runs,
         "seconds_without_evaluate", "cpu_seconds_without_evaluate", GOALS["surrogate"]),
        ("TiKMiX-M `solve_surrogate`, including `evaluate`", surrogate_runs, "seconds", "cpu_seconds", None),
    ]
    summary = []
    for name, runs, wall_key, cpu_key, goal in rows:
        wall, cpu = med(runs, wall_key), med(runs, cpu_key)
        summary.append({
            "step": name, "median_seconds": wall, "median_cpu_seconds": cpu,
            "fraction_of_pass": wall / base_wall, "cpu_fraction_of_pass": cpu / base_cpu,
            "goal": goal, "met": None if goal is None else wall / base_wall <= goal,
        })
    result = {
        "shape": {"domains": N_DOMAINS, "tasks": N_TASKS},
        "quick": args.quick,
        "seed": args.seed,
        "torch_threads": args.threads,
        "influence_pass": {"which": which, "note": note, "runs": passes, "median_seconds": base_wall,
                           "median_cpu_seconds": base_cpu,
                           "micro_batches": (N_DOMAINS + N_TASKS) * n_batches,
                           "tokens_per_micro_batch": BATCH_SIZE * SEQ_LEN},
        "direct": direct_runs,
        "surrogate": surrogate_runs,
        "summary": summary,
        "machine": {
            "platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_after": os.getloadavg(),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    print(f"Reference: one influence pass ({note}, {args.threads} torch thread(s)), median of {len(passes)}: "
          f"{base_wall:.2f} s wall, {base_cpu:.2f} s CPU\n")
    print("| step | median s | share of the pass | CPU s | CPU share | goal | met |")
    print("|---|---:|---:|---:|---:|---:|:---:|")
    for row in summary:
        goal = "-" if row["goal"] is None else f"<= {row['goal']:.0%}"
        met = "-" if row["met"] is None else ("yes" if row["met"] else "NO")
        print(f"| {row['step']} | {row['median_seconds']:.3f} | {row['fraction_of_pass']:.2%} | "
              f"{row['median_cpu_seconds']:.3f} | {row['cpu_fraction_of_pass']:.2%} | {goal} | {met} |")
    statuses = sorted({r["status"] for r in direct_runs + surrogate_runs})
    r2 = [round(r["r2"], 3) for r in surrogate_runs if r["r2"] is not None]
    gains = [round(r["y_gain_over_direct"], 4) for r in surrogate_runs]
    print(f"\nStatuses seen: {statuses}; surrogate held-out R^2: {r2}; "
          f"target gain of TiKMiX-M over TiKMiX-D: {gains}")
    load = tuple(round(x, 2) for x in os.getloadavg())
    print(f"Load average after: {load} on {os.cpu_count()} CPUs; wrote {out}")


if __name__ == "__main__":
    main()
