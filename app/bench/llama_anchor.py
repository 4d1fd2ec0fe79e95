"""llama.cpp as ``bench decode``'s anchor (``--against llama.cpp``): llama-cpp-python on the base's
own GGUF, the engine CPU users pick, in the same process and run as the other sides.

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

import time
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
            "llama_cpp_python": self.version,
            "gguf": str(self.gguf),
            "threads": self.threads,
        }

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode(), add_bos=False, special=True))

    def side(self, prompt_ids: list[int]) -> Side:
        def run(tokens: int) -> tuple[Sample, list[int]]:
            self.llm.reset()  # no prefix reuse across rounds: every run prefills the prompt
            out: list[int] = []
            times: list[float] = []
            with Timer() as t:
                for token in self.llm.generate(
                    prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0
                ):
                    times.append(time.perf_counter())
                    out.append(int(token))
                    if len(out) >= tokens:
                        break
            sample = {
                "seconds": t.seconds,
                "cpu_seconds": t.cpu_seconds,
                "ms_per_token": per_token_ms(times, tokens),
            }
            return sample, out

        return run
