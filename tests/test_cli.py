"""The ``tikmix`` command line end to end: demo, train (one process and two ranks), plot, influence,
and the errors a user can make (one clear line, exit status 2, no traceback)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from tikmix_hf.cli import main
from tikmix_hf.demo.arms import DEFAULT_ARMS, EARLY

pytestmark = pytest.mark.usefixtures("one_thread")

STDLIB = Path(sysconfig.get_paths()["stdlib"])



def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    """Two small domains of real text (a folder of code, a .jsonl of prose) and two validation files."""
    import pydoc_data.topics as topics

    root = tmp_path_factory.mktemp("data")
    (root / "code").mkdir()
    for path in sorted((STDLIB / "json").glob("*.py")):
        (root / "code" / path.name).write_text(path.read_text())
    (root / "code" / "blob.bin").write_bytes(b"\0\1\2binary")  # skipped: not text
    items = sorted(topics.topics.items())
    with open(root / "prose.jsonl", "w") as fh:
        for _, text in items[:40]:
            fh.write(json.dumps({"text": text}) + "\n")
    (root / "val_code.txt").write_text((STDLIB / "csv.py").read_text())
    (root / "val_prose.txt").write_text("\n\n".join(text for _, text in items[60:66]))
    return root


def _train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--output_dir", str(out), "--domain", f"code={data / 'code'}",
        "--domain", f"prose={data / 'prose.jsonl'}",
        "--validation", f"val_code={data / 'val_code.txt'}", f"val_prose={data / 'val_prose.txt'}",
        "--vocab_size", "300", "--block_size", "32", "--max_steps", "12", "--per_device_train_batch_size", "4",
        "--learning_rate", "3e-3", "--use_cpu", "--report_to", "none", "--save_strategy", "no",
        "--disable_tqdm", "true",
        "--logging_steps", "4", "--tikmix_stage_steps", "4", "--tikmix_probe_sequences", "4",
        "--tikmix_validation_sequences", "4", "--tikmix_show_progress", "false", *extra,
    ]


@pytest.fixture(scope="module")
def trained_run(text_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(_train_argv(text_data, out, "--eval_strategy", "steps", "--eval_steps", "6")) == 0
    return out


# ------------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------------

def _check_png(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    assert path.is_file(), path
    assert 5_000 < path.stat().st_size < 600_000, (path, path.stat().st_size)
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] >= 250 and image.shape[1] >= 400, (path, image.shape)
    assert float(image[..., :3].std()) > 0.05, f"{path} looks blank"
    return image


def stage_steps(arm: str, size: dict) -> set[int]:
    """The steps an arm decides at: the default objective's early schedule, or the preset's stages."""
    if not arm.startswith("tikmix"):
        return set()
    fractions = size["stage_fractions"] if arm.endswith("_paper") else EARLY
    return {s for s in (round(f * size["max_steps"]) for f in fractions) if 0 < s < size["max_steps"]}


def _check_demo_output(out: Path, arms: list[str], seeds: list[int]) -> dict:
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [(r["seed"], r["arm"]) for r in runs] == [(s, a) for s in seeds for a in arms]
    # equal training tokens for every arm; probe tokens counted apart, only for TiKMiX arms
    tokens = {r["training_tokens"] for r in runs}
    size = results["size"]
    assert tokens == {size["max_steps"] * size["batch_size"] * size["block_size"]}
    for r in runs:
        assert (r["probe_tokens"] > 0) == r["arm"].startswith("tikmix"), r["arm"]
        assert (r["lookahead_forward_tokens"] > 0) == r["arm"].startswith("tikmix_m")
        assert r["stages"] == len(stage_steps(r["arm"], size))
        final = r["final"]
        assert set(final["losses"]) == set(results["tasks"])
        assert all(np.isfinite(v) and 0 < v < 20 for v in final["losses"].values())
        assert 0.0 <= final["accuracy"] <= 1.0
        assert abs(sum(r["final_weights"].values()) - 1) < 1e-9
        assert r["curve"][0]["step"] == 0 and r["curve"][-1]["step"] == size["max_steps"]
        assert 0 <= r["tikmix_share"] < 1
        # every arm of a seed starts from the same model: the step-0 evaluation is identical
        first = next(q for q in runs if q["seed"] == r["seed"])
        assert r["curve"][0]["losses"] == first["curve"][0]["losses"]

    report = (out / "report.md").read_text()
    assert "# TiKMiX demo report" in report
    for r in runs:
        row = next(line for line in report.splitlines() if line.startswith(f"| {r['seed']} | {r['label']} |"))
        assert f"{r['final']['average']:.3f}" in row
        numbers = re.findall(r"\d+\.\d{3}", row)
        assert len(numbers) >= len(results["tasks"]) + 2, row
    assert "Mean over seeds" in report and "TiKMiX share" in report
    for task in results["tasks"]:
        assert task in report

    pngs = sorted((out / "plots").glob("*.png"))
    assert [str(p.relative_to(out)) for p in pngs] == sorted(results["plots"])
    expected = {f"validation_seed{s}.png" for s in seeds}
    for r in runs:
        s, a = r["seed"], r["arm"]
        if a.startswith("tikmix"):
            expected.add(f"seed{s}_{a}_weights.png")
            expected |= {f"seed{s}_{a}_influence_stage{k + 1}.png" for k in range(r["stages"])}
            if not a.endswith("_paper") and r["stages"] >= 2:  # predicted against realised gains
                expected.add(f"seed{s}_{a}_gains.png")
    assert {p.name for p in pngs} == expected
    for p in pngs:
        _check_png(p)
    return results


def test_demo_tiny_local(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--size", "tiny", "--output-dir", str(out), "--no-progress"]) == 0
    results = _check_demo_output(out, list(DEFAULT_ARMS), [0])
    assert results["corpus"] == "local" and len(results["domains"]) >= 9
    assert "val:code/asyncio" in results["tasks"]
    assert results["choice_task"] in ("choice:bible/kjv", "choice:python/docstrings")


def test_demo_synthetic_through_the_module_entry_point(tmp_path):
    """``python -m tikmix_hf.cli demo``, as ``make demo`` runs it, on the synthetic corpus with two seeds (the tiny
    preset: the presets share every code path, and ``--quick`` is the same run with larger numbers)."""
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "tikmix_hf.cli", "demo", "--size", "tiny", "--corpus", "synthetic", "--output-dir",
         str(out), "--seeds", "0", "1", "--arms", "static", "uniform", "tikmix_m"],  # M runs D's solve as its anchor
        capture_output=True, text=True, env=_env(), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Mean over seeds" in proc.stdout and "TiKMiX-M" in proc.stdout and "static (uniform)" in proc.stdout
    assert "TiKMiX-M" in proc.stderr  # the progress bars
    results = _check_demo_output(out, ["static", "uniform", "tikmix_m"], [0, 1])
    assert results["size"]["name"] == "tiny"
    assert results["roles"]["noise"] == "noise" and results["oracle_weights"]["helpful_b"] == 0.5


# ------------------------------------------------------------------------------------------------
# train, plot, influence
# ------------------------------------------------------------------------------------------------

def test_train_single_process(trained_run):
    from tikmix_hf.history import load_history

    history = load_history(trained_run / "tikmix" / "history.json")
    assert history["domains"] == ["code", "prose"] and history["tasks"] == ["val_code", "val_prose"]
    assert [s["step"] for s in history["stages"]] == [4, 8]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.json"):
        assert (trained_run / name).is_file(), name
    state = json.loads((trained_run / "trainer_state.json").read_text())
    assert state["global_step"] == 12
    assert any("eval_val_code_loss" in e for e in state["log_history"])


def test_train_from_yaml_mapping_and_saved_model(text_data, trained_run, tmp_path):
    """A YAML mapping (a folder, a file, a saved `datasets` folder), a saved model and its tokenizer, and
    a static baseline."""
    import datasets

    rows = [json.loads(line) for line in (text_data / "prose.jsonl").read_text().splitlines()]
    datasets.Dataset.from_list([{"body": r["text"]} for r in rows]).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "domains.yaml").write_text(
        f"code: {{path: {text_data / 'code'}}}\nprose: {text_data / 'prose.jsonl'}\n"
        "saved: {dataset: saved, column: body}\n"  # relative to the mapping file
    )
    out = tmp_path / "out"
    argv = ["train", "--output_dir", str(out), "--domains", str(tmp_path / "domains.yaml"),
            "--model_name_or_path", str(trained_run), "--block_size", "32", "--max_steps", "3",
            "--per_device_train_batch_size", "2", "--use_cpu", "--report_to", "none", "--save_strategy", "no",
            "--disable_tqdm", "true", "--static_mixture",
            "--mixture_weights", '{"code": 0.5, "prose": 0.3, "saved": 0.2}']
    assert main(argv) == 0
    assert (out / "model.safetensors").is_file() and not (out / "tikmix").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_train_accelerate_launch_two_processes(text_data, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` starts two CPU ranks through torch's elastic launcher,
    the one `torchrun` is (one launch covers both ways in)."""
    from helpers.launch import free_port

    out = tmp_path / "acc"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "tikmix_hf.cli", *_train_argv(text_data, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from tikmix_hf.history import load_history

    history = load_history(out / "tikmix" / "history.json")
    assert [s["step"] for s in history["stages"]] == [4, 8]
    # two ranks of 4 sequences: 8 samples per step from the shared stream
    assert all(s["samples_consumed"] == s["step"] * 8 for s in history["stages"])
    assert all(s["influence"]["world_size"] == 2 for s in history["stages"])
    assert "world size 2" in proc.stdout
    assert (out / "model.safetensors").is_file()
    assert proc.stdout.count("tikmix train: final mixture") == 1  # printed by rank 0 only


def test_plot_saved_run(trained_run, tmp_path, capsys):
    out = tmp_path / "pictures"
    assert main(["plot", str(trained_run), "--output-dir", str(out)]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["gains.png", "influence_stage1.png", "influence_stage2.png", "validation.png", "weights.png"]
    for p in out.glob("*.png"):
        _check_png(p)
    md = (out / "history.md").read_text()
    assert "| 1 | 4 |" in md and "## Influence at stage 2" in md
    assert str(out / "weights.png") in capsys.readouterr().out
    # the history file itself works too, and the pictures go next to it by default
    assert main(["plot", str(trained_run / "tikmix" / "history.json")]) == 0
    assert (trained_run / "tikmix" / "plots" / "weights.png").is_file()


def test_influence_saved_run(trained_run, text_data, tmp_path, capsys):
    out = tmp_path / "influence.json"
    code = main(["influence", "--model", str(trained_run), "--domains", f"code={text_data / 'code'}",
                 f"prose={text_data / 'prose.jsonl'}", "--validation", f"val_code={text_data / 'val_code.txt'}",
                 "--probe-sequences", "4", "--validation-sequences", "4", "--output", str(out), "--no-progress"])
    assert code == 0
    doc = json.loads(out.read_text())
    S = np.array(doc["influence"]["scores"])
    assert S.shape == (1, 2) and np.all(np.isfinite(S))
    assert doc["influence"]["domain_names"] == ["code", "prose"]
    assert abs(sum(doc["recommended_weights"].values()) - 1) < 1e-9
    assert doc["block_size"] == 32  # the saved tiny model's max_position_embeddings
    printed = capsys.readouterr().out
    assert "| code |" in printed and "TiKMiX-D" in printed and str(out) in printed


# ------------------------------------------------------------------------------------------------
# Errors: the argument, the value and the fix; exit status 2; no traceback
# ------------------------------------------------------------------------------------------------

def _error(capsys, argv) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, (argv, captured.err)
    assert "Traceback" not in captured.err
    return captured.err


def _base(data: Path, out: Path) -> list[str]:
    return ["train", "--output_dir", str(out), "--max_steps", "2", "--use_cpu", "--report_to", "none"]


@pytest.fixture
def bad_files(tmp_path) -> Path:
    (tmp_path / "broken.yaml").write_text("code: [unclosed\n  web: x\n")
    (tmp_path / "list.yaml").write_text("- code\n- web\n")
    (tmp_path / "number.yaml").write_text("code: 3\n")
    (tmp_path / "keys.yaml").write_text("code: {dataset: x, shards: 3}\n")
    (tmp_path / "rows.jsonl").write_text('{"content": "hello"}\n')
    (tmp_path / "badline.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (tmp_path / "ok.txt").write_text("some text " * 50)
    (tmp_path / "history.json").write_text('{"format": "something else"}')
    (tmp_path / "truncated.json").write_text('{"format": "tikmix_hf.history/1", "stages": [')
    (tmp_path / "empty").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--domain", "code=/no/such/dir"], ["--domain code=/no/such/dir", "no such file or folder", "NAME=PATH"]),
        (["--domain", "justaname"], ["--domain justaname", "not NAME=PATH"]),
        (["--domain", "=ok.txt"], ["name before '=' is empty"]),
        (["--domains", "broken.yaml"], ["broken.yaml", "not valid YAML at line"]),
        (["--domains", "list.yaml"], ["list.yaml", "expected a mapping", "got a list"]),
        (["--domains", "number.yaml"], ["number.yaml: code", "expected a path or a mapping", "got 3"]),
        (["--domains", "keys.yaml"], ["keys.yaml: code", "unknown keys ['shards']", "dataset:"]),
        (["--domains", '{"code": "ok.txt", '], ["not valid JSON"]),
        (["--domain", "a=ok.txt", "--domain", "a=ok.txt"], ["'a' is already given"]),
        (["--domain", "a=rows.jsonl", "--validation", "v=ok.txt"], ["no text column 'text'", "['content']",
                                                                     "--text_column"]),
        (["--domain", "a=badline.jsonl", "--validation", "v=ok.txt"], ["badline.jsonl line 2 is not valid JSON"]),
        (["--domain", "a=empty", "--validation", "v=ok.txt"], ["--domain a=empty", "no text found"]),
        (["--domain", "a=ok.txt"], ["no validation tasks", "--validation NAME=PATH", "--static_mixture"]),
        ([], ["no training domains", "--domain NAME=PATH"]),
        (["--domain", "a=ok.txt", "--validation", "v=ok.txt", "--model_name_or_path", "/no/model"],
         ["--model_name_or_path /no/model", "no such folder"]),
        (["--domain", "a=ok.txt", "--validation", "v=ok.txt", "--model_config", "nope.json"],
         ["--model_config nope.json", "neither a preset"]),
        (["--domain", "a=ok.txt", "--validation", "v=ok.txt", "--mixture_weights", "heavy"],
         ["--mixture_weights 'heavy'", "natural, uniform or a JSON mapping"]),
        (["--domain", "a=ok.txt", "--validation", "v=ok.txt", "--tikmix_stage_steps", "-3"],
         ["tikmix_stage_steps=-3", "positive integer"]),
        (["--domain", "a=ok.txt", "--validation", "v=ok.txt", "--tikmix_solver", "magic"],
         ["--tikmix_solver", "invalid choice: 'magic'"]),
    ],
)
def test_train_errors(capsys, bad_files, monkeypatch, extra, expected):
    monkeypatch.chdir(bad_files)
    err = _error(capsys, _base(bad_files, bad_files / "out") + extra)
    for text in expected:
        assert text in err, (text, err)


def test_train_needs_max_steps(capsys, bad_files, monkeypatch):
    monkeypatch.chdir(bad_files)
    err = _error(capsys, ["train", "--output_dir", "out", "--use_cpu", "--domain", "a=ok.txt", "--validation",
                          "v=ok.txt"])
    assert "--max_steps" in err and "endless" in err


def test_train_block_too_long_for_text(capsys, bad_files, monkeypatch):
    monkeypatch.chdir(bad_files)
    err = _error(capsys, _base(bad_files, bad_files / "out") + [
        "--domain", "a=ok.txt", "--validation", "v=ok.txt", "--block_size", "4096", "--vocab_size", "300",
        "--model_config", "tiny"])
    assert "--domain a=ok.txt" in err and "shorter than one block of 4096 tokens" in err and "--block_size" in err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["plot", "/no/such/history.json"], ["HISTORY /no/such/history.json", "no such file",
                                              "<output_dir>/tikmix/history.json"]),
        (["plot", "{d}/history.json"], ["not a TiKMiX history", "tikmix_hf.history/1"]),
        (["plot", "{d}/truncated.json"], ["not valid JSON", "truncated"]),
        (["plot", "{d}/empty"], ["a folder without tikmix/history.json"]),
        (["influence", "--model", "/no/model", "--domains", "a={d}/ok.txt", "--validation", "v={d}/ok.txt"],
         ["--model /no/model", "no such folder"]),
        (["influence", "--model", "{d}", "--domains", "a=/no/file", "--validation", "v={d}/ok.txt"],
         ["--domains a=/no/file", "no such file or folder"]),
        (["influence", "--model", "{d}", "--domains", "a={d}/ok.txt"], ["--validation: give the validation sets"]),
        (["influence", "--model", "{d}", "--domains", "a={d}/ok.txt", "--validation", "v={d}/ok.txt",
          "--prior", "most"], ["--prior 'most'", "natural, uniform or a JSON mapping"]),
        (["influence", "--model", "{d}", "--domains", "a={d}/ok.txt", "--validation", "v={d}/ok.txt"],
         ["--model {d}", "no causal language model could be loaded", "save_pretrained"]),
        (["demo", "--corpus", "web"], ["--corpus", "invalid choice: 'web'"]),
        (["demo", "--arms", "static", "doremi"], ["--arms static doremi", "unknown arm(s) ['doremi']", "tikmix_d"]),
        (["demo", "--seeds", "0", "0"], ["--seeds 0 0", "distinct"]),
        (["demo", "--output-dir", "{d}/ok.txt"], ["--output-dir {d}/ok.txt", "not a folder"]),
        (["frobnicate"], ["invalid choice: 'frobnicate'"]),
    ],
)
def test_command_errors(capsys, bad_files, argv, expected):
    argv = [a.replace("{d}", str(bad_files)) for a in argv]
    err = _error(capsys, argv)
    for text in expected:
        assert text.replace("{d}", str(bad_files)) in err, (text, err)


def test_one_reader_for_the_files_people_write(tmp_path, monkeypatch):
    """Domain mappings, model configs, histories and schedules are read by one reader, whose errors name
    the file as the caller does and say where the mistake is."""
    from tikmix_hf._io import FileReadError, read_structured

    (tmp_path / "ok.yml").write_text("code: data/code\n")
    (tmp_path / "ok.json").write_text('{"code": "data/code"}')
    assert read_structured(tmp_path / "ok.yml") == read_structured(tmp_path / "ok.json") == {"code": "data/code"}
    (tmp_path / "bad.yaml").write_text("code: [unclosed\n  web: x\n")
    (tmp_path / "bad.txt").write_text("code: data/code\n")
    cases = [("bad.yaml", "--domains bad.yaml: not valid YAML at line 2, column"),
             ("bad.txt", "not valid JSON (Expecting value: line 1 column 1 (char 0)); a YAML file must be named"),
             ("absent.json", "--domains absent.json: no such file")]
    for name, message in cases:
        with pytest.raises(FileReadError, match=re.escape(message)):
            read_structured(tmp_path / name, f"--domains {name}")
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if pyyaml were not installed
    with pytest.raises(ImportError, match="ok.yml: YAML needs pyyaml; `pip install pyyaml`"):
        read_structured(tmp_path / "ok.yml")


def test_console_script_usage_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tikmix_hf.cli", "plot", str(tmp_path / "nope.json")],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("tikmix plot: error: HISTORY") and "Traceback" not in proc.stderr


def test_plots_and_report_from_a_history_document(tmp_path):
    """The picture and table functions on a hand-written history, in a fresh interpreter: no pyplot import."""
    history = {
        "format": "tikmix_hf.history/1", "domains": ["a", "b", "c"], "tasks": ["t1", "t2"], "config": {},
        "initial_weights": {"a": 0.5, "b": 0.3, "c": 0.2},
        "stages": [{
            "stage": 1, "step": 50, "tokens_seen": 6400, "status": "converged", "solver": "direct", "entropy": 1.0,
            "weights_before": {"a": 0.5, "b": 0.3, "c": 0.2}, "weights_after": {"a": 0.2, "b": 0.6, "c": 0.2},
            "seconds": {"influence": 0.5, "solve": 0.01, "total": 0.51},
            "influence": {"scores": [[1.0, 3.0, -0.5], [0.2, 0.1, -2.0]], "task_names": ["t1", "t2"],
                          "domain_names": ["a", "b", "c"], "stderr": [[0.1, None, 0.9], [0.3, 0.4, None]]},
        }],
    }
    (tmp_path / "h.json").write_text(json.dumps(history))
    script = f"""
import json, sys
from tikmix_hf.plots import plot_history, weight_segments
from tikmix_hf.report import history_report
h = json.load(open({str(tmp_path / 'h.json')!r}))
steps, W = weight_segments(h)
assert steps.tolist() == [0, 50, 100] and W.shape == (3, 3)
paths = plot_history(h, {str(tmp_path / 'png')!r})
assert [p.name for p in paths] == ["weights.png", "influence_stage1.png"]
md = history_report(h)
assert "| a | 0.500 | 0.200 |" in md and "S[t1]" in md and "| 1 | 50 | 6,400 | converged |" in md
assert "matplotlib.pyplot" not in sys.modules
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("weights.png", "influence_stage1.png"):
        _check_png(tmp_path / "png" / name)


def test_train_defaults_suit_a_new_model_and_leave_a_saved_one_alone():
    from tikmix_hf.cli.train import _inject_new_model_defaults, _train_parser

    def parsed(*argv):
        argv = _inject_new_model_defaults(["--output_dir", "run", "--max_steps", "100", *argv])
        return _train_parser().parse_args_into_dataclasses(args=argv)[2]

    new = parsed()
    assert (new.learning_rate, str(new.lr_scheduler_type.value), new.warmup_steps) == (1e-3, "cosine", 0.05)
    assert parsed("--learning_rate", "3e-4").learning_rate == 3e-4  # a flag given wins
    assert parsed("--model_name_or_path", "saved").learning_rate == 5e-5  # fine-tuning: the Trainer's defaults
