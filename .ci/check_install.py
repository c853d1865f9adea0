"""Packaging acceptance (issue 11, item 14): massedit installs beside Hugging Face's `kernels`.

In a fresh virtualenv with `kernels` (PyPI) installed first, a non-editable install of this project
and its uninstall leave every file of `kernels` byte-identical and `from kernels import get_kernel`
working; the installed project holds massedit/kernels/covariance.py, imports and runs
(`massedit --version`, an import smoke) from the install, also with the repository root as the
working directory, where `import kernels` must still find Hugging Face's package.

The project's heavy dependencies (torch, transformers) are not installed again: for the import
smoke only, a .pth file appends this interpreter's site-packages after the fresh environment's own,
so the fresh environment's packages always win. Run with the project's environment active:

    python .ci/check_install.py
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*cmd, cwd=None) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, check=True, text=True, stdout=subprocess.PIPE)
    return done.stdout.strip()


def digests(site: Path) -> dict[str, str]:
    """Every file of the `kernels` distribution (package and metadata); bytecode caches left out,
    since importing may write them."""
    files = [p for p in site.glob("kernels*") for p in ([p] if p.is_file() else p.rglob("*"))]
    return {str(p.relative_to(site)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(files) if p.is_file() and "__pycache__" not in p.parts}


def check(condition: bool, message: str) -> None:
    if not condition:
        sys.exit(f"check_install: FAILED: {message}")
    print(f"check_install: ok: {message}")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="massedit-install-") as tmp:
        tmp = Path(tmp)
        env = tmp / "venv"
        run(sys.executable, "-m", "venv", env)
        py = env / "bin" / "python"
        pip = (py, "-m", "pip", "--disable-pip-version-check", "--quiet")
        run(*pip, "install", "kernels")
        site = Path(run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"))
        before = digests(site)
        check(any(name.startswith("kernels/") for name in before), f"Hugging Face's kernels installed in {site}")
        get_kernel = ("import kernels; from kernels import get_kernel; "
                      f"assert kernels.__file__.startswith({str(site)!r}), kernels.__file__")

        # The wheel is built with this environment's setuptools: no build isolation, no download.
        run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", tmp / "dist",
            ROOT)
        wheel = next((tmp / "dist").glob("*.whl"))
        run(*pip, "install", "--no-deps", wheel)
        check((site / "massedit" / "kernels" / "covariance.py").is_file(),
              "install holds massedit/kernels/covariance.py")
        check(digests(site) == before, "installing massedit-engine left every kernels file byte-identical")
        run(py, "-c", get_kernel, cwd=ROOT)
        check(True, "from the repository root, `import kernels` finds Hugging Face's, with get_kernel")

        bridge = site / "zz-massedit-check-install.pth"
        own = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        bridge.write_text("\n".join(sorted(own)) + "\n")
        version = run(env / "bin" / "massedit", "--version", cwd=tmp)
        check(version.startswith("massedit "), f"`massedit --version` from the install: {version}")
        smoke = ("import massedit, massedit.kernels.covariance as cov; from massedit import MassEditor, preset; "
                 f"assert massedit.__file__.startswith({str(site)!r}), massedit.__file__; "
                 f"assert cov.__file__.startswith({str(site)!r}), cov.__file__; "
                 "assert preset('gpt-j-6b').layers == [3, 4, 5, 6, 7, 8]; " + get_kernel)
        run(py, "-c", smoke, cwd=ROOT)
        check(True, "the installed massedit imports (with massedit.kernels) from the repository root")
        bridge.unlink()

        run(*pip, "uninstall", "--yes", "massedit-engine")
        check(not (site / "massedit").exists(), "uninstall removed massedit")
        check(digests(site) == before, "uninstalling massedit-engine left every kernels file byte-identical")
        run(py, "-c", get_kernel, cwd=ROOT)
        check(True, "after the uninstall, `from kernels import get_kernel` works")


if __name__ == "__main__":
    main()
