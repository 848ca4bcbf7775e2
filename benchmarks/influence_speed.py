"""Group Influence speed and memory, side by side with real ``transformers.Trainer`` training steps.

One ``Trainer`` run trains a Llama on fixed token sequences; a callback measures Group Influence at
step boundaries (as the TiKMiX callback will) for 4, 8 and 26 domains and 1 and 5 tasks, so the
training steps and the influence passes share the same process, model, sequences and machine load:

- speed ratio = influence tokens/s / training tokens/s (goal >= 1.0);
- memory ratio = influence peak extra memory / parameter bytes (goal <= n_tasks + 2).

A second section measures the accuracy of the two reductions (``projection_dim``, ``param_filter``)
against exact scores on the tiny fp64 test model.

With ``--fsdp`` the same model is sharded with ``fully_shard`` (per decoder layer and at the root)
over ``--nproc`` ranks (gloo on CPU, NCCL on CUDA; the script relaunches itself under torchrun) and
trained by a plain loop, since ``Trainer`` enables FSDP only on accelerators. Influence passes run
at step boundaries as above; tokens/s count the tokens of all ranks on both sides, and the memory
column is the engine's ledger of this rank's buffers against ``(n_tasks + 2) x P / world`` bytes.
It writes ``influence_speed_fsdp.json`` and ``.md`` beside ``--out``.

    python benchmarks/influence_speed.py            # CPU, float32, hidden 128, 4 layers, vocab 384
    python benchmarks/influence_speed.py --quick
    python benchmarks/influence_speed.py --device cuda --dtype bfloat16 --hidden 768 --layers 12 --vocab 32000
    python benchmarks/influence_speed.py --fsdp                # 2 CPU ranks

Writes ``benchmarks/out/influence_speed.json`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [(4, 1), (8, 1), (26, 1), (4, 5), (8, 5), (26, 5)]  # (domains, tasks)
QUICK_CONFIGS = [(4, 1), (8, 5)]  # --quick: the smallest and a middle one
DTYPES = {name: getattr(torch, name) for name in ("float32", "bfloat16", "float16", "float64")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 batch per domain/task, fewer timed steps")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=None, help="default: hidden // 32 (at least 1)")
    parser.add_argument("--intermediate", type=int, default=None, help="default: about 8/3 x hidden")
    parser.add_argument("--vocab", type=int, default=384)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--probe-batches", type=int, help="micro-batches per domain (default 2, quick 1)")
    parser.add_argument("--val-batches", type=int, help="micro-batches per task (default 2, quick 1)")
    parser.add_argument("--train-steps", type=int, help="timed training steps between influence passes")
    parser.add_argument("--repeats", type=int, help="passes per configuration (default 3, quick 1)")
    parser.add_argument("--preconditioner", default="identity", choices=["identity", "adam", "diag_fisher"])
    parser.add_argument("--buffer-dtype", default=None, choices=sorted(DTYPES), help="default: the library's")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads (default 1 on CPU: on a shared machine 2-thread kernels stall behind "
        "other jobs and timings swing tenfold; the same setting applies to both sides of the ratio)",
    )
    parser.add_argument("--no-accuracy", action="store_true", help="skip the reduction-accuracy section")
    parser.add_argument("--fsdp", action="store_true", help="shard with fully_shard over --nproc ranks, plain loop")
    parser.add_argument("--nproc", type=int, default=2, help="ranks for --fsdp (default 2)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "influence_speed.json"))
    args = parser.parse_args(argv)
    args.probe_batches = args.probe_batches or (1 if args.quick else 2)
    args.val_batches = args.val_batches or (1 if args.quick else 2)
    args.train_steps = args.train_steps or (3 if args.quick else 4)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.threads is None and torch.device(args.device).type == "cpu":
        args.threads = 1
    return args


def build_model(args):
    from tikmix_hf.testing import tiny_llama

    heads = args.heads or max(1, args.hidden // 32)
    intermediate = args.intermediate or int(round(args.hidden * 8 / 3 / 16)) * 16
    model = tiny_llama(args.vocab, hidden_size=args.hidden, layers=args.layers, heads=heads, block_size=args.seq_len,
                       seed=0, intermediate_size=intermediate, tie_word_embeddings=False)
    return model.to(device=args.device, dtype=DTYPES[args.dtype])


def make_batches(count, args, seed):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return batches


class _Rows(torch.utils.data.Dataset):
    """The benchmark sequences, one row per item, for the Trainer."""

    def __init__(self, batches):
        self.rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_speed(args):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from tikmix_hf.influence import group_influence

    model = build_model(args)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    max_domains, max_tasks = max(m for m, _ in configs), max(n for _, n in configs)
    pool = make_batches(max_domains * args.probe_batches + max_tasks * args.val_batches, args, seed=1)
    split = max_domains * args.probe_batches
    on_device = [{k: v.to(args.device) for k, v in b.items()} for b in pool]
    p, v = args.probe_batches, args.val_batches
    domains_all = {f"d{j:02d}": on_device[j * p:(j + 1) * p] for j in range(max_domains)}
    tasks_all = {f"t{i}": on_device[split + i * v:split + (i + 1) * v] for i in range(max_tasks)}
    tokens_per_batch = args.batch_size * args.seq_len
    warmup = 2

    # The schedule: warm-up steps, then for every configuration and repeat, ``train_steps`` timed
    # training steps followed by one influence pass at the step boundary; timed steps at the end.
    schedule = [config for config in configs for _ in range(args.repeats)]
    buffer_dtype = DTYPES[args.buffer_dtype] if args.buffer_dtype else None

    class SideBySide(TrainerCallback):
        """Times every training step end to end and runs the scheduled influence passes.

        A step is timed from the end of the previous one (after any influence pass) to its own end,
        so it includes data loading, forward, backward, clipping, the optimizer and the Trainer's
        bookkeeping.
        """

        def __init__(self):
            self.steps, self.rows, self.last = {}, [], None

        def on_step_end(self, targs, state, control, model=None, optimizer=None, **kwargs):
            _sync(args.device)
            now = time.perf_counter()
            if self.last is not None and state.global_step > warmup:
                self.steps[state.global_step] = now - self.last
            index, remainder = divmod(state.global_step - warmup, args.train_steps)
            if state.global_step > warmup and remainder == 0 and 1 <= index <= len(schedule):
                m, n = schedule[index - 1]
                domains = dict(list(domains_all.items())[:m])
                tasks = dict(list(tasks_all.items())[:n])
                result = group_influence(model, domains, tasks, preconditioner=args.preconditioner,
                                         optimizer=optimizer, buffer_dtype=buffer_dtype, show_progress=False)
                tokens = tokens_per_batch * (m * args.probe_batches + n * args.val_batches)
                self.rows.append({
                    "after_step": state.global_step, "domains": m, "tasks": n, "tokens": tokens,
                    "seconds": result.seconds, "tokens_per_s": tokens / result.seconds,
                    "peak_memory_bytes": result.peak_memory_bytes, "memory_measure": result.memory_measure,
                    "buffer_bytes": result.buffer_bytes, "buffer_dtype": result.buffer_dtype,
                    "preconditioner": result.preconditioner,
                })
            _sync(args.device)
            self.last = time.perf_counter()

    callback = SideBySide()
    total_steps = warmup + args.train_steps * (len(schedule) + 1)
    with tempfile.TemporaryDirectory() as output_dir:
        targs = TrainingArguments(
            output_dir=output_dir, use_cpu=torch.device(args.device).type == "cpu", report_to="none",
            save_strategy="no", logging_strategy="no", per_device_train_batch_size=args.batch_size,
            max_steps=total_steps, learning_rate=1e-3, dataloader_num_workers=0, disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=targs, train_dataset=_Rows(pool), callbacks=[callback])
        trainer.train()

    # Each pass is compared with the training steps right before and right after it, so that a
    # change in machine load during the run moves both sides of the ratio alike. Of the repeats
    # of a configuration, the pass with the median ratio is reported (all ratios are kept).
    rows = []
    for m, n in configs:
        passes = [r for r in callback.rows if (r["domains"], r["tasks"]) == (m, n)]
        for r in passes:
            s = r["after_step"]
            around = [callback.steps[t] for t in range(s - args.train_steps + 1, s + args.train_steps + 1)
                      if t in callback.steps]
            r["train_tokens_per_s"] = tokens_per_batch / float(np.median(around))
            r["speed_ratio"] = r["tokens_per_s"] / r["train_tokens_per_s"]
        median = sorted(passes, key=lambda r: r["speed_ratio"])[(len(passes) - 1) // 2]
        rows.append({
            "domains": m, "tasks": n, "repeats": len(passes), "tokens": median["tokens"],
            "tokens_per_s": median["tokens_per_s"], "train_tokens_per_s": median["train_tokens_per_s"],
            "speed_ratio": median["speed_ratio"], "speed_ratios": [r["speed_ratio"] for r in passes],
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in passes),
            "buffer_bytes": max(r["buffer_bytes"] for r in passes),
            "memory_ratio": max(r["peak_memory_bytes"] for r in passes) / param_bytes,
            "buffer_ratio": max(r["buffer_bytes"] for r in passes) / param_bytes,
            "memory_goal": n + 2, "memory_measure": passes[0]["memory_measure"],
            "buffer_dtype": passes[0]["buffer_dtype"], "preconditioner": passes[0]["preconditioner"],
        })
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameter_bytes": param_bytes,
        "train_tokens_per_s": tokens_per_batch / float(np.median(list(callback.steps.values()))),
        "train_step_seconds": callback.steps,
        "passes": callback.rows,
        "rows": rows,
    }


FSDP_CONFIGS = [(4, 1), (8, 1), (4, 5), (8, 5)]  # (domains, tasks)


def _launch_fsdp(argv):
    """Rerun this script under torchrun with ``--nproc`` ranks; rank 0 writes the report."""
    import subprocess

    args = parse_args(argv)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, *(argv or sys.argv[1:])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, check=True, env=env)


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_fsdp(args):
    """Influence passes against training steps of the same ``fully_shard`` model (one rank's view)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from tikmix_hf.influence import group_influence

    cuda = torch.device(args.device).type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(args.device)
    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    max_domains, max_tasks = max(m for m, _ in FSDP_CONFIGS), max(n for _, n in FSDP_CONFIGS)
    p, v = args.probe_batches, args.val_batches
    pool = make_batches(max_domains * p + max_tasks * v, args, seed=1)
    pool = [{k: t.to(args.device) for k, t in b.items()} for b in pool]
    split = max_domains * p
    domains_all = {f"d{j:02d}": pool[j * p:(j + 1) * p] for j in range(max_domains)}
    tasks_all = {f"t{i}": pool[split + i * v:split + (i + 1) * v] for i in range(max_tasks)}
    tokens_per_batch = args.batch_size * args.seq_len
    buffer_dtype = DTYPES[args.buffer_dtype] if args.buffer_dtype else None

    def train_step(step):
        batch = pool[(step * world + rank) % len(pool)]
        _sync(args.device)
        started = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(args.device)
        return time.perf_counter() - started

    step = 0
    for _ in range(2):  # warm-up of both sides: first calls pay one-off costs (lazy init, imports)
        train_step(step)
        step += 1
    group_influence(model, dict(list(domains_all.items())[:1]), dict(list(tasks_all.items())[:1]),
                    preconditioner=args.preconditioner, optimizer=optimizer, show_progress=False)
    steps, passes = [], []
    for m, n in [config for config in FSDP_CONFIGS for _ in range(args.repeats)]:
        around = []
        for _ in range(args.train_steps):
            around.append(train_step(step))
            step += 1
        domains, tasks = dict(list(domains_all.items())[:m]), dict(list(tasks_all.items())[:n])
        result = group_influence(model, domains, tasks, preconditioner=args.preconditioner, optimizer=optimizer,
                                 buffer_dtype=buffer_dtype, show_progress=False)
        for _ in range(args.train_steps):
            around.append(train_step(step))
            step += 1
        steps += around
        tokens = tokens_per_batch * (m * p + n * v)  # every batch is differentiated once, on some rank
        train_rate = world * tokens_per_batch / float(np.median(around))
        passes.append({
            "domains": m, "tasks": n, "tokens": tokens, "seconds": result.seconds,
            "tokens_per_s": tokens / result.seconds, "train_tokens_per_s": train_rate,
            "speed_ratio": tokens / result.seconds / train_rate, "buffer_bytes": result.buffer_bytes,
            "peak_memory_bytes": result.peak_memory_bytes, "memory_measure": result.memory_measure,
            "memory_goal_bytes": (n + 2) * param_bytes / world, "preconditioner": result.preconditioner,
            "buffer_dtype": result.buffer_dtype,
        })
    rows = []
    for m, n in FSDP_CONFIGS:
        mine = [r for r in passes if (r["domains"], r["tasks"]) == (m, n)]
        median = dict(sorted(mine, key=lambda r: r["speed_ratio"])[(len(mine) - 1) // 2])
        median["speed_ratios"] = [r["speed_ratio"] for r in mine]
        rows.append(median)
    # Every rank's ledger, so that the table can show the largest.
    ledgers = [None] * world
    dist.all_gather_object(ledgers, [r["buffer_bytes"] for r in rows])
    for index, row in enumerate(rows):
        row["buffer_bytes_per_rank"] = [ledger[index] for ledger in ledgers]
    dist.destroy_process_group()
    return rank, {"parameters": n_params, "parameter_bytes": param_bytes, "world_size": world,
                  "train_step_seconds": steps, "passes": passes, "rows": rows}


def fsdp_table(report, args):
    first = report["rows"][0]
    world = report["world_size"]
    lines = [
        f"Llama {args.layers}x{args.hidden}, vocab {args.vocab}, {report['parameters'] / 1e6:.2f}M params, "
        f"{args.dtype} on {args.device.split(':')[0]}, fully_shard over {world} ranks (per decoder layer and root), "
        f"batch {args.batch_size} x {args.seq_len} per rank, {args.threads or 'default'} thread(s) per rank; "
        f"preconditioner {first['preconditioner']}, buffers {first['buffer_dtype']}; {args.probe_batches} "
        f"micro-batch(es) per domain, {args.val_batches} per task; a plain training loop (forward, backward, "
        f"AdamW step), after 2 warm-up steps and one warm-up pass. Each row is the pass with the median ratio "
        f"of {args.repeats} repeat(s), against the "
        f"{2 * args.train_steps} training steps around it; tokens/s are over all ranks; memory: the engine's "
        f"ledger of one rank's buffers (the largest over ranks), P = parameter bytes of the whole model.",
        "",
        "| domains | tasks | influence tokens/s | training tokens/s | speed ratio (goal >= 1.0) | "
        "buffers per rank / (P / world) | memory goal (tasks + 2) |",
        "|---|---|---|---|---|---|---|",
    ]
    shard_bytes = report["parameter_bytes"] / world
    for r in report["rows"]:
        lines.append(
            f"| {r['domains']} | {r['tasks']} | {r['tokens_per_s']:.0f} | {r['train_tokens_per_s']:.0f} | "
            f"{r['speed_ratio']:.2f} | {max(r['buffer_bytes_per_rank']) / shard_bytes:.2f} | {r['tasks'] + 2} |"
        )
    return "\n".join(lines)


def main_fsdp(args, argv):
    if "LOCAL_RANK" not in os.environ:
        _launch_fsdp(argv)
        return
    started = time.perf_counter()
    rank, report = run_fsdp(args)
    if rank != 0:
        return
    report = {"args": vars(args), "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                              "cpus": os.cpu_count(), "load_average": list(os.getloadavg())},
              "fsdp": report, "seconds": time.perf_counter() - started}
    markdown = fsdp_table(report["fsdp"], args)
    out = Path(args.out).with_name("influence_speed_fsdp.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown + "\n")
    print(markdown)
    print(f"\nwrote {out} and {out.with_suffix('.md')} ({report['seconds']:.0f} s)")


def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def run_accuracy():
    """Reductions against exact scores on the tiny fp64 test model, after a few AdamW steps."""
    from tikmix_hf.influence import group_influence
    from tikmix_hf.testing import exact_llama, named_batches, token_batches

    model = exact_llama(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for batch in token_batches(30, seed=21, batch_size=4):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    domains = named_batches([f"d{j}" for j in range(8)], 2, seed=3)
    tasks = named_batches(["t0", "t1", "t2"], 2, seed=4)
    exact = group_influence(model, domains, tasks, show_progress=False)
    P = exact.num_parameters
    # |grad f_i|^2 and |g_j|^2 are identity influences of a set on itself; with them, the cosines
    # explain the projection error (about sqrt(2/k) / |cos| relative).
    task_norms = np.sqrt(np.diag(group_influence(model, tasks, tasks, show_progress=False).scores))
    domain_norms = np.sqrt(np.diag(group_influence(model, domains, domains, show_progress=False).scores))
    cosines = np.abs(exact.scores) / np.outer(task_norms, domain_norms)

    def compare(label, result):
        S, E = result.scores, exact.scores
        return {
            "reduction": label,
            "parameters": result.num_parameters,
            "relative_error": float(np.linalg.norm(S - E) / np.linalg.norm(E)),
            "spearman_over_domains": float(np.mean([_spearman(S[i], E[i]) for i in range(len(E))])),
            "sign_agreement": float(np.mean(np.sign(S) == np.sign(E))),
            "memory_bytes": result.peak_memory_bytes,
            "seconds": result.seconds,
        }

    rows = [compare("exact", exact)]
    for k in (64, 256, 1024, 4096):
        runs = [
            compare("", group_influence(model, domains, tasks, projection_dim=k, seed=s, show_progress=False))
            for s in range(3)
        ]
        row = {key: float(np.mean([r[key] for r in runs])) if isinstance(value, float) else value
               for key, value in runs[0].items()}
        row["reduction"] = f"projection_dim={k} (mean of 3 seeds)"
        rows.append(row)
    filters = {
        "param_filter=['mlp']": ["mlp"],
        "param_filter=['self_attn']": ["self_attn"],
        "param_filter=['layers.1.', 'lm_head']": ["layers.1.", "lm_head"],
        "param_filter=['lm_head']": ["lm_head"],
        "param_filter=['embed_tokens']": ["embed_tokens"],
    }
    for label, pf in filters.items():
        result = group_influence(model, domains, tasks, param_filter=pf, show_progress=False)
        rows.append(compare(label, result))
    return {"model_parameters": P, "domains": len(domains), "tasks": len(tasks), "rows": rows,
            "median_abs_cosine": float(np.median(cosines)), "max_abs_cosine": float(cosines.max())}


def speed_table(speed, args):
    first = speed["rows"][0]
    lines = [
        f"Llama {args.layers}x{args.hidden}, vocab {args.vocab}, {speed['parameters'] / 1e6:.2f}M params, "
        f"{args.dtype} on {args.device}, batch {args.batch_size} x {args.seq_len}, {torch.get_num_threads()} "
        f"thread(s); preconditioner {first['preconditioner']}, buffers {first['buffer_dtype']}; "
        f"{args.probe_batches} micro-batch(es) per domain, {args.val_batches} per task; Trainer "
        f"{speed['train_tokens_per_s']:.0f} tokens/s (median step). Each row is the pass with the median "
        f"ratio of {first['repeats']} repeat(s), against the training steps around it; memory: "
        f"{first['memory_measure']}.",
        "",
        "| domains | tasks | influence tokens/s | Trainer tokens/s | speed ratio (goal >= 1.0) | "
        "peak extra memory / param bytes | buffers / param bytes | memory goal (tasks + 2) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in speed["rows"]:
        lines.append(
            f"| {r['domains']} | {r['tasks']} | {r['tokens_per_s']:.0f} | {r['train_tokens_per_s']:.0f} | "
            f"{r['speed_ratio']:.2f} | {r['memory_ratio']:.2f} | {r['buffer_ratio']:.2f} | "
            f"{r['memory_goal']} |"
        )
    return "\n".join(lines)


def accuracy_table(accuracy):
    lines = [
        f"Tiny fp64 Llama ({accuracy['model_parameters']} params), {accuracy['domains']} domains x "
        f"{accuracy['tasks']} tasks, after 30 AdamW steps; errors against exact identity scores; median "
        f"|cos(grad f_i, g_j)| = {accuracy['median_abs_cosine']:.3f} (max {accuracy['max_abs_cosine']:.3f})",
        "",
        "| reduction | params scored | relative error ||S'-S||/||S|| | Spearman over domains | "
        "sign agreement | buffer bytes |",
        "|---|---|---|---|---|---|",
    ]
    for r in accuracy["rows"]:
        lines.append(
            f"| {r['reduction']} | {r['parameters']} | {r['relative_error']:.3f} | "
            f"{r['spearman_over_domains']:.3f} | {r['sign_agreement']:.2f} | {r['memory_bytes']} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.fsdp:
        main_fsdp(args, argv)
        return
    started = time.perf_counter()
    speed = run_speed(args)
    report = {
        "args": vars(args),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "threads": torch.get_num_threads(), "load_average": list(os.getloadavg())},
        "speed": speed,
    }
    print(speed_table(speed, args))
    if not args.no_accuracy:
        report["accuracy"] = run_accuracy()
        print()
        print(accuracy_table(report["accuracy"]))
    report["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
