"""`--memory-budget`: choose per run how much to recompute, offload and page so that the predicted peak fits.

A policy has these parts (all exact: they change where activations and optimizer state live, never the
math, so losses and gradients are bit for bit those of full recompute):

* ``keep``: the last K decoder blocks keep all their activations (no recompute in backward); the other
  ``L - K`` are checkpointed. The last ones because backward reaches them first: their activations are
  freed before the checkpointed blocks' recompute peaks (qlora.plan.activation_model).
* ``gemms``: of the checkpointed blocks, the G just below the kept ones keep their MLP gate/up outputs from
  forward to recompute, which then skips those two GEMMs (``keep_gemms`` of qlora.offload.enable_checkpointing:
  ``4 * I`` bytes a token a block, against a kept block's ~``14H + 6I``).
* ``offload``: the inputs of the first M checkpointed blocks wait in pinned CPU memory (qlora.offload), the
  others' stay on the device.
* the optimizer state a paged optimizer keeps on the device; the rest waits in CPU memory (qlora.optim).
* ``stream``: when even the cheapest of these (every block recomputed, inputs offloaded, state paged out) does not
  fit, the frozen weights of the fewest blocks that make it fit wait in pinned CPU memory and are copied in as
  those blocks run (qlora.stream, ``--offload-weights``; two slots on the device): the fastest policy with that
  streaming then, chosen as above with no kept blocks.

On a GPU all of it must also fit ``host_mem``, the CPU memory the run may fill.

The choice maximizes the recompute saved, in units of one block's recompute: a kept block saves 1 (~1/4 of
its FLOPs in the step), a block keeping its MLP GEMMs the share of the recompute those two GEMMs are
(:func:`gemm_share`: measured 0.29 for Llama-3-8B at 2048 tokens on an H100, though those GEMMs are 0.70 of its
FLOPs) for about 40% of a kept block's memory. For each number of kept blocks: the fewest offloaded inputs that
fit, more where that keeps optimizer state on the device, then the most GEMM-keeping blocks that fit (and more
offloaded inputs where they leave room for more of those: :meth:`_Room.placements`); ties go to more kept blocks,
then to fewer offloaded inputs; and, for that, as much optimizer state on the device as fits (:func:`qlora.plan.estimate` with the budget as ``gpu_mem`` spills only what does not
fit). More budget never saves less recompute (it may keep fewer whole blocks, for more GEMM-keeping ones). The
predictions are
:func:`qlora.plan.estimate`'s; the kept block's constants come from counting and still need a GPU
calibration (docs/memory.md).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import QLoraError
from .plan import (CONTEXT_BYTES, GiB, counts_for, estimate, fits, host_bytes, host_fits, parse_size, plan_kwargs,
                   required_bytes, rows_per_micro_batch)

AUTO_MARGIN = 0.05  # of the device's memory left unplanned under `auto`: other processes, fragmentation beyond SLACK


def parse_budget(value) -> str | int:
    """``off``, ``auto`` or a size (``24GiB``, ``80GB``, ``24``: GiB) in bytes; a bad value is one line."""
    text = str(value).strip().lower()
    if text in ("off", "auto"):
        return text
    try:
        return parse_size(value)
    except QLoraError:
        raise QLoraError(f"--memory-budget must be off, auto or a size like 24GiB or 80GB, got {value!r}") from None


def auto_budget(device) -> int:
    """``auto``: the free memory of the device now, minus :data:`AUTO_MARGIN` of its total; on a CUDA
    device the context this process already holds counts back in (the estimate adds it again)."""
    import torch
    if getattr(device, "type", str(device)) == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free + CONTEXT_BYTES - AUTO_MARGIN * total)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(host_available() - AUTO_MARGIN * total)


def host_available() -> int:
    """Bytes of CPU memory available now (``MemAvailable``; free pages where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def local_processes() -> int:
    """This machine's processes of the run (torchrun's LOCAL_WORLD_SIZE), each with its own CPU-memory copies."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


@dataclass(frozen=True)
class Policy:
    """What :func:`choose` picked. ``page_budget``: the optimizer's ``page_budget_bytes`` (None: no limit
    from the plan, as without a budget); ``states_on_host``: optimizer state bytes in CPU memory."""

    budget: int
    layers: int
    keep: int
    offload: int  # of the checkpointed blocks, how many (the first ones) have their inputs in CPU memory
    gemms: int
    page_budget: int | None
    states_on_host: int
    peak: int
    phase: str
    required: int
    stream: int = 0  # how many blocks stream their weights from CPU memory (qlora.plan.streamed_blocks: which)
    weight_slots: int = 0  # with stream: the slots' bytes on the device
    weight_host: int = 0  # with stream: the streamed blocks' bytes in pinned CPU memory
    host: int = 0  # all the run keeps in CPU memory (qlora.plan.host_bytes)

    @property
    def keep_indices(self) -> range:
        """The blocks that keep their activations (the last ``keep``), as enable_checkpointing(keep=...) takes them."""
        return range(self.layers - self.keep, self.layers)

    @property
    def gemm_indices(self) -> range:
        """The checkpointed blocks that keep their MLP gate/up outputs (enable_checkpointing(keep_gemms=...)): the
        ``gemms`` just below the kept ones, which backward reaches first."""
        return range(self.layers - self.keep - self.gemms, self.layers - self.keep)

    def describe(self) -> str:
        """The run header's line."""
        recomputed = self.layers - self.keep
        where = "" if not recomputed else (
            ", their inputs in CPU memory" if self.offload >= recomputed else
            f", the inputs of the first {self.offload} in CPU memory" if self.offload else ", inputs on the device")
        where += f", {self.gemms} of them keeping their MLP gate/up outputs" if self.gemms else ""
        states = (f"optimizer state: {self.states_on_host / GiB:.2f} GiB in CPU memory" if self.states_on_host
                  else "optimizer state on the device")
        which = ("block weights" if self.stream >= self.layers
                 else f"the weights of {self.stream} of the {self.layers} blocks")
        weights = (f"; {which} streamed from CPU memory ({self.weight_host / GiB:.2f} GiB there, "
                   f"{self.weight_slots / GiB:.2f} GiB of slots on the device)" if self.stream else "")
        moved = self.host and (self.offload or self.stream)
        host = f"; {self.host / GiB:.2f} GiB in CPU memory in all" if moved else ""
        return (f"memory budget {self.budget / GiB:.1f} GiB: {self.keep} of {self.layers} blocks keep their activations, "
                f"{recomputed} recomputed{where}{weights}; {states}; predicted peak {self.peak / GiB:.2f} GiB at the "
                f"{self.phase} (needs {self.required / GiB:.2f} GiB with slack and context){host}")


def choose(config, seq: int, batch: int, budget: int, *, context: int = CONTEXT_BYTES, checkpointing: bool = True,
           offload: bool | None = None, stream: bool | int | None = None, host_mem: int | None = None,
           most_kept: int | None = None, **kw) -> Policy:
    """The fastest policy whose predicted need (:func:`qlora.plan.required_bytes`) fits ``budget`` bytes.

    ``checkpointing=False`` allows only keeping every block; ``offload`` True/False forces the block
    inputs' place (None: the budget decides how many go to CPU memory, the fewest that fit); ``stream``: True
    only policies that stream the weights of every block (every block recomputed), an integer K of K blocks (a
    model streamed so already), False none, None (default) streaming the fewest blocks that fit where nothing else
    fits (and checkpointing is on); ``host_mem``: the CPU memory the run may fill (offloaded
    inputs, streamed weights, paged optimizer state, a host embedding table; :func:`qlora.plan.host_bytes`), None
    unchecked; ``most_kept``: at most this many blocks kept whole (None: any; with checkpointing off all are);
    ``kw``: :func:`qlora.plan.estimate`'s settings (an explicit ``page_budget``, e.g. 0 for
    --offload-optimizer, is kept). Raises one line when nothing fits."""
    kw = {k: v for k, v in kw.items() if k not in ("grad_checkpointing", "keep_blocks", "keep_gemms", "gpu_mem",
                                                   "offload_weights")}
    kw.setdefault("counts", counts_for(config, **kw))
    layers = int(config.num_hidden_layers)
    share = gemm_share(config, seq)
    room = _Room(config, seq, batch, budget, context, host_mem, offload)
    best = None  # (recompute saved, keep, offloaded inputs, gemms, est)
    top = layers if most_kept is None or not checkpointing else max(0, min(layers, int(most_kept)))
    for keep in range(top, -1 if checkpointing else layers - 1, -1) if not stream else ():
        if best is not None and keep + share * (layers - keep) <= best[0]:
            break  # fewer kept blocks cannot save more, even with every other block keeping its GEMMs
        for off, gemms, est in room.placements(keep, kw):
            if best is None or keep + share * gemms > best[0]:  # (ties: more kept blocks, then fewer offloaded)
                best = (keep + share * gemms, keep, off, gemms, est)
    streamed = best is None and checkpointing and stream is not False
    if streamed:  # nothing fits with the weights on the device (or streaming asked for): every block recomputed,
        # the weights of as few blocks streamed as fit (of all of them where streaming was asked for)
        n = (layers if stream is True else int(stream)) if stream else room.fewest_streamed(kw)
        for off, gemms, est in room.placements(0, dict(kw, offload_weights=n or layers)):
            if best is None or share * gemms > best[0]:
                best = (share * gemms, 0, off, gemms, est)
    if best is not None:
        _, keep, off, gemms, est = best
        return _policy(est, budget, layers, keep, off, context, kw, gemms)
    raise QLoraError(room.too_small(checkpointing, streamed))


class _Room:
    """Where a policy's tensors fit: the device budget (with slack and context) and ``host_mem`` of CPU memory.
    ``last`` is the estimate tried last, the cheapest on the device (for the message when nothing fits)."""

    def __init__(self, config, seq: int, batch: int, budget: int, context: int, host_mem: int | None,
                 offload: bool | None):
        self.config, self.seq, self.batch, self.budget, self.context = config, seq, batch, budget, context
        self.host_mem, self.forced, self.last, self.host_short = host_mem, offload, None, False

    def estimate(self, keep: int, off: int, kw: dict, gemms: int = 0) -> dict:
        return estimate(self.config, self.seq, self.batch, keep_blocks=keep, keep_gemms=gemms, offload=off,
                        gpu_mem=self.budget, **kw)

    def fits(self, est: dict) -> bool:
        on_device, on_host = fits(est, self.budget, self.context), host_fits(est, self.host_mem)
        self.host_short |= on_device and not on_host
        return on_device and on_host

    def fewest(self, keep: int, kw: dict, lo: int, hi: int, gemms: int = 0) -> tuple[int, dict] | None:
        """The fewest offloaded inputs in [lo, hi] that fit, and that estimate. Between the ends device memory falls
        as inputs leave and host memory rises; the ends are tried on their own: the first offloaded input comes back
        in its backward beside the next one's prefetch, and with all of them offloaded the first checkpointed block's
        backward does so too, but the loss backward holds one input less."""
        m = int(self.config.num_hidden_layers) - keep

        def fitting(n: int) -> tuple[int, dict] | None:
            est = self.last = self.estimate(keep, n, kw, gemms)
            return (n, est) if self.fits(est) else None

        if lo == 0 and (found := fitting(0)):
            return found
        found, a, b = None, max(lo, 1), min(hi, m - 1)
        while a <= b:
            mid = (a + b) // 2
            est = self.last = self.estimate(keep, mid, kw, gemms)
            if fits(est, self.budget, self.context):
                found, b = ((mid, est) if self.fits(est) else found), mid - 1
            else:
                a = mid + 1
        return found or (fitting(m) if hi == m and m > 0 else None)

    def fewest_streamed(self, kw: dict) -> int | None:
        """The fewest blocks whose weights, streamed, let a policy (every block recomputed) fit; None: not even all.
        (Each streamed block frees its weights on the device for the same two slots.)"""
        lo, hi, found = 1, int(self.config.num_hidden_layers), None
        while lo <= hi:
            mid = (lo + hi) // 2
            if self.placements(0, dict(kw, offload_weights=mid)):
                found, hi = mid, mid - 1
            else:
                lo = mid + 1
        return found

    def most_on_host(self, keep: int, kw: dict, lo: int, hi: int) -> int:
        """The most offloaded inputs in [lo, hi] the CPU memory holds (``lo`` is known to)."""
        if self.host_mem is None:
            return hi
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if host_fits(self.estimate(keep, mid, kw), self.host_mem) else (lo, mid - 1)
        return lo

    def least_paged(self, keep: int, kw: dict, n: int, est: dict, top: int) -> tuple[int, dict]:
        """From ``n`` offloaded inputs that fit (``est``), the fewest in [n, top] with which as little optimizer state
        is paged out as at ``top``: the room an offloaded input leaves goes to the optimizer state first, whose paging
        runs in the optimizer step, where the inputs' copies overlap the compute."""
        paged = est["host"]["optimizer_states"]
        if not paged or top <= n:
            return n, est
        least = self.estimate(keep, top, kw)["host"]["optimizer_states"]
        lo, hi, best = n + 1, top, (n, est)
        while lo <= hi and least < paged:
            mid = (lo + hi) // 2
            e = self.estimate(keep, mid, kw)
            if e["host"]["optimizer_states"] <= least and self.fits(e):
                best, hi = (mid, e), mid - 1
            else:
                lo = mid + 1
        return best

    def placements(self, keep: int, kw: dict) -> list[tuple[int, int, dict]]:
        """``(offloaded inputs, GEMM-keeping blocks, estimate)`` worth weighing with ``keep`` kept blocks: the fewest
        offloaded inputs that fit and page out no more optimizer state than need be (:meth:`least_paged`), with the
        most GEMM-keeping blocks that then fit; and, where offloading more leaves room for more GEMM-keeping blocks,
        the fewest offloaded inputs that fit those."""
        m = int(self.config.num_hidden_layers) - keep
        lo, hi = {None: (0, m), True: (m, m), False: (0, 0)}[self.forced]
        first = self.fewest(keep, kw, lo, hi)
        if first is None:
            return []
        top = self.most_on_host(keep, kw, first[0], hi)
        n0, est0 = self.least_paged(keep, kw, *first, top)
        g0, est0 = _most_gemms(self, keep, n0, est0, kw)
        out = [(n0, g0, est0)]
        if top > n0:  # (all inputs offloaded or all but one: either may leave the most room, fewest() says why)
            g1 = max(_most_gemms(self, keep, n, self.estimate(keep, n, kw), kw)[0] for n in {top, max(n0, top - 1)})
            more = self.fewest(keep, kw, n0, top, g1) if g1 > g0 else None
            if more is not None:
                out.append((more[0], g1, more[1]))
        return out

    def too_small(self, checkpointing: bool, streamed: bool) -> str:
        least = ("every block recomputed" if checkpointing else "--grad-checkpointing false") + (
            ", block inputs in CPU memory" if checkpointing and self.forced is not False else "") + (
            ", the block weights streamed from CPU memory" if streamed else "")
        last = self.last
        if self.host_short:
            return (f"--memory-budget {self.budget / GiB:.1f} GiB: the policies that fit it need more CPU memory than "
                    f"the {self.host_mem / GiB:.1f} GiB available (about {host_bytes(last) / GiB:.1f} GiB for "
                    f"{least}); free CPU memory, or use a larger budget, a smaller batch or shorter sequences")
        return (f"--memory-budget {self.budget / GiB:.1f} GiB is too small for this run: even with {least} and the "
                f"optimizer state paged out as far as it can be, it needs about "
                f"{required_bytes(last, self.context) / GiB:.1f} "
                f"GiB (peak {last['peak'] / GiB:.1f} GiB at the {last['phase']}, plus slack and context); give a "
                f"larger budget, a smaller batch or shorter sequences")


# What keeping a block's MLP gate/up outputs saved of its recompute's *time*, over what those two GEMMs are of its
# FLOPs: the rest of a recompute (attention, norms, dequantization, the checkpoint's own work) costs more time than
# its FLOPs say, and the kept outputs are copied in (H100, 8B, 2 x 2048: 0.29 of the time saved by keeping whole
# blocks, against 0.70 of the FLOPs; bench/recompute_policies.py, BENCHMARKS.md session 19)
GEMM_TIME_OVER_FLOPS = 0.41


def gemm_flop_share(config, seq: int) -> float:
    """The share of a checkpointed block's recompute FLOPs that its MLP gate/up GEMMs are: those two GEMMs over the
    recompute's (the block linears but down_proj, whose GEMM the recompute skips, and the causal attention's
    ``2 * seq * H_q * D`` a token)."""
    h, i = int(config.hidden_size), int(getattr(config, "intermediate_size", 4 * config.hidden_size))
    heads = int(config.num_attention_heads)
    d = int(getattr(config, "head_dim", None) or h // heads)
    q, kv = heads * d, int(getattr(config, "num_key_value_heads", None) or heads) * d
    gate_up = 2 * h * i
    return gate_up / (h * (q + 2 * kv) + q * h + gate_up + seq * q)


def gemm_share(config, seq: int) -> float:
    """The share of a checkpointed block's recompute time that keeping its MLP gate/up outputs saves, the unit
    :func:`choose` weighs a GEMM-keeping block by (a kept block: 1): the FLOP share (:func:`gemm_flop_share`) times
    :data:`GEMM_TIME_OVER_FLOPS`, measured."""
    return gemm_flop_share(config, seq) * GEMM_TIME_OVER_FLOPS


def _most_gemms(room: _Room, keep: int, off: int, est: dict, kw: dict) -> tuple[int, dict]:
    """The most checkpointed blocks (of ``L - keep``) that can also keep their MLP GEMMs' outputs within the
    budget, ``off`` inputs offloaded, and that policy's estimate (``est``, the one with none, when none can)."""
    if not kw["counts"].get("gemms_keepable") or est["details"]["mlp_chunk_tokens"]:
        return 0, est  # gate/up without a plain adapter, or a tiled MLP: nothing to keep
    lo, hi, best = 0, int(room.config.num_hidden_layers) - keep, est
    while lo < hi:  # memory grows with each block: the largest that fits, by bisection
        mid = (lo + hi + 1) // 2
        e = room.estimate(keep, off, kw, mid)
        lo, hi, best = (mid, hi, e) if room.fits(e) else (lo, mid - 1, best)
    return lo, best


def _policy(est: dict, budget: int, layers: int, keep: int, off: int, context: int, kw: dict,
            gemms: int = 0) -> Policy:
    states_total = est["details"]["optimizer_states_total"]
    resident = est["components"]["optimizer_states"]
    paged = kw.get("optim", "paged_adamw").startswith("paged")
    explicit = kw.get("page_budget")
    page_budget = explicit if explicit is not None else (resident if paged and resident < states_total else None)
    return Policy(budget=budget, layers=layers, keep=keep, offload=est["settings"]["offload_blocks"], gemms=gemms,
                  page_budget=page_budget, states_on_host=est["host"]["optimizer_states"], peak=est["peak"],
                  phase=est["phase"], required=required_bytes(est, context), stream=est["settings"]["streamed_blocks"],
                  weight_slots=est["components"]["weight_slots"], weight_host=est["host"]["weights"],
                  host=host_bytes(est))


def for_train(cfg, device, config=None, streamed: int | None = None, agree=None) -> Policy | None:
    """The policy of a :class:`qlora.train.TrainConfig` on ``device`` (None with ``--memory-budget off``);
    ``config``: the model's transformers config (read from ``cfg.model`` when None, no weights); ``streamed``: the
    number of blocks a model given to the run streams already (they decide, not --offload-weights); ``agree``: the
    smallest of a value over the run's processes (:meth:`qlora.distributed.Dist.min`), so that all of them choose
    the same policy from the free memory each sees (the same blocks recomputed, offloaded and streamed)."""
    value = parse_budget(cfg.memory_budget)
    if value == "off":
        return None
    from .plan import model_config
    agree = agree or (lambda x: x)
    budget = agree(auto_budget(device)) if value == "auto" else value
    if budget <= 0:
        raise QLoraError(f"--memory-budget auto: no free memory on {device}")
    config = config if config is not None else model_config(cfg.model)
    cuda = getattr(device, "type", str(device)) == "cuda"
    context = CONTEXT_BYTES if cuda else 0
    kw = plan_kwargs(cfg)
    kw.pop("offload_weights")
    # --offload-activations true: only policies that offload; on a CPU none (the offloader leaves CPU tensors be)
    asked = kw.pop("offload")
    forced = (True if asked else None) if cuda else False
    # --offload-weights: true only policies that stream, false none; auto: where nothing else fits (on a GPU)
    stream = {"true": True, "false": False}.get(str(getattr(cfg, "offload_weights", "false")).lower())
    if stream is None and not cuda:
        stream = False
    if streamed:
        stream = streamed
    # the CPU memory each of this machine's processes may fill (on the CPU the budget is that memory already)
    host = agree(host_available() // local_processes()) if cuda else None
    return choose(config, cfg.max_length, rows_per_micro_batch(cfg), budget, context=context,
                  checkpointing=kw.pop("grad_checkpointing") or bool(stream), offload=forced, stream=stream,
                  host_mem=host, **kw)


def stream_needed(cfg, config, gpu_mem: int, context: int = CONTEXT_BYTES) -> tuple[int, dict]:
    """``--offload-weights auto`` without a budget: how many blocks must stream their weights, because the run of
    :class:`qlora.train.TrainConfig` ``cfg`` does not fit ``gpu_mem`` even with every block recomputed and the
    block inputs offloaded (its optimizer and other flags as given): 0 where it fits, else the fewest with which it
    does, the block inputs where the run puts them (all where even that does not) -- and the estimate without
    streaming."""
    kw = dict(plan_kwargs(cfg), grad_checkpointing=True, offload=True, offload_weights=False)
    est = estimate(config, cfg.max_length, rows_per_micro_batch(cfg), gpu_mem=gpu_mem, **kw)
    if fits(est, gpu_mem, context):
        return 0, est
    # the count: with the block inputs where the run puts them, no block kept (--memory-budget's search, no budget)
    run = {k: v for k, v in kw.items() if k not in ("grad_checkpointing", "offload", "offload_weights")}
    run["counts"] = counts_for(config, **run)
    room = _Room(config, cfg.max_length, rows_per_micro_batch(cfg), gpu_mem, context, None,
                 bool(plan_kwargs(cfg)["offload"]))
    return room.fewest_streamed(run) or int(config.num_hidden_layers), est


def card_memory(device) -> int:
    """Bytes this process may use on a CUDA ``device``: the card's memory, times the allocator's
    per-process fraction when one is set (``torch.cuda.set_per_process_memory_fraction``)."""
    import torch
    idx = device.index if device.index is not None else torch.cuda.current_device()
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # (newer torch only)
    return int(torch.cuda.get_device_properties(idx).total_memory * (fraction(idx) if fraction else 1.0))


def plan_page_budget(cfg, config, gpu_mem: int) -> int | None:
    """Without --memory-budget, the optimizer state a paged optimizer keeps on a ``gpu_mem`` card: what the
    plan leaves room for beside the step's peak when that is less than all of it, else None (then the pager
    sizes itself from free memory at each step). Free memory at the first optimizer step is not enough to go by:
    the state it admits is what the next step's backward lacks (70B r=64 on 46 GiB ran out of memory so)."""
    kw = plan_kwargs(cfg)
    if kw["page_budget"] is not None or not str(cfg.optim).startswith("paged"):
        return None  # --offload-optimizer (all state on the host) or an optimizer that does not page
    kw.pop("page_budget")
    est = estimate(config, cfg.max_length, rows_per_micro_batch(cfg), gpu_mem=gpu_mem, **kw)
    resident = est["components"]["optimizer_states"]
    return resident if resident < est["details"]["optimizer_states_total"] else None
