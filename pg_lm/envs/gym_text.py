"""Any Gymnasium environment as a text environment: a function renders its observation as text,
another parses the policy's text into an action, and an explicit policy decides what an
unparsable answer does."""

from __future__ import annotations

from typing import Callable

UNPARSABLE = ("end", "noop", "penalty")


class GymText:
    """``gymnasium.make(env_id, **kwargs)`` behind the text contract.

    ``render(obs, env) -> str`` writes an observation (the first one is prefixed by ``intro``);
    ``parse(text) -> action or None``. An unparsable answer (``None``): ``end`` terminates the
    episode with ``unparsable_reward``; ``noop`` takes ``noop_action`` and adds
    ``unparsable_reward``; ``penalty`` keeps the state, says so, and gives ``unparsable_reward``.
    """

    def __init__(self, env_id: str, render: Callable, parse: Callable, intro: str = "", unparsable: str = "penalty",
                 unparsable_reward: float = 0.0, noop_action=None, **kwargs):
        import gymnasium as gym

        if unparsable not in UNPARSABLE:
            raise ValueError(f"unparsable must be one of {', '.join(UNPARSABLE)}, got {unparsable!r}")
        if unparsable == "noop" and noop_action is None:
            raise ValueError("unparsable 'noop' needs a noop_action")
        self.env = gym.make(env_id, **kwargs)
        self.render, self.parse, self.intro = render, parse, intro
        self.unparsable, self.unparsable_reward, self.noop_action = unparsable, unparsable_reward, noop_action

    def reset(self, *, seed: int, row: dict | None = None) -> str:
        obs, _ = self.env.reset(seed=seed)
        return self.intro + self.render(obs, self.env)

    def step(self, action: str):
        act = self.parse(action)
        if act is None and self.unparsable == "end":
            return "", self.unparsable_reward, True, False, {"parsed": False}
        if act is None and self.unparsable == "penalty":
            return "I did not understand. " + self.intro, self.unparsable_reward, False, False, {"parsed": False}
        extra = self.unparsable_reward if act is None else 0.0
        obs, reward, terminated, truncated, info = self.env.step(self.noop_action if act is None else act)
        text = "" if terminated else self.render(obs, self.env)
        return text, float(reward) + extra, bool(terminated), bool(truncated), {"parsed": act is not None}


_MOVES = {"left": 0, "down": 1, "right": 2, "up": 3}


def _lake_text(obs, env) -> str:
    desc = env.unwrapped.desc
    rows = ["".join("P" if r * len(line) + c == int(obs) else ch.decode() for c, ch in enumerate(line))
            for r, line in enumerate(desc)]
    return "\n".join(rows) + "\nYour move (left, down, right or up)?"


def _lake_move(text: str):
    words = [w.strip(".,!:;\"'").lower() for w in text.split()]
    found = [w for w in words if w in _MOVES]
    return _MOVES[found[-1]] if found else None


def frozen_lake(**kwargs) -> GymText:
    """FrozenLake-v1, 4x4, not slippery: reach G from S without falling into a hole H; reward 1 at
    G. The map is drawn with the player as P; the move is the last of left / down / right / up the
    answer names.

    >>> env = frozen_lake()
    >>> print(env.reset(seed=0).splitlines()[1])
    PFFF
    >>> env.step("I go right")[0].splitlines()[0], env.step("hmm")[1:3]
    ('SPFF', (0.0, False))
    """
    intro = ("You walk on a frozen lake: reach G without stepping into a hole H. F is safe ice, "
             "P is you.\n")
    return GymText("FrozenLake-v1", _lake_text, _lake_move, intro=intro, map_name="4x4", is_slippery=False,
                   **kwargs)
