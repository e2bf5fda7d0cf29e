"""Checkpoints of a training run: ``OUT/checkpoints/step-N/``, written atomically, verified by
checksum, restored exactly.

A checkpoint directory holds::

    adapter/                    the LoRA factors (PEFT format: adapter_config.json + safetensors)
    optimizer.safetensors       the optimizer state (qlora.optim.state_dict_to_tensors; JSON metadata)
    rng.safetensors             torch's CPU RNG state and every CUDA device's ("cpu", "cuda0", ...)
    trainer_state.json          {"step", "total", "epoch_size", "world"}: the data position follows
                                from the step number, so nothing else is needed to resume exactly
    checksums.json              sha256 of every file above, written last

It is written into ``.tmp-step-N``, every file fsynced, then renamed to ``step-N``: a killed run
leaves either the previous checkpoint or the new one, never half of one; a failed write (a full
disk) removes the temp directory and says which previous checkpoint is intact. Only the newest
``keep_last`` are kept. A checkpoint whose checksums do not match is reported and skipped.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from .errors import QLoraError
from .outdir import write_errno, write_error


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(run_dir: Path, step: int, model, opt_, state: dict, quant, keep_last: int,
                    lora: dict | None = None, opt_state: dict | None = None) -> Path:
    """Write checkpoints/step-N atomically; files are checksummed (checksums.json written last).
    ``lora`` / ``opt_state``: full tensors gathered from sharded training (else read from model / opt_)."""
    from safetensors.torch import save_file

    from .adapters import save_adapter
    from .model import lora_modules
    from .optim import state_dict_to_tensors
    ck_root = run_dir / "checkpoints"
    final = ck_root / f"step-{step:07d}"
    tmp = ck_root / f".tmp-step-{step:07d}"
    tensors, meta = state_dict_to_tensors(opt_state if opt_state is not None else opt_.state_dict())
    pairs = lora.values() if lora is not None else [(m.lora_A, m.lora_B) for m in lora_modules(model).values()]
    needed = sum(t.numel() * t.element_size() for t in [*tensors.values(), *(x for ab in pairs for x in ab)])
    try:
        ck_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(model, tmp / "adapter", quant=quant, tensors=lora)
        save_file(tensors, str(tmp / "optimizer.safetensors"), metadata=meta)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        sums = {str(p.relative_to(tmp)): _sha256(p) for p in files}
        (tmp / "checksums.json").write_text(json.dumps(sums, indent=1))
        for p in files + [tmp / "checksums.json"]:
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except Exception as e:
        # a full disk, a quota or a read-only folder (save_adapter's QLoraError says which, with the sizes)
        if not isinstance(e, (OSError, QLoraError)) and write_errno(e) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        why = write_error(e, final, needed) or e
        why = str(why) if isinstance(why, QLoraError) else (getattr(why, "strerror", None) or str(why))
        good = latest_checkpoint(run_dir)
        raise QLoraError(f"could not save the checkpoint of step {step} ({why}); temporary files removed; "
                         f"the previous checkpoint {good if good else '(none)'} is intact") from None
    for old in sorted(ck_root.glob("step-*"))[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(ck: Path) -> bool:
    try:
        sums = json.loads((ck / "checksums.json").read_text())
        return all(_sha256(ck / rel) == h for rel, h in sums.items())
    except (OSError, ValueError):
        return False


def latest_checkpoint(run_dir: Path, warn=None) -> Path | None:
    """The newest checkpoint whose checksums verify (corrupt ones are reported and skipped)."""
    for ck in sorted((run_dir / "checkpoints").glob("step-*"), reverse=True):
        if verify_checkpoint(ck):
            return ck
        if warn:
            warn(f"checkpoint {ck.name} is corrupt (checksum mismatch or missing files): skipping it")
    return None


def load_checkpoint(ck: Path, model, opt_, par) -> dict:
    """Restore LoRA factors, optimizer state and RNG from ``ck``; ``par`` (parallel.Parallel) puts
    each full tensor in place, or only this rank's shard of it under FSDP."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .adapters import read_adapter, read_magnitudes, set_magnitudes
    from .optim import state_dict_from_tensors
    _, pairs = read_adapter(ck / "adapter")
    par.load_lora(model, pairs)
    set_magnitudes(model, read_magnitudes(ck / "adapter", pairs))  # DoRA (one process: --parallel fsdp refuses it)
    with safe_open(str(ck / "optimizer.safetensors"), "pt") as f:
        meta = f.metadata()
    sd = state_dict_from_tensors(load_file(str(ck / "optimizer.safetensors")), meta)
    opt_.load_state_dict(par.local_optimizer_state(sd))
    rng = load_file(str(ck / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    return json.loads((ck / "trainer_state.json").read_text())
