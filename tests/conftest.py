# ---------------------------------------------------------------- LM backend fixtures (begin)
# Session-scoped tiny random models for tests/test_lm*.py; defined in tests/lm_fixtures.py.
from lm_fixtures import one_thread, tiny_gpt2_dir, tiny_lm_dir, tiny_rm_dir  # noqa: E402,F401
# ---------------------------------------------------------------- LM backend fixtures (end)
