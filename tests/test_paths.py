"""Committed files carry no machine paths: producers write presets by name and project files relative to it."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from harness.emit import EmittedConfig, write_config
from harness.load.workload import PRESET_DIR, load_workload
from harness.paths import PROJECT_ROOT, portable, portable_path
from harness.records import RunRecord, save_record

MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|root|tmp|home|Users|mnt|scratch)/")


def test_portable_path_and_strings(tmp_path: Path) -> None:
    assert portable_path(PRESET_DIR / "chat-mix.yaml", presets=PRESET_DIR) == "chat-mix"
    assert portable_path(PROJECT_ROOT / "models" / "tiny-llama") == "models/tiny-llama"
    assert portable_path(tmp_path / "mine.yaml") == "mine.yaml"  # outside the project: its name only
    assert portable_path("sweeps/l40s.yaml") == "sweeps/l40s.yaml"
    argv = [str(PROJECT_ROOT / ".venv/bin/python"), f"--model={PROJECT_ROOT}/models/x", "--port=8000"]
    assert portable({"argv": [argv]}) == {"argv": [[".venv/bin/python", "--model=models/x", "--port=8000"]]}


def test_workload_source_names_the_preset_or_the_project_file(tmp_path: Path) -> None:
    assert load_workload("chat-mix").to_dict()["source"] == "chat-mix"
    assert load_workload(PRESET_DIR / "tiny-cpu.yaml").to_dict()["source"] == "tiny-cpu"
    assert load_workload("chat-mix").source.endswith("chat-mix.yaml")  # loading still has the real file


def test_run_record_and_emitted_config_carry_no_project_root(tmp_path: Path) -> None:
    model = str(PROJECT_ROOT / "models" / "tiny-llama")
    record = RunRecord(run_id="r", created="2025-01-01T00:00:00Z", model=model, settings={},
                       workload=load_workload("tiny-cpu").to_dict(), arrival={}, slo=None,
                       argv=[[str(PROJECT_ROOT / ".venv/bin/python"), f"--model={model}"]])
    text = save_record(record, tmp_path / "r.json").read_text()
    assert str(PROJECT_ROOT) not in text
    doc = json.loads(text)
    assert doc["model"] == "models/tiny-llama" and doc["argv"] == [[".venv/bin/python", "--model=models/tiny-llama"]]
    assert doc["workload"]["source"] == "tiny-cpu"
    path = write_config(tmp_path / "c.yaml", EmittedConfig(model, {"max_num_seqs": 8},
                                                           provenance={"workload": load_workload("chat-mix").to_dict(),
                                                                       "model_dir": model}))
    prov = yaml.safe_load(path.read_text())["provenance"]
    assert prov["workload"]["source"] == "chat-mix" and prov["model_dir"] == "models/tiny-llama"


def test_committed_evidence_has_no_machine_paths() -> None:
    """configs/, results/, docs/: every committed text file reads the same on every clone."""
    files = subprocess.run(["git", "-C", str(PROJECT_ROOT), "ls-files", "configs", "results", "docs"],
                           capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in files:
        if name.endswith((".db", ".png", ".svg", ".pdf")):
            continue  # binary; the studies' SQLite files are not rewritten by hand
        text = (PROJECT_ROOT / name).read_text(errors="replace")
        hit = MACHINE_PATH.search(text)
        if hit:
            offenders.append(f"{name}: {text[max(0, hit.start() - 30):hit.end() + 30]!r}")
    assert not offenders, "\n".join(offenders[:10])
