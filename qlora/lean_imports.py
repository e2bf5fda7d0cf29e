"""Keep ``import transformers`` from importing packages a text fine-tune never uses.

transformers imports torchvision (its image and video utilities) and scikit-learn (assisted
generation, in some versions at import time) and SciPy (``scipy.optimize``, for its object-detection
losses) whenever they are installed. On the H100 machine torchvision alone cost 5.6 s of start-up,
since it imports ``torch._dynamo`` (bench/ttfs_profile.py), scikit-learn 1.5 s on the H200 one,
and SciPy 0.27 s of transformers' 0.83 s import on a 2-core CPU (``python -X importtime``).
Marking them absent (``sys.modules[name] = None``, which ``importlib.util.find_spec`` reports as
"not installed") takes them out of the start-up.

Applied only by the ``qlora`` command and our benchmark scripts, never on ``import qlora``: a
program that imports qlora as a library keeps its packages. ``QLORA_KEEP_IMPORTS=1`` turns it off."""
from __future__ import annotations

import sys

from .config import env_flag

UNUSED = ("torchvision", "sklearn", "scipy")


def hide_unused_packages() -> list[str]:
    """Hide the UNUSED packages from later imports, except those already imported, unless the
    user opted out or transformers is already imported; returns the names hidden."""
    if env_flag("QLORA_KEEP_IMPORTS", False):
        return []
    if "transformers" in sys.modules:  # too late: it may have decided they are available already, and a
        return []  # later lazy import of its model code would then fail on the hidden package
    hidden = [name for name in UNUSED if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None
    return hidden
