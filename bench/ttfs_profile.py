"""Time to first step, phase by phase (8B shape, NF4, LoRA r=16): imports, CUDA context, building the
model, and the first three steps. Prints a list of (phase, seconds since start).

    python bench/ttfs_profile.py            # phases
    python bench/ttfs_profile.py --detail   # + cProfile of the build and of step 1, Triton compiles in step 1
    TRITON_CACHE_DIR=$(mktemp -d) python bench/ttfs_profile.py --detail   # as with a cold Triton cache
    python bench/ttfs_profile.py --write-hot-list qlora/hot_modules.txt  # + record what a GPU run imports
    --no-warm-up: without the warm-up thread `qlora train` starts; --no-compile-ahead: the thread
    compiles no Triton kernels
"""
import time
T0 = time.time()
marks = []
def mark(what): marks.append((what, round(time.time() - T0, 2))); print(marks[-1], flush=True)
import sys
DETAIL = "--detail" in sys.argv
from qlora.lean_imports import fast_start; fast_start()  # as the qlora command does
import torch; mark("import torch")
if "--no-warm-up" not in sys.argv:  # as `qlora train` does (its thread makes the CUDA context)
    from qlora.lean_imports import warm_up_cuda
    WARM = warm_up_cuda("cuda", 128, 2048, None if "--no-compile-ahead" in sys.argv else
                        dict(hidden=4096, intermediate=14336, vocab=128256, tokens=4096))
else:
    torch.cuda.init(); torch.zeros(1, device="cuda"); mark("CUDA context")
import transformers; from transformers import LlamaConfig, LlamaForCausalLM; mark("import transformers")
compiles = []
if DETAIL:  # time every Triton compilation
    import cProfile, pstats
    import triton.compiler as tc, triton.compiler.compiler as tcc, triton.runtime.jit as tjit
    _compile = tcc.compile
    def timed(src, *a, **k):
        t = time.time(); r = _compile(src, *a, **k)
        import threading; main = threading.current_thread() is threading.main_thread()
        compiles.append((getattr(src, "name", "?"), round(time.time() - t, 2), "main" if main else "warm-up")); return r
    for mod in (tcc, tc, tjit):
        if hasattr(mod, "compile"): mod.compile = timed
from qlora.model import LoraSettings, QuantSettings, build_random; from qlora.loss import loss_sum; from qlora.optim import make_optimizer
from qlora.offload import enable_checkpointing
mark("import qlora")
from qlora.plan import shape_config
prof = cProfile.Profile() if DETAIL else None
if prof: prof.enable()
model = build_random(shape_config("8b"), QuantSettings(), LoraSettings(r=16, alpha=16, dropout=0.0), "cuda", "bf16", progress=False)
enable_checkpointing(model); model.train(); torch.cuda.synchronize(); mark("build 8B in NF4")

if prof:
    prof.disable(); pstats.Stats(prof).sort_stats("cumulative").print_stats(20); prof = cProfile.Profile(); prof.enable()
params = [p for p in model.parameters() if p.requires_grad]
opt = make_optimizer(params, "paged_adamw", lr=2e-4)
for i in range(3):
    ids = torch.randint(0, 128256, (2, 2048))
    l = loss_sum(model, {"input_ids": ids, "labels": ids}, "cuda") / ids.numel(); torch.cuda.synchronize(); mark(f"step {i+1} forward")
    l.backward(); torch.cuda.synchronize(); mark(f"step {i+1} backward")
    torch.nn.utils.clip_grad_norm_(params, 0.3); opt.step(); opt.zero_grad(); torch.cuda.synchronize(); mark(f"step {i+1} done")
    if prof and i == 0:
        prof.disable(); pstats.Stats(prof).sort_stats("tottime").print_stats(25); prof = None
        mine = [c for c in compiles if c[2] == "main"]
        print(f"Triton compilations in step 1: {len(mine)}, {sum(c[1] for c in mine):.2f} s: {mine}")
        print(f"Triton compilations by the warm-up thread after transformers was imported: {[c for c in compiles if c[2] != 'main']}")
        if "--no-warm-up" not in sys.argv:
            print("warm-up threads finished at", {k: round(v - T0, 2) for k, v in WARM.done_at.items()}, "ran", WARM.ahead)
print(marks)
if "--write-hot-list" in sys.argv:  # the modules the background compiler takes first (qlora/lean_imports.py)
    from qlora.lean_imports import record_hot_modules
    out = sys.argv[sys.argv.index("--write-hot-list") + 1]
    print(f"{record_hot_modules(out)} modules written to {out}")
