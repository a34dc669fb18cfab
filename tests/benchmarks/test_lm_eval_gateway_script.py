"""benchmarks/lm_eval_gateway.py's task: each item's label names the text that follows its context (lm-eval itself
runs by hand)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from zeroc.config import BUNDLED_HELDOUT

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import lm_eval_gateway  # noqa: E402


def test_the_task_labels_the_true_continuation(tmp_path):
    lm_eval_gateway.write_task(tmp_path, docs=5)
    text = " ".join(BUNDLED_HELDOUT.read_text().split())
    docs = [json.loads(line) for line in (tmp_path / "data.jsonl").read_text().splitlines()]
    assert len(docs) == 5 and all(len(d["choices"]) == 4 for d in docs)
    for d in docs:
        assert d["context"] + d["choices"][d["label"]] in text
    task = yaml.safe_load((tmp_path / "zeroc_tiny_mc.yaml").read_text())
    assert task["output_type"] == "multiple_choice" and task["doc_to_choice"] == "{{choices}}"
    assert task["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "data.jsonl")
