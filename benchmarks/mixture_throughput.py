"""Throughput and swap exactness of DomainMixture against datasets.interleave_datasets.

Both read the same sources (8 domains of 128-token examples) through a torch DataLoader with 0
and 2 workers, side by side in one run; the figure is the ratio of examples per second.
For the swap, both start with domain "d0" at weight 0, switch to all weight on "d0" after
`--swap-after` examples (interleave_datasets: the documented in-place edit of its probability
list), and we count the samples after the switch that still came from other domains.

    python benchmarks/mixture_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import datasets
import numpy as np
import torch

from tikmix_hf import DomainMixture

OUT = os.path.join(os.path.dirname(__file__), "out")


def build_sources(domains: int, per_domain: int, seq: int) -> dict[str, datasets.Dataset]:
    rng = np.random.default_rng(0)
    return {
        f"d{i}": datasets.Dataset.from_dict(
            {"input_ids": rng.integers(0, 1000, size=(per_domain, seq)).tolist(), "domain": [i] * per_domain}
        )
        for i in range(domains)
    }


def collate(batch):
    return {
        "input_ids": torch.tensor([e["input_ids"] for e in batch]),
        "domain": torch.tensor([e["domain"] for e in batch]),
    }


def time_loader(dataset, workers: int, batch: int, n_batches: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=collate)
    it = iter(loader)
    next(it)  # start-up (worker spawn, first batch) is not throughput
    start = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch / (time.perf_counter() - start)


def ours(sources, weights, seed=0, **kw):
    return DomainMixture(sources, weights=dict(zip(sources, weights)), seed=seed, **kw)


def theirs(sources, probabilities, workers):
    iterables = [ds.to_iterable_dataset(num_shards=max(workers, 1)) for ds in sources.values()]
    return datasets.interleave_datasets(iterables, probabilities=probabilities, seed=0)


def swap_leak(make, workers: int, batch: int, swap_after: int, after: int, set_new) -> int:
    loader = torch.utils.data.DataLoader(make(), batch_size=batch, num_workers=workers, collate_fn=collate)
    seen = []
    it = iter(loader)
    while len(seen) < swap_after:
        seen += next(it)["domain"].tolist()
    start = set_new(len(seen))
    while len(seen) < start + after:
        seen += next(it)["domain"].tolist()
    return sum(1 for d in seen[start : start + after] if d != 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer batches (a smoke run)")
    parser.add_argument("--out", default=OUT, help=f"folder for mixture_throughput.json (default {OUT})")
    args = parser.parse_args()
    domains, per_domain, seq, batch = 8, 2000, 128, 16
    n_batches = 60 if args.quick else 400
    sources = build_sources(domains, per_domain, seq)
    uniform = [1.0 / domains] * domains
    rows = []
    for workers in (0, 2):
        iterables = {n: ds.to_iterable_dataset(num_shards=2) for n, ds in sources.items()}
        mix_map = ours(sources, uniform)
        mix_iter = ours(iterables, uniform)
        for m in (mix_map, mix_iter):
            m.bind_loader(batch, num_workers=workers)
        rates = {
            "interleave_datasets": time_loader(theirs(sources, uniform, workers), workers, batch, n_batches),
            "DomainMixture (Dataset sources)": time_loader(mix_map, workers, batch, n_batches),
            "DomainMixture (IterableDataset sources)": time_loader(mix_iter, workers, batch, n_batches),
        }

        old = [0.0] + [1.0 / (domains - 1)] * (domains - 1)
        new = [1.0] + [0.0] * (domains - 1)
        swap_after, after = 16 * 20, 16 * 40

        holder = {}

        def make_theirs():
            holder["ds"] = theirs(sources, list(old), workers)
            return holder["ds"]

        def set_theirs(consumed):
            # the workaround research code uses: edit the shared probability list in place
            probs = holder["ds"]._ex_iterable.probabilities
            probs[:] = new
            return consumed

        def make_ours():
            holder["mix"] = ours(sources, old, seed=1)
            holder["mix"].bind_loader(batch, num_workers=workers)
            return holder["mix"]

        def set_ours(consumed):
            return holder["mix"].set_weights(dict(zip(sources, new)))

        leak_theirs = swap_leak(make_theirs, workers, batch, swap_after, after, set_theirs)
        leak_ours = swap_leak(make_ours, workers, batch, swap_after, after, set_ours)
        base = rates["interleave_datasets"]
        for name, rate in rates.items():
            rows.append({
                "workers": workers,
                "loader": name,
                "examples_per_s": rate,
                "ratio_vs_interleave": rate / base,
                "old_weight_samples_after_swap": leak_theirs if name == "interleave_datasets" else (
                    leak_ours if name.startswith("DomainMixture (Dataset") else None),
            })

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mixture_throughput.json"), "w") as fh:
        json.dump({"domains": domains, "seq": seq, "batch": batch, "batches": n_batches, "rows": rows}, fh, indent=1)
    print(f"\n{domains} domains, {seq}-token examples, batch {batch}, {n_batches} batches per measurement\n")
    print("| workers | loader | examples/s | ratio vs interleave | old-weight samples in the 640 after a swap |")
    print("|---|---|---|---|---|")
    for r in rows:
        leak = "" if r["old_weight_samples_after_swap"] is None else r["old_weight_samples_after_swap"]
        print(f"| {r['workers']} | {r['loader']} | {r['examples_per_s']:.0f} | "
              f"{r['ratio_vs_interleave']:.2f} | {leak} |")


if __name__ == "__main__":
    main()
