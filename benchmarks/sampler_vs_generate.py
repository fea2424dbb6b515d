"""Does pg_lm's sampler draw what ``model.generate(do_sample=True)`` draws? A check at scale.

Samples 16 completions (temperature 1, no top-k / top-p, <= 24 new tokens) for each of the
first 64 training prompts of the arithmetic task with pg_lm's ``sample`` and with
transformers' ``generate`` on the embedded SmolLM2-135M-Instruct, and prints the fraction
scored correct by ``exact_match`` for each (1,024 samples each). The two should agree within
sampling noise (~0.4 percentage points at these rates).

    python benchmarks/sampler_vs_generate.py
    python benchmarks/sampler_vs_generate.py --checkpoint runs/arithmetic/checkpoint-last  # a trained LoRA adapter
    python benchmarks/sampler_vs_generate.py --checkpoint runs/arithmetic/checkpoint-last --pg-lm-bf16-copy

``--pg-lm-bf16-copy``: pg_lm samples as its trainer does in bf16 (a bf16 copy of the weights,
the grouped attention kernel, no autocast) while ``generate`` keeps the fp32 model: does
sampling in bf16 change the success rate?

Untrained, ~2% of samples are correct, so only large differences would show; a trained
checkpoint (``make demo`` leaves one) puts the success rate where the test has power.
"""

import argparse

import torch

from pg_lm.lm.policy import load_policy
from pg_lm.lm.sampling import completion_mask_from_ids, encode_prompts, eos_token_ids, sample
from pg_lm.lm.cpu.process import apply_process_settings
from pg_lm.tasks.arithmetic import arithmetic_datasets, exact_match

PROMPTS, G, PER_CALL, NEW_TOKENS = 64, 16, 4, 24


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a LoRA adapter saved by the arithmetic recipe, merged in")
    p.add_argument("--pg-lm-bf16-copy", action="store_true", help="pg_lm samples from a bf16 copy (its bf16 path)")
    args = p.parse_args()
    apply_process_settings()
    # lora_r > 0 only selects the adapter path: the rank itself is read from the saved adapter
    policy, tok = load_policy("smollm2-135m-instruct", lora_r=8 if args.checkpoint else 0, resume_dir=args.checkpoint)
    lm = (policy.lm.merge_and_unload() if args.checkpoint else policy.lm).eval()
    ours_lm = lm
    if args.pg_lm_bf16_copy:
        from pg_lm.lm.cpu.lowp import SamplerCopy, use_grouped_attention

        ours_lm = SamplerCopy(lm, torch.bfloat16).lm
        assert use_grouped_attention(ours_lm)
    train, _ = arithmetic_datasets(100)
    prompts, answers = train["prompt"][:PROMPTS], train["answer"][:PROMPTS]
    eos = eos_token_ids(tok, lm)
    ours, hf = [], []
    torch.manual_seed(0)
    for i in range(0, PROMPTS, PER_CALL):
        ps, ans = prompts[i : i + PER_CALL], answers[i : i + PER_CALL]
        rep = [a for a in ans for _ in range(G)]
        b = sample(ours_lm, tok, ps, {"answer": ans}, G, NEW_TOKENS, cpu_layer=True)
        ours += exact_match(b.prompts, b.completions, b.columns["answer"])
        ids, am = encode_prompts(tok, ps, True, None)
        with torch.no_grad():
            out = lm.generate(input_ids=ids, attention_mask=am, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=NEW_TOKENS, num_return_sequences=G, pad_token_id=tok.pad_token_id)
        comp = out[:, ids.shape[1] :]
        mask, _ = completion_mask_from_ids(comp, eos)
        texts = [tok.decode(r[: int(n)], skip_special_tokens=True) for r, n in zip(comp, mask.sum(1))]
        hf += exact_match(None, texts, rep)
    print(f"correct: pg_lm sample{' (bf16 copy)' if args.pg_lm_bf16_copy else ''} {sum(ours) / len(ours):.4f}, generate {sum(hf) / len(hf):.4f} ({len(ours)} samples each)")


if __name__ == "__main__":
    main()
