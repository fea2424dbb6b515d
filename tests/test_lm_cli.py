"""The ``pg-lm lm`` command line: bad flags exit with code 2 and a short message (no
traceback); a broken reward function becomes ``error: ...`` and exit code 2."""

from __future__ import annotations

import pytest

from lm_fixtures import prompt_dataset
from pg_lm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # see lm_fixtures.one_thread


def exit_code_and_stderr(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


def test_unknown_estimator_exits_2(capsys):
    code, err = exit_code_and_stderr(["lm", "--estimator", "nope"], capsys)
    assert code == 2
    assert "--estimator" in err and "nope" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, fragment",
    [(["--lr", "-1"], "--lr must be > 0, got -1.0"),
     (["--kl-estimator", "k1", "--kl-in", "loss", "--kl-coef", "0.1"], "--kl-estimator k1 belongs in the reward"),
     (["--samples-per-prompt", "1"], "--baseline loo needs --samples-per-prompt >= 2"),
     (["--max-steps", "0"], "--max-steps must be > 0")],
)
def test_invalid_values_exit_2_with_the_reason(argv, fragment, capsys):
    code, err = exit_code_and_stderr(["lm", *argv], capsys)
    assert code == 2
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if fragment in ln]
    assert len(lines) == 1 and "error" in lines[0]


def test_invalid_value_message_is_one_line(capsys):
    code, err = exit_code_and_stderr(["lm", "--lr", "-1"], capsys)
    assert code == 2
    assert err.strip() == "pg-lm lm: error: --lr must be > 0, got -1.0"


def test_help_exits_0(capsys):
    code, out = exit_code_and_stderr(["lm", "--help"], capsys)
    assert code == 0


def test_reward_error_becomes_one_error_line_and_exit_2(tiny_lm_dir, tmp_path, monkeypatch, capsys):
    import pg_lm.tasks

    def half_the_rewards(prompts, completions, **_):
        return [1.0] * (len(completions) // 2)

    ds = prompt_dataset(["a", "b", "c"], answer=["1", "2", "3"])
    monkeypatch.setitem(pg_lm.tasks.TASKS, "arithmetic", lambda num_eval=100, seed=0: (ds, ds, [half_the_rewards]))
    code = main(["lm", "--model", tiny_lm_dir, "--output-dir", str(tmp_path), "--max-steps", "1", "--eval-size", "2",
                 "--prompts-per-step", "1", "--samples-per-prompt", "2", "--max-new-tokens", "4", "--progress", "false", "--lora-r", "0"])
    err = capsys.readouterr().err
    assert code == 2
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert errors == ["error: reward function 'half_the_rewards' returned 1 values for 2 completions"]
    assert "Traceback" not in err


def test_cli_trains_the_tiny_model(tiny_lm_dir, tmp_path, capsys):
    code = main(["lm", "--model", tiny_lm_dir, "--output-dir", str(tmp_path), "--max-steps", "1", "--eval-size", "2",
                 "--prompts-per-step", "1", "--samples-per-prompt", "2", "--max-new-tokens", "4", "--progress", "false",
                 "--save-model", "false", "--lora-r", "0"])
    assert code == 0
    assert (tmp_path / "summary.json").exists() and not (tmp_path / "checkpoint-last").exists()


@pytest.mark.parametrize("argv, env, cuda, bf16, fragment", [
    (["--cpu-layer", "on"], {}, True, True, "--cpu-layer on needs a CPU device, but this run's device is cuda"),
    (["--mixed-precision", "bf16"], {}, True, False, "--mixed-precision bf16: this GPU has no bf16 support"),
    (["--mixed-precision", "fp16"], {}, False, False, "--mixed-precision fp16 needs a CUDA GPU"),
    ([], {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, False, False, "pg_lm runs FSDP version 2 only"),
    (["--cpu-layer", "on"], {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, False, False,
     "--cpu-layer on cannot run under FSDP"),
    ([], {"ACCELERATE_USE_DEEPSPEED": "true"}, False, False, "DeepSpeed needs a CUDA GPU"),
    (["--micro-batch-size", "4"], {"ACCELERATE_USE_DEEPSPEED": "true"}, True, True,
     "--micro-batch-size: gradient accumulation over micro-batches is not supported under DeepSpeed"),
    (["--resume"], {"ACCELERATE_USE_DEEPSPEED": "true"}, True, True, "--resume is not supported under DeepSpeed"),
])
def test_a_launch_that_cannot_run_exits_2_before_loading_a_model(argv, env, cuda, bf16, fragment, capsys, monkeypatch,
                                                                 tmp_path):
    """Device, precision, sharding and CPU-layer combinations are checked before any model is loaded (the
    device's answers are faked: these run on any machine)."""
    import torch

    import pg_lm.lm.setup as setup

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(setup, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    code = main(["lm", "--output-dir", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and fragment in err, err


def test_config_file_values_are_typed_like_flags(tmp_path):
    """YAML reads ``1e-5`` as a string and ``2`` as an int: both become the field's float."""
    from pg_lm.lm import LMConfig
    from pg_lm.run import parse_config

    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-5\nkl_coef: 2\nmax_steps: '7'\nchat_template: 'false'\nclip_low: null\n"
                    "lora_target_modules: [q_proj, v_proj]\n")
    cfg = parse_config(LMConfig, ["--config", str(path)])
    assert cfg.lr == 1e-5 and isinstance(cfg.lr, float) and cfg.kl_coef == 2.0 and isinstance(cfg.kl_coef, float)
    assert cfg.max_steps == 7 and cfg.chat_template is False and cfg.clip_low is None
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("text, fragment", [
    ("max_steps: ten\n", "max_steps in {path} must be int, got 'ten'"),
    ("max_steps: true\n", "max_steps in {path} must be int, got True"),
    ("lr: [1, 2]\n", "lr in {path} must be float, got [1, 2]"),
    ("max_stepz: 3\n", "unknown field(s) in {path}: max_stepz; valid fields: model, task,"),
])
def test_a_bad_config_file_value_is_one_line_naming_the_key(text, fragment, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    code, err = exit_code_and_stderr(["lm", "--config", str(path)], capsys)
    assert code not in (0, None) and "Traceback" not in err
    assert err.strip().count("\n") == 0 and fragment.format(path=path) in err, err


def test_an_unknown_model_is_one_line_naming_the_default(tmp_path, capsys):
    code = main(["lm", "--model", str(tmp_path / "no-such-model"), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.strip().count("\n") == 0
    assert "is neither a local folder with a model, a .gguf file" in err and "'smollm2-135m-instruct'" in err
