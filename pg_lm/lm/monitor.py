"""Saying when a run has stopped learning.

Under a group baseline (RLOO, GRPO, ...) a group whose G samples all got the same reward has
advantage 0 on every token: it teaches nothing. When the policy settles on one answer -- the right
one, or a near miss worth partial credit -- every group soon looks like that, every advantage is 0,
and training goes on without changing anything (the entropy collapse of DAPO, Yu et al. 2025). The
metrics show it (``reward/zero_spread_frac`` near 1, ``completion/distinct_frac`` falling), but a
progress bar does not. :func:`watch` counts the steps in a row without a learning signal and, once
there have been ``--collapse-steps`` of them, gives one verdict: ``solved`` when every sample reaches
``--pass-threshold``, else ``collapsed``, with a warning that says what usually helps.
"""

from __future__ import annotations

# a step has no learning signal when at least this fraction of its groups has no reward spread
NO_SIGNAL_FRAC = 0.95

# in the order of pg_lm's measurements over six tasks x three seeds (BENCHMARKS.md section 12)
HELP = ("what usually helps: dynamic sampling (--dynamic-sampling true, more --max-sampling-rounds), clip-higher on "
        "a reused rollout (--num-minibatches 4 --clip-low 0.2 --clip-high 0.28), a lower --lr, or a denser reward "
        "(partial credit on the way); an entropy bonus or a higher --temperature did worse there")


def no_signal(stats: dict) -> bool:
    """Whether a step's metrics show no learning signal: (nearly) every group without a reward spread
    (with dynamic sampling: (nearly) every trained group a filler without spread); without groups, no
    row trained."""
    if "reward/zero_spread_frac" not in stats:
        return stats.get("perf/trained_frac", 1.0) == 0.0
    frac = stats.get("sampling/filler_frac", stats["reward/zero_spread_frac"])
    return frac >= NO_SIGNAL_FRAC


def watch(state, stats: dict, window: int) -> str | None:
    """Count the step's verdict in the train ``state`` (``no_signal_steps``: steps in a row without a
    learning signal); the first time the count reaches ``window`` (0: never), return ``"solved"``
    (every sample of the step at ``--pass-threshold``: ``reward/solved_frac`` 1) or ``"collapsed"``;
    else None. ``stats`` gains ``health/no_signal_steps`` and ``health/collapsed`` (1 from the
    verdict on, while the signal stays away and the task is not solved)."""
    state.no_signal_steps = state.no_signal_steps + 1 if no_signal(stats) else 0
    solved = stats.get("reward/solved_frac", 0.0) >= 1.0
    stuck = bool(window) and state.no_signal_steps >= window
    stats.update({"health/no_signal_steps": state.no_signal_steps, "health/collapsed": float(stuck and not solved)})
    if not window or state.no_signal_steps != window:
        return None
    return "solved" if solved else "collapsed"


def message(verdict: str, stats: dict, step: int, window: int) -> str:
    """The one line the console prints and ``summary.json`` keeps for a verdict of :func:`watch`."""
    if verdict == "solved":
        return (f"step {step}: solved: every sample reached --pass-threshold for the last {window} steps "
                f"(mean reward {stats['reward/mean']:.3f}); further steps add nothing")
    detail = ", ".join(f"{name} {stats[key]:.3f}" for key, name in (
        ("policy/entropy", "entropy"), ("completion/distinct_frac", "distinct completions per group"))
        if key in stats)
    head = f"warning: step {step}: no learning signal for the last {window} steps -- "
    if stats["reward/mean"] == 0.0 and stats.get("reward/std", 0.0) == 0.0:  # nothing has scored: nothing to settle on
        return (head + f"no sample earned any reward{' (' + detail + ')' if detail else ''}; the task may be out of "
                "reach as sampled: a denser reward (partial credit on the way), more --samples-per-prompt, a larger "
                "--max-new-tokens or a higher --temperature")
    return (head + f"in nearly every group all samples got the same reward, stuck at mean reward "
            f"{stats['reward/mean']:.3f}{' (' + detail + ')' if detail else ''}; {HELP}")
