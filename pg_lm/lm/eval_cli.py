"""``pg-lm eval``: evaluate a model, or what a run trained, on a task or your dataset and rewards.

    pg-lm eval --adapter runs/lm/checkpoint-last --dataset test.jsonl --reward my_rewards.py:correct --eval-samples 8

Greedy completions give the mean reward, accuracy (total reward >= --pass-threshold), mean length
and the fraction cut at the token limit; --eval-samples n sampled completions per prompt give
pass@k. With ``--env`` it plays held-out episodes instead (one greedy episode per seed: success, mean
return, turns; --eval-samples n sampled episodes per seed give pass@k over episodes):

    pg-lm eval --adapter runs/guess/checkpoint-last --env guess --max-turns 4 --eval-size 200

The same code evaluates during training (pg_lm/lm/evaluate.py). Prints the result as JSON and writes
``eval.json`` and ``eval_samples.jsonl`` to --output-dir.
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from pg_lm.run import parse_config

from .config import EvalConfig, LMConfig
from .rewards import RewardError


def eval_prompts_and_rewards(cfg: EvalConfig):
    """(dataset, reward functions, weights): ``--dataset`` with ``--reward`` / ``--reward-model``, or the
    task's held-out prompts and reward. Checked before any model is loaded."""
    from pg_lm.tasks import TASKS

    from .data import load_prompts
    from .reward_specs import rewards_from_config

    fns, weights = rewards_from_config(cfg)
    if cfg.dataset:
        if not fns:
            raise ValueError("--dataset needs a reward: --reward path/to/file.py:function (or module:function, or a "
                             "built-in), or --reward-model")
        return load_prompts(cfg.dataset, cfg.split, cfg.prompt_column, "evaluation"), fns, weights
    _, held_out, task_fns = TASKS[cfg.task](num_eval=cfg.eval_size or 100, seed=0)
    return held_out, fns or task_fns, weights


def what_to_evaluate(cfg: EvalConfig):
    """(the --env's environment maker or None, the prompts or None, the RewardSet or None), checked
    before any model loads. An environment scores its episodes (reward functions, if given, add a
    final reward); prompts need reward functions (a task's, or --reward's)."""
    from pg_lm.envs import load_env

    from .data import check_dataset
    from .reward_specs import rewards_from_config
    from .rewards import RewardSet

    if cfg.env is not None:
        fns, weights = rewards_from_config(cfg)
        return load_env(cfg.env), None, RewardSet(fns, weights, timeout=cfg.reward_timeout) if fns else None
    dataset, fns, weights = eval_prompts_and_rewards(cfg)
    rewards = RewardSet(fns, weights, timeout=cfg.reward_timeout)
    check_dataset(dataset, "evaluation")
    rewards.check_columns(dataset.column_names, "evaluation")
    return None, dataset, rewards


def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate as ``cfg`` says; returns (and writes) the result."""
    from .episodes import check_template
    from .evaluate import evaluate_episodes, evaluate_prompts, truncation_warning
    from .export import find_checkpoint, is_adapter, load_trained, run_config
    from .rewards import RewardModel
    from .sampling import fit_prompts

    make_env, dataset, rewards = what_to_evaluate(cfg)
    adapter = find_checkpoint(cfg.adapter, "--adapter") if cfg.adapter else None
    if adapter is not None and not is_adapter(adapter):
        raise ValueError(f"--adapter {cfg.adapter} holds a full model, not a LoRA adapter: pass it as --model")
    trained = adapter or (Path(cfg.model) if Path(cfg.model).is_dir() else None)
    run = run_config(trained) if trained is not None else {}  # the evaluation's budget defaults to the run's
    max_new_tokens = (cfg.eval_max_new_tokens or run.get("eval_max_new_tokens") or run.get("max_new_tokens")
                      or LMConfig.max_new_tokens)
    torch.manual_seed(cfg.seed)
    lm, tok = load_trained(cfg.model, adapter)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lm.to(device)
    for fn in rewards.fns if rewards else ():
        if isinstance(fn, RewardModel):
            fn.model.to(device)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    context = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext
    samples: list = []
    if dataset is None:
        delta = check_template(tok, cfg.model or str(adapter), cfg.system_prompt)
        metrics = evaluate_episodes(lm, tok, make_env, delta, cfg, max_new_tokens, context=context, rewards=rewards,
                                    samples=samples)
        size = {"env": cfg.env, "episodes": cfg.eval_size if cfg.eval_size is not None else 100}
    else:
        dataset, note = fit_prompts(dataset, tok, cfg.chat_template, cfg.max_prompt_length, cfg.long_prompts,
                                    "evaluation", cfg.system_prompt)
        if note:
            print(note, file=sys.stderr)
        metrics = evaluate_prompts(lm, tok, rewards, dataset, cfg, max_new_tokens, context=context, samples=samples)
        size = {"prompts": len(dataset) if cfg.eval_size is None else min(cfg.eval_size, len(dataset))}
    result = {"model": cfg.model, "adapter": str(adapter) if adapter else None, **size,
              "max_new_tokens": max_new_tokens, "eval_samples": cfg.eval_samples, **metrics}
    warning = truncation_warning(metrics, max_new_tokens, "--eval-max-new-tokens") if dataset is not None else None
    if warning:
        result["warnings"] = [warning]
        print(warning, file=sys.stderr)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(out / "eval_samples.jsonl", "w") as f:
        for row in samples:
            f.write(json.dumps(row) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(EvalConfig, argv, prog="pg-lm eval")
    try:
        result = run_eval(cfg)
    except (ValueError, RewardError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
