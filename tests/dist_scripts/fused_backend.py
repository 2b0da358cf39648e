"""Run by tests/test_hash_checks.py under ``TRITON_INTERPRET=1`` (the fused kernel on CPU): the hashes check
with ``backend: triton`` writes the same ledger as with ``backend: torch`` and takes GRAD_NONFINITE from the
fused pass's NaN/Inf counts. ``python fused_backend.py OUT_DIR``; prints RESULT<json>."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from callbacks import Monitor  # noqa: E402

OUT = sys.argv[1]


def run(backend: str) -> list:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ledger = os.path.join(OUT, f"{backend}.jsonl")
    mon = Monitor(policy="log", checks={"hashes": {"backend": backend, "ledger": ledger}})
    mon.dispatch("init", model, step=0, optimizer=opt)
    gen = torch.Generator().manual_seed(0)
    for step in (1, 2):
        opt.zero_grad()
        model(torch.randn(4, 8, generator=gen)).square().mean().backward()
        if step == 2:
            model[2].bias.grad[1] = float("nan")  # a NaN the fused pass must count
        mon.dispatch("step", model, step=step, phase="before_optimizer", optimizer=opt)
        opt.step()
        mon.dispatch("step", model, step=step, phase="after_optimizer", optimizer=opt)
    mon.dispatch("end", model, step=2)
    return [[f.code, f.step, list(f.params), f.details.get("counts")] for f in mon.findings]


result = {"torch": run("torch"), "triton": run("triton")}
print("RESULT" + json.dumps(result))
