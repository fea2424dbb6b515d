"""A formatting task: the answer must sit inside a required tag.

"Which is larger, 37 or 52? Write only the answer inside <answer></answer>." The reward is 1.0 for
exactly one ``<answer>...</answer>`` holding the right number, 0.2 for the tag around a wrong
answer (the format learned first), 0.0 without the tag, however right the answer around it.

>>> tagged_answer(["p"] * 4, ["<answer>52</answer>", "<answer>37</answer>", "52", "<answer>52</answer><answer>52</answer>"],
...               answer=["52"] * 4)
[1.0, 0.2, 0.0, 0.0]
"""

from __future__ import annotations

import random

from datasets import Dataset

from .simple import tag_text

TAG = "answer"


def tagged_answer(prompts, completions, answer, **_) -> list[float]:
    """1.0: the right answer inside the one tag; 0.2: the tag around another answer; 0.0: no single tag."""
    out = []
    for c, a in zip(completions, answer):
        inside = tag_text(c, TAG)
        out.append(0.0 if inside is None else 1.0 if inside == str(a) else 0.2)
    return out


def tagged(num_eval: int = 100, seed: int = 0):
    """(train, held-out, [tagged_answer]): "Which is larger, a or b?" over distinct pairs 10..99; columns
    ``prompt``, ``answer``."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100) if a != b]
    random.Random(seed).shuffle(pairs)
    rows = lambda ps: {"prompt": [f"Which is larger, {a} or {b}? Write only the answer inside <{TAG}></{TAG}>."
                                  for a, b in ps], "answer": [str(max(a, b)) for a, b in ps]}
    return Dataset.from_dict(rows(pairs[num_eval:])), Dataset.from_dict(rows(pairs[:num_eval])), [tagged_answer]
