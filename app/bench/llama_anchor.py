"""llama.cpp as ``bench decode``'s anchor (``--against llama.cpp``): llama-cpp-python on the base's
own GGUF, the engine CPU users pick, in the same run as the other sides, interleaved round by round.

By default it runs in a child process of its own (:class:`LlamaCppProcess`, speaking JSON lines
over a pipe; the child times its own tokens, so the pipe costs nothing measured). In the bench
process it loads the OpenMP runtime torch already loaded (libgomp, by soname), and each side's
helper threads slowed the other's (:mod:`app.engine.openmp`): llama.cpp ran 1.5-1.7x slower
there than alone while the engines' idle teams lived; once they were freed, the engine ran 2.4x
slower beside llama.cpp's team. ``--anchor-process same`` keeps it in-process, freeing its team
after each run.

Same prompt token ids as the engine, greedy (``temp=0``: argmax, no repeat penalty), exactly the
same number of new tokens (EOS is not a stop here: ``Llama.generate`` yields until told to stop),
the same CPU threads for generation and prompt, the KV cache emptied before every run (llama-cpp-
python would otherwise reuse the cached prompt prefix from the previous round). It runs the base
(the GGUF as shipped, Q4_1 for SmolLM2), not a SoFT adapter merged into it: the tokens it picks are
the base's, and only its speed is compared.

llama-cpp-python is the optional extra ``.[anchors]`` (``make bench-anchors``): it compiles
llama.cpp for ~12 minutes on two cores, so it is never part of ``make test``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.bench.common import Timer
from app.bench.decode_sides import Sample, Side, per_token_ms
from app.model_store import ModelStoreError

ANCHOR = "llama.cpp"
INSTALL_HINT = "pip install '.[anchors]' (or make bench-anchors; it compiles for ~12 minutes)"


def base_gguf(model: str | Path) -> Path:
    """The GGUF that ``model`` is, holds, or (an adapter) names as its base."""
    from app.base_ref import find_gguf, is_adapter, resolve, resolve_base

    path = resolve(model)
    if is_adapter(path):
        from app.engine.adapter import adapter_base

        path = resolve_base(adapter_base(path), str(path / "sorted.json"))
    gguf = find_gguf(path) if path.is_dir() or path.suffix.lower() == ".gguf" else None
    if gguf is None:
        raise ModelStoreError(
            f"--against {ANCHOR} needs a GGUF model, or an adapter on a GGUF base: "
            f"{model} is neither (name one with --gguf)"
        )
    return gguf


class LlamaCpp:
    """One llama-cpp-python model, run greedy from an empty KV cache each time."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int) -> None:
        try:
            import llama_cpp
        except ImportError as exc:
            raise ModelStoreError(
                f"--against {ANCHOR} needs llama-cpp-python, which is not installed: {INSTALL_HINT}"
            ) from exc
        self.gguf = gguf
        self.threads = threads
        self.version = str(getattr(llama_cpp, "__version__", "unknown"))
        self.llm = llama_cpp.Llama(
            model_path=str(gguf),
            n_ctx=n_ctx,
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            seed=0,
            verbose=False,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "engine": ANCHOR,
            "process": "same",
            "llama_cpp_python": self.version,
            "gguf": str(self.gguf),
            "threads": self.threads,
        }

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode(), add_bos=False, special=True))

    def run(self, prompt_ids: Sequence[int], tokens: int) -> tuple[Sample, list[int]]:
        """One greedy generation of ``tokens`` new tokens from an empty cache, timed."""
        self.llm.reset()  # no prefix reuse across rounds: every run prefills the prompt
        out: list[int] = []
        times: list[float] = []
        with Timer() as t:
            for token in self.llm.generate(
                list(prompt_ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0
            ):
                times.append(time.perf_counter())
                out.append(int(token))
                if len(out) >= tokens:
                    break
        if "torch" in sys.modules:  # beside torch, llama.cpp shares its libgomp: free our team
            from app.engine.openmp import release_thread_pool

            release_thread_pool()  # (else the engine's worker slows down: app/engine/openmp.py)
        sample = {
            "seconds": t.seconds,
            "cpu_seconds": t.cpu_seconds,
            "ms_per_token": per_token_ms(times, tokens),
        }
        return sample, out

    def side(self, prompt_ids: list[int]) -> Side:
        return lambda tokens: self.run(prompt_ids, tokens)

    def close(self) -> None:
        self.llm.close()


class LlamaCppProcess:
    """:class:`LlamaCpp` in a child process (``python -m app.bench.llama_anchor``): the same
    methods, each one JSON request and reply over the child's stdin and stdout."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int) -> None:
        self.gguf, self.threads = gguf, threads
        command = [sys.executable, "-m", "app.bench.llama_anchor", str(gguf), str(threads)]
        self.child = subprocess.Popen(
            [*command, str(n_ctx)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.version = str(self._call("version"))

    def _call(self, method: str, *args: Any) -> Any:
        assert self.child.stdin is not None and self.child.stdout is not None
        self.child.stdin.write(json.dumps([method, *args]) + "\n")
        self.child.stdin.flush()
        line = self.child.stdout.readline()
        if not line:
            code = self.child.wait()
            raise ModelStoreError(f"the {ANCHOR} child process ended (exit {code}): see its stderr")
        reply = json.loads(line)
        if "error" in reply:
            raise ModelStoreError(reply["error"])
        return reply["result"]

    def describe(self) -> dict[str, Any]:
        return {**self._call("describe"), "process": "child"}

    def tokenize(self, text: str) -> list[int]:
        return list(self._call("tokenize", text))

    def side(self, prompt_ids: list[int]) -> Side:
        def run(tokens: int) -> tuple[Sample, list[int]]:
            sample, out = self._call("run", prompt_ids, tokens)
            return sample, out

        return run

    def close(self) -> None:
        if self.child.poll() is None:
            assert self.child.stdin is not None
            self.child.stdin.close()
            try:
                self.child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.child.kill()


def serve_child(argv: Sequence[str]) -> int:
    """The child's loop: one JSON ``[method, *args]`` per stdin line, one reply per stdout line."""
    gguf, threads, n_ctx = Path(argv[0]), int(argv[1]), int(argv[2])
    llm: LlamaCpp | None = None
    error = None
    try:
        llm = LlamaCpp(gguf, threads, n_ctx)
    except Exception as exc:  # answered to the parent's first request, in one line
        error = (
            str(exc) if isinstance(exc, ModelStoreError) else f"{ANCHOR} cannot load {gguf}: {exc}"
        )
    methods = {
        "version": lambda model: model.version,
        "describe": lambda model: model.describe(),
        "tokenize": lambda model, text: model.tokenize(text),
        "run": lambda model, ids, tokens: model.run(ids, tokens),
    }
    for line in sys.stdin:
        method, *args = json.loads(line)
        reply = {"error": error} if llm is None else {"result": methods[method](llm, *args)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(serve_child(sys.argv[1:]))
