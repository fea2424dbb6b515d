"""The shipped text environments: seeded, rewards as documented, a random policy's base rate, the
contract's checks naming the environment and the episode (and the modules' doctests)."""

from __future__ import annotations

import doctest

import pytest

import pg_lm.envs.contract
import pg_lm.envs.games
import pg_lm.envs.gym_text
from pg_lm.envs import EnvError, GuessNumber, ToolArithmetic, check_reset, check_step, frozen_lake, random_success_rate
from pg_lm.envs.games import calculate


@pytest.mark.parametrize("module", [pg_lm.envs.contract, pg_lm.envs.games, pg_lm.envs.gym_text])
def test_doctests(module):
    assert doctest.testmod(module).failed == 0


def play(env, seed, actions):
    obs, out = env.reset(seed=seed), []
    for a in actions:
        out.append(check_step(env, env.step(a), 0))
        if out[-1][2] or out[-1][3]:
            break
    return obs, out


def test_guess_number_is_seeded_and_binary_search_wins_within_four_turns():
    env = GuessNumber(high=15)
    secrets = set()
    for seed in range(40):
        env.reset(seed=seed)
        secrets.add(env.secret)
        again = GuessNumber(high=15)
        again.reset(seed=seed)
        assert again.secret == env.secret
        lo, hi, total = 1, 15, 0.0
        for turn in range(4):
            guess = (lo + hi) // 2
            obs, reward, terminated, truncated, _ = env.step(f"{guess}")
            total += reward
            if terminated:
                break
            lo, hi = (guess + 1, hi) if obs == "Higher." else (lo, guess - 1)
        assert total == 1.0 and terminated and not truncated
    assert len(secrets) > 8
    assert env.step("no number")[0].startswith("Answer with one number")


def test_tool_arithmetic_rewards_the_right_answer_and_runs_the_calculator_safely():
    env = ToolArithmetic()
    prompt = env.reset(seed=5)
    a, op, b = prompt.split("?")[0].split()[-3:]
    want = int(a) + int(b) if op == "+" else int(a) * int(b)
    assert env.step(f"CALC: {a} {op} {b}")[0] == f"RESULT: {want}"
    assert env.step("I think so")[0] == ToolArithmetic.PROTOCOL
    assert env.step(f"ANSWER: {want + 1}")[1:3] == (0.0, True)
    env.reset(seed=5)
    assert env.step(f"ANSWER: {want:,}")[1:3] == (1.0, True)  # thousands separators read
    assert calculate("1 - -2") == 3 and calculate("7 / 2") is None and calculate("") is None


def test_frozen_lake_reaches_the_goal_by_the_known_path():
    env = frozen_lake()
    obs, out = play(env, 0, ["down", "down", "right", "right", "down", "right"])
    assert "P" in obs and sum(r for _, r, *_ in out) == 1.0 and out[-1][2]
    obs, out = play(env, 0, ["right", "down"])  # into the hole at (1, 1)
    assert out[-1][1:3] == (0.0, True)
    _, out = play(env, 0, ["sideways"])
    assert out[0][0].startswith("I did not understand") and not out[0][2]


def test_random_policies_have_a_low_base_rate():
    guess = random_success_rate(lambda: GuessNumber(high=15), lambda rng, obs: str(rng.randint(1, 15)), max_turns=4)
    assert 0.1 < guess < 0.45  # about 1 - (14/15)^4 = 0.24 with repeats
    moves = ["left", "down", "right", "up"]
    lake = random_success_rate(frozen_lake, lambda rng, obs: rng.choice(moves), max_turns=8)
    assert lake < 0.1
    tool = random_success_rate(ToolArithmetic, lambda rng, obs: f"ANSWER: {rng.randint(200, 1998)}", max_turns=2)
    assert tool < 0.05


def test_the_contract_checks_name_the_environment_and_the_episode():
    env = GuessNumber()
    assert check_reset(env, "hi", 0) == "hi" and check_reset(env, [{"role": "user", "content": "x"}], 0)
    with pytest.raises(EnvError, match=r"GuessNumber.reset \(episode 3\) returned int"):
        check_reset(env, 5, 3)
    with pytest.raises(EnvError, match=r"GuessNumber.step \(episode 7\) returned tuple of 4"):
        check_step(env, ("obs", 1.0, False, False), 7)
    with pytest.raises(EnvError, match="the reward is nan"):
        check_step(env, ("o", float("nan"), False, False, {}), 1)
    with pytest.raises(EnvError, match="the observation is int"):
        check_step(env, (3, 0.0, False, False, {}), 1)
    with pytest.raises(EnvError, match="must be bools"):
        check_step(env, ("o", 0.0, 1, False, {}), 1)
    assert check_step(env, ("o", 1, True, False, None), 1) == ("o", 1.0, True, False, {})


def test_the_documented_environment_runs_as_written():
    """docs/environments.md's 20-line environment, executed as the page shows it."""
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "environments.md").read_text()
    code = next(block for block in page.split("```python")[1:] if "class Hangman" in block).split("```")[0]
    assert len(code.strip().splitlines()) <= 25
    space: dict = {}
    exec(code, space)
    env = space["Hangman"](words=("apple",))
    assert "5-letter" in check_reset(env, env.reset(seed=0), 0)
    assert check_step(env, env.step("a"), 0) == ("a____", 0.0, False, False, {})
    assert check_step(env, env.step("z"), 0)[1] == pytest.approx(-0.1)
    for letter in "ple":
        out = check_step(env, env.step(letter), 0)
    assert out == ("", 1.0, True, False, {})
    env.reset(seed=0)
    for letter in "bcdfgh":
        out = check_step(env, env.step(letter), 0)
    assert out[3] is True  # six misses: truncated
