import pytest

# ---------------------------------------------------------------- LM backend fixtures (begin)
# Session-scoped tiny random models for tests/test_lm*.py; defined in tests/lm_fixtures.py.
from lm_fixtures import one_thread, tiny_gpt2_dir, tiny_lm_dir, tiny_rm_dir  # noqa: E402,F401
# ---------------------------------------------------------------- LM backend fixtures (end)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``make test`` runs two workers with ``--dist loadgroup``) the tests that
    launch a 2-process run share one group, so one worker runs them one after another: two such
    launches at once would put four processes on two cores and time out the collectives' waits."""
    for item in items:
        if item.get_closest_marker("two_process"):
            item.add_marker(pytest.mark.xdist_group("two_process"))


def pytest_configure(config):
    """Each xdist worker computes on one intra-op thread: two workers then fill the two cores
    without OpenMP threads of one waiting on the other's."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_accelerator():
    """Accelerate keeps one process-wide state whose mixed precision cannot change once set, and
    ``--mixed-precision auto`` resolves to bf16 on some CPUs and to fp32 on others: every test
    starts with that state cleared, so that a test asking for fp32 never meets an earlier test's bf16."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
