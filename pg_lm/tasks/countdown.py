"""Countdown: reach a target number from given numbers with + - * / (each number once).

"Using the numbers 3, 7, 12, each exactly once, and + - * / ( ), write an expression equal to 27."
The reward reads the completion's expression (inside ``<answer>...</answer>`` when there is one,
else its last line with a number, any ``= ...`` cut off), evaluates it exactly (fractions, no
``eval``), and gives 1.0 when it uses exactly the given numbers and equals the target, 0.1 when it
is a valid expression of exactly those numbers with another value (partial credit for the form,
as in TinyZero), else 0.0. Puzzles are generated offline from a seed, and each has a solution.

>>> countdown_reward(["p"] * 4, ["(12 - 7) * 3 + 12 = 27", "12 + 7 + 3", "27", "3 * 7 + 12 - 6"],
...                  numbers=[[3, 7, 12, 12], [3, 7, 12], [3, 7, 12], [3, 7, 12]], target=[27, 27, 27, 27])
[1.0, 0.1, 0.0, 0.0]
"""

from __future__ import annotations

import ast
import random
import re
from fractions import Fraction

from datasets import Dataset

from .simple import tag_text

_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}


def _value(node, used: list[int]) -> Fraction:
    """The exact value of an expression tree of integers and + - * /; the integers go to ``used``."""
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_value(node.left, used), _value(node.right, used))
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        used.append(node.value)
        return Fraction(node.value)
    raise ValueError("not an arithmetic expression of whole numbers")


def expression_of(completion: str) -> str | None:
    """The expression a completion answers with (see the module docstring), or None."""
    text = tag_text(completion, "answer")
    if text is None:
        lines = [ln for ln in completion.strip().splitlines() if re.search(r"\d", ln)]
        text = lines[-1] if lines else None
    if text is None:
        return None
    text = text.split("=")[0].replace("×", "*").replace("÷", "/").replace("x", "*").strip().rstrip(".")
    return text if re.fullmatch(r"[\d\s+\-*/().]+", text) else None


def score_expression(expression: str | None, numbers: list[int], target: int) -> float:
    if expression is None:
        return 0.0
    used: list[int] = []
    try:
        value = _value(ast.parse(expression, mode="eval").body, used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return 0.0
    if sorted(used) != sorted(int(n) for n in numbers):
        return 0.0
    return 1.0 if value == target else 0.1


def countdown_reward(prompts, completions, numbers, target, **_) -> list[float]:
    """1.0: an expression of exactly ``numbers`` equal to ``target``; 0.1: of exactly ``numbers``, another value; else 0."""
    return [score_expression(expression_of(c), n, t) for c, n, t in zip(completions, numbers, target)]


def make_puzzle(rng: random.Random, count: int = 3) -> tuple[list[int], int, str]:
    """(numbers, target, one solution): ``count`` numbers in 1..20 combined left to right by random
    operations, keeping every intermediate value a whole number in 1..200 (re-drawn until so)."""
    while True:
        numbers = [rng.randint(1, 20) for _ in range(count)]
        value, expr = Fraction(numbers[0]), str(numbers[0])
        for n in numbers[1:]:
            op = rng.choice("+-*/")
            value = {"+": value + n, "-": value - n, "*": value * n, "/": value / n}[op]
            expr = f"({expr}) {op} {n}" if op in "*/" and " " in expr else f"{expr} {op} {n}"
        if value.denominator == 1 and 1 <= value <= 200:
            shuffled = numbers[:]
            rng.shuffle(shuffled)
            return shuffled, int(value), expr


def countdown_prompt(numbers: list[int], target: int) -> str:
    return (f"Using the numbers {', '.join(map(str, numbers))}, each exactly once, and + - * / ( ), write an "
            f"expression equal to {target}. Write only the expression inside <answer></answer>.")


def countdown(num_eval: int = 100, seed: int = 0, num_train: int = 5000):
    """(train, held-out, [countdown_reward]): columns ``prompt``, ``numbers``, ``target``, ``solution``."""
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < num_train + num_eval:
        numbers, target, solution = make_puzzle(rng)
        key = (tuple(sorted(numbers)), target)
        if key not in seen:
            seen.add(key)
            rows.append({"prompt": countdown_prompt(numbers, target), "numbers": numbers, "target": target,
                         "solution": solution})
    return Dataset.from_list(rows[num_eval:]), Dataset.from_list(rows[:num_eval]), [countdown_reward]
