"""The engine's front end: load once, then ``generate`` / ``cancel`` / ``stats`` from any thread.

Callers (the asyncio side) only touch the :class:`~app.engine.mailbox.Mailbox`; the worker thread
(:class:`~app.engine.loop.EngineLoop`) owns the batch and the model runner. No torch type crosses
this interface (see :mod:`app.engine.types`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from app.engine.batch import Batch
from app.engine.chunking import ChunkPacer
from app.engine.codec import TextCodec
from app.engine.config import DEFAULT_MAX_SEQ_LEN, EngineConfig, resolve_device
from app.engine.invariants import check_request
from app.engine.kv_cache import KVCache
from app.engine.loader import Checkpoint, load_checkpoint
from app.engine.loop import EngineLoop
from app.engine.mailbox import Mailbox
from app.engine.openmp import release_thread_pool
from app.engine.profile import measure_profile
from app.engine.request_state import RequestState
from app.engine.runner import ModelRunner
from app.engine.types import (
    EngineClosedError,
    EngineStats,
    Event,
    FinalEvent,
    GenerationRequest,
    ModelInfo,
    ProfilePoint,
    StepHook,
)
from app.engine.weights import SIDE_PATH_FORMATS, build_model

logger = logging.getLogger(__name__)

__all__ = ["Engine", "EngineClosedError"]


class Engine:
    def __init__(
        self, checkpoint: Checkpoint, config: EngineConfig, step_hook: StepHook | None = None
    ) -> None:
        device, dtype_name = resolve_device(config)
        if config.torch_threads is not None and device == "cpu":
            torch.set_num_threads(config.torch_threads)
        max_seq_len = min(config.max_seq_len or DEFAULT_MAX_SEQ_LEN, checkpoint.max_context)
        if config.max_seq_len and config.max_seq_len > checkpoint.max_context:
            logger.warning(
                "max_seq_len %d exceeds what the model supports; using %d",
                config.max_seq_len,
                checkpoint.max_context,
            )
        dtype = getattr(torch, dtype_name)
        model = build_model(
            checkpoint.hf_config,
            checkpoint.tensors,
            max_seq_len,
            device,
            dtype,
            weights=config.weights,
            kernel_cache=Path(config.kernel_cache_dir) if config.kernel_cache_dir else None,
            adapter=checkpoint.adapter,
        )
        checkpoint.tensors.clear()  # the model holds its own (fused) copies
        checkpoint.adapter = None
        a = model.args
        cache = KVCache(
            a.num_layers, config.max_slots, a.num_kv_heads, max_seq_len, a.head_dim, device, dtype
        )
        logger.info(
            "loaded %s (%s, %d layers, exits %s) on %s/%s; KV cache %d slots x %d tokens (%.1f MB)",
            checkpoint.folder,
            checkpoint.model_type,
            a.num_layers,
            checkpoint.meta.exits,
            device,
            dtype_name,
            config.max_slots,
            max_seq_len,
            cache.nbytes / 2**20,
        )
        self.config = config
        self.info = _model_info(
            checkpoint, a.num_layers, a.vocab_size, max_seq_len, device, dtype_name
        )
        if model.kernel_choice is not None:
            choice = model.kernel_choice
            self.info = replace(self.info, weights=choice.weights, weight_kernel=choice.kernel)
        self._codec = TextCodec(checkpoint.tokenizer)
        self._mailbox = Mailbox()
        batch = Batch(
            config.max_slots, max_seq_len, frozenset(checkpoint.eos_token_ids), self._mailbox.done
        )
        pacer = ChunkPacer(config.prefill_chunk, config.prefill_stall)
        self._loop = EngineLoop(ModelRunner(model, cache), batch, self._mailbox, step_hook, pacer)
        self._thread: threading.Thread | None = None

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        config: EngineConfig | None = None,
        step_hook: StepHook | None = None,
    ) -> Engine:
        """Load a model-store folder once (raises ``ModelStoreError`` with one clear sentence, and
        ``WeightFormatError`` for a weight format this machine cannot run)."""
        config = config or EngineConfig()
        keep = config.weights in SIDE_PATH_FORMATS
        return cls(load_checkpoint(model_dir, keep_adapter=keep), config, step_hook)

    # -- text -------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self._codec.tokenizer

    def encode(self, text: str) -> list[int]:
        return self._codec.encode(text)

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self._codec.encode_chat(messages)

    # -- lifecycle --------------------------------------------------------------------------------
    def measure_profile(
        self,
        batch_sizes: Sequence[int],
        *,
        depths: int = 0,
        max_seconds: float = float("inf"),
        prompt_tokens: int = 64,
        decode_steps: int = 8,
    ) -> list[ProfilePoint]:
        """Prefill ms per prompt token and decode ms per step by batch size, at ``depths`` exits
        spread over the trained ones (0: all), with the batch sizes that fit in ``max_seconds``.

        Runs before :meth:`start` (as the server does), or after it while no request is live:
        it holds the mailbox's lock, so the worker stays idle and new requests wait.
        """
        runner = self._loop.runner
        with self._mailbox.cv:
            if self._mailbox.live:
                raise RuntimeError("cannot measure the latency profile while requests run")
            try:
                with runner.inference():
                    return measure_profile(
                        runner,
                        self.info,
                        batch_sizes,
                        prompt_tokens,
                        decode_steps,
                        depths,
                        max_seconds,
                    )
            finally:
                release_thread_pool()  # the worker decodes next (app/engine/openmp.py)

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        with self._mailbox.cv:
            if self._thread is not None:
                return
            # this thread loaded the model: its OpenMP team would slow the worker's (openmp.py)
            release_thread_pool()
            self._thread = threading.Thread(
                target=self._loop.run, name="sortedserve-engine", daemon=True
            )
            self._thread.start()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop accepting; let in-flight requests finish for ``timeout_s``; cancel the rest."""
        thread = self._thread
        self._mailbox.close(timeout_s if thread is not None else None)
        if thread is not None:
            thread.join()
        else:  # never started: cancel what was submitted, from this thread
            self._loop.stop(self._mailbox.take(busy=True))
        if self._loop.relay is not None:
            self._loop.relay.close()

    def stats(self) -> EngineStats:
        batch = self._loop.batch
        running = len(batch.running)
        return EngineStats(
            running=running,
            # a request part-way through a chunked prefill waits for its first token, in a row
            waiting=self._mailbox.arrived + len(batch.waiting) + (batch.prefilling is not None),
            free_slots=batch.max_slots - running - (batch.prefilling is not None),
            max_slots=batch.max_slots,
        )

    # -- requests ---------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Token events, then one :class:`FinalEvent`. Leaving early cancels the request."""
        check_request(request, self.info)
        if request.arrival_time is None:
            request.arrival_time = time.perf_counter()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        state = RequestState.create(
            request, asyncio.get_running_loop(), queue, self._codec.decode, request.arrival_time
        )
        self._mailbox.submit(state)
        finished = False
        try:
            while not finished:
                event = await queue.get()
                finished = isinstance(event, FinalEvent)
                yield event
        finally:
            if not finished:
                self.cancel(request.request_id)

    def cancel(self, request_id: str) -> None:
        """Cancel a waiting or running request; it leaves within one step (thread-safe)."""
        self._mailbox.cancel(request_id)


def _model_info(
    checkpoint: Checkpoint,
    num_layers: int,
    vocab_size: int,
    max_seq_len: int,
    device: str,
    dtype: str,
) -> ModelInfo:
    meta = checkpoint.meta
    quality = {
        str(k): float(v)
        for k, v in (meta.eval.get("by_exit") or {}).items()
        if isinstance(v, int | float)
    }
    return ModelInfo(
        model_id=checkpoint.folder.resolve().name,
        model_type=checkpoint.model_type,
        num_layers=num_layers,
        exits=tuple(meta.exits),
        max_seq_len=max_seq_len,
        vocab_size=vocab_size,
        eos_token_ids=tuple(checkpoint.eos_token_ids),
        device=device,
        dtype=dtype,
        soft_tuned=meta.soft_tuned,
        quality=quality,
        metric=str(meta.eval.get("metric", "loss")),
    )
