"""Keep ``import transformers`` from importing torchvision in our own processes.

transformers' image and video utilities import torchvision whenever it is installed, and
torchvision imports ``torch._dynamo``: on the H100 machine that was 5.6 s of the ~11 s that
``import transformers`` took, for a text-only fine-tune that never touches an image
(bench/ttfs_profile.py). Marking torchvision as absent (``sys.modules["torchvision"] = None``,
which ``importlib.util.find_spec`` reports as "not installed") removes it from the start-up.

Applied only by the ``qlora`` command and our benchmark scripts, never on ``import qlora``: a
program that imports qlora as a library keeps its own torchvision. ``QLORA_IMPORT_TORCHVISION=1``
turns it off."""
from __future__ import annotations

import os
import sys


def skip_torchvision() -> bool:
    """Hide torchvision from later imports unless it is already imported or the user opted out;
    returns whether it did."""
    if os.environ.get("QLORA_IMPORT_TORCHVISION", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    if "torchvision" in sys.modules:
        return False
    sys.modules["torchvision"] = None
    return True
