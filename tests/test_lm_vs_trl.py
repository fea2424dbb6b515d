"""pg_lm's GRPO update against TRL's ``GRPOTrainer``, the reference implementation.

Both train the same tiny model on the same 4 prompts x 4 samples: pg_lm samples them,
TRL is handed those very completions (its ``_generate_single_turn`` is replaced), both
score them with the same reward function, and both take one step at the configuration of
``benchmarks/lm_vs_trl.py`` (group-mean baseline scaled by the group std, token-mean loss,
no KL, one optimizer step per rollout). Then TRL's advantages must equal pg_lm's, and its
gradient -- read just before its optimizer step -- pg_lm's. pg_lm computes it another way
(each prompt run once with its KV cache shared by the group, log-probs only at completion
positions, rows with zero advantage left out), so equal gradients test all of that against
an independent implementation. Given the same samples the two make the same update, so
reward per step can differ only through sampling, which ``benchmarks/sampler_vs_generate.py``
compares with ``model.generate``.
"""

from __future__ import annotations

import pytest
import torch

from lm_fixtures import make_trainer, prompt_dataset, varied_reward

pytest.importorskip("trl")

G, N, MAX_NEW = 4, 4, 8


def reward(prompts, completions, **kw):
    """Varies between the samples of a prompt, except prompt "f": a group of equal rewards
    (zero advantage), which pg_lm leaves out of the backward pass."""
    return [0.5 if p == "f" else r for p, r in zip(prompts, varied_reward(prompts, completions))]


def _trl_reward(prompts, completions, **kw):  # TRL passes conversational prompts and completions
    return reward([p[-1]["content"] for p in prompts], [c[-1]["content"] for c in completions])


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([grads[k].flatten() for k in sorted(grads)])


@pytest.mark.parametrize("skip_zero_advantage", [True, False])
def test_same_samples_same_advantages_and_gradient_as_trl(tiny_lm_dir, tmp_path, one_thread, skip_zero_advantage):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    # ---- pg_lm: sample, score, one update; the gradient as the optimizer sees it
    prompts = ["ab", "cde", "f", "ghij"]  # different lengths: left padding in both libraries
    pg = make_trainer(tiny_lm_dir, tmp_path / "pg", reward_fns=(reward,), train_dataset=prompt_dataset(prompts), prompts_per_step=N,
                      samples_per_prompt=G, max_new_tokens=MAX_NEW, lr=1e-3, estimator="reinforce",
                      baseline="group_mean", scale_rewards=True, loss_agg="token-mean", kl_coef=0.0,
                      max_grad_norm=None, weight_decay=0.0, ppo_epochs=1, num_minibatches=1,
                      skip_zero_advantage=skip_zero_advantage, temperature=1.0, chat_template=True)
    batch, _ = pg.rollout()
    adv, ret = pg.advantages(batch)
    order = batch.prompts[::G]  # pg_lm's (shuffled) prompt order: TRL is given the same
    assert sorted(order) == sorted(prompts) and batch.prompts == [p for p in order for _ in range(G)]
    zero = (adv == 0).all(1)  # (B,) rows that cannot move the gradient
    assert zero.any() and not zero.all()  # a group pg_lm may skip, and a gradient to compare
    pg_grads = {}
    opt = getattr(pg.opt, "optimizer", pg.opt)
    opt.register_step_pre_hook(lambda *_: pg_grads.update(
        {n.removeprefix("lm."): p.grad.detach().clone() for n, p in pg.policy.named_parameters()}))
    pg.update(batch, adv, ret)

    lengths = batch.lengths.tolist()
    completions = [row[:n] for row, n in zip(batch.completion_ids.tolist(), lengths)]
    prompt_rows = [row[row_mask.bool()].tolist() for row, row_mask in zip(batch.prompt_ids, batch.prompt_mask)]

    # ---- TRL: the same prompts in the same order (no shuffling), handed pg_lm's completions
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), max_steps=1, per_device_train_batch_size=N * G,
                      gradient_accumulation_steps=1, num_generations=G, max_completion_length=MAX_NEW,
                      temperature=1.0, learning_rate=1e-3, lr_scheduler_type="constant", weight_decay=0.0,
                      max_grad_norm=0.0, beta=0.0, num_iterations=1, loss_type="dapo", scale_rewards="group",
                      gradient_checkpointing=False, bf16=False, use_cpu=True, seed=0, shuffle_dataset=False,
                      report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1)
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in order]})
    trl = GRPOTrainer(model=tiny_lm_dir, reward_funcs=_trl_reward, args=args, train_dataset=data)

    def handed(prompt_ids, *_, **__):
        assert [list(p) for p in prompt_ids] == prompt_rows  # TRL tokenized the same prompts, in the same order
        return [list(c) for c in completions], None

    trl._generate_single_turn = handed
    seen = {}
    inner = trl._generate_and_score_completions

    def record(*a, **kw):
        out = inner(*a, **kw)
        seen["advantages"] = out["advantages"].detach().clone()
        return out

    trl._generate_and_score_completions = record
    trl_grads = {}

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            trl_grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters()})

    trl.add_callback(Grads())
    trl.train()

    # ---- the same advantages, the same gradient
    torch.testing.assert_close(seen["advantages"].float(), adv[:, 0].float(), rtol=1e-5, atol=1e-6)
    assert set(trl_grads) == set(pg_grads)
    g_pg, g_trl = _flat(pg_grads), _flat(trl_grads)
    assert g_trl.norm() > 1e-3  # a real gradient, not two zeros
    assert float((g_pg - g_trl).norm() / g_trl.norm()) < 1e-5
