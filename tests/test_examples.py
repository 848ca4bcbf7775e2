"""``examples/pretrain_clm.py`` at a tiny size: local files of three kinds, streamed, re-mixed by TiKMiX."""

from __future__ import annotations

import importlib.util
import json
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A folder of .txt code, a .jsonl of prose, a .parquet of prose, a validation .txt; a tokenizer and a config."""
    import pydoc_data.topics as topics

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tikmix_hf.testing import tiny_llama, train_tokenizer

    root = tmp_path_factory.mktemp("clm")
    (root / "code").mkdir()
    code = [path.read_text() for path in sorted((STDLIB / "json").glob("*.py"))]
    for k, text in enumerate(code):
        (root / "code" / f"{k}.txt").write_text(text)
    prose = [text for _, text in sorted(topics.topics.items())]
    (root / "prose.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in prose[:30]))
    pq.write_table(pa.table({"body": prose[30:60]}), root / "more.parquet")
    (root / "val.txt").write_text((STDLIB / "csv.py").read_text())
    tokenizer = train_tokenizer(code + prose[:60], vocab_size=300)
    tokenizer.save_pretrained(root / "tokenizer")
    tiny_llama(len(tokenizer), hidden_size=32, layers=1, heads=2, block_size=32).config.save_pretrained(root / "new")
    return root


def test_pretrain_clm_streams_local_files_and_remixes_them(files, tmp_path):
    from tikmix_hf.history import load_history

    example = load_example("pretrain_clm")
    out = tmp_path / "run"
    weights = example.main([
        "--output_dir", str(out), "--domain", f"code={files / 'code'}", f"prose={files / 'prose.jsonl'}",
        "--domain", f"more={files / 'more.parquet'}", "--validation", f"held_out_code={files / 'val.txt'}",
        "--text_column", "body", "--streaming", "--config_name", str(files / "new"),
        "--tokenizer_name", str(files / "tokenizer"), "--block_size", "32", "--max_steps", "12",
        "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--use_cpu", "--report_to", "none",
        "--save_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "50", "--tikmix_stage_steps", "4",
        "--tikmix_probe_sequences", "4", "--tikmix_validation_sequences", "4", "--tikmix_window_steps", "2",
        "--tikmix_show_progress", "false",
    ])
    history = load_history(out / "tikmix" / "history.json")
    assert history["domains"] == ["code", "prose", "more"] and history["tasks"] == ["held_out_code"]
    assert [s["step"] for s in history["stages"]] == [4, 8]
    assert all(s["influence"]["window"] is not None for s in history["stages"])  # measured in the training window
    assert weights == pytest.approx(history["stages"][-1]["weights_after"])
    assert (out / "model.safetensors").is_file()

