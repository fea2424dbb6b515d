"""``--generator vllm``: a vLLM server (its own environment, ``make setup-vllm``) as the sampler.

One server on a tiny tied-embedding Llama (head size 32: vLLM's CPU backend refuses 8) in fp32
serves the module's engine tests: its token ids and log-probs against the learner's own forward,
a weight sync (the tied head re-tied), the version check, greedy and seeded sampling, and the
resumption of a run through ``--vllm-url`` (the checkpoint's weights synced before the first
rollout). One training run starts a server of its own and has it killed mid-run (a one-line error,
the state saved, no process left). Where the vLLM environment is missing every test here skips,
saying so.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from lm_fixtures import PROMPTS, make_tiny_lm, make_trainer, prompt_dataset, read_jsonl

pytestmark = pytest.mark.xdist_group("vllm")  # one worker, one server at a time


def _vllm_python():
    from pg_lm.lm.engine.server import EngineError, find_python

    if not Path("/proc/self").exists():
        pytest.skip("the vLLM server is managed on Linux only")
    try:
        return find_python(None)
    except EngineError as e:
        pytest.skip(f"the vLLM environment is not installed here ({e})")


@pytest.fixture(scope="session")  # one server per test process, however its tests are ordered
def tied_dir(tmp_path_factory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("tied"), engine=True)


@pytest.fixture(scope="session")  # one server per test process, however its tests are ordered
def served(tied_dir, tmp_path_factory):
    """(the engine, the learner's LM in fp32, its tokenizer), the server started from the LM's weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pg_lm.lm.engine import VLLMEngine
    from pg_lm.lm.engine.server import Server

    python = _vllm_python()
    lm = AutoModelForCausalLM.from_pretrained(tied_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tied_dir)
    engine = VLLMEngine(None, "float32").bind(lm)
    folder = engine.write(lm, 0, tok)
    engine.server = Server.start(python, str(folder), tmp_path_factory.mktemp("log") / "vllm.log", dtype="float32",
                                 max_model_len=256, seed=0, kv_cache_gb=1, gpu_memory=0.3, timeout=300)
    assert engine.server.call("/collective_rpc", {"method": "pg_lm_hello"})["results"] == ["pg_lm"]
    engine.server.call("/update_weight_version", {"new_version": "0"})
    engine.folder, engine.version = folder, 0
    yield engine, lm, tok
    engine.close()


def _learner_logp(lm, batch, temperature: float) -> torch.Tensor:
    from pg_lm.lm.policy import Policy

    with torch.no_grad():
        logp = Policy(lm)(batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask,
                          temperature=temperature)[0]
    return logp * batch.completion_mask


def test_samples_token_ids_with_the_learners_log_probs(served):
    from pg_lm.lm.sampling import sample

    engine, lm, tok = served
    torch.manual_seed(0)
    batch = sample(engine, tok, PROMPTS, {}, num_samples=4, max_new_tokens=10, temperature=0.8, logprobs=True)
    assert batch.completion_ids.shape[0] == len(PROMPTS) * 4
    ended = batch.lengths < 10  # rows that stopped at EOS hold it as their last real token, then padding
    assert ended.any()
    for row, n in zip(batch.completion_ids[ended], batch.lengths[ended]):
        assert row[n - 1] == tok.eos_token_id and (row[n:] == tok.pad_token_id).all()
    assert len({tuple(r.tolist()) for r in batch.completion_ids}) > len(PROMPTS)  # the G samples of a prompt differ
    gap = (_learner_logp(lm, batch, 0.8) - batch.sampler_logp).abs().max()
    assert gap < 1e-4, gap  # fp32 on both sides, the temperature applied to both


def test_weight_sync_reaches_a_tied_head(served):
    """After the learner's weights change (the embedding, which the head shares, among them), the
    server's log-probs follow them: they match the new weights and no longer the old ones."""
    from pg_lm.lm.sampling import sample

    engine, lm, tok = served
    torch.manual_seed(1)
    old = {k: v.clone() for k, v in lm.state_dict().items()}
    try:
        with torch.no_grad():
            lm.model.embed_tokens.weight.mul_(2.0)
            for p in lm.model.layers[0].parameters():
                p.add_(0.05 * torch.randn_like(p))
        seconds = engine.prepare(lm, 1)
        assert seconds > 0 and engine.version == 1
        batch = sample(engine, tok, PROMPTS, {}, num_samples=2, max_new_tokens=8, logprobs=True)
        assert (_learner_logp(lm, batch, 1.0) - batch.sampler_logp).abs().max() < 1e-4
        lm.load_state_dict(old)
        assert (_learner_logp(lm, batch, 1.0) - batch.sampler_logp).abs().max() > 0.1  # the old weights' differ
    finally:
        lm.load_state_dict(old)
        engine.prepare(lm, 2)


def test_a_stale_server_is_refused(served):
    from pg_lm.lm.engine import EngineError

    engine, lm, _ = served
    engine.prepare(lm, 3)
    engine.prepare(lm, 3)  # the same version: nothing written
    assert engine.sync_s == 0.0
    with pytest.raises(EngineError, match="stale policy"):
        engine.check(4)


def test_greedy_and_seeded_sampling(served):
    from pg_lm.lm.sampling import generate

    engine, lm, tok = served
    enc = tok(PROMPTS[:4], padding=True, return_tensors="pt")
    eos, pad = [tok.eos_token_id], tok.pad_token_id
    greedy = engine.generate(enc.input_ids, enc.attention_mask, 2, 6, eos, pad, greedy=True)
    ours = generate(lm, enc.input_ids, enc.attention_mask, 2, 6, eos, pad, greedy=True)
    assert torch.equal(greedy[:, :ours.shape[1]], ours)  # the argmax path of both: the same tokens
    top1 = engine.generate(enc.input_ids, enc.attention_mask, 2, 6, eos, pad, top_k=1)
    assert torch.equal(top1, greedy)
    torch.manual_seed(5)
    a = engine.generate(enc.input_ids, enc.attention_mask, 3, 6, eos, pad)
    torch.manual_seed(5)
    b = engine.generate(enc.input_ids, enc.attention_mask, 3, 6, eos, pad)
    assert torch.equal(a, b)  # seeds drawn from torch's generator: a step's sampling repeats
    remax = engine.generate(enc.input_ids, enc.attention_mask, 2, 6, eos, pad, greedy_extra=True)
    assert remax.shape[0] == 4 * 3 and torch.equal(remax[2::3, :greedy.shape[1]], greedy[::2])


def test_episodes_of_many_turns_sample_through_the_engine(served):
    """Multi-turn episodes sampled by the server: its log-probs of every action token equal the learner's
    on the whole conversation (observations in the context, off the action mask)."""
    from pg_lm.lm import episodes as ep
    from pg_lm.lm.policy import Policy

    class Echo:  # three turns, each observation says which turn it was
        def reset(self, *, seed, row=None):
            self.k = 0
            return f"start {seed}"

        def step(self, action):
            self.k += 1
            return f"t{self.k}", 0.25, self.k >= 3, False, {}

    engine, lm, tok = served
    torch.manual_seed(2)
    b = ep.run_episodes(engine, tok, Echo, [7, 8], [None, None], ep.check_template(tok, "tiny"), group_size=2,
                        max_turns=5, max_new_tokens=6, max_episode_tokens=400)
    assert b.completion_ids.shape[0] == 4 and (b.turn_end.sum(1) >= 1).all()
    assert (b.completion_mask.sum(1) < b.attention.sum(1)).all()  # observations in the rows, off the action mask
    with torch.no_grad():
        logp = Policy(lm)(b.prompt_ids, b.prompt_mask, b.completion_ids, b.attention)[0]
    assert ((logp - b.sampler_logp) * b.completion_mask).abs().max() < 1e-4


def test_engine_flags_and_a_missing_environment_are_one_line_errors(tmp_path):
    from pg_lm.lm import LMConfig
    from pg_lm.lm.engine import EngineError
    from pg_lm.lm.engine.server import find_python

    with pytest.raises(ValueError, match="--vllm-url / --vllm-python need --generator vllm"):
        LMConfig(vllm_url="http://localhost:8000")
    with pytest.raises(ValueError, match="--vllm-kv-cache-gb"):
        LMConfig(generator="vllm", vllm_kv_cache_gb=0)
    with pytest.raises(EngineError, match="make setup-vllm") as err:
        find_python(str(tmp_path / "no-such-python"))
    assert "\n" not in str(err.value)


def test_lora_weights_reach_the_server_merged():
    """The weights written for the server are the LoRA-merged model's, the tied head left out."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from lm_fixtures import _llama_config, make_tokenizer
    from pg_lm.lm.engine.weights import merged_weights

    torch.manual_seed(0)
    base = LlamaForCausalLM(_llama_config(make_tokenizer(), hidden=64, heads=2, tie_word_embeddings=True))
    lm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for n, p in lm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    ours = merged_weights(lm, torch.float32)
    reference = {k: v for k, v in lm.merge_and_unload().state_dict().items() if k != "lm_head.weight"}
    assert ours.keys() == reference.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], reference[k], rtol=0, atol=1e-6)


def _group_gone(pgid: int, seconds: float = 10.0) -> bool:
    """Whether no process of the group ``pgid`` is left (its members reaped within ``seconds``)."""
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_a_killed_server_stops_the_run_saved_then_resume_resyncs(served, tied_dir, tmp_path):
    """The server killed mid-run: the run stops with one line naming the saved state, nothing is left
    running; resumed against a running server (``--vllm-url``: the module's, holding other weights),
    the server is given the checkpoint's weights before the first rollout."""
    from pg_lm.lm.engine import EngineError

    kw = dict(generator="vllm", max_steps=6, save_every=1, eval_size=0, max_new_tokens=6, lora_r=4, lr=1e-2,
              sampler_correction="tis", num_minibatches=2)
    shm_before = set(Path("/dev/shm").glob("psm_*"))  # vLLM's shared memory (none where there is no /dev/shm)
    tr = make_trainer(tied_dir, tmp_path, train_dataset=prompt_dataset(), **kw)
    server = tr.engine.server
    step = tr.train_step

    def train_step():  # the server dies during the third step's rollout
        if tr.state.step == 2:
            os.killpg(server.proc.pid, signal.SIGKILL)
        return step()

    tr.train_step = train_step
    pgid = server.proc.pid
    with pytest.raises(EngineError) as err:
        tr.train()
    message = str(err.value)
    assert "\n" not in message and "saved in" in message and "step 2" in message, message
    assert str(tmp_path / "checkpoint-last") in message  # (the resumed run below starts at step 2)
    assert _group_gone(pgid)
    for leaked in set(Path("/dev/shm").glob("psm_*")) - shm_before:  # what the killed server could not free
        if leaked.is_file():
            leaked.unlink(missing_ok=True)
    assert not tr.engine.sync_dir.exists()

    url = served[0].server.url
    tr = make_trainer(tied_dir, tmp_path, train_dataset=prompt_dataset(), resume=True, vllm_url=url,
                      **{**kw, "max_steps": 3})
    assert tr.state.step == 2 and tr.engine.version is None  # not synced yet
    batch, stats = tr.rollout()
    assert stats["perf/sync_s"] > 0 and tr.engine.server.call("/weight_info")["weight_version"] == "2"
    lm = tr.acc.unwrap_model(tr.policy).lm
    assert (_learner_logp(lm, batch, 1.0) - batch.sampler_logp).abs().max() < 1e-4
    summary = tr.train()
    assert summary["train/steps"] == 3 and tr.engine.server.proc is None  # a server it did not start: left running
    assert served[0].server.call("/health") is None
    engine, lm0, _ = served  # the shared server back on the fixture's weights, for the tests after this one
    engine.version = None
    engine.prepare(lm0, 10)
    sync = {r["step"]: r["perf/sync_s"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "perf/sync_s" in r}
    assert sync[1] == 0 and sync[2] > 0  # the first rollout's weights were the server's own; then one sync a step
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "sampler/is_weight" in r]
    assert rows and all(r["sampler/logp_gap"] < 1e-3 for r in rows)  # corrected (tis) and logged; fp32 on both sides


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow),
                                    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
                                        not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_the_arithmetic_recipe_learns_sampled_by_vllm(device, tmp_path):
    """The recipe on the embedded SmolLM2-135M-Instruct for 40 steps, every rollout sampled by vLLM."""
    import json
    import subprocess
    import sys

    _vllm_python()
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "recipes" / "arithmetic.py"), "--generator", "vllm", "--max-steps", "40",
           "--max-seconds", "None", "--eval-size", "100", "--output-dir", str(tmp_path), "--progress", "false",
           "--save-model", "false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=root,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["train/steps"] == 40
    assert summary["eval/accuracy_after"] >= summary["eval/accuracy_before"] + 0.2, summary


@pytest.mark.slow
@pytest.mark.two_process
def test_two_ddp_processes_sample_from_one_synced_server(tied_dir, tmp_path):
    """DDP on 2 CPU processes: the main process starts and syncs the server, both sample from it."""
    import json
    import subprocess
    import sys

    _vllm_python()
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(root / "configs/accelerate/cpu_ddp.yaml"),
           "-m", "pg_lm.cli", "lm", "--model", str(tied_dir), "--generator", "vllm", "--max-steps", "3", "--eval-size", "4",
           "--lora-r", "0", "--lr", "1e-2", "--mixed-precision", "no", "--max-new-tokens", "6", "--output-dir", str(tmp_path),
           "--progress", "false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=root,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert json.loads((tmp_path / "summary.json").read_text())["num_processes"] == 2
    sync = {r["step"]: r["perf/sync_s"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "perf/sync_s" in r}
    assert sync[1] == 0 and sync[2] > 0 and sync[3] > 0
