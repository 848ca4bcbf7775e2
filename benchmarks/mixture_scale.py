"""DomainMixture at pre-training scale: memory, I/O and resume time against the previous version.

Three measurements, each printed as a table and written to ``benchmarks/out/mixture_scale.{json,md}``:

1. **Map-style**: one domain of N rows (up to 1e8; rows are generated on access, so only the mixture's
   own memory is measured) plus a small one. In a fresh process per run: peak memory above the
   imports, time to the first 64 samples, and time of one stage's probes (64 rows of each domain).
   "previous" is ``src/tikmix_hf/mixture.py`` at ``--baseline-rev``, loaded from git.
2. **Streaming by shard**: a JSON domain in 64 files read through one DataLoader with 4 workers;
   rows each worker read (counted by a ``.map`` on the dataset) against the ideal, samples consumed / 4,
   and examples per second against the same dataset read plainly through the same DataLoader.
3. **Resume at 90%** of a streamed domain of R rows: seconds to the first batch after
   ``load_state_dict``, against a fresh start (and against the previous version, which replays).

    python benchmarks/mixture_scale.py [--quick]
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, parser, table, write

BASELINE_REV = "410803a"  # the last commit with the single-file mixture.py


class GeneratedRows:
    """N rows made on access: the source costs nothing, so memory is the mixture's own."""

    def __init__(self, n: int, tag: str):
        self.n, self.tag = n, tag

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"domain": self.tag, "idx": int(i)}


def load_previous(rev: str):
    """The mixture module as it was at ``rev`` (it imports only numpy and torch)."""
    code = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:src/tikmix_hf/mixture.py"],
                          capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "previous_mixture.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("previous_mixture", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def map_child(impl: str, n: int, rev: str) -> dict:
    """One map-style measurement, in this (fresh) process."""
    import datasets  # noqa: F401 - imported by the mixture on first use: its memory is not the mixture's
    import torch  # noqa: F401
    if impl == "previous":
        DomainMixture = load_previous(rev).DomainMixture
    else:
        from tikmix_hf import DomainMixture
    base = peak_mb()
    t0 = time.perf_counter()
    mixture = DomainMixture({"big": GeneratedRows(n, "big"), "small": GeneratedRows(1000, "small")},
                            weights={"big": 0.9, "small": 0.1}, seed=0)
    first = list(islice(iter(mixture), 64))
    t_first = time.perf_counter() - t0
    t1 = time.perf_counter()
    probes = [mixture.probe(d, 64, round=1) for d in ("big", "small")]
    t_probe = time.perf_counter() - t1
    assert len(first) == 64 and all(len(p) == 64 for p in probes)
    return {"impl": impl, "rows": n, "peak_mb_above_imports": peak_mb() - base,
            "seconds_to_first_64": t_first, "seconds_one_stage_probes": t_probe}


def run_map(sizes: list[int], rev: str) -> list[dict]:
    rows = []
    for impl in ("previous", "new"):
        for n in sizes:
            out = subprocess.run([sys.executable, __file__, "--map-child", impl, str(n), rev], check=False,
                                 capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
            if out.returncode:
                raise RuntimeError(out.stderr[-2000:])
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)
    return rows


def write_files(folder: Path, files: int, rows: int) -> list[str]:
    paths = []
    text = "lorem ipsum dolor sit amet " * 4
    for s in range(files):
        p = folder / f"part{s:03d}.jsonl"
        p.write_text("".join(json.dumps({"s": s, "o": o, "text": text}) + "\n" for o in range(rows)))
        paths.append(str(p))
    return paths


def run_streaming(folder: Path, files: int, rows: int, batches: int, workers: int = 4, batch: int = 64) -> list[dict]:
    import datasets
    import torch
    from torch.utils.data import DataLoader, get_worker_info

    from tikmix_hf import DomainMixture

    paths = write_files(folder, files, rows)
    counter = torch.zeros(workers, dtype=torch.int64).share_memory_()

    def count(row):
        counter[get_worker_info().id] += 1
        return row

    def collate(b):
        return [(e["s"], e["o"]) for e in b]

    def stream():
        return datasets.load_dataset("json", data_files=paths, split="train", streaming=True).map(count)

    out = []
    for name in ("plain datasets IterableDataset", "DomainMixture (by shard)"):
        counter.zero_()
        if name.startswith("plain"):
            dataset = stream()
        else:
            dataset = DomainMixture({"web": stream(), "none": [{"s": -1, "o": 0}]},
                                    weights={"web": 1.0, "none": 0.0}, seed=0)
            dataset.bind_loader(batch, num_workers=workers)
        loader = DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=collate)
        it = iter(loader)
        next(it)  # worker start-up is not throughput
        t0 = time.perf_counter()
        for _ in range(batches - 1):
            next(it)
        rate = (batches - 1) * batch / (time.perf_counter() - t0)
        del it, loader
        ideal = batches * batch / workers
        reads = counter.tolist()
        out.append({"loader": name, "examples_per_s": rate, "rows_read_per_worker": reads, "ideal_per_worker": ideal,
                    "max_over_ideal": max(reads) / ideal, "total_over_consumed": sum(reads) / (batches * batch)})
        print(out[-1], file=sys.stderr)
    return out


def run_resume(folder: Path, rows: int, rev: str, batch: int = 64) -> list[dict]:
    import datasets

    from tikmix_hf import DomainMixture

    files = 16
    paths = write_files(folder, files, rows // files)
    at = int(0.9 * rows)

    def build(module=None):
        cls = DomainMixture if module is None else module.DomainMixture
        web = datasets.load_dataset("json", data_files=paths, split="train", streaming=True)
        return cls({"web": web, "none": [{"s": -1, "o": 0}]}, weights={"web": 1.0, "none": 0.0}, seed=0)

    first = build()
    t0 = time.perf_counter()
    for _ in islice(first, at):
        pass
    t_reach = time.perf_counter() - t0
    state = json.loads(json.dumps(first.state_dict()))
    results = []
    for label, module, saved in (("fresh start (sample 0)", None, None), ("resume at 90% (new)", None, state),
                                 ("resume at 90% (previous: replay)", load_previous(rev), "previous")):
        t0 = time.perf_counter()
        mixture = build(module)
        if saved == "previous":
            mixture.load_state_dict(mixture.state_dict(position=at))  # the cursors are pure counts
        elif saved is not None:
            mixture.load_state_dict(saved)
        got = list(islice(iter(mixture), batch))
        results.append({"run": label, "seconds_to_first_batch": time.perf_counter() - t0, "samples": len(got)})
        print(results[-1], file=sys.stderr)
    results.append({"run": f"(reading to 90% once, to take the state: {at} samples)",
                    "seconds_to_first_batch": t_reach})
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--map-child":
        print(json.dumps(map_child(sys.argv[2], int(sys.argv[3]), sys.argv[4])))
        return
    p = parser(__doc__)
    p.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of the previous mixture.py")
    p.add_argument("--max-rows", type=float, default=1e8, help="largest map-style domain (default 1e8)")
    args = p.parse_args()
    started = time.perf_counter()
    top = int(1e6 if args.quick else args.max_rows)
    sizes = sorted({min(int(x), top) for x in (1e6, 1e7, 1e8)})
    files, per_file, batches = (64, 200, 40) if args.quick else (64, 2000, 1500)
    resume_rows = 100_000 if args.quick else 1_000_000

    map_rows = run_map(sizes, args.baseline_rev)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "s").mkdir()
        (Path(tmp) / "r").mkdir()
        streaming = run_streaming(Path(tmp) / "s", files, per_file, batches)
        resume = run_resume(Path(tmp) / "r", resume_rows, args.baseline_rev)

    md = [(f"Map-style: one domain of N generated rows (+1,000), 64 samples then one stage's probes, "
           f"fresh process each; previous = mixture.py at {args.baseline_rev}.\n"),
          table(["version", "rows", "peak MB above imports", "s to first 64 samples", "s one stage's probes"],
                [[r["impl"], f"{r['rows']:.0e}", f"{r['peak_mb_above_imports']:.0f}", f"{r['seconds_to_first_64']:.2f}",
                  f"{r['seconds_one_stage_probes']:.2f}"] for r in map_rows]),
          (f"\nStreaming JSON domain in {files} files x {per_file} rows, 4 DataLoader workers, batch 64, "
           f"{batches} batches.\n"),
          table(["loader", "examples/s", "rows read per worker", "ideal per worker", "max / ideal", "read / consumed"],
                [[r["loader"], f"{r['examples_per_s']:.0f}", " ".join(map(str, r["rows_read_per_worker"])),
                  f"{r['ideal_per_worker']:.0f}", f"{r['max_over_ideal']:.3f}", f"{r['total_over_consumed']:.3f}"]
                 for r in streaming]),
          f"\nResume of a streamed domain of {resume_rows:,} rows in 16 files, first batch of 64, in one process.\n",
          table(["run", "s to first batch"], [[r["run"], f"{r['seconds_to_first_batch']:.2f}"] for r in resume])]
    doc = {"quick": args.quick, "map": map_rows, "streaming": streaming, "resume": resume,
           "sizes": {"map_rows": sizes, "files": files, "rows_per_file": per_file, "batches": batches,
                     "resume_rows": resume_rows}}
    write("mixture_scale", args.out, doc, "\n".join(md), started=started)


if __name__ == "__main__":
    main()
