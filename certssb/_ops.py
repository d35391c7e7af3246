"""Loads the compiled extension `certssb._C` and wraps its torch ops.

Importing `certssb._C` loads the shared library whose static initializers
register the `certssb` operator library (torch.ops.certssb.*). This module
is the one place that import happens; fake kernels, autograd and typed
wrappers of later ops are registered here too, after a successful load.
Nothing here touches CUDA at import time.
"""
from __future__ import annotations

import json
from typing import Any

import torch  # loads libtorch before the extension that links against it

try:
    from . import _C  # noqa: F401  (imported for its op registrations)
except (ImportError, OSError) as _exc:  # OSError: a shared library it needs is missing
    raise ImportError(
        "certssb's compiled extension certssb._C could not be loaded: it was not built, "
        f"or it was built against another torch than the running torch {torch.__version__}. "
        "Rebuild it on this machine with `pip install --no-build-isolation -e .` "
        f"from the repository root. Original error: {type(_exc).__name__}: {_exc}"
    ) from _exc


def build_info() -> dict[str, Any]:
    """Describe how the loaded extension was compiled.

    Returns a new dict parsed from the JSON of ``torch.ops.certssb.build_info()``:

    - ``version`` (str): certssb version the extension was built from;
    - ``torch`` (str): TORCH_VERSION of the headers it was compiled against;
    - ``cuda`` (bool): whether CUDA kernels were compiled in;
    - ``cuda_version`` (str | None): CUDA runtime version compiled against, e.g. "12.4";
    - ``openmp`` (bool): whether it was compiled with OpenMP;
    - ``debug`` (bool): whether it is a DEBUG=1 build (-O0 -g);
    - ``cxx`` (str): host compiler id, e.g. "gcc 12.2.0".

    Example:
        >>> build_info()["version"]
        '0.1.0'
    """
    return json.loads(torch.ops.certssb.build_info())


def has_cuda_kernels() -> bool:
    """Whether CUDA kernels were compiled into `certssb._C`.

    This says what was built, not whether a GPU can be used now: combine it with
    ``torch.cuda.is_available()`` before running a CUDA op.
    """
    return bool(build_info()["cuda"])
