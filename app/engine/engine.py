"""The engine: one continuously batched decode loop in a worker thread, behind an async interface.

Each loop iteration reads:  take new work → apply cancels / lowered exits → prefill arrivals into
free rows → re-order rows if membership or exits changed → one decode step for every running row →
hand events back. A request joins after its prefill and leaves when finished, between steps.

Threads: callers (the asyncio side) only append to ``_inbox`` / ``_commands`` under ``_cv``; the
worker owns everything else. Each iteration's events go, as one batch, to a relay thread
(:mod:`app.engine.relay`) that puts them into each request's ``asyncio.Queue`` with one
``loop.call_soon_threadsafe`` per event loop, so nothing ever blocks the event loop and waking it
never stalls the decode loop. No torch type crosses this interface (see :mod:`app.engine.types`).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from app.engine.config import DEFAULT_MAX_SEQ_LEN, EngineConfig, resolve_device
from app.engine.kv_cache import KVCache, plan_rows
from app.engine.loader import Checkpoint, load_checkpoint
from app.engine.model import Transformer
from app.engine.profile import measure_profile
from app.engine.relay import EventRelay
from app.engine.request_state import RequestState
from app.engine.runner import ModelRunner
from app.engine.types import (
    EngineStats,
    FinalEvent,
    FinishReason,
    GenerationRequest,
    ModelInfo,
    ProfilePoint,
    StepHook,
    StepReport,
    TokenEvent,
)

logger = logging.getLogger(__name__)

Event = TokenEvent | FinalEvent


class EngineClosedError(RuntimeError):
    """The engine is shutting down and accepts no new requests."""


class Engine:
    def __init__(
        self, checkpoint: Checkpoint, config: EngineConfig, step_hook: StepHook | None = None
    ) -> None:
        device, dtype_name = resolve_device(config)
        if config.torch_threads is not None and device == "cpu":
            torch.set_num_threads(config.torch_threads)
        dtype = getattr(torch, dtype_name)
        max_seq_len = min(config.max_seq_len or DEFAULT_MAX_SEQ_LEN, checkpoint.max_context)
        if config.max_seq_len and config.max_seq_len > checkpoint.max_context:
            logger.warning(
                "max_seq_len %d exceeds what the model supports; using %d",
                config.max_seq_len,
                checkpoint.max_context,
            )
        model = Transformer.from_checkpoint(
            checkpoint.hf_config, checkpoint.tensors, max_seq_len, device, dtype
        )
        checkpoint.tensors.clear()  # the model holds its own (fused) copies
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
        self.tokenizer = checkpoint.tokenizer
        # Rust tokenizers refuse concurrent use when one call reconfigures them ("Already
        # borrowed"); the API encodes from a thread pool, so encoding is serialised.
        self._encode_lock = threading.Lock()
        self._runner = ModelRunner(model, cache)
        self._decode_text = _text_decoder(copy.deepcopy(checkpoint.tokenizer))
        self._eos = frozenset(checkpoint.eos_token_ids)
        self._step_hook = step_hook
        self._max_seq_len = max_seq_len
        self._max_slots = config.max_slots
        self.info = _model_info(checkpoint, model, max_seq_len, device, dtype_name)
        # Shared with callers, guarded by _cv.
        self._cv = threading.Condition()
        self._inbox: list[RequestState] = []
        self._commands: list[tuple[Any, ...]] = []
        self._calls: list[tuple[Callable[[], Any], Future]] = []
        self._live: set[str] = set()  # request ids submitted and not finished
        self._closing = False
        self._stop = False
        self._thread: threading.Thread | None = None
        # Owned by the worker thread.
        self._requests: dict[str, RequestState] = {}
        self._waiting: deque[RequestState] = deque()
        self._running: list[RequestState] = []  # in row order once laid out
        self._layout_dirty = False
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]] = {}
        self._relay: EventRelay | None = None  # started with the worker

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        config: EngineConfig | None = None,
        step_hook: StepHook | None = None,
    ) -> Engine:
        """Load a model-store folder once (raises ``ModelStoreError`` with one clear sentence)."""
        return cls(load_checkpoint(model_dir), config or EngineConfig(), step_hook)

    # -- tokenisation -----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """``tokenizer(text).input_ids``: BOS where the tokenizer is configured to add one."""
        with self._encode_lock:
            return list(self.tokenizer(text).input_ids)

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The tokenizer's chat template with the generation prompt."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template")
        with self._encode_lock:
            out = self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=True
            )
        if not isinstance(out, list):
            out = out["input_ids"]
        return [int(t) for t in out]

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        with self._cv:
            if self._thread is not None:
                return
            self._relay = self._relay or EventRelay()
            self._thread = threading.Thread(
                target=self._run, name="sortedserve-engine", daemon=True
            )
            self._thread.start()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop accepting; let in-flight requests finish for ``timeout_s``; cancel the rest."""
        with self._cv:
            self._closing = True
            if self._thread is not None:
                self._cv.wait_for(lambda: not self._live, timeout=max(0.0, timeout_s))
            self._stop = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        else:
            self._cancel_unstarted()
        if self._relay is not None:
            self._relay.close()

    def stats(self) -> EngineStats:
        with self._cv:
            waiting = len(self._inbox) + len(self._waiting)
        running = len(self._running)
        return EngineStats(
            running=running,
            waiting=waiting,
            free_slots=self._max_slots - running,
            max_slots=self._max_slots,
        )

    # -- requests ---------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Token events, then one :class:`FinalEvent`. Leaving early cancels the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        state = self._submit(request, loop, queue)
        finished = False
        try:
            while True:
                event = await queue.get()
                if isinstance(event, FinalEvent):
                    finished = True
                yield event
                if finished:
                    return
        finally:
            if not finished:
                self.cancel(state.request_id)

    def cancel(self, request_id: str) -> None:
        """Cancel a waiting or running request; it leaves within one step (thread-safe)."""
        self._command("cancel", request_id)

    def lower_exit(self, request_id: str, exit_layer: int) -> None:
        """Move a request to a shallower exit from its next token on; ignored if not lower."""
        self._command("lower", request_id, exit_layer)

    def measure_profile(
        self, batch_sizes: Sequence[int], prompt_tokens: int = 64, decode_steps: int = 8
    ) -> list[ProfilePoint]:
        """Per trained exit: prefill ms per prompt token and decode ms per step by batch size.

        Runs in the worker thread while no request is running (or inline before ``start``).
        """

        def job() -> list[ProfilePoint]:
            return measure_profile(
                self._runner, self.info, batch_sizes, prompt_tokens, decode_steps
            )

        future: Future = Future()
        with self._cv:
            inline = self._thread is None
            if not inline:
                self._calls.append((job, future))
                self._cv.notify_all()
        if inline:
            with torch.inference_mode():
                return job()
        return future.result()

    def _submit(
        self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue
    ) -> RequestState:
        self._validate(request)
        now = time.perf_counter()
        if request.arrival_time is None:
            request.arrival_time = now
        state = RequestState.create(request, loop, queue, self._decode_text, request.arrival_time)
        with self._cv:
            if self._closing:
                raise EngineClosedError("the engine is shutting down")
            if request.request_id in self._live:
                raise ValueError(f"request id {request.request_id!r} is already in use")
            self._live.add(request.request_id)
            self._inbox.append(state)
            self._cv.notify_all()
        return state

    def _validate(self, request: GenerationRequest) -> None:
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self._max_seq_len:
            raise ValueError(
                f"the prompt has {n} tokens; the context holds {self._max_seq_len} "
                "(prompt plus at least one new token)"
            )
        if not 1 <= request.exit_layer <= self.info.num_layers:
            raise ValueError(
                f"exit_layer {request.exit_layer} is outside 1..{self.info.num_layers}"
            )
        vocab = self.info.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_ids):
            raise ValueError(f"the prompt has token ids outside 0..{vocab - 1}")
        p = request.sampling
        if p.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if p.temperature < 0 or not 0 < p.top_p <= 1 or p.top_k < 0:
            raise ValueError("temperature must be >= 0, top_p in (0, 1] and top_k >= 0")

    def _command(self, *command: Any) -> None:
        with self._cv:
            self._commands.append(command)
            self._cv.notify_all()

    # -- the worker loop --------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    self._cv.wait_for(self._has_work)
                    stopping = self._stop
                    inbox, self._inbox = self._inbox, []
                    commands, self._commands = self._commands, []
                    calls = self._calls if not (self._running or stopping) else []
                    if calls:
                        self._calls = []
                for state in inbox:
                    self._requests[state.request_id] = state
                    self._waiting.append(state)
                if stopping:
                    break
                try:
                    self._iterate(commands, calls)
                except Exception as exc:  # a bug in the loop itself: fail the work, keep serving
                    logger.exception("engine loop iteration failed")
                    for state in [*self._running, *self._waiting]:
                        self._finish(state, "error", error=f"engine failure: {exc}")
                    self._layout_dirty = True
                self._flush()
            self._stop_all()

    def _iterate(
        self, commands: list[tuple[Any, ...]], calls: list[tuple[Callable[[], Any], Future]]
    ) -> None:
        self._apply(commands)
        for job, future in calls:
            self._call(job, future)
        if not self._calls:
            self._admit()
        if self._running:
            self._step()

    def _has_work(self) -> bool:
        return bool(
            self._stop
            or self._inbox
            or self._commands
            or self._running
            or self._waiting
            or self._calls
        )

    def _apply(self, commands: list[tuple[Any, ...]]) -> None:
        for command in commands:
            kind, request_id, *args = command
            state = self._requests.get(request_id)
            if state is None or state.finish_reason is not None:
                continue
            if kind == "cancel":
                self._finish(state, "cancelled")
            elif kind == "lower":
                self._lower(state, args[0])

    def _lower(self, state: RequestState, exit_layer: Any) -> None:
        if not isinstance(exit_layer, int) or not 1 <= exit_layer < state.exit_layer:
            logger.debug(
                "ignored lower_exit(%s, %r) at exit %d",
                state.request_id,
                exit_layer,
                state.exit_layer,
            )
            return
        state.lower_exit(exit_layer)
        if state.row >= 0:
            self._layout_dirty = True

    def _call(self, job: Callable[[], Any], future: Future) -> None:
        try:
            future.set_result(job())
        except Exception as exc:
            future.set_exception(exc)

    def _admit(self) -> None:
        """Prefill waiting requests into free rows; each sends its first token at once."""
        while self._waiting and len(self._running) < self._max_slots:
            state = self._waiting.popleft()
            used = {s.row for s in self._running}
            state.row = next(r for r in range(self._max_slots) if r not in used)
            state.prefill_start = time.perf_counter()
            try:
                token = self._runner.prefill(
                    state.row, state.request.prompt_ids, state.exit_layer, state.next_sampling()
                )
            except Exception as exc:
                logger.exception("prefill failed for %s", state.request_id)
                self._finish(state, "error", error=f"prefill failed: {exc}")
                continue
            self._on_token(state, token, time.perf_counter())
            if state.finish_reason is None:
                self._running.append(state)
                self._layout_dirty = True
            else:
                state.row = -1
            self._flush()

    def _layout(self) -> None:
        """Order rows by exit (deepest first) with as few cache-row copies as possible."""
        running = self._running
        current = [s.row for s in running]
        exits = [s.exit_layer for s in running]
        new_rows = plan_rows(current, exits)
        moves = [(c, n, e) for c, n, e in zip(current, new_rows, exits, strict=True) if c != n]
        copy_len = max(
            (
                running[i].position
                for i, (c, n) in enumerate(zip(current, new_rows, strict=True))
                if c != n
            ),
            default=0,
        )
        for state, row in zip(running, new_rows, strict=True):
            state.row = row
        running.sort(key=lambda s: s.row)
        self._runner.set_layout(
            moves, copy_len, [s.position for s in running], [s.exit_layer for s in running]
        )
        self._layout_dirty = False

    def _step(self) -> None:
        running = self._running
        start = time.perf_counter()
        try:
            if self._layout_dirty:
                self._layout()
            sampled = []
            for i, state in enumerate(running):
                params = state.next_sampling()
                if params is not None:
                    sampled.append((i, params))
            tokens = self._runner.decode(
                [s.generated[-1] for s in running],
                max(s.position for s in running) + 1,
                sampled,
            )
        except Exception as exc:
            logger.exception("decode step failed; failing its %d requests", len(running))
            for state in list(running):
                self._finish(state, "error", error=f"decode step failed: {exc}")
            return
        now = time.perf_counter()
        deepest = running[0].exit_layer
        batch = len(running)
        for state, token in zip(list(running), tokens, strict=True):
            try:
                self._on_token(state, token, now)
            except Exception as exc:
                logger.exception("post-processing failed for %s", state.request_id)
                self._finish(state, "error", error=f"post-processing failed: {exc}")
        if self._step_hook is not None:
            self._report(now, now - start, batch, deepest)

    def _report(self, now: float, seconds: float, batch: int, deepest: int) -> None:
        report = StepReport(
            now=now,
            step_seconds=seconds,
            batch_size=batch,
            deepest_exit=deepest,
            rows=tuple(s.row_state() for s in self._running),
            waiting=len(self._waiting),
        )
        try:
            lowered = self._step_hook(report)  # type: ignore[misc]
        except Exception:
            logger.exception("step hook failed")
            return
        for request_id, exit_layer in (lowered or {}).items():
            state = self._requests.get(request_id)
            if state is not None and state.finish_reason is None:
                self._lower(state, exit_layer)

    def _on_token(self, state: RequestState, token: int, now: float) -> None:
        state.generated.append(token)
        state.last_token_at = now
        if state.first_token_at is None:
            state.first_token_at = now
        reason: FinishReason | None = None
        if token in self._eos and not state.request.sampling.ignore_eos:
            reason = "eos"
            text = ""
        else:
            text = state.stops.push(state.decoder.add(token))
            if state.stops.stopped:
                reason = "stop"
            elif (
                len(state.generated) >= state.request.sampling.max_new_tokens
                or state.prompt_len + len(state.generated) >= self._max_seq_len
            ):
                reason = "length"
        if reason in ("eos", "length"):
            text += state.stops.push(state.decoder.flush())
            if state.stops.stopped:
                reason = "stop"
            else:
                text += state.stops.flush()
        self._emit(state, state.token_event(token, text))
        if reason is not None:
            self._finish(state, reason)

    def _finish(self, state: RequestState, reason: FinishReason, error: str | None = None) -> None:
        self._emit(state, state.final_event(reason, time.perf_counter(), error))
        self._requests.pop(state.request_id, None)
        if state in self._running:
            self._running.remove(state)
            self._layout_dirty = True
        elif state in self._waiting:
            self._waiting.remove(state)
        state.row = -1
        with self._cv:
            self._live.discard(state.request_id)
            if not self._live:
                self._cv.notify_all()

    # -- events back to asyncio -------------------------------------------------------------------

    def _emit(self, state: RequestState, event: Event) -> None:
        if state.loop is None or state.queue is None:
            return
        self._outbox.setdefault(state.loop, []).append((state.queue, event))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        if outbox:
            if self._relay is None:  # events before start(): only cancellations at shutdown
                self._relay = EventRelay()
            self._relay.post(outbox)

    def _stop_all(self) -> None:
        for state in [*self._waiting, *self._running]:
            self._finish(state, "cancelled")
        self._flush()
        with self._cv:
            calls, self._calls = self._calls, []
        for _, future in calls:
            future.set_exception(EngineClosedError("the engine shut down"))

    def _cancel_unstarted(self) -> None:
        with self._cv:
            inbox, self._inbox = self._inbox, []
        for state in inbox:
            self._finish(state, "cancelled")
        self._flush()


def _model_info(
    checkpoint: Checkpoint, model: Transformer, max_seq_len: int, device: str, dtype: str
) -> ModelInfo:
    meta = checkpoint.meta
    quality = {}
    for k, v in (meta.eval.get("by_exit") or {}).items():
        if isinstance(v, int | float):
            quality[str(k)] = float(v)
    return ModelInfo(
        model_id=checkpoint.folder.resolve().name,
        model_type=checkpoint.model_type,
        num_layers=model.args.num_layers,
        exits=tuple(meta.exits),
        max_seq_len=max_seq_len,
        vocab_size=model.args.vocab_size,
        eos_token_ids=tuple(checkpoint.eos_token_ids),
        device=device,
        dtype=dtype,
        soft_tuned=meta.soft_tuned,
        quality=quality,
        metric=str(meta.eval.get("metric", "loss")),
    )


def _text_decoder(tokenizer: Any) -> Callable[[Sequence[int]], str]:
    """The fastest faithful ``ids -> text`` for this tokenizer, skipping special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(list(ids), skip_special_tokens=True)
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)
