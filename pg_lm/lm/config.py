"""The language-model trainer's configuration: one flat dataclass, one flag per field."""

from __future__ import annotations

from dataclasses import dataclass

from pg_lm.core import AGG_MODES, KL_ESTIMATORS, RATIO_LEVELS, SAMPLER_CORRECTIONS
from pg_lm.run.config import arg

from .presets import PRESETS, apply_preset, record_explicit

ESTIMATORS = ("reinforce", "gae")
BASELINES = ("none", "value", "batch_mean", "group_mean", "loo")


@record_explicit  # which fields the caller gave: a preset fills only the others (see presets.py)
@dataclass
class LMConfig:
    """RL fine-tuning of a causal language model with policy gradients."""

    # what to train
    model: str = arg("smollm2-135m-instruct", "HF model id, local path, .gguf file, or the embedded default")
    task: str = arg("arithmetic", "built-in task (prompts + reward) when no dataset/reward is passed in Python", ("arithmetic",))
    output_dir: str = arg("runs/lm", "where config, metrics, samples, summary, plot and checkpoints go")
    seed: int = arg(0, "random seed (prompt order, sampling, initialisation)")
    # sampling
    max_steps: int = arg(200, "optimizer steps (each: sample, score, update)")
    max_seconds: float | None = arg(None, "stop training after this many seconds (final evaluation still runs)")
    prompts_per_step: int = arg(4, "prompts per step per process")
    samples_per_prompt: int = arg(4, "G: completions sampled per prompt")
    max_new_tokens: int = arg(24, "completion token limit during training")
    max_prompt_length: int = arg(512, "prompt token limit (after the chat template); see --long-prompts")
    long_prompts: str = arg("error", "prompts over --max-prompt-length, all found before the first step: stop with their "
                            "count, keep their last tokens, or leave them out", ("error", "truncate-left", "drop"))
    temperature: float = arg(1.0, "sampling temperature (the policy's log-probs use the same temperature)")
    top_p: float = arg(1.0, "nucleus sampling threshold")
    top_k: int = arg(0, "top-k sampling (0 = off)")
    chat_template: bool = arg(True, "wrap prompts in the tokenizer's chat template when it has one")
    # estimator
    loss_type: str | None = arg(None, "a preset under the name people know, expanding to the flags of docs/algorithms.md "
                                "(printed and saved in config.json); a flag given with it overrides a tunable value, "
                                "and one contradicting what defines the preset is an error", tuple(PRESETS))
    estimator: str = arg("reinforce", "advantage estimator: token-level REINFORCE or GAE with a value head", ESTIMATORS)
    baseline: str = arg("loo", "REINFORCE baseline (value = learned value head); ignored by gae, whose critic is the value head", BASELINES)
    scale_rewards: bool = arg(False, "divide advantages by the group's reward std (GRPO); needs baseline group_mean")
    whiten_advantages: bool = arg(False, "whiten advantages over the global batch, every process's tokens "
                                  "(mean 0, std 1; REINFORCE++)")
    gamma: float = arg(1.0, "discount per token")
    lam: float = arg(0.95, "GAE λ")
    ppo_epochs: int = arg(1, "passes over each rollout batch")
    num_minibatches: int = arg(1, "optimizer steps per pass (the rollout is split into this many)")
    micro_batch_size: int | None = arg(None, "rows per forward/backward (gradient accumulation); None = whole minibatch")
    clip_low: float | None = arg(None, "PPO clip ε below 1 (None = no clipping)")
    clip_high: float | None = arg(None, "PPO clip ε above 1 (defaults to clip_low when clip_low is set)")
    clip_ratio_c: float | None = arg(None, "dual-clip PPO: the loss of a negative advantage is at most -A·c (c > 1; None = off)")
    ratio_level: str = arg("token", "importance ratio of the policy loss: per token (PPO, GRPO) or per sequence, "
                           "length-normalised and clipped per sequence (GSPO)", RATIO_LEVELS)
    value_clip: float | None = arg(None, "PPO value-loss clipping range (None = off)")
    vf_coef: float = arg(0.1, "value-loss coefficient")
    skip_zero_advantage: bool = arg(True, "leave rows whose advantage is 0 on every token out of the backward "
                                    "pass when they cannot change the gradient (no value loss, entropy or KL loss)")
    loss_agg: str = arg("token-mean", "how per-token losses reduce to a scalar", AGG_MODES)
    dynamic_sampling: bool = arg(False, "DAPO: groups whose rewards all agree are dropped and more prompts sampled until "
                                 "the step holds --prompts-per-step informative groups (needs --samples-per-prompt >= 2)")
    max_sampling_rounds: int = arg(3, "dynamic sampling: extra sampling rounds per step at most; when reached, a warning, "
                                   "and the batch is filled up with zero-spread groups")
    sampler_correction: str = arg("none", "correct for the sampler's log-probs differing from the learner's (bf16 "
                                  "sampling copy, CPU decode layer): truncated importance sampling min(ρ, cap), or "
                                  "mask tokens with ρ > cap (ρ = π_learner / π_sampler); the gap is logged either way",
                                  SAMPLER_CORRECTIONS)
    sampler_is_cap: float = arg(2.0, "the cap C of --sampler-correction (>= 1)")
    sampler_is_level: str = arg("token", "ρ per token, or per sequence (the product over its tokens)", ("token", "sequence"))
    # regularisation
    kl_coef: float = arg(0.0, "KL-to-reference coefficient β (0 = no reference model)")
    kl_estimator: str = arg("k3", "KL estimator (k1 only in the reward)", KL_ESTIMATORS)
    kl_in: str = arg("loss", "where the KL penalty goes: per-token in the reward, or in the loss", ("reward", "loss"))
    kl_target: float | None = arg(None, "adaptive KL: target KL per sequence (None = fixed coefficient)")
    kl_horizon: float = arg(10000.0, "adaptive KL horizon (Ziegler et al. 2019)")
    entropy_coef: float = arg(0.0, "entropy bonus coefficient")
    overlong_penalty: float = arg(0.0, "added to the reward of completions that hit max_new_tokens without EOS")
    # optimisation
    lr: float = arg(1e-5, "learning rate (AdamW)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    warmup_steps: int = arg(0, "linear learning-rate warm-up steps")
    lr_schedule: str = arg("constant", "learning rate after warm-up: constant, or linear / cosine decay to 0 over the "
                           "run (steps over --max-steps, or time over --max-seconds when that is further along)",
                           ("constant", "linear", "cosine"))
    max_grad_norm: float | None = arg(1.0, "gradient clipping (None or 0 = off)")
    lora_r: int = arg(0, "LoRA rank (0 = full fine-tuning)")
    lora_alpha: int = arg(32, "LoRA α")
    lora_dropout: float = arg(0.0, "LoRA dropout")
    lora_target_modules: list[str] = arg(["all-linear"], "LoRA target modules (names, or all-linear)")
    mixed_precision: str = arg("auto", "Accelerate mixed precision (fp32 master weights, bf16/fp16 autocast, fp32 "
                               "log-softmax); auto = bf16 where bf16 matmuls are fast (a CUDA GPU with bf16; on a CPU, "
                               "a matmul timed in both precisions at start-up), else no",
                               ("auto", "no", "bf16", "fp16"))
    cpu_layer: str = arg("auto", "pg_lm/lm/cpu, the CPU speed layer (decode GEMM choice, few-op Llama decoder, grouped "
                         "attention and a sampling copy in bf16, malloc / huge-page settings): auto = on when the "
                         "device is a CPU and the weights are not sharded, on, or off (the plain path every device "
                         "runs)", ("auto", "on", "off"))
    # evaluation, logging, checkpoints
    eval_every: int = arg(0, "greedy held-out evaluation every N steps (0 = only before and after)")
    eval_size: int = arg(100, "held-out prompts evaluated")
    eval_max_new_tokens: int = arg(16, "completion token limit in evaluation (greedy)")
    eval_batch_size: int = arg(50, "prompts per evaluation generate call")
    log_every: int = arg(1, "write metrics every N steps")
    samples_every: int = arg(10, "write samples.jsonl rows every N steps")
    save_every: int = arg(0, "checkpoint every N steps (0 = only at the end)")
    save_model: bool = arg(True, "write the final checkpoint")
    save_total_limit: int | None = arg(2, "checkpoints kept (checkpoint-last and the newest checkpoint-<step>; None = all)")
    resume: bool = arg(False, "continue the same run from output_dir's newest intact checkpoint")
    # failures
    max_bad_steps: int = arg(3, "stop after this many updates in a row skipped for a non-finite value")
    reward_timeout: float | None = arg(None, "seconds a reward function may take on one batch (None = no limit)")
    report_to: str = arg("none", "extra tracker through Accelerate", ("none", "tensorboard", "wandb"))
    progress: bool = arg(True, "show a progress bar")

    def __post_init__(self):
        if self.loss_type is not None:
            apply_preset(self)
        if self.clip_high is None and self.clip_low is not None:
            self.clip_high = self.clip_low
        positive = ("max_steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "ppo_epochs",
                    "num_minibatches", "eval_max_new_tokens", "eval_batch_size", "log_every", "max_prompt_length",
                    "samples_every", "kl_horizon", "max_bad_steps")  # samples_every / kl_horizon divide
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("lr", "temperature", "top_p"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("kl_coef", "entropy_coef", "vf_coef", "lora_r", "eval_size", "eval_every", "save_every", "warmup_steps",
                     "top_k", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.max_grad_norm == 0:  # as in the gym backend: 0 = off (clipping to norm 0 would zero every update)
            self.max_grad_norm = None
        for name in ("max_grad_norm", "clip_low", "clip_high", "value_clip"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (or None for off), got {getattr(self, name)}")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"--gamma and --lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.baseline in ("group_mean", "loo") and self.estimator == "reinforce" and self.samples_per_prompt < 2:
            raise ValueError(f"--baseline {self.baseline} needs --samples-per-prompt >= 2")
        if self.scale_rewards and (self.baseline != "group_mean" or self.estimator != "reinforce"):
            raise ValueError("--scale-rewards needs --estimator reinforce --baseline group_mean")
        if self.kl_estimator == "k1" and self.kl_in == "loss" and self.kl_coef > 0:
            raise ValueError("--kl-estimator k1 belongs in the reward (its gradient as a loss is wrong): use --kl-in reward")
        if self.kl_target is not None and self.kl_coef <= 0:
            raise ValueError("--kl-target (adaptive KL) needs an initial --kl-coef > 0")
        rows = self.prompts_per_step * self.samples_per_prompt
        if rows % self.num_minibatches:
            raise ValueError(f"{rows} rows per step do not split into --num-minibatches {self.num_minibatches}")
        for name in ("save_total_limit", "reward_timeout"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0 (or None for no limit), got {getattr(self, name)}")
        if self.micro_batch_size is not None and self.micro_batch_size <= 0:
            raise ValueError(f"--micro-batch-size must be > 0, got {self.micro_batch_size}")
        if self.ratio_level == "sequence" and self.uses_value_head:
            raise ValueError("--ratio-level sequence (GSPO) has one advantage per completion; a value head's per-token "
                             f"advantages need --ratio-level token (got --estimator {self.estimator} --baseline {self.baseline})")
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1.0:
            raise ValueError(f"--clip-ratio-c must be > 1 (or None for off), got {self.clip_ratio_c}")
        if self.dynamic_sampling and self.samples_per_prompt < 2:
            raise ValueError("--dynamic-sampling needs --samples-per-prompt >= 2 (a group of one has no reward spread)")
        if self.max_sampling_rounds < 0:
            raise ValueError(f"--max-sampling-rounds must be >= 0, got {self.max_sampling_rounds}")
        if not self.sampler_is_cap >= 1.0:
            raise ValueError(f"--sampler-is-cap must be >= 1 (agreeing paths then get weight 1), got {self.sampler_is_cap}")

    @staticmethod
    def preset_fields(given: dict) -> set[str]:
        """The fields that the ``loss_type`` in ``given`` (flags / a config file) sets: a script's own
        defaults for them (``recipes/arithmetic.py``'s ``baseline="loo"``) give way to the preset."""
        preset = PRESETS.get(given.get("loss_type"))
        return set(preset.defining) | set(preset.tunable) if preset else set()

    @property
    def minibatch_rows(self) -> int:
        """Rows (sequences) per optimizer step on each process."""
        return self.prompts_per_step * self.samples_per_prompt // self.num_minibatches

    @property
    def uses_value_head(self) -> bool:
        return self.estimator == "gae" or self.baseline == "value"

    @property
    def reuses_rollout(self) -> bool:
        """Whether a rollout feeds more than one optimizer step (then π_old must be stored)."""
        return self.ppo_epochs > 1 or self.num_minibatches > 1
