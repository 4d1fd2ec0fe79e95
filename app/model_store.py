"""The model store format: an ordinary Hugging Face checkpoint folder plus ``sorted.json``.

This module knows the file layout and the ``sorted.json`` schema (SPEC §2). It imports no torch, so
the API layer and the scheduler can read checkpoint metadata cheaply.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SORTED_FILE = "sorted.json"
FORMAT_VERSION = 1
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class ModelStoreError(ValueError):
    """A checkpoint folder that cannot be served; the message is one clear sentence."""


@dataclass
class SortedMeta:
    """The content of ``sorted.json``."""

    num_layers: int
    exits: list[int]
    method: str = "soft"
    eval: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT_VERSION
    soft_tuned: bool = True

    def __post_init__(self) -> None:
        self.exits = sorted({int(k) for k in self.exits})
        if not self.exits:
            raise ModelStoreError("sorted.json lists no exits")
        bad = [k for k in self.exits if k < 1 or k > self.num_layers]
        if bad:
            raise ModelStoreError(
                f"sorted.json lists exits {bad} outside the model's 1..{self.num_layers} layers"
            )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("soft_tuned")
        return {
            "format": data.pop("format"),
            "method": data.pop("method"),
            "num_layers": data.pop("num_layers"),
            "exits": data.pop("exits"),
            **data,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SortedMeta:
        if not isinstance(data, dict):
            raise ModelStoreError("sorted.json must hold a JSON object")
        if data.get("format", FORMAT_VERSION) != FORMAT_VERSION:
            raise ModelStoreError(f"sorted.json format {data.get('format')!r} is not supported")
        try:
            return cls(
                num_layers=int(data["num_layers"]),
                exits=[int(k) for k in data["exits"]],
                method=str(data.get("method", "soft")),
                eval=dict(data.get("eval") or {}),
                training=dict(data.get("training") or {}),
            )
        except KeyError as exc:
            raise ModelStoreError(f"sorted.json is missing the field {exc}") from exc
        except ModelStoreError:
            raise
        except (TypeError, ValueError) as exc:
            raise ModelStoreError(f"sorted.json is malformed: {exc}") from exc


def write_sorted_meta(folder: str | Path, meta: SortedMeta) -> Path:
    path = Path(folder) / SORTED_FILE
    path.write_text(json.dumps(meta.to_json(), indent=2) + "\n")
    return path


def read_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelStoreError(f"model folder {str(folder)!r} does not exist")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelStoreError(f"model folder {str(folder)!r} has no config.json")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelStoreError(f"{cfg_path} is not valid JSON: {exc}") from exc


def check_architecture(config: dict[str, Any]) -> str:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelStoreError(
            f"model_type {model_type!r} is not supported; SortedServe serves "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints"
        )
    return model_type


def read_sorted_meta(folder: str | Path, num_layers: int | None = None) -> SortedMeta:
    """Read ``sorted.json``; without one, every layer is an exit (with a warning)."""
    folder = Path(folder)
    if num_layers is None:
        num_layers = int(read_config(folder)["num_hidden_layers"])
    path = folder / SORTED_FILE
    if not path.is_file():
        logger.warning(
            "%s has no %s: the model was not SoFT-tuned; every layer is offered as an exit",
            folder,
            SORTED_FILE,
        )
        meta = SortedMeta(num_layers=num_layers, exits=list(range(1, num_layers + 1)))
        meta.method = "none"
        meta.soft_tuned = False
        return meta
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelStoreError(f"{path} is not valid JSON: {exc}") from exc
    meta = SortedMeta.from_json(data)
    if meta.num_layers != num_layers:
        raise ModelStoreError(
            f"sorted.json says {meta.num_layers} layers but config.json has {num_layers}"
        )
    return meta
