"""Loading a model and tokenizer by hub name, local directory, GGUF file or catalog name (massedit.model.catalog):
the loading options shared by
`MassEditor.from_pretrained` and every CLI command (placement, offload, quantization, dtype).

Every option is checked before any weight is read; a device map is checked against the model's
module names from a skeleton built on the meta device (config only, no weights).
"""
from __future__ import annotations

import json
import pickle
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from massedit.model import catalog
from massedit.model.gguf import gguf_file_of, load_gguf

DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
QUANTIZE = ("8bit", "4bit")


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
                                "(give a directory written by save_pretrained, a .gguf file, a model of `massedit models list`, "
                                "or a hub model name)")


def check_hub_model(name: str) -> None:
    """A hub name neither in the local hub cache nor on a reachable hub fails at once, in one line:
    transformers would retry for about a minute, printing each retry. One request, no retries."""
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(name, "config.json"), str):
        return  # offline mode fails fast by itself; a cached model loads without the hub
    try:
        model_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"model {name!r}: no local directory of that name, and no such model on the Hugging "
                                "Face hub; check the name, or give a directory written by save_pretrained") from None
    except HfHubHTTPError:
        return  # gated, private or rate limited: transformers says what it needs
    except Exception as err:  # no connection: the HTTP library's own errors
        raise FileNotFoundError(f"model {name!r}: not a local directory, not in the hub cache, and the hub cannot be "
                                f"reached ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                                "give a local model directory, or download the model while online") from None


@dataclass
class LoadOptions:
    """Where and how to load a model. `device` is the simple case of a device map: "auto" shards
    over the GPUs when there are any (else CPU), "cpu", "cuda" or "cuda:N" put the whole model there.
    device_map: "auto" | "balanced" | "balanced_low_0" | "sequential", a dict module name → device
    (an int GPU index, "cuda:N", "cpu" or "disk"), or the path of a JSON file holding such a dict.
    max_memory: {device: size} or "0=20GiB,cpu=64GiB". quantization: "8bit", "4bit" (nf4) or a
    transformers quantization config. torch_dtype: "auto" or one of float32/float16/bfloat16."""

    device: str = "auto"
    device_map: Union[str, dict, None] = None
    max_memory: Union[str, dict, None] = None
    offload_folder: Optional[str] = None
    quantization: Any = None
    torch_dtype: Any = "auto"


def _dtype(value):
    if isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ValueError(f"model dtype must be one of {', '.join(DTYPES)}, got {value!r}")
    return DTYPES[value]


def _check_device(device: str, what: str) -> torch.device:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{what}: {device!r} is not a device; use cpu, cuda, cuda:N (or disk in a device map)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what}: {device} was asked for but no CUDA device is available")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"{what}: {device} was asked for but there are {torch.cuda.device_count()} CUDA devices")
    return parsed


def parse_max_memory(text: str) -> dict:
    """'0=20GiB,cpu=64GiB' → {0: '20GiB', 'cpu': '64GiB'} (sizes as Accelerate reads them)."""
    from accelerate.utils import convert_file_size_to_int

    out: dict = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        device, sep, size = (s.strip() for s in item.partition("="))
        if not sep or not device or not size:
            raise ValueError(f"--max-memory: {item!r} is not DEVICE=SIZE; write e.g. \"0=20GiB,cpu=64GiB\"")
        try:
            convert_file_size_to_int(size)
        except ValueError:
            raise ValueError(f"--max-memory: {size!r} is not a size; write e.g. 20GiB or 500MB") from None
        key = int(device) if device.isdigit() else device
        if not isinstance(key, int) and key not in ("cpu", "disk", "mps"):
            _check_device(key, "--max-memory")
        out[key] = size
    if not out:
        raise ValueError("--max-memory is empty; write e.g. \"0=20GiB,cpu=64GiB\"")
    return out


def _read_device_map(value: Union[str, dict]) -> Union[str, dict]:
    if isinstance(value, dict):
        return value
    if value in DEVICE_MAPS:
        return value
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"--device-map {value!r}: not one of {', '.join(DEVICE_MAPS)} and no such JSON file")
    try:
        device_map = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--device-map {value}: not valid JSON: {err}") from None
    if not isinstance(device_map, dict):
        raise ValueError(f"--device-map {value}: must be a JSON object mapping module names to devices")
    return device_map


def _check_device_map(device_map: dict, module_names: set[str]) -> None:
    for name, device in device_map.items():
        if name not in module_names:
            near = sorted(n for n in module_names if n and "." not in n)
            raise ValueError(f"device map names module {name!r}, which this model does not have "
                             f"(its top-level modules: {', '.join(near)})")
        if isinstance(device, bool) or not isinstance(device, (int, str)):
            raise ValueError(f"device map: {name!r} → {device!r} is not a device (an int GPU index, cuda:N, cpu or disk)")
        if isinstance(device, int):
            _check_device(f"cuda:{device}", "device map")
        elif device != "disk":
            _check_device(device, "device map")


def _check_folder(folder: str) -> None:
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"--offload-folder {folder}: cannot write there ({err.strerror or err}); "
                         "give a writable directory") from None


def _quantization_config(quantization, compute_dtype):
    if quantization is None or not isinstance(quantization, str):
        return quantization
    if quantization not in QUANTIZE:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {quantization!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError(f"--quantize {quantization} needs bitsandbytes, which is not installed; "
                         "pip install bitsandbytes (or leave out --quantize)") from None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=compute_dtype if isinstance(compute_dtype, torch.dtype)
                              else torch.float32)


def _module_names(name_or_path: str) -> set[str]:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf = gguf_file_of(name_or_path)
    source = dict(pretrained_model_name_or_path=str(gguf.parent), gguf_file=gguf.name) if gguf else \
        dict(pretrained_model_name_or_path=name_or_path)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(**source))
    return {n for n, _ in skeleton.named_modules()}


def _placement(name_or_path: str, options: LoadOptions):
    """The device_map for from_pretrained, checked."""
    if options.device_map is not None and options.device not in ("auto", None):
        raise ValueError("give either --device or --device-map, not both (--device cuda:1 is --device-map "
                         "'{\"\": 1}')")
    if options.device_map is None:
        if options.device in ("auto", None):
            return "auto" if torch.cuda.is_available() else None
        device = _check_device(options.device, "--device")
        return None if device.type == "cpu" else {"": str(device)}
    device_map = _read_device_map(options.device_map)
    if isinstance(device_map, dict):
        _check_device_map(device_map, _module_names(name_or_path))
        if "disk" in device_map.values() and options.offload_folder is None:
            raise ValueError("the device map puts modules on disk: give --offload-folder DIR (offload_folder=) "
                             "for their weights and the edits to them")
    return device_map


def load_model(name_or_path: str, options: Optional[LoadOptions] = None):
    """(model, tokenizer), loaded as `options` say; every option is checked before any weight is read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = options or LoadOptions()
    name_or_path = catalog.resolve(name_or_path, progress=_note)
    gguf = gguf_file_of(name_or_path)
    if gguf is None:
        check_local_model(name_or_path)
        if not looks_local(name_or_path):
            check_hub_model(name_or_path)
    dtype = _dtype(options.torch_dtype)
    max_memory = parse_max_memory(options.max_memory) if isinstance(options.max_memory, str) else options.max_memory
    if options.offload_folder is not None:
        _check_folder(options.offload_folder)
    quantization_config = _quantization_config(options.quantization, dtype)
    if gguf is not None and quantization_config is not None:
        raise ValueError(f"{gguf}: a GGUF checkpoint is dequantized on load and cannot be loaded with --quantize; "
                         "convert it first (massedit models get, or load it and save_pretrained), then quantize that")
    try:
        device_map = _placement(name_or_path, options)
        if max_memory is not None and device_map is None:
            raise ValueError("--max-memory budgets a device map, and this load has none (no GPU, no --device-map): "
                             "add --device-map auto|balanced|sequential, or leave --max-memory out")
        # "auto" keeps the checkpoint's dtype on GPU; on CPU half precision is slow and imprecise.
        on_gpu = torch.cuda.is_available() and (device_map is not None or quantization_config is not None)
        torch_dtype = torch.float32 if dtype == "auto" and not on_gpu else dtype
        kwargs = dict(device_map=device_map, max_memory=max_memory, offload_folder=options.offload_folder,
                      quantization_config=quantization_config)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if gguf is not None:
            model, tok = load_gguf(gguf, torch_dtype, **kwargs)
        else:
            tok = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs, **dtype_kwargs(torch_dtype))
    except OSError as err:
        raise FileNotFoundError(f"cannot load model {name_or_path!r}: {str(err).splitlines()[0]}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{_unreadable_json(name_or_path) or name_or_path}: not valid JSON ({err}); restore or "
                         "re-create the file (save_pretrained writes it)") from None
    except (pickle.UnpicklingError, EOFError):
        # torch.load refuses what is not a weights-only checkpoint, in 30 lines that do not name the file.
        files = ", ".join(str(p) for p in sorted(Path(name_or_path).glob("*.bin"))) or name_or_path
        raise ValueError(f"{files}: not a readable checkpoint (torch.load finds no weights-only PyTorch file: "
                         "truncated, corrupt or holding code); restore or re-create it") from None
    # A named map decides placement only while loading; transformers then reads disk-offloaded
    # weights from the checkpoint without a folder, and an edit to them would fail after z.
    if options.offload_folder is None and "disk" in (getattr(model, "hf_device_map", None) or {}).values():
        raise ValueError(f"--device-map {options.device_map}: the model does not fit the memory given "
                         "(--max-memory), so modules went to disk: give --offload-folder DIR (offload_folder=) "
                         "for their weights and the edits to them, or more --max-memory")
    model.eval()
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return model, tok


def _unreadable_json(name_or_path: str) -> Optional[Path]:
    """The first JSON file of a local model directory that does not parse (transformers does not say)."""
    folder = Path(name_or_path)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return path
    return None


def _note(message: str) -> None:
    print(f"massedit: {message}", file=sys.stderr, flush=True)


def check_savable(model, name_or_path: str) -> None:
    """Before the work whose result is saved: transformers saves a model by reversing the weight
    conversions it loaded with, and some (a pre-quantized bitsandbytes 4-bit checkpoint) have none."""
    try:
        for conversion in getattr(model, "_weight_conversions", None) or ():
            conversion.reverse_transform()
    except NotImplementedError:
        raise ValueError(f"{name_or_path}: this transformers version cannot save a model loaded from this "
                         "checkpoint (a pre-quantized bitsandbytes checkpoint), so the result cannot be written; "
                         "load the float checkpoint with --quantize instead") from None


def model_name_for(name_or_path: str) -> str:
    """Statistics are filed under the model directory's basename (or the hub name with '/' → '_');
    the resolved directory's, so that `.` and `..` give a real name, never a path."""
    path = Path(name_or_path)
    if path.exists():
        # A GGUF file's statistics are those of the model it holds, not of a file name with a suffix.
        return (path.resolve().stem if path.suffix.lower() == ".gguf" else path.resolve().name) or "root"
    return name_or_path.strip("/").replace("/", "_")
