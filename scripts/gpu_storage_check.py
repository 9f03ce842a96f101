"""GPU check of flatquant.placement: calibration with inputs on the GPU, in pinned CPU memory and on disk
must give the same model (the two CPU-side storages copy each batch to the GPU per step), up to the run-to-run
spread of GPU training, which "device2" (the GPU storage again) measures."""

import copy
import sys
import time

import torch

sys.path.insert(0, "tests")
from conftest import random_llama  # noqa: E402

from flatquant.calibrate import CalibConfig, quantize_model  # noqa: E402
from flatquant.methods import get_method  # noqa: E402
from flatquant.spec import QuantConfig  # noqa: E402

base = random_llama(layers=2, hidden=512, inter=1536, heads=8, kv_heads=2).cuda()
samples = torch.randint(0, 256, (32, 512), generator=torch.Generator().manual_seed(0))
ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1)).cuda()
out = {}
for where in ("device", "device2", "cpu", "disk"):
    model = copy.deepcopy(base)
    torch.cuda.synchronize()
    t0 = time.time()
    quantize_model(model, samples, get_method("flatquant"), QuantConfig(), CalibConfig(epochs=2, batch_size=4, device="cuda", storage=where.rstrip("2")), None)
    torch.cuda.synchronize()
    with torch.no_grad():
        out[where] = model(ids).logits
    print(where, f"{time.time() - t0:.2f}s", "max diff vs device:", (out[where] - out["device"]).abs().max().item(), flush=True)
