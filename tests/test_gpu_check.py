"""benchmarks/gpu_check.sh cannot run without a GPU: its bash parses, the benchmark scripts it
calls accept its flags, and its JSON-merging Python step runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_called_scripts_accept_its_flags() -> None:
    text = SCRIPT.read_text()
    for script in ("benchmarks/train_step.py", "benchmarks/generate.py"):
        flags = re.findall(r"(--[a-z_]+)", text.split(script, 1)[1].split("run ", 1)[0])
        usage = subprocess.run(
            [sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True
        )
        assert usage.returncode == 0, usage.stderr[-2000:]
        for flag in flags:
            assert flag in usage.stdout, (script, flag)


def test_merge_step_writes_one_json(tmp_path: Path) -> None:
    merge = SCRIPT.read_text().split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "memory_plan.json").write_text(json.dumps({"total_gb": 30.5}))
    (parts / "train_step.json").write_text("Traceback ...")
    (parts / "generate.json").write_text(json.dumps({"error": "exit status 124"}))
    out = tmp_path / "gpu_check.json"
    subprocess.run(
        [sys.executable, "-", str(parts), str(out), "sdpa"],
        input=merge,
        text=True,
        check=True,
        capture_output=True,
    )
    report = json.loads(out.read_text())
    assert report["memory_plan"] == {"total_gb": 30.5}
    assert report["train_step"]["error"] == "no JSON"
    assert report["generate"] == {"error": "exit status 124"}
    assert report["attn_implementation"] == "sdpa"
