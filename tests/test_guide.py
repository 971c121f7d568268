"""docs/guide.md is what benchmarks/render_guide.py renders from the committed result files, and
a result file that is missing renders as "not measured yet", never as a number."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _renderer():
    spec = importlib.util.spec_from_file_location("render_guide", REPO / "benchmarks" / "render_guide.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_guide_is_current():
    r = _renderer()
    assert (REPO / "docs" / "guide.md").read_text(encoding="utf-8") == r.render(), \
        "docs/guide.md is stale: run python3 benchmarks/render_guide.py"


def test_numbers_come_from_the_files(tmp_path, monkeypatch):
    r = _renderer()
    monkeypatch.setattr(r, "RESULTS", tmp_path)  # no result files at all
    empty = r.render()
    assert empty.count("not measured yet") >= 5 and "GiB" not in empty
    # one probe file appears -> its numbers appear, read from the file
    probes = {"meta": {"device": "GPU-X", "date": "2030-01-01T00:00:00", "weights_bytes": 2**30},
              "forward": [{"mode": "no_grad", "batch": 8, "seq": 512, "peak_above_weights_bytes": 3 * 2**30,
                           "held_after_forward_bytes": 2**30, "logits_bytes": 2**30},
                          {"mode": "grad", "batch": 8, "seq": 512, "peak_above_weights_bytes": 9 * 2**30,
                           "held_after_forward_bytes": 8 * 2**30, "logits_bytes": 2**30}],
              "kv_cache": []}
    (tmp_path / "guide-h200" / "probes").mkdir(parents=True)
    (tmp_path / "guide-h200" / "probes" / "results.json").write_text(json.dumps(probes))
    text = r.render()
    assert "9.00 GiB" in text and "8.0× the memory alive" in text and "GPU-X, 2030-01-01" in text
