"""Config <-> CLI flags, run outputs (metrics, samples, summary, plots)."""

from .config import arg, build_parser, parse_config, to_dict
from .output import RunWriter, trim_logs

__all__ = ["RunWriter", "arg", "build_parser", "parse_config", "to_dict", "trim_logs"]
