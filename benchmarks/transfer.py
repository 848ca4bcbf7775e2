"""Transfer: find a schedule with TiKMiX on a small proxy, replay it on a model at least 4x larger.

Per seed, on the synthetic corpus (domains with known roles):

1. ``proxy``: TiKMiX-D (the default mixer, plain settings, the quick demo's stage fractions 1/3
   and 2/3) on a Llama of 1 layer x 24 hidden units;
2. on the large model (2 layers x 64 hidden units, about 6x the parameters), all at the same
   training tokens and from the same initial model:
   - ``uniform``: equal weights, never changed;
   - ``replay``: the proxy's ``history.json`` replayed (``--tikmix_solver replay``), no influence pass;
   - ``proxy_final``: the proxy's final weights used statically from step 0;
   - ``direct``: TiKMiX-D run on the large model itself.

Reported: each arm's average held-out loss, the paired per-seed gain over uniform
``-(arm / uniform - 1)`` with a 95% t interval over seeds, and the wall-time ratio of the replay
run against the direct TiKMiX run (training time, evaluation excluded, paired per seed).

    python benchmarks/transfer.py [--quick] [--seeds 0 1 2] [--workers 2]

Full: 3 seeds x (1 proxy + 4 large runs) of 150 steps of 16 x 64 tokens on the demo's quick corpus,
about 15 minutes on 2 busy CPU cores;
``--quick``: 1 seed of the tiny preset, under a minute.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_size, parser, process_pool, table, write  # noqa: E402

CORPUS = "synthetic"
LABELS = {
    "proxy": "TiKMiX-D on the proxy",
    "uniform": "static uniform",
    "replay": "replayed proxy schedule",
    "proxy_final": "proxy's final weights, static",
    "direct": "TiKMiX-D on the large model",
}
LARGE_ARMS = ["uniform", "replay", "proxy_final", "direct"]

_DATA: dict[str, Any] = {}


def sizes(quick: bool):
    """(proxy, large): the same data, steps and batch; the large model is at least 4x the proxy."""
    if quick:
        proxy = bench_size(True)
        return proxy, dataclasses.replace(proxy, name="transfer-quick-large", hidden_size=64, layers=2)
    # The demo's quick corpus and block size, so that 15 runs fit in about 15 minutes on 2 busy cores.
    from tikmix_hf.demo import SIZES

    proxy = dataclasses.replace(SIZES["quick"], name="transfer-proxy", hidden_size=24, layers=1, heads=2,
                                max_steps=150, eval_every=50)
    return proxy, dataclasses.replace(proxy, name="transfer-large", hidden_size=64, layers=2, heads=4)


def run_job(job: dict) -> dict:
    from tikmix_hf.demo import Arm, DemoSize, prepare_data, train_arm

    size = DemoSize(**job["size"])
    if "data" not in _DATA:
        # The data depend on the corpus settings only, which proxy and large share.
        _DATA["data"] = prepare_data(CORPUS, size)
    arm = job["arm"]
    if arm in ("proxy", "direct"):
        spec = Arm(arm, LABELS[arm], solver="direct")
    elif arm == "uniform":
        spec = Arm(arm, LABELS[arm], initial="uniform")
    elif arm == "replay":
        spec = Arm(arm, LABELS[arm], solver="replay",
                   config={"tikmix_schedule": job["schedule"], "tikmix_stage_fractions": None})
    else:
        spec = Arm(arm, LABELS[arm], initial=job["weights"])
    base = Path(job["base"]) / job["model"]
    row, model = train_arm(spec, job["seed"], _DATA["data"], size, base, keep_model=True)
    row["model"] = job["model"]
    row["parameters"] = sum(p.numel() for p in model.parameters())
    if row["history"]:
        row["history_path"] = str(base / row["history"])
    return row


def run_all(seeds: list[int], proxy, large, workers: int, base: Path) -> list[dict]:
    from tqdm.auto import tqdm

    def job(arm, seed, size, model, **extra):
        return {"arm": arm, "seed": seed, "size": dataclasses.asdict(size), "model": model, "base": str(base),
                **extra}

    rows: list[dict] = []
    bar = tqdm(total=len(seeds) * (1 + len(LARGE_ARMS)), desc="transfer runs", unit="run", dynamic_ncols=True)
    with process_pool(workers) as pool:
        # The proxies first (they are cheap and the replays wait for them), with the runs that need nothing.
        first = [pool.submit(run_job, job("proxy", s, proxy, "proxy")) for s in seeds]
        rest = [pool.submit(run_job, job(a, s, large, "large")) for s in seeds for a in ("uniform", "direct")]
        for fut in first:
            row = fut.result()
            rows.append(row)
            bar.update(1)
            s = row["seed"]
            rest.append(pool.submit(run_job, job("replay", s, large, "large", schedule=row["history_path"])))
            rest.append(pool.submit(run_job, job("proxy_final", s, large, "large", weights=row["final_weights"])))
        for fut in rest:
            rows.append(fut.result())
            bar.update(1)
    bar.close()
    return rows


def t_interval(values) -> tuple[float, float, float]:
    """Mean and its 95% t interval over seeds (``nan`` half-width for one seed)."""
    from scipy import stats

    a = np.asarray(values, dtype=float)
    mean = float(a.mean())
    if len(a) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a)))
    return mean, mean - half, mean + half


def summarise(rows: list[dict]) -> dict:
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["seed"], r["arm"]): r for r in rows}
    out: dict[str, Any] = {"seeds": seeds, "arms": {}}
    for arm in ["proxy", *LARGE_ARMS]:
        rs = [by[(s, arm)] for s in seeds]
        e = {
            "label": LABELS[arm], "model": rs[0]["model"], "parameters": rs[0]["parameters"],
            "average": [r["final"]["average"] for r in rs],
            "training_tokens": int(np.mean([r["training_tokens"] for r in rs])),
            "probe_tokens": int(np.mean([r["probe_tokens"] for r in rs])),
            "train_seconds": [r["seconds"]["train"] for r in rs],
            "final_weights": [r["final_weights"] for r in rs],
        }
        if arm != "proxy" and arm != "uniform":
            gains = [-(by[(s, arm)]["final"]["average"] / by[(s, "uniform")]["final"]["average"] - 1) for s in seeds]
            e["gain_vs_uniform"] = {"per_seed": gains, "mean_ci95": t_interval(gains),
                                    "wins": int(sum(g > 0 for g in gains)), "n": len(gains)}
        out["arms"][arm] = e
    ratios = [by[(s, "replay")]["seconds"]["train"] / by[(s, "direct")]["seconds"]["train"] for s in seeds]
    out["wall_ratio_replay_vs_direct"] = {"per_seed": ratios, "mean_ci95": t_interval(ratios)}
    vs_direct = [-(by[(s, "replay")]["final"]["average"] / by[(s, "direct")]["final"]["average"] - 1) for s in seeds]
    out["replay_vs_direct"] = {"per_seed": vs_direct, "mean_ci95": t_interval(vs_direct)}
    vs_static = [-(by[(s, "replay")]["final"]["average"] / by[(s, "proxy_final")]["final"]["average"] - 1)
                 for s in seeds]
    out["replay_vs_proxy_final"] = {"per_seed": vs_static, "mean_ci95": t_interval(vs_static)}
    return out


def _ci(m: tuple[float, float, float], scale: float = 100, unit: str = "%") -> str:
    mean, lo, hi = m
    if np.isnan(lo):
        return f"{scale * mean:+.2f}{unit}"
    return f"{scale * mean:+.2f}{unit} [{scale * lo:+.2f}, {scale * hi:+.2f}]"


def verdict(summary: dict) -> str:
    arms = summary["arms"]
    replay = arms["replay"]["gain_vs_uniform"]["mean_ci95"]
    direct = arms["direct"]["gain_vs_uniform"]["mean_ci95"]
    vs_direct = summary["replay_vs_direct"]["mean_ci95"]
    n = len(summary["seeds"])
    lines = []
    if n < 2:
        lines.append(f"- **Transfer:** one seed only, no interval; replay {_ci(replay)} vs uniform, direct "
                     f"{_ci(direct)}.")
        return "\n".join(lines)
    if replay[1] > 0:
        head = "the proxy's schedule transfers: the replay beats uniform on the large model (interval above 0)"
    elif replay[2] < 0:
        head = "the proxy's schedule does not transfer: the replay is worse than uniform (interval below 0)"
    else:
        head = "no clear transfer: the replay's interval against uniform contains 0"
    lines.append(f"- **Transfer:** {head}; replay {_ci(replay)}, TiKMiX-D on the large model {_ci(direct)} vs "
                 f"uniform ({n} seeds).")
    if vs_direct[1] > 0 or vs_direct[2] < 0:
        side = "better" if vs_direct[0] > 0 else "worse"
        lines.append(f"- **Replay against direct TiKMiX-D on the large model:** {side}, {_ci(vs_direct)}.")
    else:
        lines.append(f"- **Replay against direct TiKMiX-D on the large model:** indistinguishable, "
                     f"{_ci(vs_direct)} (interval contains 0).")
    lines.append(f"- **Replay against the proxy's final weights used statically:** "
                 f"{_ci(summary['replay_vs_proxy_final']['mean_ci95'])}.")
    ratio = summary["wall_ratio_replay_vs_direct"]["mean_ci95"]
    lines.append(f"- **Wall time:** the replay trains in {ratio[0]:.2f}x the time of direct TiKMiX-D "
                 f"(95% interval {ratio[1]:.2f}-{ratio[2]:.2f}); it runs no probe or influence pass.")
    return "\n".join(lines)


def markdown(summary: dict, proxy, large, seconds: float) -> str:
    arms = summary["arms"]
    head = (
        f"Setup: synthetic corpus; proxy: Llama of {proxy.layers} layers x {proxy.hidden_size} hidden units "
        f"({arms['proxy']['parameters']:,} parameters); large: {large.layers} x {large.hidden_size} "
        f"({arms['uniform']['parameters']:,} parameters, "
        f"{arms['uniform']['parameters'] / arms['proxy']['parameters']:.1f}x). "
        f"Both train {large.max_steps} steps of {large.batch_size} x {large.block_size}-token blocks; TiKMiX-D decides "
        f"at {list(large.stage_fractions)} of training. Seeds {summary['seeds']}; gains are paired per seed, "
        f"-(arm / uniform - 1) of the average held-out loss, mean [95% t interval]. Wall time of the whole run: "
        f"{seconds / 60:.1f} min."
    )
    rows = []
    for e in arms.values():
        g = e.get("gain_vs_uniform")
        sd = np.std(e["average"], ddof=1) if len(e["average"]) > 1 else 0.0
        rows.append([
            e["label"], e["model"], f"{np.mean(e['average']):.4f} ± {sd:.4f}",
            f"{_ci(g['mean_ci95'])} ({g['wins']}/{g['n']})" if g else "—",
            f"{e['training_tokens']:,} / {e['probe_tokens']:,}", f"{np.mean(e['train_seconds']):.0f}",
        ])
    body = table(["arm", "model", "average held-out loss", "gain vs uniform [95% CI] (wins)",
                  "training / probe tokens", "train s"], rows)
    ratio = summary["wall_ratio_replay_vs_direct"]
    extra = ("Wall-time ratio replay / direct TiKMiX-D on the large model, per seed: "
             + ", ".join(f"{x:.2f}" for x in ratio["per_seed"]) + ".")
    return "\n\n".join([head, body, extra, verdict(summary)])


def main(argv=None) -> dict:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="model seeds (default 0 1 2; quick: 0)")
    p.add_argument("--workers", type=int, default=2, help="parallel runs, one torch thread each")
    args = p.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    proxy, large = sizes(args.quick)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tikmix-transfer-") as base:
        rows = run_all(seeds, proxy, large, args.workers, Path(base))
    seconds = time.perf_counter() - started
    summary = summarise(rows)
    for r in rows:
        r.pop("curve", None)
    doc = {"proxy_size": dataclasses.asdict(proxy), "large_size": dataclasses.asdict(large), "summary": summary,
           "rows": rows}
    write("transfer", args.out, doc, markdown(summary, proxy, large, seconds), started=started)
    return doc


if __name__ == "__main__":
    main()
