"""The README's first command: the demo runs, and proves what it says it shows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, _clean_env


def test_the_demo_passes_and_its_restart_makes_no_request(tmp_path: Path) -> None:
    demo = subprocess.run(
        [sys.executable, "scripts/demo.py"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # fetcher logs to stderr: as a reader of the terminal sees them
        text=True,
        env={k: v for k, v in _clean_env().items() if k != "PYTHONUNBUFFERED"} | {"DEMO_OUT": str(tmp_path)},
        cwd=ROOT,
        timeout=120,
    )
    assert demo.returncode == 0, demo.stdout
    assert f"Demo passed: results are in {tmp_path}" in demo.stdout
    restart = demo.stdout.split("== 3.")[1].split("== 4.")[0]
    assert "already present" in restart
    assert "requests the HTTP server received: 0" in restart
    assert sorted(p.name for p in (tmp_path / "models-http" / "sentiment-model").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
