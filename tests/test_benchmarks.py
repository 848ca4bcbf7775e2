"""The evidence benchmarks stay alive: the quality arms' ``--quick`` run through ``run_all.py``, every other
script imported, and the pieces of ``run_all``/``quality`` that decide what gets compared with what."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality  # noqa: E402
import run_all  # noqa: E402
from _common import bench_size  # noqa: E402


def test_render_replaces_only_the_named_blocks(tmp_path):
    # the older scripts' printed output: the Trainer's log dicts and "wrote" notices are left out
    (tmp_path / "a.md").write_text("{'train_runtime': '1.0'}\n| new | table |\nwrote /tmp/x.json\n")
    text = "intro\n<!-- begin: a -->\nold a\n<!-- end: a -->\nmiddle\n<!-- begin: b -->\nold b\n<!-- end: b -->\n"
    out = run_all.render(text, tmp_path, ["a", "b"])  # b has no markdown: left alone
    assert out == ("intro\n<!-- begin: a -->\n| new | table |\n<!-- end: a -->\nmiddle\n"
                   "<!-- begin: b -->\nold b\n<!-- end: b -->\n")
    with pytest.raises(ValueError, match="begin: a"):
        run_all.render("no markers here", tmp_path, ["a"])


def test_every_script_has_a_block_in_results():
    text = run_all.RESULTS.read_text()
    for name in run_all.SCRIPTS:
        assert f"<!-- begin: {name} -->" in text and f"<!-- end: {name} -->" in text, name
        assert (ROOT / "benchmarks" / f"{name}.py").exists()


def _done(share, weights, max_steps=400):
    """A finished run whose measurement took ``share`` of its training's own seconds."""
    return {"seconds": {"train": 100.0 * (1 + share), "tikmix": 100.0 * share}, "max_steps": max_steps,
            "final_weights": weights, "model_path": "/ref"}


def test_quality_plan_orders_dependants_and_charges_the_measured_compute():
    size = bench_size(False)
    jobs = {j["arm"]: j for j in quality.plan("local", [0], quality.ORDER)}
    assert "oracle" not in jobs and "targets" in jobs  # the oracle exists only for the synthetic corpus
    assert {a for a, j in jobs.items() if not j["needs"]} >= {"uniform", "natural", "tikmix_d", "tikmix_m", "odm"}
    assert jobs["doremi"]["needs"] == ["uniform"] and jobs["uniform"]["save_model"]
    assert jobs["tikmix_d"]["config"].get("tikmix_influence_source") is None  # the library's default
    assert jobs["tikmix_d_probes"]["config"]["tikmix_influence_source"] == "probes"
    # the defaults started from the mixture a user who knows the targets would pick, on the corpus that has one
    assert jobs["tikmix_d_tilted"]["initial"] == "targets" and jobs["tikmix_d"]["initial"] == "natural"
    assert jobs["tikmix_d_tilted"]["config"]["tikmix_initial_weights"] == "keep"  # not re-aligned on top
    # every measuring arm has an equal-compute twin that waits for it, TiKMiX-M and the baselines included
    for arm in quality.EQ_ARMS:
        assert jobs[f"{arm}_eq"]["needs"][-1] == arm and jobs[f"{arm}_eq"]["solver"] == jobs[arm]["solver"]
    assert not {"tikmix_d_tilted", "tikmix_d_tilted_eq", "targets"} & {j["arm"] for j in quality.plan(
        "synthetic", [0], quality.ORDER)}
    with pytest.raises(ValueError, match="has no equal-compute run"):
        quality.plan("local", [0], ["uniform_eq"])
    done = {("local", 0, "tikmix_d"): _done(0.05, {"a": 0.25, "b": 0.75}),
            ("local", 0, "tikmix_m"): _done(0.101, {"a": 1.0}),
            ("local", 0, "uniform"): _done(0.0, {})}
    # the measurement's seconds at the run's own seconds per step: 5% of 400 steps, and 10.1% rounded up
    assert quality.charged_steps(done[("local", 0, "tikmix_d")]) == 20
    eq = quality.resolve(jobs["tikmix_d_eq"], done, size)
    assert eq["max_steps"] == size.max_steps - 20 and eq["compute_matched"]
    assert quality.resolve(jobs["tikmix_m_eq"], done, size)["max_steps"] == size.max_steps - 41
    # the hindsight arm starts from the plain run's final weights
    assert quality.resolve(jobs["hindsight_d"], done, size)["initial"] == {"a": 0.25, "b": 0.75}
    assert quality.resolve(jobs["doremi"], done, size)["config"] == {"tikmix_reference_model": "/ref"}


#: The scripts whose --quick runs in the suite: the quality arms (every mixer through the demo engine), one
#: script that writes a file and one that writes a folder. The others' --quick runs in ``make bench-quick``
#: (together about four minutes of CPU); here they are imported, which catches a moved or renamed import.
IN_SUITE = ["mixture_throughput", "solver_speed", "quality"]


@pytest.mark.parametrize("name", sorted(set(run_all.SCRIPTS) - set(IN_SUITE)))
def test_the_other_scripts_import_and_have_a_main(name):
    module = importlib.import_module(name)
    assert callable(module.main), name


@pytest.mark.slow
def test_run_all_quick(tmp_path):
    """The suite's benchmarks' --quick, through the command ``make bench`` uses; the copy of RESULTS.md gets
    their tables and the repository's file is left alone."""
    before = run_all.RESULTS.read_text()
    # two scripts at a time: most of them train on one thread, and the suite runs on two cores
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--jobs", "2",
                           "--out", str(tmp_path), "--only", *IN_SUITE], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert run_all.RESULTS.read_text() == before
    report = json.loads((tmp_path / "run_all.json").read_text())
    assert [r["name"] for r in report["runs"]] == IN_SUITE
    rendered = (tmp_path / "RESULTS.md").read_text()
    for name in IN_SUITE:
        body = (tmp_path / f"{name}.md").read_text()
        assert "|---" in body, name  # a markdown table
        assert body.strip() in rendered, name
    q = json.loads((tmp_path / "quality.json").read_text())
    synthetic = q["summary"]["synthetic"]["arms"]
    assert synthetic["oracle"]["gap_closed"][0] == pytest.approx(1.0)
    assert synthetic["uniform"]["gap_closed"][0] == pytest.approx(0.0)
    runs = {(r["corpus"], r["arm"]): r for r in q["runs"]}
    for corpus in ("synthetic", "local"):
        # equal compute: the TiKMiX run gave up the steps its measurement's seconds cost; hindsight starts from
        # the plain run's final weights
        eq, plain = runs[(corpus, "tikmix_d_eq")], runs[(corpus, "tikmix_d")]
        # (the tiny preset's measurement may cost more than its 32 steps: the run then trains one)
        assert eq["max_steps"] == max(plain["max_steps"] - quality.charged_steps(plain), 1) < plain["max_steps"]
        assert runs[(corpus, "hindsight_d")]["final_weights"] == pytest.approx(plain["final_weights"])
    assert (tmp_path / "quality_synthetic.png").stat().st_size > 1000


@pytest.mark.slow
def test_cost_charges_a_training_window_its_hooks_and_only_its_extra_passes(tmp_path):
    """The cost bench's TiKMiX-D arm reads S in the training window by default: its sequences are training's,
    so only the validation and top-up passes count as passes, and the hooks are charged per window token."""
    import cost

    from tikmix_hf.demo import Arm, prepare_data, train_arm
    from tikmix_hf.history import load_history

    size = bench_size(True)
    data = prepare_data("local", size)
    shape = cost.model_shape(data, size)
    for source in ("training", "probes"):
        arm = Arm("tikmix_d", "TiKMiX-D", solver="direct", config={"tikmix_influence_source": source})
        row = train_arm(arm, 0, data, size, tmp_path / source)
        history = load_history(tmp_path / source / row["history"])
        spent = cost.tikmix_cost(row, history, data, shape)
        assert spent["labelled_tokens"] == row["probe_tokens"] > 0
        stages = [s["influence"] for s in history["stages"] if s["influence"].get("window")]
        windows = [s["window"] for s in stages]
        assert bool(windows) == (source == "training")
        # every window sequence is one training block of block_size tokens
        blocks = sum(sum(w["sequences"].values()) for w in windows)
        assert spent["window_tokens"] == blocks * size.block_size
        # per read token the weight gradient (2 P) and the loss-scale fit (LOSS_FIT per logit); per read
        # sequence its dot products with each task's gradient (2 P per task)
        expected = 0.0
        for inf in stages:
            w, sequences = inf["window"], sum(inf["window"]["sequences"].values())
            expected += (sequences * size.block_size * (2.0 * w["parameters"] + cost.LOSS_FIT * shape["vocab"])
                         + sequences * 2.0 * len(inf["task_losses"]) * w["parameters"])
        assert spent["hook_flops"] == pytest.approx(expected, rel=1e-12)
        assert spent["flops"] > spent["hook_flops"]
