"""bench/e2e.py --smoke: every contender of the GPU benchmark runs, on the CPU at tiny sizes."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_e2e_smoke_measures_every_contender(tmp_path):
    out = tmp_path / "e2e.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "e2e.py"), "--smoke", "--new-tokens", "3",
                    "--json", str(out), "--plot", str(tmp_path / "e2e.png")], check=True, timeout=900)
    rows = json.loads(out.read_text())["rows"]
    contenders = {row["contender"] for row in rows}
    assert contenders == {"stock-eager", "stock-compiled", "lm-infinite", "floor"}
    assert all("error" not in row and row["decode_ms"] > 0 for row in rows)
    assert (tmp_path / "e2e.png").stat().st_size > 0
