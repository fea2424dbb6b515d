"""Two small games for multi-turn training: guess a number with higher / lower feedback, and
three-digit arithmetic with a calculator the model calls in plain text."""

from __future__ import annotations

import ast
import operator
import random
import re

_INT = re.compile(r"-?\d+")


class GuessNumber:
    """Guess a secret number in 1..``high`` with "higher" / "lower" feedback.

    Reward 1.0 on the turn the guess is right (terminated), 0.0 otherwise; an answer without a
    number is told so and costs the turn. Binary search needs at most ``ceil(log2(high + 1))``
    turns (4 for 1..15); a random guess each turn wins about ``turns / high`` of the episodes.

    >>> env = GuessNumber(high=15)
    >>> env.reset(seed=3)[:38]
    'I am thinking of a number from 1 to 15'
    >>> env.secret
    4
    >>> env.step("8")[:3], env.step("My guess is 4.")[1:3]
    (('Lower.', 0.0, False), (1.0, True))
    """

    def __init__(self, high: int = 15):
        self.high = high
        self.secret = None

    def reset(self, *, seed: int, row: dict | None = None) -> str:
        self.secret = random.Random(seed).randint(1, self.high)
        return (f"I am thinking of a number from 1 to {self.high}. Guess it: answer with one number. "
                "I will say higher or lower.")

    def step(self, action: str):
        found = _INT.findall(action)
        if not found:
            return f"Answer with one number from 1 to {self.high}.", 0.0, False, False, {"parsed": False}
        guess = int(found[-1])
        if guess == self.secret:
            return "", 1.0, True, False, {"parsed": True}
        return ("Higher." if guess < self.secret else "Lower."), 0.0, False, False, {"parsed": True}


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def calculate(expression: str) -> int | None:
    """The value of an integer expression of + - * and parentheses, or None (anything else).

    >>> calculate("347 * 28"), calculate("(2 + 3) * 4"), calculate("__import__('os')"), calculate("2 ** 99")
    (9716, 20, None, None)
    """
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError
    try:
        return value(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ValueError, RecursionError):
        return None


class ToolArithmetic:
    """Three-digit arithmetic a 135M model cannot do in its head, with a calculator it calls in text.

    The model writes ``CALC: <expression>`` to get ``RESULT: <value>`` back as the next observation,
    and ``ANSWER: <number>`` to answer: reward 1.0 when right (terminated), 0.0 when wrong
    (terminated). Anything else is told the protocol and costs the turn.

    >>> env = ToolArithmetic()
    >>> env.reset(seed=1).split("?")[0]
    'What is 237 + 682'
    >>> env.step("CALC: 237 + 682")[0], env.step("ANSWER: 919")[1:3]
    ('RESULT: 919', (1.0, True))
    """

    PROTOCOL = "Write CALC: <expression> to use the calculator, or ANSWER: <number> to answer."

    def __init__(self, ops: str = "+*"):
        self.ops, self.answer = ops, None

    def reset(self, *, seed: int, row: dict | None = None) -> str:
        rng = random.Random(seed)
        a, b, op = rng.randint(100, 999), rng.randint(100, 999), rng.choice(self.ops)
        self.answer = a + b if op == "+" else a * b
        return f"What is {a} {op} {b}? {self.PROTOCOL}"

    def step(self, action: str):
        answer = re.search(r"ANSWER:\s*(-?[\d,]+)", action)
        if answer:
            right = int(answer.group(1).replace(",", "")) == self.answer
            return "", float(right), True, False, {"tool_calls": 0}
        calc = re.search(r"CALC:\s*([0-9+\-*() ]+)", action)
        if calc:
            result = calculate(calc.group(1))
            return (f"RESULT: {result}" if result is not None else "The calculator takes + - * and numbers."), \
                0.0, False, False, {"tool_call": calc.group(1).strip()}
        return self.PROTOCOL, 0.0, False, False, {}
