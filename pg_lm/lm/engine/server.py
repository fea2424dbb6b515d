"""A vLLM OpenAI-compatible server as a managed child process, and the HTTP calls pg_lm makes to it.

vLLM pins its own torch and replaces ``torch.set_num_threads`` in the process that imports it, so
it never runs inside pg_lm's interpreter: it runs from its own virtual environment (``make
setup-vllm`` makes ``.venv-vllm``), as a separate process in a session of its own, which pg_lm
stops at the end of the run, on errors and on signals (SIGTERM, then SIGKILL to what is left of
its process group), and which the kernel stops if pg_lm dies first (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

WORKER_DIR = Path(__file__).resolve().parent / "worker"  # pg_lm_vllm_worker.py: on the server's PYTHONPATH
EXTENSION = "pg_lm_vllm_worker.WeightSync"
SERVED_NAME = "policy"


class EngineError(RuntimeError):
    """The inference engine failed (died, refused a request, or sampled with stale weights): one line."""


def find_python(given: str | None) -> Path:
    """The vLLM environment's interpreter: ``given`` (``--vllm-python``), else ``$PG_LM_VLLM_PYTHON``, else
    ``.venv-vllm/bin/python`` in the working folder or beside pg_lm's source tree."""
    here = Path(__file__).resolve().parents[3]
    candidates = [given] if given else [os.environ.get("PG_LM_VLLM_PYTHON"), Path.cwd() / ".venv-vllm/bin/python",
                                        here / ".venv-vllm/bin/python"]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise EngineError("--generator vllm: no vLLM environment found (run `make setup-vllm`, or give its interpreter "
                      "with --vllm-python, or a running server with --vllm-url)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(python: Path, model_dir: str, port: int, dtype: str, max_model_len: int, seed: int, gpu_memory: float) -> list[str]:
    """The server's command line: token ids in and out, the sampled distribution's log-probs (after
    temperature), pg_lm's sampling fields only (``--generation-config vllm``: none from the model's
    generation_config.json), eager (no compile at start-up), the weight-sync extension."""
    return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
            "--max-model-len", str(max_model_len), "--seed", str(seed), "--generation-config", "vllm",
            "--logprobs-mode", "processed_logprobs", "--worker-extension-cls", EXTENSION,
            "--gpu-memory-utilization", str(gpu_memory), "--enforce-eager", "--disable-log-stats"]


def server_env(kv_cache_gb: int) -> dict:
    """The server's environment: dev endpoints on (weight reload, versions), offline, the KV cache size
    set (on a CPU vLLM otherwise wants 90% of memory free), every core this process may use for its threads (sampling and
    learning take turns, they do not overlap); the user's own VLLM_* settings win."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    env = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gb), "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1", "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)),
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "TOKENIZERS_PARALLELISM": "false"}
    env = {**env, **os.environ}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(WORKER_DIR), os.environ.get("PYTHONPATH")) if p)
    env.pop("VIRTUAL_ENV", None)
    return env


def _die_with_parent() -> None:  # in the child, before exec: SIGTERM when pg_lm's process ends (Linux)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Server:
    """A vLLM server started by pg_lm (``start``), or one already running at ``url`` (``proc`` None)."""

    def __init__(self, url: str, proc: subprocess.Popen | None = None, log: Path | None = None):
        self.url, self.proc, self.log = url.rstrip("/"), proc, log

    @classmethod
    def start(cls, python: Path, model_dir: str, log: Path, *, dtype: str, max_model_len: int, seed: int,
              kv_cache_gb: int, gpu_memory: float, timeout: float) -> "Server":
        port = free_port()
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(command(python, model_dir, port, dtype, max_model_len, seed, gpu_memory), stdout=out,
                                    stderr=subprocess.STDOUT, env=server_env(kv_cache_gb), start_new_session=True,
                                    preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        server = cls(f"http://127.0.0.1:{port}", proc, log)
        atexit.register(server.stop)
        server.wait_ready(timeout)
        return server

    def wait_ready(self, timeout: float) -> None:
        """Poll ``/health`` until the engine has loaded (connection refused until then); a child that
        exits first, or ``timeout`` seconds, is an error naming its log."""
        t0 = time.monotonic()
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise EngineError(f"the vLLM server exited with code {self.proc.returncode} while starting; "
                                  f"its log: {self.log} ({self.tail()})")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() - t0 > timeout:
                self.stop()
                where = f"its log: {self.log}" if self.log else f"at {self.url}"
                raise EngineError(f"the vLLM server was not ready after {timeout:.0f} s ({where})")
            time.sleep(0.5)

    def tail(self, lines: int = 1) -> str:
        """The last line(s) of the server's log that say something (its error, usually)."""
        if self.log is None or not self.log.exists():
            return ""
        text = [x for x in self.log.read_text(errors="replace").splitlines() if x.strip()]
        return " | ".join(text[-lines:])[-300:]

    def call(self, path: str, body: dict | None = None, timeout: float = 600.0):
        """GET (``body`` None) or POST JSON to the server; its JSON reply (None when empty). A server that
        has died or answers with an error is an :class:`EngineError` in one line."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            raise EngineError(f"the vLLM server refused {path} (HTTP {e.code}): {detail}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            dead = self.proc is not None and self.proc.poll() is not None
            what = f"exited with code {self.proc.returncode}" if dead else f"did not answer ({e})"
            raise EngineError(f"the vLLM server at {self.url} {what} during {path}"
                              + (f"; its log: {self.log}" if self.log else "")) from None
        return json.loads(raw) if raw.strip() else None

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to the server, which stops vLLM's engine and workers (its children); after ``grace``
        seconds, or when it died first, SIGKILL to what is left of its process group. Does nothing for a
        server pg_lm did not start."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()  # the server alone: it stops its engine and workers, which free their shared memory
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10.0  # the rest of its group (multiprocessing's resource tracker frees
        while time.monotonic() < deadline:  # the shared memory last) may finish; what is still there is killed
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
