"""Tiny random language models for the LM-backend tests (no network, a few MB, built in < 1 s).

``make_tiny_lm(dir)`` saves a 2-layer ``LlamaForCausalLM`` plus a character-level
``PreTrainedTokenizerFast`` (one token per character, a chat template) to ``dir``, so
``LMConfig(model=dir)`` goes through the normal ``from_pretrained`` path.
``make_tiny_gpt2(dir)`` saves a tied-embedding GPT-2 (absolute positions) with the same
tokenizer; ``make_tiny_rm(dir)`` a ``LlamaForSequenceClassification`` (num_labels=1).

The fixtures ``tiny_lm_dir`` / ``tiny_gpt2_dir`` / ``tiny_rm_dir`` (session) and ``one_thread``
are re-exported by ``conftest.py``; the trainer helpers below are imported directly.
The distributed worker (``dist_grad_worker.py``) imports nothing from here: it receives
the saved folder's path.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]
# every printable ASCII character is one token; no merges, so decode(encode(x)) == x
CHARS = list(string.digits + string.ascii_letters + string.punctuation + " \n")
# "Q:<prompt>\nA:" for one user turn: short, and it never contains special tokens.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}Q:{{ m['content'] }}\n"
    "{% else %}A:{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)


def make_tokenizer(chat_template: bool = True):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char alone
    tk.decoder = decoders.Fuse()  # ... and fused back without spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                  unk_token=UNK, padding_side="left")
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def _llama_config(tok, hidden: int = 32, heads: int = 4, **kw):
    from transformers import LlamaConfig

    kw = {"tie_word_embeddings": False, **kw}
    return LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1), max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw,
    )


def make_tiny_lm(out_dir, seed: int = 0, chat_template: bool = True, engine: bool = False) -> Path:
    """Save a random 2-layer Llama + char tokenizer to ``out_dir``; returns the folder. ``engine``: the
    shape vLLM's CPU backend accepts (head size 32, not 8) with tied embeddings, like SmolLM2."""
    from transformers import GenerationConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tok = make_tokenizer(chat_template)
    torch.manual_seed(seed)
    shape = dict(hidden=64, heads=2, tie_word_embeddings=True) if engine else {}
    model = LlamaForCausalLM(_llama_config(tok, **shape))
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def make_tiny_gpt2(out_dir, seed: int = 0) -> Path:
    """Save a random 2-layer GPT-2 (learned ABSOLUTE positions, tied embeddings) + char tokenizer.

    Llama's rotary positions are relative, so wrong position ids under left padding go
    unnoticed there; GPT-2 makes every log-prob depend on them.
    """
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    out_dir = Path(out_dir)
    tok = make_tokenizer()
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256, n_inner=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # deterministic, like SmolLM2 (no dropout)
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     tie_word_embeddings=True)  # tied input/output embeddings, like SmolLM2 and GPT-2
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # make positions matter a lot: the default init (std 0.01) is faint
        model.transformer.wpe.weight.normal_(0.0, 1.0)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def make_tiny_rm(out_dir, seed: int = 1) -> Path:
    """Save a random 2-layer LlamaForSequenceClassification (one label) + char tokenizer."""
    from transformers import LlamaForSequenceClassification

    out_dir = Path(out_dir)
    tok = make_tokenizer(chat_template=False)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_llama_config(tok, num_labels=1))
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: tiny models on a shared 2-core machine are several
    times faster without OpenMP hand-offs (fused AdamW and backward especially)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> str:
    return str(make_tiny_lm(tmp_path_factory.mktemp("tiny_lm")))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> str:
    return str(make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2")))


@pytest.fixture(scope="session")
def tiny_rm_dir(tmp_path_factory) -> str:
    return str(make_tiny_rm(tmp_path_factory.mktemp("tiny_rm")))


# ---------------------------------------------------------------- trainer helpers

PROMPTS = ["ab", "cde", "f", "ghij", "kl", "mnopq", "r", "stu"]  # different lengths: real left padding


def prompt_dataset(prompts=PROMPTS, **columns):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": list(prompts), **{k: list(v) for k, v in columns.items()}})


def varied_reward(prompts, completions, **_):
    """A reward that differs between samples of a prompt (so advantages are non-zero)."""
    return [float(sum(map(ord, c)) % 7) / 7.0 for c in completions]


def digit_fraction(prompts, completions, **_):
    """The fraction of characters that are digits: ~0.1 for the random tiny model, learnable."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def constant_reward(prompts, completions, **_):
    return [1.0] * len(completions)


def make_config(model_dir, output_dir, **kw):
    from pg_lm.lm import LMConfig

    base = dict(model=str(model_dir), output_dir=str(output_dir), prompts_per_step=2, samples_per_prompt=4,
                max_new_tokens=6, eval_max_new_tokens=4, eval_size=4, eval_batch_size=4, lr=1e-3,
                lora_r=0, lr_schedule="constant",  # full fine-tuning at a constant rate unless a test asks
                progress=False, samples_every=1, max_steps=1, seed=0,
                mixed_precision="no")  # fp32 unless a test asks: "auto" would pick bf16 on some CPUs only
    base.update(kw)
    return LMConfig(**base)


def make_trainer(model_dir, output_dir, reward_fns=(varied_reward,), train_dataset=None, eval_dataset=None,
                 reward_weights=None, env=None, **kw):
    from pg_lm.lm.trainer import Trainer

    cfg = make_config(model_dir, output_dir, **kw)
    train_dataset = prompt_dataset() if train_dataset is None else train_dataset
    return Trainer(cfg, list(reward_fns), train_dataset, eval_dataset, reward_weights, env=env)


def snapshot(module) -> dict:
    """{name: detached copy} of every parameter (trainable or not)."""
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def read_jsonl(path) -> list[dict]:
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def learns_digits(model_dir, output_dir, **kw) -> list[dict]:
    """20 steps on the digit-fraction reward (about 0.1 at chance, 1.0 for digits only), asserting
    the training reward rose clearly from chance and the held-out reward rose; returns the metric rows."""
    settings = dict(reward_fns=[digit_fraction], eval_dataset=prompt_dataset(["q", "xy", "abc", "z"]), max_steps=20,
                    prompts_per_step=4, samples_per_prompt=8, max_new_tokens=4, eval_max_new_tokens=4, lr=1e-2,
                    samples_every=10, seed=1)
    summary = make_trainer(model_dir, output_dir, **{**settings, **kw}).train()
    rows = [r for r in read_jsonl(Path(output_dir) / "metrics.jsonl") if "reward/mean" in r]
    rewards = [r["reward/mean"] for r in rows]
    assert len(rewards) == 20
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.3  # near chance at the start ...
    assert last > first + 0.3, rewards  # ... clearly better at the end
    assert summary["eval/reward_after"] > summary["eval/reward_before"]
    return rows
