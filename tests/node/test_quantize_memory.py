"""A span with 8- or 4-bit weights takes a fraction of the memory of the same span in float32.

Each measurement is a fresh process (``scripts/bench_quant.py probe``): the peak resident memory
over loading all 32 blocks of a 128 MB float32 checkpoint and two decoding steps, above what the
process held before (its imports and torchao's kernels loaded). Measured here: float32 129 MiB,
int8 40 to 51 MiB (0.31x to 0.39x), nf4 34 to 37 MiB (0.26x to 0.28x).
"""
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from potluck.node.local_swarm import make_tiny_checkpoint

PROBE = Path(__file__).resolve().parents[2] / "scripts" / "bench_quant.py"


def span_peak_mib(path: Path, quant: str) -> float:
    out = subprocess.run([sys.executable, str(PROBE), "probe", str(path), quant, "2", "memory"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["span_peak_mib"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("memory") / "llama-32", hidden=256, layers=32,
                                intermediate=1024)


def test_packed_spans_take_a_fraction_of_the_memory(checkpoint):
    with ThreadPoolExecutor() as pool:  # side by side: each process's own peak is measured
        exact, int8, nf4 = pool.map(lambda quant: span_peak_mib(checkpoint, quant), ["none", "int8", "nf4"])
    assert exact > 120  # every weight was read: 32 blocks of 3.75 MiB
    assert int8 <= 0.6 * exact, (int8, exact)
    assert nf4 <= 0.35 * exact, (nf4, exact)
