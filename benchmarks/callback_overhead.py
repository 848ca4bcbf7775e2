"""Wall-time overhead of TiKMiXCallback in a real Trainer run, against the same run with a static mixture.

Both arms train the same tiny Llama on the same toy domains for the same number of steps; the
TiKMiX arm re-decides the mixture at the default stage boundaries with the library's defaults. The
runs alternate (static, TiKMiX, static, TiKMiX, ...) and the fastest of each arm is kept, so that
load from other processes hits both alike. What the overhead should be: the tokens the measurement
forwards beyond training (validation sequences, probes and top-ups; a training window's sequences
are training's own) over the training tokens, since such a pass costs about a training step per
token, plus the training window's hook time over the static run's time. The goal: the overhead
exceeds that by at most 2 percentage points (nothing else the callback does costs more).

    python benchmarks/callback_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from transformers import Trainer, TrainingArguments

from tikmix_hf import DomainMixture, TiKMiXCallback, TiKMiXConfig
from tikmix_hf.stage_record import measurement_tokens
from tikmix_hf.testing import tiny_llama

OUT = os.path.join(os.path.dirname(__file__), "out")
SEQ, VOCAB = 128, 384


def domains(n_domains: int, per_domain: int, seed: int = 0) -> dict[str, list[dict]]:
    rng = np.random.default_rng(seed)
    out = {}
    for d in range(n_domains):
        # each domain: a random walk over its own slice of the vocabulary, so domains differ
        lo = (d * 37) % (VOCAB - 64)
        rows = (lo + np.cumsum(rng.integers(-2, 3, size=(per_domain, SEQ)), axis=1) % 64).tolist()
        out[f"d{d}"] = [{"input_ids": r, "labels": r} for r in rows]
    return out


def collate(examples):
    ids = torch.tensor([e["input_ids"] for e in examples])
    return {"input_ids": ids, "labels": ids.clone()}


def model():
    return tiny_llama(VOCAB, hidden_size=128, layers=4, heads=4, block_size=SEQ, seed=0, intermediate_size=336,
                      tie_word_embeddings=False)


def run(arm: str, steps: int, batch: int, probes: int, n_domains: int, source: str = "auto") -> dict:
    data = domains(n_domains, 256)
    validation = {"held_out": domains(1, probes, seed=1)["d0"]}
    mixture = DomainMixture(data, weights="uniform", seed=0)
    callbacks = []
    if arm == "tikmix":
        config = TiKMiXConfig(tikmix_probe_sequences=probes, tikmix_validation_sequences=probes,
                              tikmix_influence_source=source, tikmix_show_progress=False)
        callbacks.append(TiKMiXCallback(mixture, validation, config))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, use_cpu=True,
                                 report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=10_000)
        trainer = Trainer(model=model(), args=args, train_dataset=mixture, data_collator=collate,
                          callbacks=callbacks)
        for callback in callbacks:
            callback.bind(trainer)
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    result = {"arm": arm, "wall_s": wall}
    if arm == "tikmix":
        history = callbacks[0].history
        result["stages"] = len(history)
        result["tikmix_s"] = sum(h["seconds"]["total"] for h in history)
        result["influence_s"] = sum(h["seconds"]["influence"] for h in history)
        # tokens forwarded beyond training: probes, top-ups and validation (a window's sequences are training's)
        result["probe_tokens"] = sum(measurement_tokens(h["influence"]) for h in history)
        result["hook_s"] = sum((h["influence"].get("window") or {}).get("hook_seconds", 0.0) for h in history)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=OUT, help=f"folder for callback_overhead.json (default {OUT})")
    cli = parser.parse_args()
    torch.set_num_threads(1)  # 2-thread kernels stall badly behind any other process on a 2-core machine
    steps, batch, probes, n_domains = (20, 8, 4, 4) if cli.quick else (200, 8, 8, 4)
    repeats = cli.repeats or (1 if cli.quick else 2)
    runs = {"static": [], "tikmix": []}
    for _ in range(repeats):
        for arm in ("static", "tikmix"):
            runs[arm].append(run(arm, steps, batch, probes, n_domains))
            print(f"  {arm}: {runs[arm][-1]['wall_s']:.1f} s", file=sys.stderr)
    static = min(runs["static"], key=lambda r: r["wall_s"])
    tikmix = min(runs["tikmix"], key=lambda r: r["wall_s"])
    train_tokens = steps * batch * SEQ
    # a probe token is labelled-token count; a training sequence of SEQ tokens has SEQ - 1 of them
    train_labelled = steps * batch * (SEQ - 1)
    predicted = tikmix["probe_tokens"] / train_labelled + tikmix["hook_s"] / static["wall_s"]
    overhead = tikmix["wall_s"] / static["wall_s"] - 1
    row = {
        "steps": steps, "batch": batch, "seq": SEQ, "domains": n_domains, "probe_sequences": probes,
        "stages": tikmix["stages"], "train_tokens": train_tokens, "probe_tokens": tikmix["probe_tokens"],
        "static_wall_s": static["wall_s"], "tikmix_wall_s": tikmix["wall_s"],
        "wall_ratio": tikmix["wall_s"] / static["wall_s"], "overhead": overhead,
        "predicted_overhead": predicted, "excess_pp": 100 * (overhead - predicted),
        "tikmix_share": tikmix["tikmix_s"] / tikmix["wall_s"],
        "influence_share": tikmix["influence_s"] / tikmix["wall_s"],
        "goal_met": overhead <= predicted + 0.02, "all_runs": runs,
    }
    os.makedirs(cli.out, exist_ok=True)
    with open(os.path.join(cli.out, "callback_overhead.json"), "w") as fh:
        json.dump(row, fh, indent=1)
    print("\n| steps | stages | extra tokens / training tokens + hook time | wall ratio (TiKMiX / static) | overhead | "
          "excess over that | TiKMiX share of wall time | goal (excess <= 2 pp) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {steps} | {row['stages']} | {predicted:.1%} | {row['wall_ratio']:.3f} | {overhead:.1%} | "
          f"{row['excess_pp']:+.1f} pp | {row['tikmix_share']:.1%} | {'met' if row['goal_met'] else 'missed'} |")


if __name__ == "__main__":
    main()
