"""Service settings: flags, then ``SORTEDSERVE_*`` environment variables, then defaults.

There is no module-level settings object: ``python -m app serve`` builds one ``Settings`` and passes
it to ``create_app``; tests build their own.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "sortedserve"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SORTEDSERVE_", extra="ignore")

    model: Path = Field(Path("model_store/default"), description="checkpoint folder to serve")
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(None, description="when set, inference routes need this bearer key")
    device: str = Field("auto", description="auto, cpu or cuda[:N]")
    dtype: str = Field("auto", description="auto (float32 on CPU, bfloat16 on CUDA), float32, ...")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for torch")
    weights: str = Field("auto", description="linear weights: auto, float32, bfloat16, int8, int4")

    max_batch_size: int = Field(16, ge=1, description="KV-cache slots: requests decoding at once")
    max_seq_len: int | None = Field(None, ge=8, description="per-request context (prompt + new)")
    prefill_chunk: int = Field(
        256, ge=0, description="most prompt tokens prefilled between decode steps (0: off)"
    )
    prefill_stall: float = Field(
        1.5, gt=0, description="a prefill chunk may take this many decode steps' time"
    )
    max_queue: int = Field(64, ge=0, description="requests waiting for a slot before 429")
    max_prompt_chars: int = Field(32_000, ge=1)
    max_new_tokens_limit: int = Field(1024, ge=1, description="largest max_new_tokens accepted")
    default_max_new_tokens: int = Field(128, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body accepted")

    drain_timeout_s: float = Field(30.0, ge=0, description="how long in-flight work may finish")
    profile_cache_dir: Path = Field(default_factory=default_cache_dir)
    profile_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    reprofile: bool = Field(False, description="measure the latency profile even when cached")
    profile_depths: int = Field(
        3, ge=0, description="exits measured at start-up (the rest fitted); 0 measures all"
    )
    profile_max_s: float = Field(
        15.0,
        gt=0,
        description="seconds the start-up profile may take (batch 1 and the largest always run)",
    )
    budget_headroom: float = Field(
        0.9, gt=0, le=1, description="pick exits predicted to finish within budget_ms × this"
    )
    budget_recheck: float = Field(
        1.0, gt=0, description="lower a running request once its projection passes budget × this"
    )
    log_level: str = "info"
