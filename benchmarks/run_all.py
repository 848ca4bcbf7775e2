"""Run every benchmark and paste its tables into ``benchmarks/RESULTS.md`` (``make bench``).

Each script runs in its own process, one after the other (the timing benchmarks must not share
the two cores with anything). Its markdown (``<out>/<name>.md``, or what it printed) replaces the
text between ``<!-- begin: <name> -->`` and ``<!-- end: <name> -->`` in the results file; the
prose around the markers is written by hand and cites no number that a rerun could change.

    python benchmarks/run_all.py                 # everything, about 45 minutes on 2 CPU cores (up to 80 on a busy day)
    python benchmarks/run_all.py --quick --out /tmp/bench   # every script's --quick, a few minutes;
                                                 # writes /tmp/bench/RESULTS.md, not the repository's
    python benchmarks/run_all.py --only quality fidelity

Writes ``<out>/run_all.json``: each script's wall time and exit status.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, ROOT, parser  # noqa: E402

HERE = ROOT / "benchmarks"
RESULTS = HERE / "RESULTS.md"

# name -> how the script is told where to write (a folder, or the path of its JSON file)
SCRIPTS: dict[str, str] = {
    "mixture_throughput": "dir",
    "influence_speed": "file",
    "solver_speed": "file",
    "callback_overhead": "dir",
    "scaling": "dir",
    "quality": "dir",
    "fidelity": "dir",
    "cost": "dir",
    "cost_model": "dir",
    "transfer": "dir",
    "mixture_scale": "dir",
}
#: the tables a script writes beside its own (``<out>/<name>.md``), pasted with it
EXTRA_TABLES: dict[str, list[str]] = {"influence_speed": ["influence_speed_fsdp"]}


def run_script(name: str, out: Path, quick: bool) -> dict:
    target = out if SCRIPTS[name] == "dir" else out / f"{name}.json"
    cmd = [sys.executable, str(HERE / f"{name}.py"), "--out", str(target)] + (["--quick"] if quick else [])
    print(f"== {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    md = out / f"{name}.md"
    md.unlink(missing_ok=True)  # never paste a table left from an earlier run
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode == 0 and not md.exists():
        # the older scripts print their tables: keep what they printed
        md.write_text(clean(proc.stdout) + "\n")
    print(f"== {name}: exit {proc.returncode} after {seconds / 60:.1f} min", file=sys.stderr, flush=True)
    return {"name": name, "command": " ".join(["python", *(str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT))
                                                          else c for c in cmd[1:])]),
            "returncode": proc.returncode, "seconds": seconds}


def clean(text: str) -> str:
    """A script's printed output without the Trainer's log dicts and the "wrote ..." notices."""
    keep = [line for line in text.splitlines() if not line.startswith(("{'", "wrote "))]
    return "\n".join(keep).strip()


def render(results: str, out: Path, names: list[str]) -> str:
    """``results`` with every ``begin``/``end`` block of ``names`` replaced by ``<out>/<name>.md``."""
    for name in names:
        md = out / f"{name}.md"
        if not md.exists():
            continue
        pattern = re.compile(rf"(<!-- begin: {re.escape(name)} -->\n).*?(<!-- end: {re.escape(name)} -->)", re.S)
        if not pattern.search(results):
            raise ValueError(f"the results file has no '<!-- begin: {name} -->' ... '<!-- end: {name} -->' block")
        body = clean(md.read_text())
        results = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), results)
    return results


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--only", nargs="+", choices=list(SCRIPTS), default=None, help="run only these")
    p.add_argument("--jobs", type=int, default=1,
                   help="scripts run at a time (default 1: the timings of a full run are taken on a quiet machine)")
    p.add_argument("--render-only", action="store_true",
                   help="run nothing: paste the markdown already in --out into the results file")
    p.add_argument("--results", type=Path, default=None,
                   help="results file to update (default: benchmarks/RESULTS.md; with --quick or a non-default "
                        "--out: <out>/RESULTS.md, a copy)")
    args = p.parse_args(argv)
    names = args.only or list(SCRIPTS)
    args.out.mkdir(parents=True, exist_ok=True)
    in_place = not args.quick and args.out.resolve() == OUT.resolve()
    target = args.results or (RESULTS if in_place else args.out / "RESULTS.md")
    if args.render_only:
        runs = json.loads((args.out / "run_all.json").read_text())["runs"]
        summary = ""
    else:
        started = time.perf_counter()
        if args.jobs < 1:
            p.error(f"--jobs {args.jobs}: give at least 1")
        with ThreadPoolExecutor(args.jobs) as pool:  # each script is its own process
            runs = list(pool.map(lambda name: run_script(name, args.out, args.quick), names))
        total = time.perf_counter() - started
        (args.out / "run_all.json").write_text(json.dumps({"quick": args.quick, "runs": runs, "seconds": total},
                                                          indent=1))
        lines = ["| script | command | minutes | exit status |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | `{r['command']}` | {r['seconds'] / 60:.1f} | {r['returncode']} |" for r in runs]
        lines.append(f"| total | | {total / 60:.1f} | |")
        summary = "\n".join(lines)
        (args.out / "run_all.md").write_text(("Quick run (`--quick`).\n\n" if args.quick else "") + summary + "\n")
    done = [r["name"] for r in runs if r["returncode"] == 0]
    tables = [t for name in done for t in [name, *EXTRA_TABLES.get(name, [])]]
    text = render(RESULTS.read_text(), args.out, tables + (["run_all"] if set(done) == set(SCRIPTS) else []))
    if not in_place:
        # pictures: the copy sits next to them
        text = text.replace("](out/", "](")
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text)
    tmp.replace(target)
    print(summary)
    print(f"updated {target}", file=sys.stderr)
    return max((r["returncode"] for r in runs), default=0)


if __name__ == "__main__":
    sys.exit(main())
