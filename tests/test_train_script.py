"""The reference-model training script runs end to end on the CPU (its smoke mode)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT / "calibration_data"


@pytest.mark.slow
def test_training_smoke_run_writes_loadable_models(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(CALIBRATION / "wikipedia" / "calibration.jsonl.gz", data / "wiki_part00.jsonl.gz")
    out = tmp_path / "models"
    cmd = [sys.executable, str(ROOT / "scripts" / "train_reference_models.py"), "--smoke",
           "--data", str(data), "--wikitext", str(CALIBRATION / "wikitext2" / "wiki.test.raw"),
           "--out", str(out), "--max-steps", "150"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    metrics = json.loads((out / "train_metrics.json").read_text())
    for name in ("target", "draft"):
        model = AutoModelForCausalLM.from_pretrained(str(out / name))
        assert sum(p.numel() for p in model.parameters()) == metrics[name]["parameters"]
        assert metrics[name]["steps"] > 0
        # 150 small steps already beat guessing uniformly over the vocabulary
        assert metrics[name]["wikitext2_ppl"] < metrics["vocab"] / 2
