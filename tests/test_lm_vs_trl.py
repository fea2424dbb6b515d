"""pg_lm's GRPO update against TRL's ``GRPOTrainer``, the reference implementation.

Both train the same model for 3 steps of 4 prompts x 4 samples: pg_lm samples them, TRL
is handed those very completions (its ``_generate_single_turn`` is replaced), both score
them with the same reward function, and both step at the configuration of
``benchmarks/lm_vs_trl.py`` (group-mean baseline scaled by the group std, token-mean loss,
no KL, gradient clipping at 1, AdamW, one optimizer step per rollout). At every step TRL's
advantages must equal pg_lm's and its gradient -- read just before its optimizer step --
pg_lm's, and the weights must end up the same. pg_lm computes the gradient another way
(each prompt run once with its KV cache shared by the group, log-probs only at completion
positions, rows with zero advantage left out), so this tests all of that against an
independent implementation. Given the same samples the two make the same updates, so
reward per step can differ only through sampling, which ``benchmarks/sampler_vs_generate.py``
compares with ``model.generate``. Tiny Llama and GPT-2 (tied embeddings) in the default
run; the embedded SmolLM2-135M-Instruct under ``-m slow``.
"""

from __future__ import annotations

import pytest
import torch

from lm_fixtures import make_trainer, prompt_dataset, varied_reward

pytest.importorskip("trl")

G, N, MAX_NEW, STEPS, LR, CLIP = 4, 4, 8, 3, 1e-3, 1.0


EQUAL = "ff"  # the prompt whose samples all score alike: a group with advantage 0, which pg_lm skips
# Llama (rotary, relative positions): prompts of different lengths, so both libraries left-pad.
# GPT-2 (tied embeddings, learned absolute positions): prompts of one length. TRL's training forward
# passes no position ids, so under left padding its pad tokens take up positions, unlike in its
# own generation (and in pg_lm's forward), which an absolute-position model sees; rotary ones do not.
PROMPTS = {"llama": ["ab", "cde", EQUAL, "ghij"], "gpt2": ["ab", "cd", EQUAL, "gh"],
           "smollm2": ["What is 12 + 35?", "What is 48 + 21?", EQUAL, "What is 7 + 66?"]}
# relative differences allowed (gradient at each step, weights after STEPS): fp32 rounding, which grows
# over the steps with the model's size (measured: tiny models <= 6e-7 and 2e-5; SmolLM2 1.4e-4 at step 3)
TOL = {"llama": (1e-5, 1e-4), "gpt2": (1e-5, 1e-4), "smollm2": (1e-3, 1e-3)}


def reward(prompts, completions, **kw):
    """Varies between the samples of a prompt, except for prompt ``EQUAL``."""
    return [0.5 if p == EQUAL else r for p, r in zip(prompts, varied_reward(prompts, completions))]


def _trl_reward(prompts, completions, **kw):  # TRL passes conversational prompts and completions
    return reward([p[-1]["content"] for p in prompts], [c[-1]["content"] for c in completions])


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([grads[k].flatten() for k in sorted(grads)])


@pytest.mark.parametrize("skip_zero_advantage", [True, False])
@pytest.mark.parametrize("model", ["llama", "gpt2", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_same_samples_same_advantages_and_gradient_as_trl(model, request, tmp_path, skip_zero_advantage):
    """``smollm2``: the embedded SmolLM2-135M-Instruct (slow: full-size model in fp32)."""
    if model == "smollm2":
        from pg_lm.lm.models import resolve_model

        model_dir = resolve_model("smollm2-135m-instruct")
    else:
        model_dir = request.getfixturevalue({"llama": "tiny_lm_dir", "gpt2": "tiny_gpt2_dir"}[model])
        request.getfixturevalue("one_thread")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    # ---- pg_lm: STEPS steps (sample, score, update), each step's gradient as the optimizer sees it
    prompts = PROMPTS[model]
    pg = make_trainer(model_dir, tmp_path / "pg", reward_fns=(reward,), train_dataset=prompt_dataset(prompts),
                      prompts_per_step=N, samples_per_prompt=G, max_new_tokens=MAX_NEW, lr=LR,
                      estimator="reinforce", baseline="group_mean", scale_rewards=True, loss_agg="token-mean",
                      kl_coef=0.0, max_grad_norm=CLIP, weight_decay=0.0, ppo_epochs=1, num_minibatches=1, dynamic_sampling=False,
                      skip_zero_advantage=skip_zero_advantage, temperature=1.0, chat_template=True,
                      max_steps=STEPS)
    pg_grads, pg_adv, order, completions, prompt_rows = [], [], [], [], []
    opt = getattr(pg.opt, "optimizer", pg.opt)
    opt.register_step_pre_hook(lambda *_: pg_grads.append(
        {n.removeprefix("lm."): p.grad.detach().clone() for n, p in pg.policy.named_parameters()}))
    sample = pg.rollout

    def recorded():  # train_step's rollout, kept for TRL
        batch, stats = sample()
        adv, _ = pg.advantages(batch)
        zero = (adv == 0).all(1)  # (B,) rows that cannot move the gradient
        assert zero.any() and not zero.all()  # a group pg_lm may skip, and a gradient to compare
        order.extend(batch.prompts[::G])  # pg_lm's (shuffled) prompt order: TRL is given the same
        completions.extend(row[:n] for row, n in zip(batch.completion_ids.tolist(), batch.lengths.tolist()))
        prompt_rows.extend(row[m.bool()].tolist() for row, m in zip(batch.prompt_ids, batch.prompt_mask))
        pg_adv.append(adv[:, 0])
        return batch, stats

    pg.rollout = recorded
    for _ in range(STEPS):
        pg.train_step()

    # ---- TRL: the same prompts in the same order (no shuffling), handed pg_lm's completions
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), max_steps=STEPS, per_device_train_batch_size=N * G,
                      gradient_accumulation_steps=1, num_generations=G, max_completion_length=MAX_NEW,
                      temperature=1.0, learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
                      max_grad_norm=CLIP, beta=0.0, num_iterations=1, loss_type="dapo", scale_rewards="group",
                      gradient_checkpointing=False, bf16=False, use_cpu=True, seed=0, shuffle_dataset=False,
                      report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1)
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in order]})
    trl = GRPOTrainer(model=model_dir, reward_funcs=_trl_reward, args=args, train_dataset=data)
    calls = []

    def handed(prompt_ids, *_, **__):
        rows = slice(len(calls) * N * G, (len(calls) + 1) * N * G)
        calls.append(1)
        assert [list(p) for p in prompt_ids] == prompt_rows[rows]  # TRL tokenized the same prompts, in order
        return [list(c) for c in completions[rows]], None

    trl._generate_single_turn = handed
    trl_adv, inner = [], trl._generate_and_score_completions

    def record(*a, **kw):
        out = inner(*a, **kw)
        trl_adv.append(out["advantages"].detach().clone())
        return out

    trl._generate_and_score_completions = record
    trl_grads = []

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            trl_grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})

    trl.add_callback(Grads())
    trl.train()

    # ---- the same advantages and gradients at every step, so the same weights at the end
    assert len(pg_grads) == len(trl_grads) == STEPS
    for step in range(STEPS):
        torch.testing.assert_close(trl_adv[step].float(), pg_adv[step].float(), rtol=1e-5, atol=1e-6)
        assert set(trl_grads[step]) == set(pg_grads[step])
        g_pg, g_trl = _flat(pg_grads[step]), _flat(trl_grads[step])
        assert g_trl.norm() > 1e-3  # a real gradient, not two zeros
        assert float((g_pg - g_trl).norm() / g_trl.norm()) < TOL[model][0], step
    w_pg = {n.removeprefix("lm."): p.detach() for n, p in pg.policy.named_parameters()}
    w_trl = dict(trl.model.named_parameters())
    w0 = dict(AutoModelForCausalLM.from_pretrained(model_dir).named_parameters())
    moved_pg, moved_trl = (torch.cat([(w[k] - w0[k]).flatten() for k in sorted(w0)]) for w in (w_pg, w_trl))
    assert moved_trl.norm() > 0 and float((moved_pg - moved_trl).norm() / moved_trl.norm()) < TOL[model][1]
