"""Parity with mergekit's model_stock on small sharded Llama folders (benchmarks/mergekit_parity.py).

mergekit is not a dependency: the test runs when `mergekit-yaml` is on PATH or named by the
MERGEKIT_YAML environment variable (it may live in another virtual environment), else skips.
"""
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mergekit_parity  # noqa: E402

MERGEKIT_YAML = os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")


@pytest.mark.skipif(not MERGEKIT_YAML, reason="mergekit is not installed (set MERGEKIT_YAML)")
def test_same_merge_as_mergekit_where_its_cosine_is_positive(tmp_path):
    rows, theirs, ours = mergekit_parity.compare(MERGEKIT_YAML, tmp_path)
    assert theirs.keys() == ours.keys()
    inside = [(key, diff) for key, cos, diff in rows if 0 < cos <= 1]
    assert len(inside) >= 20 and all(diff < 1e-6 for _, diff in inside), inside
    # Below cos = 0 mergekit extrapolates past w0, Model Stock stops at w0: they must differ.
    outside = [diff for _, cos, diff in rows if cos <= 0]
    assert outside and all(diff > 1e-4 for diff in outside)
