"""REINFORCE++'s advantages are normalised over the GLOBAL batch (Hu 2025): 2 processes,
each holding half of a fixed batch (``dist_whiten_worker.py``, DDP over gloo), get the advantages
that one process gets with the whole batch."""

from __future__ import annotations

import pytest
import torch

import dist_whiten_worker as worker
from pg_lm.core import masked_whiten
from test_lm_distributed import CPU_DDP, ROOT

# one thread (lm_fixtures.one_thread); 2-process launches, one at a time under xdist (conftest.py)
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.two_process]


def test_global_whitening_over_two_processes_equals_one_process(tiny_lm_dir, tmp_path):
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    (tmp_path / "two").mkdir()
    cmd = [*CPU_DDP, str(ROOT / "tests" / "dist_whiten_worker.py"), tiny_lm_dir, str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    two = torch.load(tmp_path / "two" / "adv_2.pt")
    one = worker.main(tiny_lm_dir, str(tmp_path / "one"))
    assert set(one) == set(two) == set(worker.CASES)
    mask = (torch.arange(worker.T)[None] < torch.tensor(worker.LENGTHS)[:, None]).float()
    for case in one:
        torch.testing.assert_close(two[case], one[case], rtol=1e-5, atol=1e-6, msg=lambda m: f"{case}: {m}")
        whole = one[case][mask.bool()]
        assert abs(float(whole.mean())) < 1e-5 and abs(float(whole.std()) - 1.0) < 1e-4  # whitened over all 8 rows
        # each process whitening only its own half would give other advantages: the test can fail
        half = masked_whiten(one[case][:4], mask[:4])
        assert not torch.allclose(half, one[case][:4], atol=1e-3)
