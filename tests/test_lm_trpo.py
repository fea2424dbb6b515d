"""``--update trpo`` on the tiny model: a step's measured KL (exact, whole vocabulary, on the step's
completions) is within --max-kl; the line search backs off when the full step overshoots; a
rejected step leaves the weights alone; the value head is fitted by its own AdamW step; bad flags
are one-line errors; the tiny model learns the toy reward."""

from __future__ import annotations

import copy

import pytest
import torch

import pg_lm.core.natural as natural
from lm_fixtures import learns_digits, make_config, make_trainer, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # see lm_fixtures.one_thread


def unwrap(tr):
    return tr.acc.unwrap_model(tr.policy)


def step_with_batch(tr):
    """(the step's statistics, its rollout, the policy as it was before the step)."""
    before, seen = copy.deepcopy(unwrap(tr)), []
    update = tr.update
    tr.update = lambda batch, adv, returns: (seen.append(batch), update(batch, adv, returns))[1]
    stats = tr.train_step()
    return stats, seen[0], before


@torch.no_grad()
def measured_kl(old_policy, policy, batch, temperature=1.0) -> float:
    """Mean over completion tokens of the exact KL(π_old || π) at each position, computed here."""
    def logq(p):
        p.eval()
        logits, _ = p.completion_logits(batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                        batch.completion_mask, batch.group_size)
        return torch.log_softmax(logits.float() / temperature, -1)  # (B, T, V)

    old, new = logq(old_policy), logq(policy)
    kl = (old.exp() * (old - new)).sum(-1)  # (B, T)
    m = batch.completion_mask.bool()
    return float(kl[m].mean())


@pytest.mark.parametrize("kw", [{}, {"lora_r": 4}, {"estimator": "gae"}], ids=["full", "lora", "gae"])
def test_a_step_moves_the_weights_and_stays_within_max_kl(tiny_lm_dir, tmp_path, kw):
    tr = make_trainer(tiny_lm_dir, tmp_path, update="trpo", max_kl=0.01, **kw)
    stats, batch, before = step_with_batch(tr)
    assert stats["policy/step_fraction"] > 0 and stats["policy/surrogate_gain"] > 0
    kl = measured_kl(before, unwrap(tr), batch)
    assert 0 < kl <= 0.01 * (1 + 1e-4)
    assert kl == pytest.approx(stats["policy/kl"], rel=1e-3, abs=1e-7)
    moved = {n for n, p in unwrap(tr).named_parameters() if not torch.equal(p, dict(before.named_parameters())[n])}
    trainable = {n for n, p in unwrap(tr).named_parameters() if p.requires_grad}
    assert moved and moved <= trainable  # LoRA: only the adapter (and the head) moved
    if kw.get("estimator") == "gae":  # the head by AdamW alone, the trunk by the natural step alone
        assert {"value_head.weight", "value_head.bias"} <= moved and stats["loss/value"] > 0
        stepped = {id(p) for p, s in tr.opt.state.items() if s}
        assert stepped == {id(p) for p in unwrap(tr).value_head.parameters()}


def test_the_line_search_backs_off_when_the_full_step_overshoots(tiny_lm_dir, tmp_path, monkeypatch):
    # no damping and a tiny bound: the quadratic model of the KL is far off for the full step
    tr = make_trainer(tiny_lm_dir, tmp_path, update="trpo", max_kl=1e-4, cg_damping=0.0, cg_iters=20,
                      line_search_steps=60, backtrack_ratio=0.7)
    tried, real = [], natural.backtracking_line_search

    def spy(evaluate, max_kl, steps, ratio):
        return real(lambda f: tried.append((f, *evaluate(f))) or tried[-1][1:], max_kl, steps, ratio)

    monkeypatch.setattr(natural, "backtracking_line_search", spy)
    stats, batch, before = step_with_batch(tr)
    assert tried[0][0] == 1.0 and tried[0][2] > 1e-4, "the full step overshoots"
    assert all(gain <= 0 or k > 1e-4 for _, gain, k in tried[:-1]), "each rejection had a reason"
    assert tried[-1][0] < 1.0 and stats["policy/step_fraction"] == pytest.approx(tried[-1][0])  # (logged in fp32)
    assert measured_kl(before, unwrap(tr), batch) <= 1e-4 * (1 + 1e-4)


def test_a_rejected_step_leaves_the_weights_alone(tiny_lm_dir, tmp_path, monkeypatch):
    tr = make_trainer(tiny_lm_dir, tmp_path, update="trpo")
    tried = []

    def reject_all(evaluate, max_kl, steps, ratio):
        tried.append(evaluate(1.0))  # moves the weights to the full step, then gives up
        return None

    monkeypatch.setattr(natural, "backtracking_line_search", reject_all)
    before = snapshot(unwrap(tr))
    stats = tr.train_step()
    assert tried and tried[0][1] > 0, "the full step was really tried"
    assert stats["policy/step_fraction"] == 0.0
    assert all(torch.equal(p, before[n]) for n, p in unwrap(tr).named_parameters())


@pytest.mark.parametrize("kw, fragment", [
    ({"max_kl": 0.0}, "--max-kl must be > 0"), ({"max_kl": -0.1}, "--max-kl must be > 0"),
    ({"cg_iters": 0}, "--cg-iters must be > 0"), ({"cg_damping": -1.0}, "--cg-damping must be >= 0"),
    ({"line_search_steps": 0}, "--line-search-steps must be > 0"),
    ({"backtrack_ratio": 1.0}, "--backtrack-ratio must be in (0, 1)"),
    ({"update": "trpo", "clip_low": 0.2}, "--update trpo takes one natural-gradient step on the whole rollout: --clip-low 0.2"),
    ({"update": "trpo", "ppo_epochs": 2}, "--ppo-epochs 2 does not apply"),
])
def test_bad_trpo_settings_are_clear_errors(tiny_lm_dir, tmp_path, kw, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        make_config(tiny_lm_dir, tmp_path, **kw)


@pytest.mark.parametrize("flags, fragment", [(["--max-kl", "0"], "--max-kl must be > 0"),
                                             (["--cg-iters", "0"], "--cg-iters must be > 0")])
def test_bad_trpo_flags_exit_2_with_one_line(tiny_lm_dir, tmp_path, capsys, flags, fragment):
    from pg_lm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["lm", "--model", tiny_lm_dir, "--output-dir", str(tmp_path), "--update", "trpo", *flags])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and fragment in err, err


def test_tiny_model_learns_to_write_digits_with_trpo(tiny_lm_dir, tmp_path):
    """As tests/test_lm_learning.py's RLOO case, each step a natural-gradient step of mean KL <= 0.1."""
    rows = learns_digits(tiny_lm_dir, tmp_path, update="trpo", max_kl=0.1)
    assert all(0 < r["policy/kl"] <= 0.1 * (1 + 1e-4) for r in rows)


@pytest.mark.two_process
def test_two_processes_take_the_step_one_process_takes_on_the_whole_batch(tiny_lm_dir, tmp_path):
    """DDP over gloo: each process holds half of a fixed batch; the gradient, the Fisher-vector
    products, the surrogate and the KL are sums over both, so the step (and the value head's AdamW
    step) is the one a single process takes on the whole batch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import dist_trpo_worker as worker

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    (tmp_path / "two").mkdir()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(root / "configs" / "accelerate" / "cpu_ddp.yaml"), "--num_processes", "2",
           str(Path(__file__).with_name("dist_trpo_worker.py")), tiny_lm_dir, str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    two = torch.load(tmp_path / "two" / "trpo_2.pt")
    (tmp_path / "one").mkdir()
    one = worker.main(tiny_lm_dir, str(tmp_path / "one"))
    assert two["stats"].keys() == one["stats"].keys()
    for key in one["stats"]:  # every logged number is the whole batch's
        assert two["stats"][key] == pytest.approx(one["stats"][key], rel=1e-4, abs=1e-7), key
    assert 0 < one["stats"]["policy/kl"] <= 0.01 * (1 + 1e-4)
    for name, w in one["weights"].items():
        step = w - one["before"][name]
        assert torch.equal(two["before"][name], one["before"][name])
        # the same step, up to summation order: conjugate gradient amplifies rounding a little
        assert (two["weights"][name] - w).abs().max() <= 1e-3 * step.abs().max() + 1e-8, name
        assert name.startswith("value_head") or step.abs().max() > 0, name
