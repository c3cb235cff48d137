"""Run a benchmark shell script with a stub interpreter instead of training (tests of benchmarks/run_*.sh)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_with_stub(
    script: str, tmp_path: Path, stub_source: str, *stage: str, check: bool = True, **env: str
) -> subprocess.CompletedProcess:
    """``bash benchmarks/<script> <stage...>`` with ``PY`` = a stub running ``stub_source``.

    The stub logs its calls to ``tmp_path/calls.txt`` (``STUB_LOG``); results go to ``tmp_path/results``
    (``OUT``); ``env`` adds variables. With ``check``, a non-zero exit fails the test with the script's output.
    """
    stub = tmp_path / "python"
    stub.write_text(f"#!{sys.executable}\n{stub_source}")
    stub.chmod(0o755)
    env = {
        **os.environ,
        "PY": str(stub),
        "OUT": str(tmp_path / "results"),
        "STUB_LOG": str(tmp_path / "calls.txt"),
        "PYTHONPATH": str(ROOT),
        **env,
    }
    cmd = ["bash", str(ROOT / "benchmarks" / script), *stage]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
