"""Reward functions: validation (every bad output names the function and the sample),
placement of scalar / dense rewards, weighted combination, and the reward-model adapter."""

from __future__ import annotations

import math

import pytest
import torch

from pg_lm.lm.rewards import RewardError, RewardModel, RewardSet, call_reward

pytestmark = pytest.mark.usefixtures("one_thread")  # see lm_fixtures.one_thread

PROMPTS = ["p0", "p1", "p2"]
COMPLETIONS = ["aa", "bbbb", "c"]
LENGTHS = [2, 4, 1]


def named(name, fn):
    fn.__name__ = name
    return fn


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "out, sample_idx, fragment",
    [
        ([1.0, 2.0], None, "returned 2 values for 3 completions"),
        ([1.0, float("nan"), 0.0], 1, "nan"),
        ([1.0, 0.0, float("inf")], 2, "inf"),
        ([1.0, "good", 0.0], 1, "'good'"),
        ([[0.0, 1.0], [0.0, None, 0.0, 0.0], [0.0]], 1, "None"),  # None is "not applicable" for a whole completion only
        ([[0.0, 1.0], [1.0, 2.0, 3.0], [0.0]], 1, "3 per-token rewards"),  # sample 1 has 4 tokens
        ([[0.0, 1.0], [0.0] * 4, [0.0, float("nan")]], 2, "nan"),
        (None, None, "NoneType"),
        (3.0, None, "float"),
    ],
    ids=["count", "nan", "inf", "string", "dense-none", "dense-length", "dense-nan", "returns-none", "returns-scalar"],
)
def test_bad_reward_output_names_function_and_sample(out, sample_idx, fragment):
    fn = named("my_broken_reward", lambda prompts, completions, **_: out)
    with pytest.raises(RewardError) as info:
        call_reward(fn, PROMPTS, COMPLETIONS, {}, LENGTHS)
    msg = str(info.value)
    assert "my_broken_reward" in msg
    assert fragment in msg
    if sample_idx is not None:
        assert f"sample {sample_idx}" in msg


def test_raising_reward_is_wrapped_with_its_name():
    def exploding_reward(prompts, completions, **_):
        raise KeyError("answer")

    with pytest.raises(RewardError, match=r"exploding_reward.*KeyError.*answer") as info:
        call_reward(exploding_reward, PROMPTS, COMPLETIONS, {}, LENGTHS)
    assert isinstance(info.value.__cause__, KeyError)  # the user's traceback is kept


def test_callable_object_is_named_by_its_class():
    class LengthScorer:
        def __call__(self, prompts, completions, **_):
            return [1.0]

    with pytest.raises(RewardError, match="LengthScorer"):
        call_reward(LengthScorer(), PROMPTS, COMPLETIONS, {}, LENGTHS)


def test_columns_reach_the_reward_function():
    seen = {}

    def check_answer(prompts, completions, answer, **rest):
        seen.update(prompts=prompts, answer=answer, rest=rest)
        return [float(c == a) for c, a in zip(completions, answer)]

    dense = call_reward(check_answer, PROMPTS, COMPLETIONS, {"answer": ["aa", "x", "c"], "id": [0, 1, 2]}, LENGTHS)
    assert seen == {"prompts": PROMPTS, "answer": ["aa", "x", "c"], "rest": {"id": [0, 1, 2]}}
    assert dense.sum(1).tolist() == [1.0, 0.0, 1.0]


# ---------------------------------------------------------------- placement


def test_scalar_reward_lands_on_the_last_token():
    fn = lambda prompts, completions, **_: [1.5, -2.0, 3]  # an int is a number too
    dense = call_reward(fn, PROMPTS, COMPLETIONS, {}, LENGTHS)
    want = torch.tensor([[0, 1.5, 0, 0], [0, 0, 0, -2.0], [3.0, 0, 0, 0]])
    torch.testing.assert_close(dense, want)


def test_dense_rewards_land_on_their_tokens():
    fn = lambda prompts, completions, **_: [[1.0, 2.0], (3.0, 4.0, 5.0, 6.0), [7.0]]
    dense = call_reward(fn, PROMPTS, COMPLETIONS, {}, LENGTHS)
    want = torch.tensor([[1.0, 2.0, 0, 0], [3.0, 4.0, 5.0, 6.0], [7.0, 0, 0, 0]])
    torch.testing.assert_close(dense, want)


def test_mixed_scalar_and_dense_rows():
    fn = lambda prompts, completions, **_: [0.5, [1.0, 0.0, 0.0, 2.0], 4.0]
    dense = call_reward(fn, PROMPTS, COMPLETIONS, {}, LENGTHS)
    torch.testing.assert_close(dense, torch.tensor([[0, 0.5, 0, 0], [1.0, 0, 0, 2.0], [4.0, 0, 0, 0]]))


def test_numpy_and_tensor_outputs_are_accepted():
    np = pytest.importorskip("numpy")
    as_tensor = lambda prompts, completions, **_: torch.tensor([1.0, 2.0, 3.0])  # (B,) tensor
    as_numpy = lambda prompts, completions, **_: np.array([1.0, 2.0, 3.0], dtype=np.float32)
    dense_tensor = lambda prompts, completions, **_: [torch.ones(2), torch.ones(4), torch.ones(1)]
    for fn in (as_tensor, as_numpy):
        torch.testing.assert_close(call_reward(fn, PROMPTS, COMPLETIONS, {}, LENGTHS).sum(1), torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(call_reward(dense_tensor, PROMPTS, COMPLETIONS, {}, LENGTHS).sum(1),
                               torch.tensor([2.0, 4.0, 1.0]))


def test_reward_set_weights_and_reports_each_function():
    ones = named("ones", lambda prompts, completions, **_: [1.0] * len(completions))
    per_token = named("per_token", lambda prompts, completions, **_: [[0.5] * n for n in LENGTHS])
    per_fn, dense = RewardSet([ones, per_token], weights=[2.0, -1.0]).score(PROMPTS, COMPLETIONS, {}, LENGTHS)
    assert set(per_fn) == {"ones", "per_token"}
    torch.testing.assert_close(per_fn["ones"], torch.tensor([1.0, 1.0, 1.0]))  # unweighted, per function
    torch.testing.assert_close(per_fn["per_token"], torch.tensor([1.0, 2.0, 0.5]))
    want = torch.tensor([[-0.5, 1.5, 0, 0], [-0.5, -0.5, -0.5, 1.5], [1.5, 0, 0, 0]])
    torch.testing.assert_close(dense, want)
    torch.testing.assert_close(dense.sum(1), 2.0 * per_fn["ones"] - per_fn["per_token"])


def test_reward_set_keeps_functions_with_the_same_name_apart():
    """Two closures from one factory share a __name__: neither may hide the other."""
    from pg_lm.tasks import format_reward

    a, b = format_reward(r"^a"), format_reward(r"^b")
    per_fn, dense = RewardSet([a, b]).score(PROMPTS, COMPLETIONS, {}, LENGTHS)
    assert len(per_fn) == 2
    assert sorted(float(v.sum()) for v in per_fn.values()) == [1.0, 1.0]
    torch.testing.assert_close(dense.sum(1), torch.tensor([1.0, 1.0, 0.0]))


def test_reward_set_rejects_bad_weights_and_no_functions():
    with pytest.raises(ValueError, match="at least one"):
        RewardSet([])
    with pytest.raises(ValueError, match="1 reward weights for 2"):
        RewardSet([len, len], weights=[1.0])


# ---------------------------------------------------------------- the reward-model adapter


def test_reward_model_gives_one_finite_float_per_completion(tiny_rm_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    prompts = ["What is 2 + 2?", "hi", "a much longer prompt than the others"]
    completions = ["4", "hello there, friend", ""]
    rm = RewardModel(tiny_rm_dir, batch_size=2, name="tiny_rm")
    scores = rm(prompts, completions)
    assert len(scores) == 3 and all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert len(set(scores)) == 3  # the model reads the text

    # batching and padding do not change a score: each one equals the unpadded forward pass
    tok = AutoTokenizer.from_pretrained(tiny_rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir).eval()
    with torch.no_grad():
        ref = [float(model(**tok(p + c, return_tensors="pt")).logits[0, 0]) for p, c in zip(prompts, completions)]
    assert scores == pytest.approx(ref, abs=1e-5)
    assert RewardModel(model, tok, batch_size=16)(prompts, completions) == pytest.approx(ref, abs=1e-5)

    # inside a RewardSet, by its name, with a weight
    per_fn, dense = RewardSet([rm], weights=[0.5]).score(prompts, completions, {}, lengths=[1, 19, 1])
    assert list(per_fn) == ["tiny_rm"]
    torch.testing.assert_close(per_fn["tiny_rm"], torch.tensor(ref), atol=1e-5, rtol=0)
    torch.testing.assert_close(dense[1, 18], torch.tensor(0.5 * ref[1]), atol=1e-5, rtol=0)


def test_reward_model_object_needs_a_tokenizer(tiny_rm_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir)
    with pytest.raises(ValueError, match="tokenizer"):
        RewardModel(model)


def test_reward_model_truncation_keeps_the_completion(tiny_rm_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir).eval()
    rm = RewardModel(model, tok, max_length=12)
    prompt = "a long prompt that does not fit in twelve tokens"
    a, b = rm([prompt, prompt], ["answer: yes", "answer: no!"])
    assert a != b  # the completions decide the score even when the text is cut
    with torch.no_grad():
        want = float(model(input_ids=torch.tensor([tok(prompt + "answer: yes")["input_ids"][-12:]])).logits[0, 0])
    assert a == pytest.approx(want, abs=1e-5)
    assert tok.truncation_side == "right"  # the caller's tokenizer is left as it was


def test_reward_model_with_a_chat_template_adds_no_second_bos(tiny_rm_dir):
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_rm_dir)
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    tok.chat_template = "<s>{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # this tokenizer adds BOS by itself
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir).eval()
    got = RewardModel(model, tok)(["hi", "what?"], ["ok", "no"])
    with torch.no_grad():
        want = [float(model(input_ids=torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])).logits[0, 0])
                for t in ("<s>u:hi\na:ok\n", "<s>u:what?\na:no\n")]
    assert got == pytest.approx(want, abs=1e-5)
