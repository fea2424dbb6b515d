"""Sampling through a vLLM server: token ids in, token ids and the sampler's log-probs out, with the
learner's weights synced to it and a weight version checked before every rollout."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from .server import EXTENSION, SERVED_NAME, EngineError, Server
from .weights import write_folder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync_root() -> Path:
    """Where the weight folders go: memory (/dev/shm) where it exists. Folders left by a run that was
    killed (its process id, in the name, no longer alive) are removed first: they hold whole models."""
    root = Path("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir())
    if Path("/proc/self").exists():  # (where a process's liveness can be read)
        for old in root.glob("pg_lm_vllm_*_*"):
            pid = old.name.split("_")[3]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(old, ignore_errors=True)
    return root


class VLLMEngine:
    """pg_lm's generator on a vLLM server (:class:`~.server.Server`). ``generate`` has the signature and
    the result of :func:`pg_lm.lm.sampling.generate`; ``prepare`` makes the server sample with the
    learner's weights of a given version (the optimizer steps taken)."""

    def __init__(self, server: Server, dtype: str, sync_dir: str | None = None, main: bool = True):
        self.server, self.dtype, self.main = server, dtype, main
        self.owns_dir = sync_dir is None
        self.sync_dir = Path(sync_dir or tempfile.mkdtemp(prefix=f"pg_lm_vllm_{os.getpid()}_", dir=_sync_root()))
        self.version, self.folder, self.sync_s = None, None, 0.0
        self.device, self.generation_config = torch.device("cpu"), None  # the learner's, where sampling puts its ids

    def bind(self, lm) -> "VLLMEngine":
        """Stand in for the causal LM ``lm`` in sampling: its device and its generation config (EOS ids)."""
        self.device, self.generation_config = lm.device, lm.generation_config
        return self

    # ------------------------------------------------------------------ weights
    def write(self, lm, version: int, tokenizer=None) -> Path:
        """The learner's weights of ``version`` in a new folder (a reused path could be served from
        the engine's file cache: each version has its own)."""
        folder = Path(tempfile.mkdtemp(prefix=f"v{version:07d}-", dir=self.sync_dir))  # (replaced when written)
        return write_folder(lm, folder, DTYPES[self.dtype], tokenizer)

    def load(self, folder: Path, version: int) -> None:
        """Reload the server's weights from ``folder`` in place (a tied head re-tied), reset its prefix
        cache (its KV came from the old weights), and record ``version`` there."""
        reply = self.server.call("/collective_rpc", {"method": "pg_lm_reload", "args": [str(folder)]})
        results = (reply or {}).get("results") or []
        if not results or not isinstance(results[0], dict) or "retied_heads" not in results[0]:
            raise EngineError(f"the vLLM server did not reload the weights (reply: {str(reply)[:200]}); "
                              f"was it started with --worker-extension-cls {EXTENSION} (docs/inference-engine.md)?")
        if not (self.server.call("/reset_prefix_cache", {}) or {}).get("success", False):
            raise EngineError("the vLLM server could not reset its prefix cache after a weight update")
        self.server.call("/update_weight_version", {"new_version": str(version)})

    def prepare(self, lm, version: int, barrier=None) -> float:
        """Before a rollout: sync ``lm``'s weights when the server's are not of ``version`` (the main
        process writes and loads; ``barrier`` makes the others wait), then check the server's version
        on every process. Returns the seconds the sync took (0 when none was needed)."""
        t0 = time.perf_counter()
        synced = self.version != version
        if synced and self.main:
            old, self.folder = self.folder, self.write(lm, version)
            self.load(self.folder, version)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        if synced and barrier is not None:
            barrier()
        self.version = version
        self.check(version)
        self.sync_s = time.perf_counter() - t0 if synced else 0.0
        return self.sync_s

    def check(self, version: int) -> None:
        """The server holds the weights of ``version``, or an error: a stale sampler is never used."""
        served = (self.server.call("/weight_info") or {}).get("weight_version")
        if served != str(version):
            raise EngineError(f"the vLLM server holds weights of version {served}, the learner's are at {version}: "
                              "it would sample from a stale policy (another trainer syncing to the same server?)")

    # ------------------------------------------------------------------ sampling
    def _request(self, ids: list[int], n: int, seed: int, max_new_tokens: int, eos_ids: list[int], greedy: bool,
                 temperature: float, top_p: float, top_k: int, logprobs: bool) -> list[dict]:
        copies, n = (n, 1) if greedy else (1, n)  # greedy: one decode, the same for every row
        body = {"model": SERVED_NAME, "prompt": [ids], "n": n, "max_tokens": max_new_tokens, "seed": seed,
                "temperature": 0.0 if greedy else temperature, "top_p": 1.0 if greedy else top_p,
                "top_k": -1 if greedy or top_k <= 0 else top_k, "min_tokens": 0, "stop_token_ids": eos_ids,
                "ignore_eos": False, "skip_special_tokens": False, "return_token_ids": True,
                "logprobs": 0 if logprobs else None, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                "frequency_penalty": 0.0, "min_p": 0.0}
        choices = sorted(self.server.call("/v1/completions", body)["choices"], key=lambda c: c["index"])
        if len(choices) != n:
            raise EngineError(f"the vLLM server returned {len(choices)} completions for a prompt, {n} asked")
        return choices * copies

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, num_samples: int, max_new_tokens: int,
                 eos_ids: list[int], pad_id: int, greedy: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, cpu_layer: bool = False, logprobs: bool = False, greedy_extra: bool = False):
        """(N * G, T) completion ids (EOS kept, then ``pad_id``) for the N left-padded prompts, G =
        ``num_samples`` (+ 1 greedy row per prompt with ``greedy_extra``); with ``logprobs`` also the
        (N * G, T) log-probs of the drawn tokens under the sampled distribution (after temperature, and
        after top-k / top-p when set). One request per prompt, all at once (the server batches them);
        seeds drawn from torch's generator, so a run's sampling is a function of its seed and step."""
        prompts = [row[m.bool()].tolist() for row, m in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        per = num_samples + int(greedy_extra)
        base = int(torch.randint(0, 2**31 - 1, (1,)))  # host: one draw per call
        jobs = [dict(ids=p, n=num_samples, seed=base + i * per, greedy=greedy) for i, p in enumerate(prompts)]
        if greedy_extra:
            jobs += [dict(ids=p, n=1, seed=base + i * per, greedy=True) for i, p in enumerate(prompts)]
        common = dict(max_new_tokens=max_new_tokens, eos_ids=eos_ids, temperature=temperature, top_p=top_p,
                      top_k=top_k, logprobs=logprobs)
        with ThreadPoolExecutor(max_workers=min(64, len(jobs))) as pool:
            replies = list(pool.map(lambda j: self._request(**j, **common), jobs))
        rows = [c for i in range(len(prompts)) for k in ([i, len(prompts) + i] if greedy_extra else [i])
                for c in replies[k]]
        T = max(1, max(len(c["token_ids"]) for c in rows))
        pad = lambda xs, fill: list(xs) + [fill] * (T - len(xs))
        tokens = torch.tensor([pad(c["token_ids"], pad_id) for c in rows], device=self.device)  # (B, T)
        if not logprobs:
            return tokens
        lp = [pad(c["logprobs"]["token_logprobs"], 0.0) for c in rows]
        return tokens, torch.tensor(lp, dtype=torch.float32, device=self.device)  # (B, T)

    def close(self) -> None:
        """Stop a server pg_lm started and remove the weight folders it wrote."""
        self.server.stop()
        if self.owns_dir:
            shutil.rmtree(self.sync_dir, ignore_errors=True)
        elif self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

