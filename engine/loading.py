"""Loading a model and tokenizer by hub name or local path, for the CLI and from_pretrained."""
from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_kwargs(dtype) -> dict:
    """from_pretrained's dtype keyword: `dtype` since transformers 4.56, `torch_dtype` before."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


def looks_local(name_or_path: str) -> bool:
    """A path, not a hub id ("org/name"): it exists, starts like a path, has more than one "/" or a
    backslash, or its first component is an existing local directory. Such a name must not go to
    the hub, whose retries take about a minute before the typo is reported."""
    text = str(name_or_path)
    parts = text.split("/")
    return (Path(text).exists() or text.startswith((".", "/", "~")) or "\\" in text or len(parts) > 2
            or (len(parts) == 2 and Path(parts[0]).is_dir()))


def check_local_model(name_or_path: str) -> None:
    if looks_local(name_or_path) and not (Path(name_or_path).expanduser() / "config.json").exists():
        raise FileNotFoundError(f"model directory {name_or_path} not found or has no config.json "
                                "(give a directory written by save_pretrained, or a hub model name)")


def load_model(name_or_path: str, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer). device 'auto' shards with Accelerate's device_map when CUDA is present."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was asked for but no CUDA device is available")
    check_local_model(name_or_path)
    cuda = torch.cuda.is_available() and device != "cpu"
    device_map = ("auto" if device == "auto" else device) if cuda else None
    # "auto" keeps the checkpoint's dtype on GPU; on CPU half precision is slow and imprecise.
    torch_dtype = DTYPES[dtype] if dtype != "auto" or cuda else torch.float32
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, device_map=device_map, **dtype_kwargs(torch_dtype))
    except OSError as err:
        raise FileNotFoundError(f"cannot load model {name_or_path!r}: {str(err).splitlines()[0]}") from None
    model.eval()
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return model, tok


def model_name_for(name_or_path: str) -> str:
    """Statistics are filed under the model directory's basename (or the hub name with '/' → '_');
    the resolved directory's, so that `.` and `..` give a real name, never a path."""
    path = Path(name_or_path)
    if path.exists():
        return path.resolve().name or "root"
    return name_or_path.strip("/").replace("/", "_")
