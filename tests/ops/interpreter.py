"""Running a test file's triton tests on CPU under Triton's interpreter, in a subprocess.

TRITON_INTERPRET=1 must be set before triton is imported, so each kernel test module has one parent test
that reruns its triton tests in a fresh interpreter process with the variable set and no GPU visible."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def interpreter_usable() -> bool:
    """Triton before 3.8 turns kernel int arguments into 1-element arrays that numpy >= 2.5 will not index with."""
    import numpy
    import triton

    version = lambda v: tuple(int(p) for p in v.split("+")[0].split(".")[:2])  # noqa: E731
    return not (version(triton.__version__) < (3, 8) and version(numpy.__version__) >= (2, 5))


def rerun_in_interpreter(test_file: str, select: str, timeout: int = 900) -> None:
    """Run the tests of ``test_file`` matching ``-k select`` under TRITON_INTERPRET=1; fail on any failure or skip."""
    if not interpreter_usable():
        pytest.skip("this triton's interpreter does not run with this numpy (triton < 3.8 with numpy >= 2.5)")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--noconftest", test_file,
           "-k", select]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"interpreted triton tests failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
