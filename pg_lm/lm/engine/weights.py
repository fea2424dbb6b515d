"""The learner's weights as an inference engine loads them: a folder of safetensors under the
model's own parameter names, LoRA merged in, a tied output head left out (the engine ties it)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn


def _lora_deltas(model: nn.Module) -> dict[str, Tensor]:
    """{module name: the summed ΔW = B A · scale of its active LoRA adapters} (PEFT's own arithmetic)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            active = [a for a in mod.active_adapters if a in mod.lora_A]
            if active:
                out[name] = sum(mod.get_delta_weight(a) for a in active)
    return out


def is_tied(model: nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


@torch.no_grad()
def merged_weights(lm: nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    """{parameter name: tensor in ``dtype`` on the CPU} of the causal LM ``lm`` (a PEFT model: its base,
    with W + ΔW for each LoRA layer; the adapters' own tensors left out). The tied output head is left
    out, so the engine's head is tied to the new embedding rather than loaded as a separate copy."""
    from peft import PeftModel

    base = lm.get_base_model() if isinstance(lm, PeftModel) else lm
    deltas = _lora_deltas(base) if base is not lm else {}
    tied = is_tied(base)
    out = {}
    for name, t in base.state_dict().items():
        if "lora_" in name or (tied and name == "lm_head.weight"):
            continue
        module, _, leaf = name.rpartition(".base_layer.") if ".base_layer." in name else ("", "", name)
        if module:
            name = f"{module}.{leaf}"
            if leaf == "weight" and module in deltas:
                t = t.float() + deltas[module].float()
        out[name] = t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()  # host: the file's copy
    return out


def write_folder(lm: nn.Module, folder: Path, dtype: torch.dtype, tokenizer=None) -> Path:
    """Write ``lm``'s merged weights (and its config; the tokenizer when given) to a new ``folder``,
    atomically: a folder the engine reads is always whole."""
    from peft import PeftModel
    from safetensors.torch import save_file

    base = lm.get_base_model() if isinstance(lm, PeftModel) else lm
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(merged_weights(lm, dtype), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    base.config.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    os.replace(tmp, folder)
    return folder
