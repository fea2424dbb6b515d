"""pg_lm: policy-gradient RL for language models, with a Gymnasium backend for sanity checks."""

__version__ = "0.1.0"
