"""The language-model configurations: flat dataclasses, one flag per field. :class:`PromptConfig`
(model, prompts, rewards, evaluation) is shared by training (:class:`LMConfig`) and ``pg-lm eval``."""

from __future__ import annotations

from dataclasses import dataclass

from pg_lm.core import AGG_MODES, KL_ESTIMATORS, RATIO_LEVELS, SAMPLER_CORRECTIONS
from pg_lm.run.config import arg, check_trpo

from .presets import PRESETS, apply_preset, record_explicit

ESTIMATORS = ("reinforce", "gae")
UPDATES = ("gradient", "trpo")
BASELINES = ("none", "value", "batch_mean", "group_mean", "loo", "remax")


TASK_NAMES = ("arithmetic", "countdown", "tagged", "counting", "rounding", "sorting")  # pg_lm.tasks.TASKS (a test keeps them equal)


@dataclass
class PromptConfig:
    """What is sampled from and how it is scored: the model, the prompts (a built-in task or a
    dataset), the reward functions, and how evaluation samples. Shared by training (LMConfig)
    and ``pg-lm eval`` (EvalConfig), so a flag means the same in both."""

    model: str = arg("smollm2-135m-instruct", "HF model id, local path, .gguf file, or the embedded default")
    task: str = arg("arithmetic", "built-in task (prompts + reward), used when no --dataset / --reward is given", TASK_NAMES)
    # your prompts (docs/data-and-rewards.md)
    dataset: str | None = arg(None, "prompt dataset: a .jsonl / .json / .csv / .parquet file, a folder, or a name "
                              "datasets.load_dataset accepts (replaces the task's prompts; needs --reward or --reward-model)")
    split: str = arg("train", "split of --dataset to use (a single file is one split)")
    prompt_column: str = arg("prompt", "the dataset column holding the prompt: a string, or a list of chat messages "
                             "[{role, content}]; the other columns reach the reward functions")
    system_prompt: str | None = arg(None, "a system message put before every prompt (through the chat template)")
    # your rewards
    reward: list[str] = arg([], "reward function, repeatable: path/to/file.py:function, module:function, or a built-in "
                            "(last_number, exact, regex=PATTERN, tag=NAME, length=N; see docs/data-and-rewards.md)")
    reward_weights: list[float] = arg([], "one weight per --reward (then --reward-model), in order (empty = all 1)")
    reward_model: str | None = arg(None, "a sequence-classification model (folder or HF id) scoring prompt + completion")
    reward_timeout: float | None = arg(None, "seconds a reward function may take on one batch (None = no limit)")
    # sampling and the prompt's shape
    max_prompt_length: int = arg(512, "prompt token limit (after the chat template); see --long-prompts")
    long_prompts: str = arg("error", "prompts over --max-prompt-length, all found before the first step: stop with their "
                            "count, keep their last tokens, or leave them out", ("error", "truncate-left", "drop"))
    temperature: float = arg(1.0, "sampling temperature (the policy's log-probs use the same temperature)")
    top_p: float = arg(1.0, "nucleus sampling threshold")
    top_k: int = arg(0, "top-k sampling (0 = off)")
    chat_template: bool = arg(True, "wrap prompts in the tokenizer's chat template when it has one")
    # evaluation (greedy, plus pass@k from sampled completions)
    eval_size: int | None = arg(100, "held-out prompts evaluated (None = all)")
    eval_max_new_tokens: int | None = arg(None, "completion token limit in evaluation (None = --max-new-tokens, the "
                                          "training budget: a shorter one cuts answers the policy learned to write)")
    eval_batch_size: int = arg(50, "prompts per evaluation generate call")
    eval_samples: int = arg(0, "n: completions sampled per held-out prompt (at --temperature) for pass@k (0 = greedy only)")
    pass_at: list[int] = arg([], "the k of pass@k, each <= --eval-samples (empty = 1 and --eval-samples)")
    pass_threshold: float = arg(1.0, "a completion counts as correct (accuracy, pass@k) when its total reward is >= this")
    # episodes of many turns (docs/environments.md)
    env: str | None = arg(None, "episodes of many turns in an environment (to train, or to evaluate): a built-in "
                          "(guess, tool, frozenlake) or path/to/file.py:Class / module:Class; the token limit is per turn")
    max_turns: int = arg(4, "turns per episode at most (then it is truncated)")
    max_episode_tokens: int = arg(512, "prompt and episode tokens at most: an episode that would outgrow it is truncated")
    env_timeout: float | None = arg(None, "seconds an environment's reset / step may take (None = no limit)")
    env_error_reward: float | None = arg(None, "an environment that raises or hangs ends its episode with this reward "
                                         "(None: the run stops, naming the environment and the episode)")

    def __post_init__(self):
        for name in ("max_prompt_length", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("temperature", "top_p"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("top_k", "eval_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("max_turns", "max_episode_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("eval_max_new_tokens", "reward_timeout", "env_timeout"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0 (or None), got {getattr(self, name)}")
        if self.eval_size is not None and self.eval_size < 0:
            raise ValueError(f"--eval-size must be >= 0 (or None for all), got {self.eval_size}")
        bad_k = [k for k in self.pass_at if not 1 <= k <= self.eval_samples]
        if bad_k:
            raise ValueError(f"--pass-at {bad_k[0]} needs 1 <= k <= --eval-samples ({self.eval_samples})")
        n_rewards = len(self.reward) + (self.reward_model is not None)
        if self.reward_weights and n_rewards and len(self.reward_weights) != n_rewards:
            raise ValueError(f"--reward-weights has {len(self.reward_weights)} values for {n_rewards} rewards "
                             "(each --reward, then --reward-model)")

    @property
    def pass_ks(self) -> list[int]:
        """The k of each pass@k reported (none without sampled completions)."""
        if not self.eval_samples:
            return []
        return sorted(set(self.pass_at or [1, self.eval_samples]))


@record_explicit  # which fields the caller gave: a preset fills only the others (see presets.py)
@dataclass
class LMConfig(PromptConfig):
    """RL fine-tuning of a causal language model with policy gradients."""

    eval_dataset: str | None = arg(None, "held-out prompts (file, folder or name, like --dataset; split --eval-split)")
    eval_split: str | None = arg(None, "split of --eval-dataset, or of --dataset when no --eval-dataset is given "
                                 "(None with --eval-dataset: --split)")
    eval_fraction: float = arg(0.0, "hold out this fraction of --dataset's rows for evaluation (seeded; 0 = none)")
    output_dir: str = arg("runs/lm", "where config, metrics, samples, summary, plot and checkpoints go")
    seed: int = arg(0, "random seed (prompt order, sampling, initialisation)")
    # sampling
    max_steps: int = arg(200, "training steps (each: sample, score, update)")
    max_seconds: float | None = arg(None, "stop training after this many seconds (final evaluation still runs)")
    prompts_per_step: int = arg(4, "prompts per step per process")
    # 8 samples and 16 tokens: the arithmetic recipe's measured best (BENCHMARKS.md section 11); more samples
    # per prompt give the leave-one-out baseline a steadier estimate per step
    samples_per_prompt: int = arg(8, "G: completions sampled per prompt")
    max_new_tokens: int = arg(16, "completion token limit during training (also the evaluation's, by default)")
    # episodes of many turns (docs/environments.md): --env and its limits, with the evaluation's flags
    credit: str = arg("episode", "credit over turns: the episode's return minus --baseline on every action token; "
                      "each turn's return-to-go minus a group baseline (--turn-baseline); or GAE with a value head "
                      "over action tokens", ("episode", "turn", "gae"))
    turn_gamma: float = arg(1.0, "discount between turns (--credit turn / gae; --gamma is the discount between tokens)")
    turn_baseline: str = arg("episode", "--credit turn's group baseline: over the group's episodes, or over the same "
                             "turn index (biased when the policy decides how long episodes last)", ("episode", "turn_index"))
    # estimator
    loss_type: str | None = arg(None, "a preset under the name people know, expanding to the flags of docs/algorithms.md "
                                "(printed and saved in config.json); a flag given with it overrides a tunable value, "
                                "and one contradicting what defines the preset is an error", tuple(PRESETS))
    estimator: str = arg("reinforce", "advantage estimator: token-level REINFORCE or GAE with a value head", ESTIMATORS)
    baseline: str = arg("loo", "REINFORCE baseline (value = learned value head; remax = the reward of one more, greedy, "
                        "completion per prompt, not trained on); ignored by gae, whose critic is the value head", BASELINES)
    scale_rewards: bool = arg(False, "divide advantages by the group's reward std (GRPO); needs baseline group_mean")
    whiten_advantages: bool = arg(False, "whiten advantages over the global batch, every process's tokens "
                                  "(mean 0, std 1; REINFORCE++)")
    gamma: float = arg(1.0, "discount per token")
    gae_lambda: float = arg(0.95, "GAE λ (--estimator gae)")
    ppo_epochs: int = arg(1, "passes over each rollout batch")
    num_minibatches: int = arg(1, "optimizer steps per pass (the rollout is split into this many)")
    micro_batch_size: int | None = arg(None, "rows per forward/backward (gradient accumulation); None = whole minibatch")
    clip_low: float | None = arg(None, "PPO clip ε below 1 (None = no clipping)")
    clip_high: float | None = arg(None, "PPO clip ε above 1 (defaults to clip_low when clip_low is set)")
    clip_ratio_c: float | None = arg(None, "dual-clip PPO: the loss of a negative advantage is at most -A·c (c > 1; None = off)")
    ratio_level: str = arg("token", "importance ratio of the policy loss: per token (PPO, GRPO) or per sequence, "
                           "length-normalised and clipped per sequence (GSPO)", RATIO_LEVELS)
    value_clip: float | None = arg(None, "PPO value-loss clipping range (None = off; the classic-control backend's "
                                   "off is 0)")
    vf_coef: float = arg(0.1, "value-loss coefficient")
    skip_zero_advantage: bool = arg(True, "leave rows whose advantage is 0 on every token out of the backward "
                                    "pass when they cannot change the gradient (no value loss, entropy or KL loss)")
    loss_agg: str = arg("token-mean", "how per-token losses reduce to a scalar", AGG_MODES)
    # on: the pick of benchmarks/robust_defaults.py's rule (the best worst held-out gain, then the best mean
    # of per-task worst gains) over six tasks x three seeds, BENCHMARKS.md section 12
    dynamic_sampling: bool = arg(True, "DAPO: groups whose rewards all agree are dropped and more prompts sampled until "
                                 "the step holds --prompts-per-step informative groups (needs --samples-per-prompt >= 2; "
                                 "left unset, off with --env or one sample per prompt)")
    max_sampling_rounds: int = arg(3, "dynamic sampling: extra sampling rounds per step at most; when reached, a warning, "
                                   "and the batch is filled up with zero-spread groups")
    sampler_correction: str = arg("none", "correct for the sampler's log-probs differing from the learner's (bf16 "
                                  "sampling copy, CPU decode layer): truncated importance sampling min(ρ, cap), or "
                                  "mask tokens with ρ > cap (ρ = π_learner / π_sampler); the gap is logged either way",
                                  SAMPLER_CORRECTIONS)
    sampler_is_cap: float = arg(2.0, "the cap C of --sampler-correction (>= 1)")
    sampler_is_level: str = arg("token", "ρ per token, or per sequence (the product over its tokens)", ("token", "sequence"))
    # the generator (docs/inference-engine.md)
    generator: str = arg("hf", "what samples completions: transformers in this process, or a vLLM server (its own "
                         "environment, make setup-vllm) given the learner's weights after every step", ("hf", "vllm"))
    vllm_url: str | None = arg(None, "a running vLLM server to sample from (started as docs/inference-engine.md shows), "
                               "instead of one pg_lm starts and stops")
    vllm_python: str | None = arg(None, "the vLLM environment's python (None: $PG_LM_VLLM_PYTHON, else .venv-vllm/bin/python)")
    vllm_dtype: str = arg("auto", "the server's weights: auto = the precision of the learner's forward",
                          ("auto", "float32", "bfloat16", "float16"))
    vllm_kv_cache_gb: int = arg(1, "GiB of KV cache the server keeps on a CPU (VLLM_CPU_KVCACHE_SPACE)")
    vllm_gpu_memory: float = arg(0.3, "share of the GPU's memory the server takes (the learner needs the rest)")
    vllm_timeout: float = arg(300.0, "seconds to wait for the server to be ready")
    vllm_sync_dir: str | None = arg(None, "folder the weights go to for the server each step (None: a temporary one, in "
                                    "memory where /dev/shm exists); a server on another machine must read it at the same path")
    # the update (docs/trpo.md)
    update: str = arg("gradient", "how the policy moves on each rollout: AdamW steps on the loss, or TRPO's "
                      "constrained natural-gradient step (the critic, if any, still by AdamW)", UPDATES)
    max_kl: float = arg(0.01, "TRPO: bound δ on the mean KL(π_old || π) per completion token of one update")
    cg_iters: int = arg(10, "TRPO: conjugate-gradient iterations for F x = g")
    cg_damping: float = arg(0.1, "TRPO: damping λ added to the Fisher matrix (F + λI)")
    line_search_steps: int = arg(10, "TRPO: backtracking steps before the update is rejected")
    backtrack_ratio: float = arg(0.8, "TRPO: factor by which the line search shrinks the step")
    # regularisation
    kl_coef: float = arg(0.0, "KL-to-reference coefficient β (0 = no reference model)")
    kl_estimator: str = arg("k3", "KL estimator (k1 only in the reward)", KL_ESTIMATORS)
    kl_in: str = arg("loss", "where the KL penalty goes: per-token in the reward, or in the loss", ("reward", "loss"))
    kl_target: float | None = arg(None, "adaptive KL: target KL per sequence (None = fixed coefficient)")
    kl_horizon: float = arg(10000.0, "adaptive KL horizon (Ziegler et al. 2019)")
    entropy_coef: float = arg(0.0, "entropy bonus coefficient")
    overlong_penalty: float = arg(0.0, "added to the reward of completions that hit max_new_tokens without EOS")
    # optimisation
    # 2e-4 with LoRA r16 and cosine decay: the arithmetic recipe's measured best; full fine-tuning wants about
    # a tenth (--lora-r 0 --lr 2e-5)
    lr: float = arg(2e-4, "learning rate (AdamW)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    warmup_steps: int = arg(0, "linear learning-rate warm-up steps")
    lr_schedule: str = arg("cosine", "learning rate after warm-up: constant, or linear / cosine decay to 0 over the "
                           "run (steps over --max-steps, or time over --max-seconds when that is further along)",
                           ("constant", "linear", "cosine"))
    max_grad_norm: float | None = arg(1.0, "gradient clipping (None or 0 = off)")
    # LoRA r16: the recipe's measured best, and a checkpoint of a few MB instead of the whole model
    lora_r: int = arg(16, "LoRA rank (0 = full fine-tuning)")
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
    log_every: int = arg(1, "write metrics every N steps")
    samples_every: int = arg(10, "write samples.jsonl rows every N steps")
    save_every: int = arg(0, "checkpoint every N steps (0 = only at the end)")
    save_model: bool = arg(True, "write the final checkpoint")
    save_total_limit: int | None = arg(2, "checkpoints kept (checkpoint-last and the newest checkpoint-<step>; None = all)")
    resume: bool = arg(False, "continue the same run from output_dir's newest intact checkpoint")
    # failures
    max_bad_steps: int = arg(3, "stop after this many updates in a row skipped for a non-finite value")
    collapse_steps: int = arg(20, "warn when this many steps in a row had no learning signal (in nearly every group "
                                  "all samples scored the same; docs/learning-signal.md); 0 = never")
    stop_on_collapse: bool = arg(False, "end the run (with its final evaluation) when that warning is given")
    report_to: str = arg("none", "extra tracker through Accelerate", ("none", "tensorboard", "wandb"))
    progress: bool = arg(True, "show a progress bar")

    def __post_init__(self):
        if self.loss_type is not None:
            apply_preset(self)
        super().__post_init__()
        self._fit_defaults()
        self._check_numbers()
        self._check_estimator()
        self._check_batches_and_outputs()
        self._check_update()

    def _fit_defaults(self) -> None:
        """Dynamic sampling, on by default (BENCHMARKS.md section 12), stays off where it is not given and
        cannot apply: episodes of many turns, and groups of one sample. A clip given below only is
        symmetric, as in PPO."""
        if "dynamic_sampling" not in self._explicit | self.preset_fields({"loss_type": self.loss_type}):
            self.dynamic_sampling = self.dynamic_sampling and self.env is None and self.samples_per_prompt >= 2
        if self.clip_high is None and self.clip_low is not None:
            self.clip_high = self.clip_low

    def _check_numbers(self) -> None:
        """Each number in its range on its own; ``--max-grad-norm 0`` becomes None (off)."""
        positive = ("max_steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "ppo_epochs",
                    "num_minibatches", "log_every", "samples_every", "kl_horizon", "max_bad_steps")  # samples_every / kl_horizon divide
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        for name in ("kl_coef", "entropy_coef", "vf_coef", "lora_r", "eval_every", "save_every", "warmup_steps",
                     "weight_decay", "collapse_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.max_grad_norm == 0:  # as in the gym backend: 0 = off (clipping to norm 0 would zero every update)
            self.max_grad_norm = None
        for name in ("max_grad_norm", "clip_low", "clip_high", "value_clip"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (or None for off), got {getattr(self, name)}")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.gae_lambda <= 1.0:
            raise ValueError(f"--gamma and --gae-lambda must be in [0, 1], got {self.gamma}, {self.gae_lambda}")

    def _check_estimator(self) -> None:
        """The estimator, its baseline and the KL penalty fit together and with the group size."""
        if self.baseline in ("group_mean", "loo") and self.estimator == "reinforce" and self.samples_per_prompt < 2:
            raise ValueError(f"--baseline {self.baseline} needs --samples-per-prompt >= 2")
        if self.baseline == "remax" and self.estimator != "reinforce":
            raise ValueError(f"--baseline remax needs --estimator reinforce (--estimator {self.estimator} has its own critic)")
        if self.scale_rewards and (self.baseline != "group_mean" or self.estimator != "reinforce"):
            raise ValueError("--scale-rewards needs --estimator reinforce --baseline group_mean")
        if self.kl_estimator == "k1" and self.kl_in == "loss" and self.kl_coef > 0:
            raise ValueError("--kl-estimator k1 belongs in the reward (its gradient as a loss is wrong): use --kl-in reward")
        if self.kl_target is not None and self.kl_coef <= 0:
            raise ValueError("--kl-target (adaptive KL) needs an initial --kl-coef > 0")
        self._check_episodes()

    def _check_episodes(self) -> None:
        """An environment's run: the credit mode chooses the estimator; what needs one completion per row is refused."""
        if self.env is None:
            return
        for bad, why in ((self.estimator != "reinforce", "--estimator gae (use --credit gae)"),
                         (self.baseline in ("value", "remax"), f"--baseline {self.baseline}"),
                         (self.dynamic_sampling, "--dynamic-sampling"), (self.scale_rewards and self.credit != "episode",
                                                                         "--scale-rewards without --credit episode")):
            if bad:
                raise ValueError(f"--env: {why} is not supported with episodes of many turns")
        if not 0.0 <= self.turn_gamma <= 1.0:
            raise ValueError(f"--turn-gamma must be in [0, 1], got {self.turn_gamma}")

    def _check_batches_and_outputs(self) -> None:
        """The step's rows split into the minibatches; checkpoints kept; the held-out split."""
        rows = self.prompts_per_step * self.samples_per_prompt
        if rows % self.num_minibatches:
            raise ValueError(f"{rows} rows per step do not split into --num-minibatches {self.num_minibatches}")
        if self.save_total_limit is not None and self.save_total_limit <= 0:
            raise ValueError(f"--save-total-limit must be > 0 (or None for all), got {self.save_total_limit}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_fraction and (self.eval_dataset or self.eval_split):
            raise ValueError("--eval-fraction holds out rows of --dataset: give it, or --eval-dataset / --eval-split, not both")
        if self.eval_fraction and not self.dataset:
            raise ValueError("--eval-fraction needs --dataset (a task has its own held-out prompts)")
        if self.micro_batch_size is not None and self.micro_batch_size <= 0:
            raise ValueError(f"--micro-batch-size must be > 0, got {self.micro_batch_size}")

    def _check_update(self) -> None:
        """The policy loss's ratio and clips, dynamic sampling, the sampler correction, and TRPO's
        step, which leaves no room for the settings of AdamW's loop."""
        if self.ratio_level == "sequence" and self.uses_value_head:
            raise ValueError("--ratio-level sequence (GSPO) has one advantage per completion; a value head's per-token "
                             f"advantages need --ratio-level token (got --estimator {self.estimator} --baseline {self.baseline})")
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1.0:
            raise ValueError(f"--clip-ratio-c must be > 1 (or None for off), got {self.clip_ratio_c}")
        if self.dynamic_sampling and self.samples_per_prompt < 2:
            raise ValueError("--dynamic-sampling needs --samples-per-prompt >= 2 (a group of one has no reward spread)")
        if self.max_sampling_rounds < 0:
            raise ValueError(f"--max-sampling-rounds must be >= 0, got {self.max_sampling_rounds}")
        check_trpo(self, flag=lambda name: "--" + name.replace("_", "-"))
        if self.update == "trpo":  # one natural step on the whole rollout: the settings of AdamW's loop do not apply
            given = [f"--{n.replace('_', '-')} {getattr(self, n)}" for n, off in
                     (("ppo_epochs", 1), ("num_minibatches", 1), ("micro_batch_size", None), ("clip_low", None),
                      ("clip_ratio_c", None), ("ratio_level", "token"), ("sampler_correction", "none"))
                     if getattr(self, n) != off]
            if given:
                raise ValueError(f"--update trpo takes one natural-gradient step on the whole rollout: {given[0]} "
                                 "does not apply (see docs/trpo.md)")
        if self.vllm_kv_cache_gb <= 0 or not self.vllm_timeout > 0 or not 0 < self.vllm_gpu_memory <= 1:
            raise ValueError("--vllm-kv-cache-gb and --vllm-timeout must be > 0, --vllm-gpu-memory in (0, 1]")
        if self.generator == "hf" and (self.vllm_url or self.vllm_python):
            raise ValueError("--vllm-url / --vllm-python need --generator vllm")
        if not self.sampler_is_cap >= 1.0:
            raise ValueError(f"--sampler-is-cap must be >= 1 (agreeing paths then get weight 1), got {self.sampler_is_cap}")

    def with_env(self, name: str) -> "LMConfig":
        """This config for episodes of the environment ``name``, as if ``--env`` had been given with it:
        built again from the fields its caller gave (``dataclasses.replace`` would give them all), so
        that the defaults fit to the environment (:meth:`_fit_defaults`)."""
        return type(self)(**{**{k: getattr(self, k) for k in self._explicit}, "env": name})

    @staticmethod
    def preset_fields(given: dict) -> set[str]:
        """The fields that the ``loss_type`` in ``given`` (flags / a config file) sets: a script's own
        defaults for them (``recipes/arithmetic.py``'s ``baseline="loo"``) give way to the preset."""
        preset = PRESETS.get(given.get("loss_type"))
        return set(preset.defining) | set(preset.tunable) if preset else set()

    @property
    def eval_tokens(self) -> int:
        """The evaluation's completion token limit: --eval-max-new-tokens, else the training one."""
        return self.eval_max_new_tokens or self.max_new_tokens

    @property
    def minibatch_rows(self) -> int:
        """Rows (sequences) per optimizer step on each process."""
        return self.prompts_per_step * self.samples_per_prompt // self.num_minibatches

    @property
    def uses_value_head(self) -> bool:
        return self.estimator == "gae" or self.baseline == "value" or (self.env is not None and self.credit == "gae")

    @property
    def reuses_rollout(self) -> bool:
        """Whether a rollout feeds more than one optimizer step (then π_old must be stored)."""
        return self.ppo_epochs > 1 or self.num_minibatches > 1


@dataclass
class EvalConfig(PromptConfig):
    """Evaluate a model, or what a run trained, on a task or a dataset: greedy reward and accuracy,
    pass@k from sampled completions, completion length, the fraction cut at the token limit."""

    model: str | None = arg(None, "model: a name, folder or full checkpoint (None = the base the --adapter's run trained)")
    adapter: str | None = arg(None, "a LoRA adapter to merge into --model: RUN_DIR/checkpoint-last, or the run folder")
    eval_size: int | None = arg(None, "prompts evaluated (None = all)")
    eval_max_new_tokens: int | None = arg(None, "completion token limit (None = the run's --max-new-tokens when "
                                          "evaluating a run's checkpoint, else the training default)")
    output_dir: str = arg("runs/eval", "where eval.json and eval_samples.jsonl go")
    seed: int = arg(0, "random seed (sampled completions)")

    def __post_init__(self):
        super().__post_init__()
        if self.model is None and self.adapter is None:
            raise ValueError("give --model, --adapter RUN_DIR/checkpoint-last, or both")
