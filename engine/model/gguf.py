"""GGUF checkpoints (llama.cpp's format) as a model source, read with transformers' own GGUF loader.

Every tensor is dequantized to the requested dtype on load, so the model is an ordinary float model;
the loader still marks it as "quantized with gguf" (an `hf_quantizer` and a `quantization_config`),
which makes save_pretrained refuse. Nothing of the GGUF encoding survives dequantization, so the mark
is removed and the edited model saves as a plain Hugging Face checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

GGUF_MAGIC = b"GGUF"


def gguf_file_of(name_or_path: Union[str, Path]) -> Optional[Path]:
    """The GGUF file a model argument names: a `.gguf` file, or a directory that holds exactly one and
    no config.json (a directory with config.json is a Hugging Face checkpoint); else None."""
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} not found")
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise ValueError(f"{path} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}); "
                             "give the one to load as --model DIR/NAME.gguf")
        if found:
            return found[0]
    return None


def _require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ValueError("reading a GGUF checkpoint needs the gguf package, which is not installed: "
                         "pip install gguf") from None


def gguf_architecture(path: Path) -> str:
    """The file's `general.architecture`, after checking that it is a readable GGUF file."""
    _require_gguf_package()
    from gguf import GGUFReader

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes); "
                         "give a .gguf checkpoint or a Hugging Face model directory")
    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (KeyError, ValueError, IndexError, OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: the GGUF file is truncated or corrupt ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                         "download it again") from None


def check_loadable(path: Path) -> str:
    """Refuse, before any tensor is read, a GGUF architecture that this transformers cannot load."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = gguf_architecture(path)
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        loadable = sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        raise ValueError(f"{path}: transformers {transformers.__version__} cannot load GGUF architecture {arch!r} "
                         f"(it loads: {', '.join(loadable)}); convert the model to a Hugging Face checkpoint another way")
    return arch


def detach_gguf_quantizer(model) -> None:
    """Make a model loaded from GGUF an ordinary float model that save_pretrained writes in full."""
    model.hf_quantizer = None
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None and hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")


def load_gguf(path: Path, dtype, **from_pretrained_kwargs):
    """(model, tokenizer) from one GGUF file, dequantized to `dtype`, tokenizer from the same file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from massedit.model.loading import dtype_kwargs

    check_loadable(path)
    folder, name = str(path.parent), path.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **from_pretrained_kwargs,
                                                     **dtype_kwargs(dtype))
    except (ValueError, KeyError, IndexError, RuntimeError) as err:
        raise ValueError(f"{path}: transformers could not load this GGUF checkpoint "
                         f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    detach_gguf_quantizer(model)
    return model, tok
