"""Loading what a run trained, and ``pg-lm export``: a checkpoint as a standard Hugging Face folder.

A run's checkpoint (``RUN_DIR/checkpoint-last``) holds a full model, or under LoRA an adapter alone
(``adapter_config.json``) over the base named by the run's ``config.json``. :func:`load_trained`
loads either, the adapter merged into its base; :func:`export` writes the result with its tokenizer,
a folder that ``AutoModelForCausalLM.from_pretrained`` and ``pg-lm eval --model`` load.

    pg-lm export runs/lm/checkpoint-last exported/     # then: pg-lm eval --model exported/ ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def find_checkpoint(path: str, flag: str) -> Path:
    """``path``, or its ``checkpoint-last`` when it is a run folder; a ``ValueError`` when it holds no model."""
    p = Path(path).expanduser()
    if (p / "checkpoint-last").is_dir():
        p = p / "checkpoint-last"
    if not p.is_dir():
        raise ValueError(f"{flag} {path}: no such folder")
    if not (p / "adapter_config.json").exists() and not (p / "config.json").exists():
        raise ValueError(f"{flag} {path}: holds neither a LoRA adapter (adapter_config.json) nor a model (config.json)")
    return p


def run_config(folder: Path) -> dict:
    """The training run's ``config.json`` for a checkpoint ``folder`` (in it or its parent), or {}."""
    for d in (folder, folder.parent):
        f = d / "config.json"
        if f.exists():
            cfg = json.loads(f.read_text())
            if "max_new_tokens" in cfg and "estimator" in cfg:  # a run's, not a model's config.json
                return cfg
    return {}


def is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").exists()


def base_model(checkpoint: Path, model: str | None) -> str:
    """The base under an adapter: ``model`` if given, else the run's ``--model``, else the adapter's own record."""
    if model:
        return model
    base = run_config(checkpoint).get("model")
    if base is None:
        base = json.loads((checkpoint / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{checkpoint}: the adapter names no base model; pass --model")
    return base


def load_trained(model: str | None, adapter: Path | None, dtype=None):
    """(causal LM, tokenizer): ``model`` (a name, folder or checkpoint), with ``adapter`` (a LoRA
    adapter folder) merged into it when given. An adapter that does not fit the base is a ``ValueError``."""
    import torch
    from transformers import AutoModelForCausalLM

    from .models import resolve_model
    from .policy import load_tokenizer, peft_wrapping

    dtype = dtype or torch.float32
    name = base_model(adapter, model) if adapter is not None else model
    path = resolve_model(name)
    tok = load_tokenizer(str(adapter) if adapter is not None and (adapter / "tokenizer_config.json").exists() else path,
                         name)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if adapter is not None:
        from peft import PeftModel

        try:
            with peft_wrapping():
                lm = PeftModel.from_pretrained(lm, str(adapter)).merge_and_unload()
        except (RuntimeError, ValueError, KeyError) as e:  # size mismatch, target modules not found, ...
            lines = str(e).strip().splitlines() or [""]
            detail = next((ln.strip() for ln in lines if "size mismatch" in ln), lines[0].strip())[:200]
            if "Target modules" in detail:
                detail = "the modules it adapts are not in the base model"
            raise ValueError(f"--adapter {adapter} does not match the base model {name}: {detail}") from None
    lm.generation_config.pad_token_id = tok.pad_token_id
    return lm.eval(), tok


def export(checkpoint: str, out_dir: str, model: str | None = None) -> Path:
    """Write ``checkpoint`` (a LoRA adapter merged into its base, or a full model) with its tokenizer to ``out_dir``."""
    ckpt = find_checkpoint(checkpoint, "checkpoint")
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out_dir} exists and is not empty; choose a new folder")
    if is_adapter(ckpt):
        lm, tok = load_trained(model, ckpt)
    else:
        lm, tok = load_trained(str(ckpt), None)
    tok.padding_side = "right"  # a plain folder for other tools; pg_lm sets left padding itself when it loads one
    lm.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pg-lm export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="RUN_DIR/checkpoint-last (or the run folder itself)")
    p.add_argument("out_dir", help="a new folder for the merged model and its tokenizer")
    p.add_argument("--model", default=None, help="the base model under a LoRA adapter (default: the run's --model)")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out_dir, args.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
