"""Episodes of many turns (pg_lm/lm/episodes.py) on the tiny model: the tokens trained on are the
tokens sampled, observations enter as the template's token delta (equal to a full re-render), one
action mask, rewards on each turn's last action token, truncation by turns and by tokens, a group
shares its start, and a failing environment is named or ends its episode as asked."""

from __future__ import annotations

import time

import pytest
import torch

from lm_fixtures import make_tokenizer
from pg_lm.envs import EnvError
from pg_lm.lm import episodes as ep

pytestmark = pytest.mark.usefixtures("one_thread")  # see lm_fixtures.one_thread


class Counter:
    """Says "t<k>" after turn k, reward 0.25 a turn; terminates after ``turns`` turns."""

    def __init__(self, turns=3):
        self.turns, self.k, self.seed = turns, 0, None

    def reset(self, *, seed, row=None):
        self.seed, self.k = seed, 0
        return f"start {seed}"

    def step(self, action):
        self.k += 1
        return f"t{self.k}", 0.25, self.k >= self.turns, False, {}


@pytest.fixture(scope="module")
def lm_tok(tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval(), AutoTokenizer.from_pretrained(tiny_lm_dir)


def run(lm_tok, make_env=Counter, seeds=(7, 8), G=2, **kw):
    lm, tok = lm_tok
    settings = dict(group_size=G, max_turns=5, max_new_tokens=6, max_episode_tokens=400)
    settings.update(kw)
    return ep.run_episodes(lm, tok, make_env, list(seeds), [None] * len(seeds), ep.check_template(tok, "tiny"),
                           **settings)


def test_the_episode_is_the_conversation_rendered_at_once(lm_tok):
    """Char-level tokenizer: the trained tokens decode to exactly the template's rendering of the
    conversation with the sampled actions; observation and template tokens are off the action mask."""
    torch.manual_seed(1)
    b = run(lm_tok)
    tok = lm_tok[1]
    assert b.completion_ids.shape[0] == 4 and b.group_size == 2
    for i in range(4):
        m = b.completion_mask[i].bool()
        ids = b.completion_ids[i][: int(torch.nonzero(b.completion_mask[i] + b.turn_end[i]).max()) + 1].tolist()
        text = tok.decode(b.prompt_ids[i][b.prompt_mask[i].bool()].tolist() + ids)
        actions = [tok.decode(b.completion_ids[i][j].tolist()) for j in _runs(m)]
        assert len(actions) == int(b.turn_end[i].sum()) <= 3
        msgs = [{"role": "user", "content": f"start {7 + i // 2}"}]
        for k, a in enumerate(actions):
            msgs.append({"role": "assistant", "content": a.removesuffix("</s>")})
            if k < len(actions) - 1:
                msgs.append({"role": "user", "content": f"t{k + 1}"})
        want = tok.apply_chat_template(msgs, tokenize=False)
        assert want.startswith(text.replace("</s>", "")) and text.endswith(actions[-1])
        assert all(not bool(b.completion_mask[i, j]) for j in range(len(ids)) if not m[j])
        # each turn's reward on its last action token, nowhere else
        assert torch.equal(b.rewards[i] != 0, b.turn_end[i]) and float(b.scores[i]) == 0.25 * len(actions)
        assert (b.sampler_logp[i][~m] == 0).all() and (b.sampler_logp[i][m] < 0).all()


def _runs(mask):
    """Index tensors of each run of 1s in a (T,) bool mask."""
    out, cur = [], []
    for j, on in enumerate(mask.tolist()):
        if on:
            cur.append(j)
        elif cur:
            out.append(torch.tensor(cur))
            cur = []
    return out + ([torch.tensor(cur)] if cur else [])


def test_actions_are_the_sampled_tokens(lm_tok, monkeypatch):
    """Whatever the generation returned (up to its EOS) is what the record holds at the action mask."""
    drawn = []
    real = ep.generate

    def spy(*a, **kw):
        tokens, logps = real(*a, **kw)
        drawn.append(tokens.clone())
        return tokens, logps

    monkeypatch.setattr(ep, "generate", spy)
    torch.manual_seed(2)
    b = run(lm_tok, seeds=(3,), G=1, max_turns=2)
    eos = lm_tok[1].eos_token_id
    got = b.completion_ids[0][b.completion_mask[0].bool()].tolist()
    want = []
    for t in drawn:
        row = t[0].tolist()
        want += row[: row.index(eos) + 1] if eos in row else row
    assert got == want


def test_turns_and_tokens_truncate_never_crash(lm_tok):
    torch.manual_seed(3)
    b = run(lm_tok, lambda: Counter(turns=10), seeds=(1,), G=2, max_turns=2)
    assert b.truncated.all() and (b.turn_end.sum(1) == 2).all()
    b = run(lm_tok, lambda: Counter(turns=10), seeds=(1,), G=2, max_turns=50, max_episode_tokens=40)
    assert b.truncated.all()
    assert ((b.prompt_mask.sum(1) + torch.tensor([int(torch.nonzero(r).max()) + 1 for r in b.completion_mask]))
            <= 40).all()
    b = run(lm_tok, lambda: Counter(turns=1), seeds=(1,), G=2)
    assert not b.truncated.any() and (b.turn_end.sum(1) == 1).all()


def test_a_group_shares_its_start(lm_tok):
    b = run(lm_tok, seeds=(11, 12), G=3, max_turns=1)
    assert b.prompts == ["start 11"] * 3 + ["start 12"] * 3


class Broken(Counter):
    def step(self, action):
        raise RuntimeError("the game crashed")


class Slow(Counter):
    def step(self, action):
        time.sleep(5)
        return super().step(action)


class WrongType(Counter):
    def step(self, action):
        return "obs", "1.0", False, False, {}


def test_a_failing_environment_is_named_or_ends_its_episode(lm_tok):
    with pytest.raises(EnvError, match=r"Broken.step \(episode 0, turn 0\) raised RuntimeError: the game crashed"):
        run(lm_tok, Broken, seeds=(1,), G=1)
    with pytest.raises(EnvError, match=r"Slow.step \(episode 0, turn 0\) did not return within --env-timeout 0.2 s"):
        run(lm_tok, Slow, seeds=(1,), G=1, env_timeout=0.2)
    with pytest.raises(EnvError, match=r"WrongType.step \(episode 0\): the reward is '1.0'"):
        run(lm_tok, WrongType, seeds=(1,), G=1)
    b = run(lm_tok, Broken, seeds=(1,), G=2, env_error_reward=-1.0)  # asked for: the episode ends with that reward
    assert b.scores.tolist() == [-1.0, -1.0] and not b.truncated.any()


def test_a_template_that_rewrites_earlier_turns_is_refused():
    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{{ messages|length }}{% endfor %}"
    with pytest.raises(ValueError, match="tiny-bad's chat template does not preserve prefixes"):
        ep.check_template(tok, "tiny-bad")
    with pytest.raises(ValueError, match="need a chat template"):
        ep.check_template(make_tokenizer(chat_template=False), "plain")


class Varied(Counter):
    """Counter whose reward depends on the action (so a group's episodes differ)."""

    def step(self, action):
        obs, _, terminated, truncated, info = super().step(action)
        return obs, float(sum(map(ord, action)) % 5) / 4, terminated, truncated, info


def test_a_training_step_on_an_environment_moves_the_policy_and_credits_actions_only(tiny_lm_dir, tmp_path):
    """One step of each credit mode: the weights move, observation / prompt / padding positions get
    advantage 0, the metrics count turns."""
    from lm_fixtures import make_trainer, snapshot

    for credit in ("episode", "turn", "gae"):
        tr = make_trainer(tiny_lm_dir, tmp_path / credit, reward_fns=(), env=lambda: Varied(turns=2), credit=credit,
                          max_turns=3, max_new_tokens=4, lr=1e-2, turn_gamma=0.9, train_dataset=None)
        batch, _ = tr.rollout()
        adv, ret = tr.advantages(batch)
        off = batch.completion_mask == 0
        assert (adv[off] == 0).all() and (batch.turn_end.sum(1) == 2).all()
        before = snapshot(tr.acc.unwrap_model(tr.policy))
        stats = tr.train_step()
        after = snapshot(tr.acc.unwrap_model(tr.policy))
        assert any(not torch.equal(before[n], after[n]) for n in before), credit
        assert stats["episode/turns"] == 2.0 and 0 <= stats["reward/mean"] <= 2.0
        assert tr.cfg.env.startswith("python:") and tr.cfg.uses_value_head == (credit == "gae")


# a user's environment file: two turns, reward 1 for an action holding an "a"
ECHO = ("class Echo:\n"
        "    def reset(self, *, seed, row=None):\n"
        "        self.n = 0\n"
        "        return 'say a'\n"
        "    def step(self, action):\n"
        "        self.n += 1\n"
        "        return 'again', float('a' in action), self.n >= 2, False, {}\n")


def test_cli_trains_on_a_users_environment_file(tiny_lm_dir, tmp_path):
    import json

    from pg_lm.cli import main

    env_file = tmp_path / "my_env.py"
    env_file.write_text(ECHO)
    out = tmp_path / "run"
    code = main(["lm", "--model", tiny_lm_dir, "--env", f"{env_file}:Echo", "--output-dir", str(out), "--max-steps", "2",
                 "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "4", "--max-turns", "3",
                 "--progress", "false", "--mixed-precision", "no", "--lora-r", "0", "--eval-size", "3"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train/steps"] == 2
    # evaluated before and after on held-out seeds: one greedy episode each
    assert 0 <= summary["eval/reward_before"] <= 2 and 0 <= summary["eval/accuracy_after"] <= 1
    assert 1 <= summary["eval/turns_after"] <= 2
    assert main(["lm", "--model", tiny_lm_dir, "--env", f"{env_file}:Nope", "--output-dir", str(out)]) == 2


def test_observation_prompt_and_padding_positions_get_exactly_zero_gradient(tiny_lm_dir, tmp_path):
    """The whole loss (policy term with PPO's ratio, entropy bonus, KL to the reference in the loss)
    has gradient 0 at every position off the action mask, and what the record holds there -- old,
    sampler and reference log-probs set to NaN -- never enters it."""
    from lm_fixtures import make_trainer

    from pg_lm.lm.loss import micro_loss

    tr = make_trainer(tiny_lm_dir, tmp_path, reward_fns=(), env=lambda: Varied(turns=3), max_turns=3, max_new_tokens=4,
                      entropy_coef=0.01, kl_coef=0.1, kl_in="loss", num_minibatches=2, clip_low=0.2,
                      sampler_correction="tis")
    torch.manual_seed(4)
    batch, _ = tr.rollout()
    adv, ret = tr.advantages(batch)
    on = batch.completion_mask.bool()
    assert (~on & batch.attention.bool()).any()  # there are observation tokens
    for name in ("logp", "sampler_logp", "ref_logp"):
        setattr(batch, name, torch.where(on, getattr(batch, name), torch.nan))
    logp, values, ent = tr.forward(batch, grad=True)
    logp, ent = logp.detach().requires_grad_(), ent.detach().requires_grad_()
    counts = (float(on.sum()), float(len(adv)))
    loss, parts, bad = micro_loss(tr.cfg, tr.state.kl_coef, batch, (logp, values, ent), adv, ret, counts, counts)
    assert bad is None and torch.isfinite(loss) and all(torch.isfinite(torch.as_tensor(v)) for v in parts.values())
    g_logp, g_ent = torch.autograd.grad(loss, [logp, ent])
    assert (g_logp[~on] == 0).all() and (g_ent[~on] == 0).all()
    assert g_logp[on].abs().sum() > 0 and g_ent[on].abs().sum() > 0


def test_a_resumed_environment_run_is_the_same_run(tiny_lm_dir, tmp_path):
    """Stopped after step 2 and resumed, a run plays the same games (each group's seed is a function
    of the run's seed and the step) and ends with the same weights and metrics as one never stopped;
    its held-out evaluation is the same greedy episodes both times."""
    from lm_fixtures import make_trainer, read_jsonl, snapshot

    kw = dict(reward_fns=(), env=lambda: Varied(turns=2), max_turns=3, max_new_tokens=4, lr=1e-2, save_every=2,
              eval_size=3, credit="turn")
    whole = make_trainer(tiny_lm_dir, tmp_path / "whole", max_steps=4, **kw)
    s_whole = whole.train()
    make_trainer(tiny_lm_dir, tmp_path / "cut", max_steps=2, **kw).train()
    resumed = make_trainer(tiny_lm_dir, tmp_path / "cut", max_steps=4, resume=True, **kw)
    s_cut = resumed.train()
    a, b = snapshot(whole.acc.unwrap_model(whole.policy)), snapshot(resumed.acc.unwrap_model(resumed.policy))
    assert all(torch.equal(a[n], b[n]) for n in a)
    drop = ("perf/", "wall_s")
    rows = [[{k: v for k, v in r.items() if not k.startswith(drop)} for r in read_jsonl(d / "metrics.jsonl")
             if "reward/mean" in r] for d in (tmp_path / "whole", tmp_path / "cut")]
    assert rows[0] == rows[1]
    assert s_whole["eval/reward_before"] == s_cut["eval/reward_before"]
    assert s_whole["eval/reward_after"] == s_cut["eval/reward_after"]


def test_samples_hold_whole_episodes_and_a_reward_function_adds_a_final_reward(tiny_lm_dir, tmp_path):
    """samples.jsonl rows carry each episode's turns (action, observation, the turn's reward); a reward
    function beside the environment scores each episode once, from its turns (the ``episode`` column),
    on its last turn -- in training, in the metrics and in the held-out evaluation."""
    from lm_fixtures import make_trainer, read_jsonl

    def turns_bonus(prompts, completions, episode, **_):
        assert all(isinstance(c, str) for c in completions)  # the last action
        return [0.5 * len(turns) for turns in episode]

    tr = make_trainer(tiny_lm_dir, tmp_path, reward_fns=[turns_bonus], env=lambda: Counter(turns=2), max_turns=3,
                      max_new_tokens=4, max_steps=1, eval_size=2, save_model=False)
    summary = tr.train()
    rows = read_jsonl(tmp_path / "samples.jsonl")
    assert rows
    for r in rows:
        assert [t["reward"] for t in r["turns"]] == [0.25, 0.25] and r["turns"][0]["observation"] == "t1"
        assert r["turns"][-1]["final_reward"] == 1.0 and r["reward"] == pytest.approx(1.5)
        assert all(isinstance(t["action"], str) for t in r["turns"])
    step = [m for m in read_jsonl(tmp_path / "metrics.jsonl") if "reward/mean" in m][0]
    assert step["reward/turns_bonus"] == 1.0 and step["reward/mean"] == pytest.approx(1.5) and step["perf/env_s"] >= 0
    assert step["episode/turns"] == 2.0
    assert summary["eval/reward_after"] == pytest.approx(1.5) and summary["eval/turns_after"] == 2.0


def test_pg_lm_eval_plays_held_out_episodes(tiny_lm_dir, tmp_path):
    """``pg-lm eval --env``: one greedy episode per held-out seed (success, mean return, turns, action
    tokens), pass@k over sampled episodes, a reward file's final reward, every episode in eval_samples.jsonl."""
    import json

    from pg_lm.cli import main

    (tmp_path / "my_env.py").write_text(ECHO + "def bonus(prompts, completions, episode):\n"
                                               "    return [10.0 for _ in episode]\n")
    out = tmp_path / "eval"
    args = ["eval", "--model", tiny_lm_dir, "--env", f"{tmp_path / 'my_env.py'}:Echo", "--eval-size", "3",
            "--eval-samples", "2", "--max-turns", "3", "--eval-max-new-tokens", "4", "--output-dir", str(out)]
    assert main(args + ["--reward", f"{tmp_path / 'my_env.py'}:bonus"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["episodes"] == 3 and result["eval/turns"] == 2.0 and 10.0 <= result["eval/reward"] <= 12.0
    assert result["eval/accuracy"] == 1.0 and result["eval/pass@2"] == 1.0  # 10 >= --pass-threshold 1
    assert 0 < result["eval/length"] <= 8
    rows = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows].count("greedy") == 3 and [r["kind"] for r in rows].count("sampled") == 6
    assert all(len(r["turns"]) == 2 and r["turns"][-1]["final_reward"] == 10.0 for r in rows)
    assert main(args) == 0  # the environment alone
    alone = json.loads((out / "eval.json").read_text())
    assert 0.0 <= alone["eval/reward"] <= 2.0 and alone["eval/reward"] == pytest.approx(result["eval/reward"] - 10.0)
