"""The worker loop: one continuously batched decode loop in a thread of its own.

Each iteration reads: apply commands (arrivals, cancels) → admit (prefill waiting requests into
free rows) → step (one decode step for every running row; the step hook may lower exits) → post
events. The batch (:mod:`app.engine.batch`) does the bookkeeping, the runner
(:mod:`app.engine.runner`) is the only torch code, and the relay (:mod:`app.engine.relay`) hands
events to the asyncio side without ever blocking this thread.
"""

from __future__ import annotations

import logging
import time

from app.engine.batch import Batch
from app.engine.chunking import ChunkPacer
from app.engine.mailbox import Mail, Mailbox
from app.engine.openmp import release_thread_pool
from app.engine.relay import EventRelay
from app.engine.runner import ModelRunner
from app.engine.types import StepHook, StepReport

logger = logging.getLogger(__name__)


class EngineLoop:
    def __init__(
        self,
        runner: ModelRunner,
        batch: Batch,
        mailbox: Mailbox,
        step_hook: StepHook | None,
        pacer: ChunkPacer | None = None,
    ) -> None:
        self.runner = runner
        self.pacer = pacer or ChunkPacer(0, 1.0)  # prompt tokens per iteration while others decode
        self.batch = batch
        self.mailbox = mailbox
        self.step_hook = step_hook
        self.relay: EventRelay | None = None

    def run(self) -> None:
        """The thread's body: iterate until told to stop, then cancel what is left."""
        with self.runner.inference():
            while True:
                if not self.batch.busy and not self.mailbox.arrived:
                    release_thread_pool()  # idle: other threads may run torch (openmp.py)
                mail = self.mailbox.take(busy=self.batch.busy)
                if mail.stopping:
                    self.stop(mail)
                    return
                try:
                    self.iterate(mail)
                except Exception as exc:  # a bug in the loop itself: fail the work, keep serving
                    logger.exception("engine loop iteration failed")
                    self.batch.finish_all("error", error=f"engine failure: {exc}")
                self.post()

    def iterate(self, mail: Mail) -> None:
        self.apply(mail)
        self.admit()
        if self.batch.running:
            self.step()

    def apply(self, mail: Mail) -> None:
        for state in mail.arrivals:
            self.batch.add(state)
        for request_id in mail.cancels:
            self.batch.cancel(request_id)

    def admit(self) -> None:
        """Prefill waiting requests into free rows; each sends its first token at once.

        With chunking (:class:`ChunkPacer`), prompts go in chunks sized to stall the running
        requests for a bounded time per iteration (one long prompt no longer stalls every stream
        for its whole prefill); with nothing running, chunk after chunk until a request joins.
        """
        spent = 0
        while True:
            allowance = self.pacer.allowance(spent, bool(self.batch.running))
            if allowance is not None and allowance <= 0:
                return  # the rest after the next decode step
            state = self.batch.next_admission()
            if state is None:
                return
            p = state.request.sampling
            prompt, start = state.request.prompt_ids, state.prefilled
            end = len(prompt) if allowance is None else min(len(prompt), start + allowance)
            generate = p.max_new_tokens > 0 and end == len(prompt)  # 0: only score the prompt
            try:
                t0 = time.perf_counter()
                out = self.runner.prefill(
                    state.row,
                    prompt,
                    state.exit_layer,
                    state.next_sampling() if generate else None,
                    logprobs=p.logprobs,
                    prompt_logprobs=p.prompt_logprobs,
                    generate=generate,
                    start=start,
                    end=end,
                )
                spent += end - start
                seconds = time.perf_counter() - t0
                self.pacer.prefilled(end - start, seconds, bool(self.batch.running))
                logger.debug(
                    "prefill %s %d..%d (%d running) in %.1f ms",
                    state.request_id, start, end, len(self.batch.running), seconds * 1000,
                )  # fmt: skip
                if end < len(prompt):
                    self.batch.chunk_done(state, end - start, out.prompt_scores)
                    if self.batch.running:
                        return  # one chunk, then a decode step of the others
                    continue
                self.batch.joined(
                    state, out.token, time.perf_counter(), out.scores, out.prompt_scores
                )
            except Exception as exc:
                logger.exception("prefill failed for %s", state.request_id)
                self.batch.finish(state, "error", error=f"prefill failed: {exc}")
                continue
            self.post()

    def step(self) -> None:
        batch = self.batch
        start = time.perf_counter()
        try:
            layout = batch.layout()
            if layout is not None:
                self.runner.set_layout(
                    layout.moves, layout.copy_len, layout.positions, layout.exits
                )
            inputs = batch.step_inputs()
            tokens, scores = self.runner.decode(
                inputs.tokens, inputs.kv_len, inputs.sampled, inputs.scored
            )
        except Exception as exc:
            logger.exception("decode step failed; failing its %d requests", len(batch.running))
            for state in list(batch.running):
                batch.finish(state, "error", error=f"decode step failed: {exc}")
            return
        now = time.perf_counter()
        self.pacer.stepped(now - start)
        report = batch.stepped(tokens, now, now - start, scores)
        if self.step_hook is not None:
            self.report(report)

    def report(self, report: StepReport) -> None:
        try:
            lowered = self.step_hook(report)  # type: ignore[misc]
        except Exception:
            logger.exception("step hook failed")
            return
        for request_id, exit_layer in (lowered or {}).items():
            state = self.batch.requests.get(request_id)
            if state is not None:
                self.batch.lower(state, exit_layer)

    def post(self) -> None:
        """Hand this iteration's events to the relay (one batch per iteration)."""
        outbox = self.batch.take_events()
        if outbox:
            if self.relay is None:  # events before start(): only cancellations at shutdown
                self.relay = EventRelay()
            self.relay.post(outbox)

    def stop(self, mail: Mail) -> None:
        """Cancel everything still waiting or running (also what arrived last)."""
        for state in mail.arrivals:
            self.batch.add(state)
        self.batch.finish_all("cancelled")
        self.post()
