"""Time to first step, phase by phase (8B shape, NF4, LoRA r=16): imports, CUDA context, building the
model, and the first three steps. Prints a list of (phase, seconds since start).

    python bench/ttfs_profile.py
"""
import time
T0 = time.time()
marks = []
def mark(what): marks.append((what, round(time.time() - T0, 2)))
import os, sys; sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, ".")  # run from the repository root; bench/ off the path (bench/kernels.py is not `kernels`)
from qlora.lean_imports import hide_unused_packages; hide_unused_packages()  # as the qlora command does
import torch; mark("import torch")
torch.cuda.init(); torch.zeros(1, device="cuda"); mark("CUDA context")
import transformers; from transformers import LlamaConfig; mark("import transformers")
from qlora.model import LoraSettings, QuantSettings, build_random; from qlora.train import loss_sum; from qlora.optim import make_optimizer
from qlora.offload import enable_checkpointing
mark("import qlora")
from qlora.plan import shape_config
model = build_random(shape_config("8b"), QuantSettings(), LoraSettings(r=16, alpha=16, dropout=0.0), "cuda", "bf16", progress=False)
enable_checkpointing(model); model.train(); torch.cuda.synchronize(); mark("build 8B in NF4")
params = [p for p in model.parameters() if p.requires_grad]
opt = make_optimizer(params, "paged_adamw", lr=2e-4)
for i in range(3):
    ids = torch.randint(0, 128256, (2, 2048))
    l = loss_sum(model, {"input_ids": ids, "labels": ids}, "cuda") / ids.numel(); mark(f"step {i+1} forward")
    l.backward(); mark(f"step {i+1} backward")
    torch.nn.utils.clip_grad_norm_(params, 0.3); opt.step(); opt.zero_grad(); torch.cuda.synchronize(); mark(f"step {i+1} done")
print(marks)
