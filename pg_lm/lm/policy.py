"""The language-model policy: a causal LM, an optional value head, optional LoRA.

Loss-side forward passes compute the vocabulary projection only at completion
positions (``logits_to_keep``): logits over the prompt would be wasted work.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor, nn

from .logprobs import token_logprobs_entropy


class Policy(nn.Module):
    """A causal LM (π_θ) with an optional scalar value head sharing its trunk.

    The value head is a linear layer on the last hidden state (Ziegler et al. 2019);
    ``values[:, t]`` estimates the return from the state *before* completion token t.
    """

    def __init__(self, lm: nn.Module, value_head: bool = False):
        super().__init__()
        self.lm = lm
        self.value_head = None
        if value_head:
            hidden = lm.config.get_text_config().hidden_size
            self.value_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(
        self,
        prompt_ids: Tensor,  # (B, P) left-padded; rows of a group are identical
        prompt_mask: Tensor,  # (B, P)
        completion_ids: Tensor,  # (B, T) right-padded
        completion_mask: Tensor,  # (B, T)
        group_size: int = 1,  # G: rows [iG, (i+1)G) share a prompt; G > 1 encodes it once
        temperature: float = 1.0,
        with_entropy: bool = False,
        entropy_grad: bool = True,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Log-probs of the completion tokens, and values / entropies there. Each (B, T), fp32.
        ``entropy_grad=False``: the entropies carry no gradient (a diagnostic).

        With ``group_size`` G > 1 each prompt is run once and its KV cache (with its
        gradient) is shared by its G completions: the same numbers as G = 1 for less work.
        """
        logits, hidden = self.completion_logits(prompt_ids, prompt_mask, completion_ids, completion_mask, group_size)
        logp, entropy = token_logprobs_entropy(logits, completion_ids, temperature, with_entropy)  # (B, T), fp32
        values = None
        if hidden is not None:
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()  # (B, T)
        if with_entropy and not entropy_grad:  # a diagnostic unless it is in the loss
            entropy = entropy.detach()
        return logp, values, entropy

    def completion_logits(self, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                          completion_mask: Tensor, group_size: int = 1) -> tuple[Tensor, Tensor | None]:
        """(the logits predicting each completion token (B, T, V), the last hidden state there (B, T, H)
        when there is a value head, else None): :meth:`forward`'s first half, for a caller that needs
        the whole distributions (TRPO's KL)."""
        T = completion_ids.shape[1]
        want_h = self.value_head is not None
        if group_size == 1 or prompt_ids.shape[1] < 2:  # (a one-token prompt leaves nothing to cache)
            ids = torch.cat([prompt_ids, completion_ids], 1)  # (B, P + T)
            am = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], 1)
            out = self.lm(input_ids=ids, attention_mask=am, position_ids=positions(am), logits_to_keep=T + 1,
                          output_hidden_states=want_h, use_cache=False)
            logits = out.logits[:, -T - 1 : -1]  # (B, T, V): position p predicts token p + 1
            hidden = out.hidden_states[-1][:, -T - 1 : -1] if want_h else None  # (B, T, H)
            return logits, hidden
        return self._shared_prompt_forward(prompt_ids, prompt_mask, completion_ids, completion_mask, group_size, want_h)

    def _shared_prompt_forward(self, prompt_ids, prompt_mask, completion_ids, completion_mask, G, want_h):
        """Prompt once per group (N = B / G rows), KV cache repeated G times, then completions.

        The cached part is the prompt *without its last token*; the second call runs that
        token and the completions, so all T log-probs come from one vocabulary projection
        (a separate projection for the prompt's last position cost a (V, H) weight gradient
        of its own, then an add of two (V, H) tensors, in every backward).
        """
        B, T = completion_ids.shape
        p_ids, p_mask = prompt_ids[::G, :-1], prompt_mask[::G, :-1]  # (N, P - 1); left padding: the last column is real
        ids = torch.cat([prompt_ids[:, -1:], completion_ids[:, :-1]], 1)  # (B, T): position t predicts token t
        # one embedding lookup for both calls: its backward zero-fills a (V, H) gradient, once instead of twice
        emb = self.lm.get_input_embeddings()(torch.cat([p_ids.reshape(-1), ids.reshape(-1)]))  # (N (P - 1) + B T, H)
        p_emb, c_emb = emb[: p_ids.numel()].view(*p_ids.shape, -1), emb[p_ids.numel() :].view(B, T, -1)
        # logits_to_keep=1: the prompt's own logits are not used (no gradient flows through them), keep them tiny
        kw, cache = kv_cache(self.lm(inputs_embeds=p_emb, attention_mask=p_mask, position_ids=positions(p_mask),
                                     use_cache=True, logits_to_keep=1))
        cache.batch_repeat_interleave(G)  # differentiable: gradients flow back to the prompt
        am = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], 1)[:, :-1]  # (B, P + T - 1)
        out = self.lm(inputs_embeds=c_emb, attention_mask=am, position_ids=positions(am)[:, -T:], **{kw: cache},
                      use_cache=True, output_hidden_states=want_h)
        return out.logits, out.hidden_states[-1] if want_h else None  # (B, T, V), (B, T, H)


def kv_cache(out) -> tuple[str, object]:
    """(the forward's keyword for a KV cache, the cache) from a forward's output. transformers 5.x
    names both ``cache`` (``past_key_values`` is deprecated there, with a warning on every call);
    4.x knows only ``past_key_values``."""
    name = "cache" if "cache" in getattr(type(out), "__dataclass_fields__", {}) else "past_key_values"
    return name, getattr(out, name)


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids that skip left padding, as ``generate`` computes them. (B, L) -> (B, L)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@contextlib.contextmanager
def peft_wrapping():
    """Silence, around wrapping a model with peft, the one FutureWarning peft < 0.22 triggers there:
    ``PeftModel.__init__`` reads ``model.is_gradient_checkpointing``, a property transformers 5.x
    deprecated in favour of ``is_activation_checkpointing`` (peft 0.22 reads the new name). The
    warning names a property pg_lm never uses, so a user can do nothing about it. Only that message,
    raised from transformers' ``modeling_utils``, and only inside this block, is ignored."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                                module=r"transformers\.modeling_utils")
        yield


def load_tokenizer(path: str, model_name: str):
    """The tokenizer at ``path`` (``--model model_name`` resolved), padding on the left (generation
    appends on the right), with a pad token (masks come from lengths, so pad == EOS is harmless)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # not a folder, not in the Hugging Face cache, not downloadable
        raise FileNotFoundError(
            f"--model {model_name!r} is neither a local folder with a model, a .gguf file, nor a model in the "
            f"local Hugging Face cache or on the Hub ({type(e).__name__}); the embedded default is "
            f"'smollm2-135m-instruct'") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_policy(
    model_name: str,
    value_head: bool = False,
    lora_r: int = 0,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    lora_target_modules: list[str] | str = "all-linear",
    dtype: torch.dtype = torch.float32,
    resume_dir: str | None = None,
):
    """Load (policy, tokenizer). ``model_name``: the embedded default, a Hub id or a local path.

    The tokenizer pads on the left (generation appends on the right) and gets a pad
    token if it has none (masks come from lengths, so pad == EOS is harmless).
    ``resume_dir``: a checkpoint written by the trainer (full model, or LoRA adapter
    over ``model_name``, plus ``value_head.pt``) to continue from.
    """
    from transformers import AutoModelForCausalLM

    from .models import resolve_model

    path = resolve_model(model_name)
    if resume_dir is not None and lora_r == 0:
        path = resume_dir  # a full checkpoint replaces the base weights
    tok = load_tokenizer(path, model_name)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    lm.generation_config.pad_token_id = tok.pad_token_id
    if lora_r > 0 and resume_dir is not None:
        from peft import PeftModel

        with peft_wrapping():
            lm = PeftModel.from_pretrained(lm, resume_dir, is_trainable=True)
    elif lora_r > 0:
        from peft import LoraConfig, get_peft_model

        target = lora_target_modules if isinstance(lora_target_modules, str) or len(lora_target_modules) != 1 else lora_target_modules[0]
        with peft_wrapping():
            lm = get_peft_model(
                lm, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                               target_modules=target, task_type="CAUSAL_LM")
            )
    policy = Policy(lm, value_head=value_head)
    if value_head and resume_dir is not None:
        policy.value_head.load_state_dict(torch.load(f"{resume_dir}/value_head.pt", weights_only=True))
    return policy, tok
