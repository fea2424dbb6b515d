"""The vLLM worker extension pg_lm's server runs with (``--worker-extension-cls
pg_lm_vllm_worker.WeightSync``): it lives in the vLLM environment, imports only torch and vLLM,
and is reached over HTTP through ``POST /collective_rpc`` (the server runs with
``VLLM_SERVER_DEV_MODE=1``).

``pg_lm_reload(folder)`` loads a checkpoint folder (safetensors, the learner's weights) into the
running model in place, through vLLM's layer-wise reload, which repeats the weights' post-load
processing (on a CPU: re-packing each linear layer's GEMM weights). A tied output head is a layer
that receives no weights of its own, so its packed copy of the embedding would stay on the old
weights and the logits with it, silently: it is re-packed here from the new embedding.
"""

import torch


class WeightSync:
    def pg_lm_hello(self) -> str:
        """The extension is loaded (the client checks this once, before the first rollout). On a CPU it
        also stops the worker's busy-wait: after each message from the engine the worker spins for a
        second on the shared-memory queue, on a core the learner needs for its update (sampling and
        learning take turns). It now waits for the queue's notification instead, and re-reads the
        queue every 5 ms in case a notification was dropped (vLLM's own recovery waits 5 s)."""
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            import gc

            from vllm.distributed.device_communicators import shm_broadcast

            shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS = 5
            for obj in gc.get_objects():
                if type(obj) is shm_broadcast.SpinCondition and obj.is_reader:  # (type: a dead weak proxy raises)
                    obj.busy_loop_s = 0.0
        return "pg_lm"

    def pg_lm_reload(self, folder: str) -> dict:
        self.reload_weights(weights_path=folder, is_checkpoint_format=True)
        return {"retied_heads": self._pg_lm_retie()}

    @torch.no_grad()
    def _pg_lm_retie(self) -> int:
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

        model = self.model_runner.get_model()
        embeddings = [m for m in model.modules()
                      if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)]
        tied = 0
        for head in (m for m in model.modules() if isinstance(m, ParallelLMHead)):
            source = next((e for e in embeddings if e.weight is head.weight), None)
            if source is None:  # an untied head is loaded (and processed) like any other layer
                continue
            process = getattr(head.quant_method, "process_weights_after_loading", None)
            if process is not None:
                process(head)
            tied += 1
        return tied
