"""Fidelity: does Group Influence predict what a mixture actually does? (the paper's Figure 4, small)

For each corpus and seed:

1. A model is trained from scratch on the natural mixture for ``--base-steps`` AdamW steps (the
   demo's model, learning rate and batch; constant learning rate after a short warm-up).
2. At that checkpoint, ``S`` (tasks x domains) is measured with each preconditioner (identity,
   adam, diag_fisher) on ``--probe`` probe sequences per domain, and with adam again on the
   callback's default budget (the first ``--small-probe`` of them), all on the callback's
   validation budget (the bench size's ``validation_sequences`` per task); and with adam on all
   ``--outcome-sequences`` validation sequences per task. And ``S`` without probes: read in hooks
   from the training batches of the last ``--window`` base steps (``tikmix_influence_source=
   "training"``; a domain those steps held fewer than ``--small-probe`` times is topped up with
   probes of another round), beside adam on the small budget restricted to the ``Linear`` and
   ``Embedding`` parameters the hooks see. Each ``S`` is also shrunk by one standard error
   (``tikmix_shrink_z=1``).
3. ``--mixtures`` perturbed mixtures ``w_k`` (half natural, half a Dirichlet(1) draw) are each
   trained for ``--horizon`` more steps from copies of the same model and optimizer, all on the
   same sample stream seed (common random numbers: domain choices and example orders are shared
   where the mixtures allow, so the outcomes differ by the mixture, not by luck of the draw).
4. The actual change of the validation loss (the tasks ``S`` is about, averaged, on up to
   ``--outcome-sequences`` sequences per task) after each
   horizon is compared with the first-order prediction ``-mean_i (S w_k)_i``: Pearson and
   Spearman over the ``w_k``. The paper reports 0.85-0.93 for this comparison at scale.

Also reported: the same correlation against the change of the *test* loss (held-out text the
influence pass never saw), and the mean relative standard error of ``S``.

The checkpoints are independent and run two at a time (``--workers``, one torch thread each; the
numbers are the same with ``--workers 1``). ``--quick``: 1 seed, tiny model, under a minute.

    python benchmarks/fidelity.py [--quick] [--seeds 0 1 2] [--corpora synthetic local] [--workers 2]
"""

from __future__ import annotations

import copy
import sys
import time
from concurrent.futures import as_completed
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_size, one_thread, parser, process_pool, table, write  # noqa: E402

PRECONDITIONERS = ("identity", "adam", "diag_fisher")


def _batches(examples: list[dict], size: int, device="cpu") -> list[dict]:
    import torch

    out = []
    for lo in range(0, len(examples), size):
        chunk = examples[lo : lo + size]
        out.append({k: torch.tensor([e[k] for e in chunk], device=device) for k in ("input_ids", "attention_mask",
                                                                                    "labels")})
    return out


class Stream:
    """Batches of a DomainMixture, in order; ``mixture.domain_ids(k * batch, ...)`` are batch ``k``'s domains."""

    def __init__(self, domains, weights, seed: int, batch_size: int):
        from tikmix_hf import DomainMixture

        self.mixture = DomainMixture(domains, weights=weights, seed=seed)
        self.it = iter(self.mixture)
        self.batch_size = batch_size

    def next(self) -> dict:
        return _batches([next(self.it) for _ in range(self.batch_size)], self.batch_size)[0]


def train_steps(model, opt, stream: Stream, steps: int, *, lr: float, warmup: int = 0, start: int = 0) -> None:
    import torch

    model.train()
    for k in range(steps):
        step = start + k
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
        loss = model(**stream.next()).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


def mean_loss(model, sets: dict[str, list[dict]]) -> dict[str, float]:
    from tikmix_hf.demo import held_out_losses

    return held_out_losses(model, sets)


def _corr(pred: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    from scipy.stats import pearsonr, spearmanr

    if np.std(pred) == 0 or np.std(actual) == 0:
        return float("nan"), float("nan")
    return float(pearsonr(pred, actual)[0]), float(spearmanr(pred, actual)[0])


def run_one(corpus: str, seed: int, args, size) -> dict:
    import torch

    from tikmix_hf.demo import prepare_data
    from tikmix_hf.influence import TrainingWindow, group_influence
    from tikmix_hf.influence.window import covered_parameters
    from tikmix_hf.solvers.uncertainty import shrink_influence
    from tikmix_hf.testing import tiny_llama

    if corpus not in _DATA:  # once per process and corpus
        _DATA[corpus] = prepare_data(corpus, size)
    data = _DATA[corpus]
    names = list(data.domains)
    tok = data.tokenizer
    torch.manual_seed(seed)
    model = tiny_llama(len(tok), hidden_size=size.hidden_size, layers=size.layers, heads=size.heads,
                       block_size=size.block_size, seed=seed, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=size.learning_rate, betas=(0.9, 0.98), weight_decay=0.1)
    # the outcome is measured on up to --outcome-sequences per task; S on the callback's budget
    # (size.validation_sequences) unless a variant says otherwise
    val_rows = {t: [dict(r) for r in list(v)[: args.outcome_sequences]] for t, v in data.validation.items()}
    validation = {t: _batches(v[: size.validation_sequences], args.micro) for t, v in val_rows.items()}
    validation_all = {t: _batches(v, args.micro) for t, v in val_rows.items()}
    started = time.perf_counter()
    stream = Stream(data.domains, "natural", seed, size.batch_size)
    head = args.base_steps - args.window
    train_steps(model, opt, stream, head, lr=size.learning_rate, warmup=max(1, args.base_steps // 10))
    # The training window: S read in hooks from the last --window steps' own batches (the callback's
    # tikmix_influence_source="training"), validation gradients and adam's scale taken as it opens.
    window = TrainingWindow(model, validation, names, preconditioner="adam", optimizer=opt)
    batch = size.batch_size
    window.attach(lambda k, rows: (stream.mixture.domain_ids((head + k) * batch, (head + k) * batch + rows), 0))
    window_started = time.perf_counter()
    train_steps(model, opt, stream, args.window, lr=size.learning_rate, warmup=max(1, args.base_steps // 10),
                start=head)
    window_seconds = time.perf_counter() - window_started
    seen = window.close()
    base_seconds = time.perf_counter() - started

    # the influence measurements
    from tikmix_hf import DomainMixture

    probe_mixture = DomainMixture(data.domains, weights="natural", seed=seed)
    probes = {d: probe_mixture.probe(d, args.probe, round=0) for d in names}
    variants: dict[str, Any] = {}
    started = time.perf_counter()
    # A domain the window saw fewer than the callback's budget times is topped up, as the callback does,
    # from a probe round of its own (so that the top-up never shares sequences with the probe variants).
    top_up = {d: _batches(probe_mixture.probe(d, args.small_probe - c["sequences"], round=1), args.micro)
              for d, c in seen.items() if c["sequences"] < args.small_probe}
    variants[f"adam (training window, {args.window} steps)"] = window.result(top_up)
    covered = {n for n, _ in covered_parameters(model)}
    result = group_influence(model, {d: _batches(p[: args.small_probe], args.micro) for d, p in probes.items()},
                             validation, preconditioner="adam", optimizer=opt, show_progress=False,
                             param_filter=lambda n, p: n in covered)
    variants[f"adam ({args.small_probe}/domain, Linear and Embedding only)"] = result
    for pre in PRECONDITIONERS:
        result = group_influence(model, {d: _batches(p, args.micro) for d, p in probes.items()}, validation,
                                 preconditioner=pre, optimizer=opt, show_progress=False)
        variants[f"{pre} ({args.probe}/domain)"] = result
    result = group_influence(model, {d: _batches(p[: args.small_probe], args.micro) for d, p in probes.items()},
                             validation, preconditioner="adam", optimizer=opt, show_progress=False)
    variants[f"adam ({args.small_probe}/domain)"] = result
    result = group_influence(model, {d: _batches(p, args.micro) for d, p in probes.items()}, validation_all,
                             preconditioner="adam", optimizer=opt, show_progress=False)
    variants[f"adam ({args.probe}/domain, all validation)"] = result
    influence_seconds = time.perf_counter() - started

    # the continuations
    rng = np.random.default_rng([seed, 4])
    natural = np.array([len(data.domains[d]) for d in names], dtype=float)
    natural /= natural.sum()
    W = 0.5 * natural + 0.5 * rng.dirichlet(np.ones(len(names)), size=args.mixtures)
    before_val = mean_loss(model, val_rows)
    before_test = mean_loss(model, data.test)
    checkpoints = sorted(set(args.horizon))
    actual = {h: {"val": [], "test": []} for h in checkpoints}
    state, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    started = time.perf_counter()
    for w in W:
        model.load_state_dict(state)
        opt.load_state_dict(copy.deepcopy(opt_state))
        stream = Stream(data.domains, {d: float(x) for d, x in zip(names, w)}, seed + 1000, size.batch_size)
        done = 0
        for h in checkpoints:
            train_steps(model, opt, stream, h - done, lr=size.learning_rate, start=args.base_steps + done)
            done = h
            after_val, after_test = mean_loss(model, val_rows), mean_loss(model, data.test)
            actual[h]["val"].append(float(np.mean([before_val[t] - after_val[t] for t in before_val])))
            actual[h]["test"].append(float(np.mean([before_test[t] - after_test[t] for t in before_test])))
    continuation_seconds = time.perf_counter() - started
    model.load_state_dict(state)

    rows = []
    for name, result in variants.items():
        S, SE = np.asarray(result.scores), result.stderr
        rse = float(np.nanmean(np.abs(SE) / np.maximum(np.abs(S), 1e-30))) if SE is not None else float("nan")
        for shrink in (0.0, 1.0):
            used = S if shrink == 0 else shrink_influence(S, SE, shrink)
            pred = W @ used.mean(axis=0)  # predicted drop of the mean validation loss, up to a positive factor
            split_half = float(np.nanmean(list(result.split_half.values()))) if result.split_half else float("nan")
            row = {"variant": name, "shrink_z": shrink, "mean_rse": rse, "split_half": split_half}
            for h in checkpoints:
                for target in ("val", "test"):
                    p_, s_ = _corr(pred, np.array(actual[h][target]))
                    row[f"pearson_{target}_h{h}"], row[f"spearman_{target}_h{h}"] = p_, s_
            rows.append(row)
    return {"corpus": corpus, "seed": seed, "rows": rows, "mixtures": W.tolist(),
            "actual": {str(h): v for h, v in actual.items()},
            "scores": {k: np.asarray(v.scores).tolist() for k, v in variants.items()},
            "window": {"sequences": {d: c["sequences"] for d, c in seen.items()},
                       "top_up_sequences": {d: args.small_probe - seen[d]["sequences"] for d in top_up},
                       "seconds": window_seconds, "hook_seconds": window.hook_seconds},
            "seconds": {"base": base_seconds, "influence": influence_seconds, "continuations": continuation_seconds}}


_DATA: dict[str, Any] = {}


def summarise(runs: list[dict], horizons: list[int]) -> dict:
    out: dict[str, Any] = {}
    for corpus in sorted({r["corpus"] for r in runs}):
        mine = [r for r in runs if r["corpus"] == corpus]
        keys = [(row["variant"], row["shrink_z"]) for row in mine[0]["rows"]]
        entry = {}
        for variant, z in keys:
            rows = [row for r in mine for row in r["rows"] if row["variant"] == variant and row["shrink_z"] == z]
            e = {"mean_rse": float(np.nanmean([x["mean_rse"] for x in rows])),
                 "split_half": float(np.nanmean([x["split_half"] for x in rows]))}
            for h in horizons:
                for metric in ("pearson", "spearman"):
                    for target in ("val", "test"):
                        vals = np.array([x[f"{metric}_{target}_h{h}"] for x in rows])
                        e[f"{metric}_{target}_h{h}"] = (float(np.nanmean(vals)),
                                                        float(np.nanstd(vals, ddof=1)) if len(vals) > 1 else 0.0)
            entry[f"{variant}|z={z:g}"] = e
        out[corpus] = entry
    return out


def markdown(summary: dict, args, size, seeds: list[int]) -> str:
    h_short, h_long = min(args.horizon), max(args.horizon)
    parts = [
        f"Setup: the quality benchmark's model ({size.layers} layers x {size.hidden_size}, {size.block_size}-token "
        f"blocks, batch {size.batch_size}), {args.base_steps} steps on the natural mixture, then {args.mixtures} "
        f"perturbed mixtures continued for {h_short} and {h_long} steps from the same checkpoint and optimizer state. "
        f"Correlation over the mixtures between the predicted drop `mean_i (S w)_i` and the measured drop of the "
        f"average validation loss; mean ± sd over seeds {seeds}. 'test' columns: the drop measured on held-out text "
        f"the influence pass never saw."
    ]
    for corpus, entry in summary.items():
        header = ["S from", "shrink z", f"Pearson val, {h_short} steps", f"Pearson val, {h_long} steps",
                  f"Spearman val, {h_long} steps", f"Pearson test, {h_long} steps", "mean RSE of S", "split-half"]
        body = []
        for key, e in entry.items():
            variant, z = key.split("|z=")
            body.append([variant, z] + [f"{e[k][0]:.2f} ± {e[k][1]:.2f}" for k in
                                        (f"pearson_val_h{h_short}", f"pearson_val_h{h_long}",
                                         f"spearman_val_h{h_long}", f"pearson_test_h{h_long}")]
                        + [f"{e['mean_rse']:.2f}", f"{e['split_half']:.2f}"])
        parts.append(f"### {corpus} corpus\n\n" + table(header, body))
        best = max(entry, key=lambda k: entry[k][f"pearson_val_h{h_long}"][0])
        plain = next(k for k in entry if k.startswith("adam") and k.endswith("|z=0") and f"({args.probe}/" in k)
        goal = entry[best][f"pearson_val_h{h_long}"][0]
        parts.append(
            f"- Highest Pearson after {h_long} steps: {best.replace('|z=', ', z=')} at "
            f"{goal:.2f}; adam (the demo's preconditioner) with plain S at {args.probe}/domain: "
            f"{entry[plain][f'pearson_val_h{h_long}'][0]:.2f}.\n"
            f"- The fidelity goal (Pearson >= 0.8): {'met' if goal >= 0.8 else 'not met'} on the {corpus} corpus."
        )
    return "\n\n".join(parts)


def main(argv=None) -> dict:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0)")
    p.add_argument("--corpora", nargs="+", default=["synthetic", "local"], choices=["synthetic", "local"])
    p.add_argument("--base-steps", type=int, default=None, help="steps before the checkpoint (default 160)")
    p.add_argument("--mixtures", type=int, default=10)
    p.add_argument("--horizon", type=int, nargs="+", default=None, help="continuation lengths (default 10 40)")
    p.add_argument("--probe", type=int, default=None, help="probe sequences per domain (default 32)")
    p.add_argument("--small-probe", type=int, default=None, help="the callback's budget (default 8)")
    p.add_argument("--micro", type=int, default=4, help="sequences per probe micro-batch")
    p.add_argument("--window", type=int, default=None,
                   help="training-window steps before the checkpoint (default 32; quick: 8)")
    p.add_argument("--outcome-sequences", type=int, default=64,
                   help="validation sequences per task the actual loss change is measured on (and the "
                        "'all validation' variant's S)")
    p.add_argument("--workers", type=int, default=2, help="checkpoints run in parallel, one torch thread each")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers {args.workers}: give at least 1")
    size = bench_size(args.quick)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    args.base_steps = args.base_steps or (16 if args.quick else 160)
    args.horizon = args.horizon or ([4, 8] if args.quick else [10, 40])
    args.probe = args.probe or (8 if args.quick else 32)
    args.small_probe = args.small_probe or (4 if args.quick else size.probe_sequences)
    args.window = args.window or (8 if args.quick else 32)
    if not 0 < args.window < args.base_steps:
        p.error(f"--window {args.window}: must lie between 1 and --base-steps - 1 ({args.base_steps - 1})")
    if args.quick:
        args.mixtures = min(args.mixtures, 5)
    if args.mixtures < 3:
        p.error(f"--mixtures {args.mixtures}: a correlation needs at least 3 mixtures")
    from tqdm.auto import tqdm

    started = time.perf_counter()
    jobs = [(c, s) for c in args.corpora for s in seeds]
    bar = tqdm(total=len(jobs), desc="fidelity", unit="checkpoint", dynamic_ncols=True)
    if args.workers == 1:
        one_thread()
        runs = []
        for corpus, seed in jobs:
            runs.append(run_one(corpus, seed, args, size))
            bar.update(1)
    else:
        with process_pool(min(args.workers, len(jobs))) as pool:
            futures = [pool.submit(run_one, corpus, seed, args, size) for corpus, seed in jobs]
            for fut in as_completed(futures):
                fut.result()  # a failed checkpoint stops the run here
                bar.update(1)
            runs = [fut.result() for fut in futures]  # in job order
    bar.close()
    summary = summarise(runs, sorted(set(args.horizon)))
    doc = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "seeds": seeds,
           "summary": summary, "runs": runs}
    write("fidelity", args.out, doc, markdown(summary, args, size, seeds), started=started)
    return doc


if __name__ == "__main__":
    main()
