"""Generation by an inference engine (``--generator vllm``; docs/inference-engine.md).

The trainer samples through a generator: transformers' KV-cache loop in the training process
(``--generator hf``, :func:`pg_lm.lm.sampling.generate`), or a vLLM server (:class:`VLLMEngine`),
which takes the same prompt token ids and gives back the same completion ids and sampler log-probs.
The server runs in its own environment and process (:mod:`.server`); after every optimizer step the
learner's weights reach it before the next rollout (:mod:`.weights`), and its weight version is
checked on every rollout.
"""

from __future__ import annotations

from pathlib import Path

from .client import VLLMEngine
from .server import EngineError, Server, find_python

__all__ = ["VLLMEngine", "EngineError", "make_engine", "server_dtype"]


def server_dtype(cfg, acc) -> str:
    """The server's dtype: ``--vllm-dtype``, or (auto) the precision the learner's forward runs in."""
    if cfg.vllm_dtype != "auto":
        return cfg.vllm_dtype
    return {"bf16": "bfloat16", "fp16": "float16"}.get(acc.mixed_precision, "float32")


def max_model_len(cfg, lm) -> int:
    """The longest context the server must hold: a prompt and its completion, or a whole episode."""
    limit = getattr(lm.config.get_text_config(), "max_position_embeddings", None) or 1 << 16
    longest = cfg.max_prompt_length + max(cfg.max_new_tokens, cfg.eval_tokens)
    if cfg.env is not None:
        return min(limit, 8192)
    return min(limit, longest)


def make_engine(cfg, acc, lm, tok, version: int) -> VLLMEngine | None:
    """The run's generator: None for ``--generator hf``; for ``vllm``, a server started from ``lm``'s
    weights of ``version`` (its log in ``output_dir/vllm.log``), or the one at ``--vllm-url``, synced
    before its first rollout. Only the main process starts or syncs it; every process samples from it."""
    if cfg.generator == "hf":
        return None
    if getattr(acc.state, "fsdp_plugin", None) is not None:
        raise ValueError("--generator vllm: FSDP-sharded weights are not synced to the server yet (use DDP, or --generator hf)")
    from accelerate.utils import broadcast_object_list

    dtype, folder, url = server_dtype(cfg, acc), None, cfg.vllm_url
    engine = VLLMEngine(None, dtype, cfg.vllm_sync_dir, acc.is_main_process).bind(lm)
    if acc.is_main_process:
        if url is None:
            folder = engine.write(lm, version, tok)
            server = Server.start(find_python(cfg.vllm_python), str(folder), Path(cfg.output_dir) / "vllm.log",
                                  dtype=dtype, max_model_len=max_model_len(cfg, lm), seed=cfg.seed,
                                  kv_cache_gb=cfg.vllm_kv_cache_gb,
                                  gpu_memory=cfg.vllm_gpu_memory, timeout=cfg.vllm_timeout)
            url = server.url
        else:
            server = Server(url)
            server.wait_ready(cfg.vllm_timeout)
        hello = (server.call("/collective_rpc", {"method": "pg_lm_hello"}) or {}).get("results")
        if hello != ["pg_lm"]:
            raise EngineError(f"the vLLM server at {url} lacks pg_lm's weight-sync extension (start it as "
                              "docs/inference-engine.md shows)")
    url = broadcast_object_list([url])[0] if acc.num_processes > 1 else url
    engine.server = server if acc.is_main_process else Server(url)
    if cfg.vllm_url is None:  # started from these weights: they are the version's (on every process)
        if folder is not None:
            engine.server.call("/update_weight_version", {"new_version": str(version)})
        engine.folder, engine.version = folder, version
    return engine
