import pytest

# ---------------------------------------------------------------- LM backend fixtures (begin)
# Session-scoped tiny random models for tests/test_lm*.py; defined in tests/lm_fixtures.py.
from lm_fixtures import one_thread, tiny_gpt2_dir, tiny_lm_dir, tiny_rm_dir  # noqa: E402,F401
# ---------------------------------------------------------------- LM backend fixtures (end)


@pytest.fixture(autouse=True)
def fresh_accelerator():
    """Accelerate keeps one process-wide state whose mixed precision cannot change once set, and
    ``--mixed-precision auto`` resolves to bf16 on some CPUs and to fp32 on others: every test
    starts with that state cleared, so that a test asking for fp32 never meets an earlier test's bf16."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
