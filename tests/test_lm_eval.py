"""Evaluation (the trainer's and ``pg-lm eval``'s, one code path): greedy reward and accuracy, pass@k,
lengths, the fraction cut at the limit (with a warning), a budget that defaults to the training one;
``pg-lm export`` merges a LoRA adapter into a standard folder with the same logits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lm_fixtures import make_trainer, prompt_dataset, read_jsonl
from pg_lm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # see lm_fixtures.one_thread

REWARD_FILE = '''
def has_digit(prompts, completions, **_):
    return [float(any(ch.isdigit() for ch in c)) for c in completions]
'''


def has_digit(prompts, completions, **_):
    return [float(any(ch.isdigit() for ch in c)) for c in completions]


def test_eval_budget_defaults_to_the_training_one():
    from pg_lm.lm import LMConfig

    assert LMConfig(max_new_tokens=7).eval_tokens == 7
    assert LMConfig(max_new_tokens=7, eval_max_new_tokens=3).eval_tokens == 3


def test_pass_at_k_and_the_greedy_metrics_agree_with_the_samples(tiny_lm_dir, tmp_path):
    from pg_lm.lm.evaluate import evaluate_prompts

    tr = make_trainer(tiny_lm_dir, tmp_path, reward_fns=[has_digit], max_new_tokens=5, eval_max_new_tokens=None,
                      eval_samples=6, pass_at=[1, 3, 6], temperature=1.5, eval_size=None, eval_batch_size=3)
    ds = prompt_dataset(["ab", "cde", "f", "ghij"])
    samples = []
    lm, context = tr.sampling_lm()
    out = evaluate_prompts(lm, tr.tok, tr.rewards, ds, tr.cfg, tr.cfg.eval_tokens, context=context, samples=samples)
    greedy = [s for s in samples if s["kind"] == "greedy"]
    sampled = [s for s in samples if s["kind"] == "sampled"]
    assert len(greedy) == 4 and len(sampled) == 4 * 6
    assert max(s["length"] for s in samples) <= 5 and any(s["length"] == 5 for s in samples)  # the training budget
    assert out["eval/reward"] == pytest.approx(sum(s["reward"] for s in greedy) / 4)
    assert out["eval/accuracy"] == pytest.approx(sum(s["reward"] >= 1 for s in greedy) / 4)
    assert out["eval/length"] == pytest.approx(sum(s["length"] for s in greedy) / 4)
    assert out["eval/truncated_frac"] == pytest.approx(sum(s["truncated"] for s in greedy) / 4)
    correct = [sum(s["reward"] >= 1 for s in sampled[6 * i : 6 * i + 6]) for i in range(4)]
    for k in (1, 3, 6):
        expected = sum(1 - math.comb(6 - c, k) / math.comb(6, k) for c in correct) / 4
        assert out[f"eval/pass@{k}"] == pytest.approx(expected)
    assert 0 < sum(correct) < 24  # the check above met both right and wrong completions


def test_a_run_whose_evaluation_cuts_completions_says_so(tiny_lm_dir, tmp_path, capsys):
    tr = make_trainer(tiny_lm_dir, tmp_path, eval_dataset=prompt_dataset(["ab", "cd"]), eval_max_new_tokens=1)
    summary = tr.train()
    assert summary["eval/truncated_frac_after"] > 0.1
    assert summary["warnings"][0].startswith("warning: the evaluation cut")
    assert "--eval-max-new-tokens 1 tokens" in capsys.readouterr().out


@pytest.fixture(scope="module")
def lora_run(tiny_lm_dir, tmp_path_factory):
    """A one-step LoRA run on the tiny model (lr high enough that the adapter moves the logits)."""
    from accelerate.state import AcceleratorState

    out = tmp_path_factory.mktemp("lora_run")
    AcceleratorState._reset_state(True)
    torch.set_num_threads(1)
    make_trainer(tiny_lm_dir, out, lora_r=4, lr=5e-2, max_new_tokens=5, eval_max_new_tokens=None).train()
    return out


def test_export_merges_the_adapter_with_the_same_logits(lora_run, tiny_lm_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "exported"
    assert main(["export", str(lora_run / "checkpoint-last"), str(out)]) == 0
    assert (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm_dir),
                                             lora_run / "checkpoint-last").eval()
    ids = AutoTokenizer.from_pretrained(out)("Q:12+34\nA:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got, want, before = merged(ids).logits, with_adapter(ids).logits, base(ids).logits
    assert (want - before).abs().max() > 1e-3  # the adapter changes the logits...
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # ...and the merged model has them


def test_pg_lm_eval_on_a_trained_adapter_with_a_dataset_and_a_reward_file(lora_run, tmp_path, capsys):
    (tmp_path / "r.py").write_text(REWARD_FILE)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"q": f"{a}+1="}) + "\n" for a in range(5)))
    out = tmp_path / "eval"
    code = main(["eval", "--adapter", str(lora_run), "--dataset", str(tmp_path / "d.jsonl"), "--prompt-column", "q",
                 "--reward", f"{tmp_path}/r.py:has_digit", "--eval-samples", "3", "--output-dir", str(out)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads((out / "eval.json").read_text())
    assert printed == result and result["prompts"] == 5 and result["max_new_tokens"] == 5  # the run's budget
    assert {"eval/reward", "eval/accuracy", "eval/length", "eval/truncated_frac", "eval/pass@1", "eval/pass@3",
            "eval/has_digit"} <= set(result)
    rows = read_jsonl(out / "eval_samples.jsonl")
    assert len(rows) == 5 * (1 + 3) and {r["prompt"] for r in rows} == {f"{a}+1=" for a in range(5)}


def test_pg_lm_eval_loads_an_exported_model_and_a_task(lora_run, tmp_path, capsys):
    exported = tmp_path / "exported"
    assert main(["export", str(lora_run), str(exported)]) == 0  # the run folder: its checkpoint-last
    code = main(["eval", "--model", str(exported), "--task", "arithmetic", "--eval-size", "3",
                 "--eval-max-new-tokens", "4", "--output-dir", str(tmp_path / "eval")])
    assert code == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["prompts"] == 3 and result["max_new_tokens"] == 4 and "eval/exact_match" in result


@pytest.mark.parametrize("argv, fragment", [
    (["eval", "--adapter", "{d}/none"], "error: --adapter {d}/none: no such folder"),
    (["eval"], "give --model, --adapter RUN_DIR/checkpoint-last, or both"),
    (["export", "{d}/none", "{d}/out"], "error: checkpoint {d}/none: no such folder"),
    (["export", "{run}", "{run}"], "error: {run} exists and is not empty; choose a new folder"),
])
def test_bad_eval_and_export_input_is_one_line_exit_2(argv, fragment, lora_run, tmp_path, capsys, monkeypatch):
    import pg_lm.lm.export as export

    monkeypatch.setattr(export, "load_trained", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = [a.format(d=tmp_path, run=lora_run) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.strip().count("\n") == 0, err
    assert fragment.format(d=tmp_path, run=lora_run) in err, err


def test_an_adapter_that_does_not_fit_the_base_is_one_line(lora_run, tiny_gpt2_dir, tmp_path, capsys):
    code = main(["eval", "--model", tiny_gpt2_dir, "--adapter", str(lora_run), "--eval-size", "1",
                 "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error" in ln]  # (the base model loads first: its progress bar)
    assert code == 2 and "Traceback" not in err and errors == [
        f"error: --adapter {lora_run}/checkpoint-last does not match the base model {tiny_gpt2_dir}: the modules it "
        "adapts are not in the base model"], err


def test_the_documented_three_commands_work(tiny_lm_dir, tmp_path, monkeypatch, capsys):
    """docs/data-and-rewards.md's first commands, JSONL and reward file, as a user copies them (plus a tiny
    model and budget): train on a JSONL with a reward file, evaluate, export."""
    import re
    import shlex
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    doc = (Path(__file__).resolve().parents[1] / "docs" / "data-and-rewards.md").read_text()
    commands = re.search(r"```bash\n(.*?)```", doc, re.S).group(1)
    rows = re.search(r"```json\n(.*?)```", doc, re.S).group(1).strip().splitlines()
    (tmp_path / "data.jsonl").write_text("\n".join(rows * 5) + "\n")  # 10 rows: one held out at 0.1
    (tmp_path / "test.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "my_rewards.py").write_text(re.search(r"```python\n(.*?)```", doc, re.S).group(1))
    monkeypatch.chdir(tmp_path)
    tiny = {"lm": ["--model", tiny_lm_dir, "--max-steps", "1", "--prompts-per-step", "2", "--samples-per-prompt", "2",
                   "--max-new-tokens", "4", "--progress", "false", "--mixed-precision", "no"],
            "eval": ["--output-dir", "runs/eval"], "export": []}
    lines = [shlex.split(ln.split("#")[0]) for ln in commands.strip().splitlines()]
    assert [ln[:2] for ln in lines] == [["pg-lm", "lm"], ["pg-lm", "eval"], ["pg-lm", "export"]]
    for argv in lines:
        assert main(argv[1:] + tiny[argv[1]]) == 0, argv
    assert json.loads((tmp_path / "runs" / "eval" / "eval.json").read_text())["prompts"] == 2
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "exported").config.vocab_size > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reward_model_and_evaluation_run_on_the_gpu(lora_run, tiny_lm_dir, tiny_rm_dir, tmp_path):
    """On a GPU the reward model scores on the trainer's device, and pg-lm eval samples there (bf16 autocast)."""
    from pg_lm.lm import RewardModel

    tr = make_trainer(tiny_lm_dir, tmp_path / "t", reward_fns=[RewardModel(tiny_rm_dir)])
    assert next(tr.rewards.fns[0].model.parameters()).device.type == "cuda"
    _, stats = tr.rollout()
    assert torch.isfinite(torch.tensor(stats["reward/reward_model"].item()))
    out = tmp_path / "eval"
    assert main(["eval", "--adapter", str(lora_run), "--reward-model", tiny_rm_dir, "--eval-size", "3",
                 "--eval-samples", "2", "--output-dir", str(out), "--dataset", str(_jsonl(tmp_path))]) == 0
    assert json.loads((out / "eval.json").read_text())["prompts"] == 3


def _jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["ab", "cd", "ef"]))
    return path


def test_export_of_a_full_checkpoint_drops_the_trainer_state(tiny_lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "full"
    make_trainer(tiny_lm_dir, run, lr=5e-2).train()
    out = tmp_path / "exported"
    assert main(["export", str(run), str(out)]) == 0
    assert (run / "checkpoint-last" / "trainer_state.pt").exists() and not (out / "trainer_state.pt").exists()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out)(ids).logits
        want = AutoModelForCausalLM.from_pretrained(run / "checkpoint-last")(ids).logits
        before = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)(ids).logits
    assert (want - before).abs().max() > 1e-3
    torch.testing.assert_close(got, want)
