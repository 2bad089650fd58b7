"""How the app is served: which model, whether its weights are fetched, where they go, and the GPU decorator a
Hugging Face ZeroGPU Space needs. Read from the command line and the environment the operator sets:

- ``SEEDSTORY_PRESET``: the model (default: the demo);
- ``SEEDSTORY_DOWNLOAD=1`` (or ``app.py --download``): fetch a release preset's missing files at start-up
  (``seedstory.download``), showing the progress on the app's first screen;
- ``SEEDSTORY_RELEASE_ROOT``: where the released files live; on a Space with persistent storage (``/data``,
  or ``SEEDSTORY_PERSISTENT_DIR``) they go to ``<storage>/pretrained`` so a restart does not fetch them again;
- ``SEEDSTORY_SET``: preset overrides, space-separated (``runtime.llm_quantization=8bit`` on a 24 GB GPU);
- ``HF_TOKEN`` (a Space secret): for the gated Llama-2 base.

Without ``--download`` the app sets ``HF_HUB_OFFLINE=1``: nothing is fetched at run time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

# A frame of the released model (text, then a 50-step 1024 px SDXL picture) on one large GPU, with room to
# spare; ZeroGPU reserves the GPU for this long per frame and refuses calls above its maximum.
ZERO_GPU_FRAME_SECONDS = 30
ZERO_GPU_OVERHEAD_SECONDS = 15
ZERO_GPU_MAX_SECONDS = 300


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def wants_download(argv: Sequence[str], env: Mapping[str, str] = os.environ) -> bool:
    """``--download`` among the arguments, or ``SEEDSTORY_DOWNLOAD`` set (a Space's settings)."""
    return "--download" in argv or _truthy(env.get("SEEDSTORY_DOWNLOAD"))


@dataclass
class ServeOptions:
    preset: str
    download: bool = False
    overrides: list[str] = field(default_factory=list)
    on_space: bool = False
    zero_gpu: bool = False

    @property
    def release_root(self) -> Optional[str]:
        return next((o.split("=", 1)[1] for o in self.overrides if o.startswith("release.root=")), None)


def serve_options(preset: Optional[str] = None, download: bool = False,
                  env: Mapping[str, str] = os.environ) -> ServeOptions:
    """What to serve, from the arguments and the environment (see the module's docstring)."""
    from .cli import default_preset

    on_space = bool(env.get("SPACE_ID"))
    opts = ServeOptions(preset=preset or env.get("SEEDSTORY_PRESET") or default_preset(),
                        download=download or _truthy(env.get("SEEDSTORY_DOWNLOAD")), on_space=on_space,
                        zero_gpu=_truthy(env.get("SPACES_ZERO_GPU")))
    opts.overrides.extend((env.get("SEEDSTORY_SET") or "").split())
    root = env.get("SEEDSTORY_RELEASE_ROOT")
    storage = env.get("SEEDSTORY_PERSISTENT_DIR", "/data")
    if not root and on_space and os.path.isdir(storage) and os.access(storage, os.W_OK):
        root = os.path.join(storage, "pretrained")
    if root:
        opts.overrides.append(f"release.root={root}")
    return opts


def gpu_seconds(frames: int) -> int:
    """The GPU time to reserve on ZeroGPU for ``frames`` frames."""
    return min(ZERO_GPU_MAX_SECONDS, ZERO_GPU_OVERHEAD_SECONDS + ZERO_GPU_FRAME_SECONDS * max(1, int(frames or 1)))


def gpu(frames: Optional[Callable[..., int]] = None) -> Callable:
    """A decorator for the calls that run the models: ``spaces.GPU`` with a duration that fits the frames the call
    makes (``frames(*args, **kwargs)``, default 1) where the ``spaces`` package is installed (on a ZeroGPU Space
    it gives the call a GPU; elsewhere it does nothing), the function itself otherwise."""
    try:
        import spaces
    except ImportError:
        return lambda fn: fn
    count = frames or (lambda *a, **k: 1)
    return lambda fn: spaces.GPU(duration=lambda *a, **k: gpu_seconds(count(*a, **k)))(fn)


__all__ = ["ServeOptions", "gpu", "gpu_seconds", "serve_options", "wants_download"]
