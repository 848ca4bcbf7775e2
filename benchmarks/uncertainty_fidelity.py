"""Fidelity of Group Influence with and without the uncertainty tools (issue 11), a first measure.

For each seed: a small Llama is trained for a few SGD steps on a uniform mixture of the toy domains
of ``tests/_toy.py`` (pattern / echo / noise; held-out counting sequences as the validation task).
Then ``S`` and its standard errors are measured on probe batches, and for ``--mixtures`` random
mixtures ``w`` (Dirichlet) the *actual* validation-loss drop of one SGD step along
``sum_j w_j g_j`` is measured, with the ``g_j`` taken from *fresh* batches (not the probes: that is
what an influence estimate has to predict). The first-order prediction of the drop is ``lr * S w``.

Reported per seed and averaged: the Pearson correlation between predicted and actual drops for the
plain ``S`` and for ``S`` shrunk by ``z`` standard errors, the mean relative standard error, and the
split-half agreement.

Not yet measured here (left open): the demo's real-text and synthetic corpora and the held-out gain
of full TiKMiX runs before/after; this script is the skeleton for those (add ``--corpus``).

    python benchmarks/uncertainty_fidelity.py --quick       # 1 seed, tiny, about a minute on 2 CPUs
    python benchmarks/uncertainty_fidelity.py --seeds 3

Writes ``benchmarks/out/uncertainty_fidelity.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from _toy import RecordingCollator, tiny_model, toy_domains, toy_validation  # noqa: E402

from tikmix_hf.influence import group_influence  # noqa: E402
from tikmix_hf.solvers.robust import shrink_influence  # noqa: E402


def batches(examples, size, collate):
    return [collate(examples[i : i + size]) for i in range(0, len(examples), size)]


def mean_loss(model, val):
    total, count = 0.0, 0
    with torch.no_grad():
        for b in val:
            out = model(**b)
            n = int((b["labels"][:, 1:] != -100).sum())
            total, count = total + float(out.loss) * n, count + n
    return total / count


def run_seed(seed, args):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    collate = RecordingCollator()
    collate.recording = False
    data = toy_domains(n=args.pool, seed=seed)
    names = list(data)
    val = batches(toy_validation(n=32, seed=100 + seed)["held_out_pattern"], 16, collate)
    model = tiny_model(seed, torch.float64 if args.fp64 else torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    for step in range(args.warm_steps):  # a few steps on a uniform mixture
        mixed = [data[n][int(i)] for n in names for i in rng.integers(0, args.pool, args.batch // len(names))]
        opt.zero_grad()
        model(**collate(mixed)).loss.backward()
        opt.step()
    # probes and fresh batches are disjoint halves of each domain's pool
    probe = {n: batches(data[n][: args.probe_batches * args.batch], args.batch, collate) for n in names}
    fresh = {n: batches(data[n][args.pool // 2 :], args.batch, collate) for n in names}
    result = group_influence(model, probe, {"val": val}, show_progress=False)
    S, SE = result.scores, result.stderr
    base = mean_loss(model, val)
    W = rng.dirichlet(np.ones(len(names)), size=args.mixtures)
    actual = []
    params = [p for p in model.parameters()]
    original = [p.detach().clone() for p in params]
    for w in W:
        grads = [torch.zeros_like(p) for p in params]
        for j, n in enumerate(names):
            b = fresh[n][int(rng.integers(0, len(fresh[n])))]
            g = torch.autograd.grad(model(**b).loss, params)
            for acc, gi in zip(grads, g):
                acc.add_(gi, alpha=float(w[j]))
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(args.lr * g)
        actual.append(base - mean_loss(model, val))
        with torch.no_grad():
            for p, o in zip(params, original):
                p.copy_(o)
    actual = np.array(actual)
    row = {"seed": seed, "split_half": result.split_half["val"],
           "mean_rse": float(np.nanmean(SE / np.maximum(np.abs(S), 1e-30))),
           "scores": S.tolist(), "stderr": SE.tolist()}
    for z in args.z:
        pred = args.lr * (W @ shrink_influence(S, SE, z)[0])
        row[f"pearson_z{z:g}"] = float(np.corrcoef(pred, actual)[0, 1]) if pred.std() > 0 else float("nan")
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--mixtures", type=int, default=10)
    p.add_argument("--warm-steps", type=int, default=10)
    p.add_argument("--probe-batches", type=int, default=8)
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--pool", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--z", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    p.add_argument("--fp64", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.warm_steps, args.probe_batches = 1, 5, 4
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = [run_seed(s, args) for s in range(args.seeds)]
    summary = {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0] if k.startswith("pearson") or k in ("mean_rse", "split_half")}
    out = {"args": vars(args), "rows": rows, "summary": summary, "seconds": time.perf_counter() - started}
    (ROOT / "benchmarks" / "out").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "out" / "uncertainty_fidelity.json").write_text(json.dumps(out, indent=1))
    print("| metric | mean over seeds |\n|---|---|")
    for k, v in summary.items():
        print(f"| {k} | {v:.3f} |")


if __name__ == "__main__":
    main()
