"""Episodes of many turns, sampled in lockstep, token in / token out.

Every live episode advances together: one batched generation per turn (each episode's whole token
sequence so far as the context), then every environment steps at once, and finished episodes drop
out. The tokens trained on are the tokens sampled: an action is never decoded and encoded again.
An observation enters as the chat template's *token delta*: the template rendered for a fixed base
conversation with and without a new user message, the difference tokenized once per observation,
after what the template writes behind an assistant message (its EOS when the turn was cut before
the model sampled one). :func:`check_template` compares that construction with a full re-render at
start-up: a template that does not preserve prefixes is refused, naming the model.

The record is a :class:`~pg_lm.lm.rollout.Rollout` whose completion is the whole episode after the
first prompt: ``completion_mask`` is the *action mask* (1 on sampled tokens, each turn's EOS
included; 0 on observation, template and padding tokens), ``turn_end`` marks each turn's last
action token, ``rewards`` holds each turn's reward there, ``truncated`` says which episodes were cut
(``--max-turns``, ``--max-episode-tokens``, or the environment) rather than terminated.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import torch

from pg_lm.envs import EnvError, check_reset, check_step, load_env

from .rollout import Rollout
from .sampling import _adds_special, completion_mask_from_ids, eos_token_ids, format_prompts, generate

_BASE = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]


@dataclass
class TemplateDelta:
    """How a tokenizer's chat template continues a conversation after an assistant turn."""

    tok: object
    system_prompt: str | None = None
    base: str = field(init=False)  # the fixed base conversation, rendered once
    closing: str = field(init=False)  # what the template writes behind an assistant message (e.g. "<|im_end|>\n")

    def __post_init__(self):
        self.base = _render(self.tok, _BASE, self.system_prompt, False)
        self.closing = self.base[self.base.rindex("y") + 1:] if "y" in self.base else ""

    def observation(self, text: str, eos_sampled: bool) -> list[int]:
        """The tokens after an assistant turn up to the next generation prompt, for a user message
        ``text``: the template's closing (without its EOS when the policy sampled one), the user
        turn, the generation prompt."""
        closing = self.closing
        eos = self.tok.eos_token or ""
        if eos_sampled and eos and closing.startswith(eos):
            closing = closing[len(eos):]
        after = _render(self.tok, [*_BASE, {"role": "user", "content": text}], self.system_prompt, True)
        return self.tok(closing + after[len(self.base):], add_special_tokens=False)["input_ids"]


def _render(tok, msgs, system_prompt, generation_prompt: bool) -> str:
    if system_prompt is not None:
        msgs = [{"role": "system", "content": system_prompt}, *msgs]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)


def check_template(tok, model_name: str, system_prompt: str | None = None) -> TemplateDelta:
    """The tokenizer's :class:`TemplateDelta`, after checking that prompt + actions + observation deltas
    give the tokens of the whole conversation rendered at once; a ``ValueError`` naming the model
    when the template does not preserve prefixes (or has none)."""
    if getattr(tok, "chat_template", None) is None:
        raise ValueError(f"episodes of many turns need a chat template: {model_name}'s tokenizer has none")
    delta = TemplateDelta(tok, system_prompt)
    after = _render(tok, [*_BASE, {"role": "user", "content": "z"}], system_prompt, True)
    if not after.startswith(delta.base) or "y" not in delta.base:
        raise ValueError(f"{model_name}'s chat template does not preserve prefixes (rendering a conversation with "
                         "one more message changes what came before): it cannot run episodes of many turns")
    turns = [("What is 2 + 2?", "4"), ("And 3 + 3?", "6")]
    msgs = [m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    whole = tok(_render(tok, msgs, system_prompt, False), add_special_tokens=False)["input_ids"]
    eos = [tok.eos_token_id] if tok.eos_token and delta.closing.startswith(tok.eos_token) else []
    built = tok(_render(tok, msgs[:1], system_prompt, True), add_special_tokens=False)["input_ids"]
    built += tok("4", add_special_tokens=False)["input_ids"] + eos + delta.observation("And 3 + 3?", bool(eos))
    built += tok("6", add_special_tokens=False)["input_ids"] + eos
    if whole[: len(built)] != built:
        raise ValueError(f"{model_name}'s chat template does not preserve prefixes: a conversation built turn by "
                         "turn from token deltas differs from the whole conversation rendered at once")
    return delta


@dataclass
class _Episode:
    env: object
    prompt: list[int]  # the first prompt's tokens
    ids: list[int] = field(default_factory=list)  # everything after it: actions and observations
    mask: list[float] = field(default_factory=list)  # 1 on action tokens
    logp: list[float] = field(default_factory=list)  # the sampler's log-prob per token (0 off actions)
    turn_end: list[bool] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)  # per token: each turn's reward on its last action token
    first: str = ""  # the first observation's text (the record's prompt)
    turns: list[dict] = field(default_factory=list)  # each turn's action, reward and observation, as text
    done: bool = False
    truncated: bool = False


def _each(pool, calls: list, timeout: float | None, on_error: float | None) -> list:
    """The results of ``calls`` [(function, what it is)], run concurrently on ``pool``, each within
    ``timeout`` seconds. An exception or a hang stops the run with an :class:`EnvError` naming
    ``what``; with ``on_error`` a number, that call's episode ends instead (terminated, with that
    reward): its result is ``("", on_error, True, False, {"error": ...})``."""
    futures = [pool.submit(fn) for fn, _ in calls]
    out = []
    for future, (_, what) in zip(futures, calls):
        try:
            out.append(future.result(timeout=timeout))
            continue
        except FutureTimeout:
            why = f"{what} did not return within --env-timeout {timeout} s"
        except EnvError:
            raise
        except Exception as e:  # the user's environment: whatever it raises is named, not lost in a traceback
            why = f"{what} raised {type(e).__name__}: {e}"
        if on_error is None:
            raise EnvError(why)
        out.append(("", float(on_error), True, False, {"error": why}))
    return out


def start(make_env, tok, seeds: list[int], rows: list, group_size: int, chat_template: bool,
          system_prompt: str | None, pool, timeout: float | None) -> list[_Episode]:
    """``group_size`` episodes per seed (a group shares its seed and its row), reset concurrently; an
    environment that fails here stops the run (no episode has started to end)."""
    envs = [make_env() for _ in range(len(seeds) * group_size)]
    calls = [(lambda e=e, k=k: e.reset(seed=seeds[k // group_size], row=rows[k // group_size]),
              f"{type(e).__name__}.reset (episode {k})") for k, e in enumerate(envs)]
    obs = [check_reset(envs[k], o, k) for k, o in enumerate(_each(pool, calls, timeout, None))]
    texts = format_prompts(tok, obs, chat_template, system_prompt)
    enc = tok(texts, add_special_tokens=_adds_special(tok, chat_template))["input_ids"]
    return [_Episode(env, list(ids), first=o if isinstance(o, str) else o[-1]["content"])
            for env, ids, o in zip(envs, enc, obs)]


@torch.no_grad()
def _act(lm, episodes: list[_Episode], eos: list[int], pad: int, max_new_tokens: int, sampling: dict,
         cpu_layer: bool) -> list[tuple[list[int], list[float]]]:
    """One turn of every episode in ``episodes``: one batched generation over their whole contexts
    (left-padded); each action's tokens up to and including its EOS, and the sampler's log-probs."""
    device = lm.device
    ctx = [e.prompt + e.ids for e in episodes]
    L = max(map(len, ctx))
    ids = torch.tensor([[pad] * (L - len(c)) + c for c in ctx], device=device)  # (N, L)
    am = torch.tensor([[0] * (L - len(c)) + [1] * len(c) for c in ctx], device=device)  # (N, L)
    tokens, logps = generate(lm, ids, am, 1, max_new_tokens, eos, pad, logprobs=True, cpu_layer=cpu_layer,
                             **sampling)  # (N, T) each
    lengths = completion_mask_from_ids(tokens, eos)[0].sum(1).long().tolist()  # (N,) up to the first EOS
    return [(row[:n], lp[:n]) for row, lp, n in zip(tokens.tolist(), logps.tolist(), lengths)]


def run_episodes(lm, tok, make_env, seeds: list[int], rows: list, delta: TemplateDelta, *, group_size: int,
                 max_turns: int, max_new_tokens: int, max_episode_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, chat_template: bool = True, cpu_layer: bool = False,
                 env_timeout: float | None = None, env_error_reward: float | None = None,
                 greedy: bool = False) -> Rollout:
    """``group_size`` episodes of ``make_env()`` per seed of ``seeds`` (``rows``: each group's dataset row
    or None), each to termination, truncation by the environment, ``max_turns`` turns of at most
    ``max_new_tokens`` tokens, or ``max_episode_tokens`` tokens in all -- whichever comes first (a
    cut episode is truncated, never an error). ``lm`` is the unwrapped causal LM with its whole weights."""
    eos, pad = eos_token_ids(tok, lm), tok.pad_token_id
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(32, len(seeds) * group_size)) as pool:
        episodes = start(make_env, tok, seeds, rows, group_size, chat_template, delta.system_prompt, pool, env_timeout)
        env_s = time.perf_counter() - t0
        for turn in range(max_turns):
            live = [(k, e) for k, e in enumerate(episodes) if not e.done]
            if not live:
                break
            acted = _act(lm, [e for _, e in live], eos, pad, max_new_tokens, sampling, cpu_layer)
            texts = [tok.decode(ids, skip_special_tokens=True) for ids, _ in acted]
            calls = [(lambda e=e, a=a: e.env.step(a), f"{type(e.env).__name__}.step (episode {k}, turn {turn})")
                     for (k, e), a in zip(live, texts)]
            t0 = time.perf_counter()
            results = _each(pool, calls, env_timeout, env_error_reward)
            env_s += time.perf_counter() - t0
            for (k, e), (ids, lp), text, res in zip(live, acted, texts, results):
                _advance(e, ids, lp, text, check_step(e.env, res, k), delta, eos, turn == max_turns - 1,
                         max_new_tokens, max_episode_tokens)
    return _record(episodes, tok, pad, group_size, lm.device, env_s)


def _advance(e: _Episode, ids: list[int], lp: list[float], text: str, res: tuple, delta: TemplateDelta,
             eos: list[int], last_turn: bool, max_new_tokens: int, max_episode_tokens: int) -> None:
    """Append a turn's action (and, unless the episode ends, the observation's token delta) to ``e``."""
    obs, reward, terminated, truncated, _ = res
    e.turns.append({"action": text, "reward": reward, "observation": obs})
    e.ids += ids
    e.mask += [1.0] * len(ids)
    e.logp += lp
    e.turn_end += [False] * (len(ids) - 1) + [True]
    e.rewards += [0.0] * (len(ids) - 1) + [reward]
    if terminated or truncated or last_turn:
        e.done, e.truncated = True, not terminated
        return
    d = delta.observation(obs, eos_sampled=bool(ids) and ids[-1] in eos)
    if len(e.prompt) + len(e.ids) + len(d) + max_new_tokens > max_episode_tokens:  # no room for another turn
        e.done, e.truncated = True, True
        return
    e.ids += d
    e.mask += [0.0] * len(d)
    e.logp += [0.0] * len(d)
    e.turn_end += [False] * len(d)
    e.rewards += [0.0] * len(d)


def _record(episodes: list[_Episode], tok, pad: int, group_size: int, device, env_s: float) -> Rollout:
    """The episodes as one :class:`Rollout` on ``device`` (prompts left-padded, episodes right-padded);
    ``env_s``: the seconds spent in the environments' ``reset`` and ``step``."""
    P, T = max(len(e.prompt) for e in episodes), max(max(len(e.ids) for e in episodes), 1)

    def right(xs, fill, dtype):
        return torch.tensor([x + [fill] * (T - len(x)) for x in xs], dtype=dtype, device=device)  # (B, T)

    rewards = right([e.rewards for e in episodes], 0.0, torch.float32)
    return Rollout(
        prompt_ids=torch.tensor([[pad] * (P - len(e.prompt)) + e.prompt for e in episodes], device=device),
        prompt_mask=torch.tensor([[0] * (P - len(e.prompt)) + [1] * len(e.prompt) for e in episodes], device=device),
        completion_ids=right([e.ids for e in episodes], pad, torch.long),
        completion_mask=right([e.mask for e in episodes], 0.0, torch.float32),
        truncated=torch.tensor([e.truncated for e in episodes], device=device),
        prompts=[e.first for e in episodes], completions=[tok.decode(e.ids) for e in episodes],
        sampler_logp=right([e.logp for e in episodes], 0.0, torch.float32),
        rewards=rewards, scores=rewards.sum(1), group_size=group_size,
        turn_end=right([e.turn_end for e in episodes], False, torch.bool),
        completion_attention=right([[1.0] * len(e.ids) for e in episodes], 0.0, torch.float32),
        episodes=[e.turns for e in episodes], env_s=env_s,
    )


def env_name(env) -> str:
    """How ``config.json`` records an environment given from Python (``train(cfg, env=...)``)."""
    return f"python:{getattr(env, '__name__', type(env).__name__)}"


def resolve_env(cfg, env):
    """The function making the run's environments (``env``, else ``--env``), or None: a run without one."""
    if env is None and cfg.env is None:
        return None
    return env if env is not None else load_env(cfg.env)


def final_rewards(rewards, batch: Rollout, rows: list, tok) -> dict:
    """Add the reward functions' score of each episode to its last turn's reward (in place), and
    return each function's (B,) scores. A function gets the first observation as the prompt, the last
    action as the completion, and the episode's turns as the ``episode`` column (each turn's
    ``action``, ``reward``, ``observation``), beside the dataset row's columns."""
    cols = {"episode": batch.episodes}
    for name in rows[0] or {}:
        if name != "prompt":
            cols[name] = [r[name] for r in rows for _ in range(batch.group_size)]
    last = [turns[-1]["action"] if turns else "" for turns in batch.episodes]
    per_fn, dense = rewards.score(batch.prompts, last, cols, [1] * len(last), None, tok)
    final = dense.sum(1).to(batch.rewards)  # (B,)
    B, T = batch.turn_end.shape
    at = torch.where(batch.turn_end, torch.arange(T, device=batch.turn_end.device), -1).max(1).values  # (B,) last turn
    ok = at >= 0
    batch.rewards[ok, at[ok]] += final[ok]
    batch.scores = batch.rewards.sum(1)
    for turns, r in zip(batch.episodes, final.tolist()):
        if turns:
            turns[-1]["final_reward"] = r
    return per_fn


def step_episodes(tr, step: int, lm, context) -> tuple[Rollout, dict]:
    """(the episodes of training step ``step`` of the trainer ``tr``, the reward functions' (B,)
    scores): ``--prompts-per-step`` groups of ``--samples-per-prompt`` episodes on this process, each
    group's seed a function of the run's seed, the step and the group (so a resumed run plays the
    same games); with a dataset, each group gets the step's row as ``reset(row=...)``."""
    cfg, n, rank = tr.cfg, tr.cfg.prompts_per_step, tr.acc.process_index
    seeds = [(cfg.seed * 1_000_003 + step) * 10_007 + rank * n + k for k in range(n)]
    rows = [None] * n
    if tr.train_ds is not None:
        prompts, cols = tr.prompts(step)
        rows = [{"prompt": p, **{c: v[k] for c, v in cols.items()}} for k, p in enumerate(prompts)]
    with context():
        batch = run_episodes(lm, tr.tok, tr.make_env, seeds, rows, tr.delta, group_size=cfg.samples_per_prompt,
                             max_turns=cfg.max_turns, max_new_tokens=cfg.max_new_tokens,
                             max_episode_tokens=cfg.max_episode_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                             top_k=cfg.top_k, chat_template=cfg.chat_template, cpu_layer=tr.cpu_layer,
                             env_timeout=cfg.env_timeout, env_error_reward=cfg.env_error_reward)
    return batch, final_rewards(tr.rewards, batch, rows, tr.tok) if tr.rewards is not None else {}


# held-out seeds: far from every training seed ((seed * 1_000_003 + step) * 10_007 + group)
EVAL_SEED = 1 << 50
