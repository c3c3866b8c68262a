"""Layers and routings shared by the Triton forward and backward tests (CPU interpreter or GPU)."""
from __future__ import annotations

import torch

import nf4moe

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def assert_negative_ids_trap(setup: str, call: str, *argv: str) -> None:
    """Run ``setup`` then ``call`` (Python source; ``call`` one statement) in a child process on the GPU (a
    device-side assert leaves its CUDA context unusable), with the repository and tests/ on its path: the call
    or the synchronize after it must raise the device-side assert, and the kernel's message reach stderr."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (f"{setup}\nimport torch\ntry:\n    {call}\n    torch.cuda.synchronize()\n"
            "except RuntimeError as e:\n    print('RAISED', ' '.join(str(e).split()))\n")
    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300, env=env)
    assert "RAISED" in proc.stdout and "device-side assert" in proc.stdout, (proc.stdout, proc.stderr[-2000:])
    assert "top_k_index has negative expert ids" in proc.stderr, proc.stderr[-2000:]


def run_uninterpreted(script: str, *argv: str) -> str:
    """Run ``tests/<script>`` in a child process with TRITON_INTERPRET unset (the kernels are then real JIT
    functions, compiled for a target given by hand) and the repository on its path; returns its stdout after
    checking it exited 0."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(here.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(here / script), *argv], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def count_calls(monkeypatch, owner, name: str) -> list:
    """Replace ``owner.name`` (for the rest of the test) by a wrapper that records each call in the
    returned list, then calls the original."""
    calls = []
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def make_layer(e, h, i, *, rank=0, nested=True, act="silu", blocksize=64, seed=0, lora_dtype=torch.float32):
    """A triton-backend layer on fresh random weights; LoRA B non-zero so the LoRA paths (and the
    LoRA gradients) really carry signal."""
    g = torch.Generator().manual_seed(seed)
    gu = (torch.randn(e, 2 * i, h, generator=g) * h ** -0.5).to(DEV)
    dn = (torch.randn(e, h, i, generator=g) * i ** -0.5).to(DEV)
    m = nf4moe.QuantGroupedExperts.from_weights(gu, dn, lora_rank=rank, lora_alpha=2 * rank if rank else None,
                                                compress_statistics=nested, act=act, blocksize=blocksize,
                                                backend="triton", lora_dtype=lora_dtype)
    with torch.no_grad():
        for p in m.lora_B.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def routing(t, e, k, *, seed, mode="random"):
    g = torch.Generator().manual_seed(seed)
    if mode == "random":
        idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else torch.zeros(0, k, dtype=torch.long)
    elif mode == "one_expert":  # every token's first slot to expert 1; other slots sentinels
        idx = torch.full((t, k), e + 5)
        idx[:, 0] = 1
    elif mode == "sentinels":
        idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
        idx[torch.rand(t, k, generator=g) < 0.3] = e  # expert-parallel sentinels
    w = torch.rand(t, k, generator=g) + 0.1
    return idx.to(DEV), w.to(DEV)


def routing_plan(top_k_index, num_experts):
    """The launch plan of a layer call routing ``top_k_index`` over ``num_experts`` experts (no LoRA, inference),
    for tests of the routing alone: plan.make_plan's own choice of the routing form, uncached (tests move
    routing.py's thresholds, which make_plan's cache cannot see).  CPU tensors outside the interpreter (where a
    layer takes the reference backend) get torch's sort."""
    from nf4moe.kernels import ops
    from nf4moe.kernels.host import INTERPRET
    from nf4moe.kernels.plan import LaunchPlan, PlanInputs, make_plan

    t, k = top_k_index.shape
    cuda = top_k_index.is_cuda
    if not (cuda or INTERPRET):
        return LaunchPlan(routing="torch", up="gemm", down="gemm", up_xa="none", down_xa="none", combine="kernel",
                          wgmma_tile=None, pdl=False, gemv_xa_early=False, capturing=False, save_preact=False,
                          check_ids_in_kernel=False)
    traced = ops.traced((top_k_index,))
    direct_cuda = cuda and not traced  # (a traced call's plan never reads the device's capability or capture state)
    inputs = PlanInputs(
        tokens=t, top_k=k, num_experts=num_experts, hidden=64, intermediate=64, rank=0, blocksize=64,
        dtype=torch.float32, cuda=cuda,
        capability=torch.cuda.get_device_capability(top_k_index.device) if direct_cuda else None,
        interpret=INTERPRET, gluon=False, index_ok=top_k_index.dtype in (torch.int32, torch.int64), x_aligned=False,
        training=False, recompute=False, capturing=direct_cuda and torch.cuda.is_current_stream_capturing(),
        traced=traced)
    plan = make_plan.__wrapped__(inputs)
    assert plan.routing in ("kernel", "torch"), plan  # no LoRA: never the routing launch with X·Aᵀ
    return plan


def build_routing(top_k_index, num_experts, check_ids=False):
    """The layer's routing of ``top_k_index`` (ops.route under ``routing_plan``): a Routing (sorted pair ids,
    expert offsets); ``check_ids`` rejects negative ids as the layer does."""
    from nf4moe.kernels import ops

    routing, xa = ops.route(routing_plan(top_k_index, num_experts), top_k_index, num_experts, check_ids=check_ids)
    assert xa is None
    return routing


def refill(x, idx, w, *, e, seed):
    """Fresh random inputs copied into the buffers a CUDA graph captured (``routing``'s ids and weights over ``e``
    experts), before a replay."""
    x.copy_(torch.randn(x.shape, device=x.device, generator=torch.Generator(x.device).manual_seed(seed)))
    nidx, nw = routing(x.shape[0], e, idx.shape[1], seed=seed)
    idx.copy_(nidx)
    w.copy_(nw)


def training_step_calls(monkeypatch, t: int, *, seed: int) -> list:
    """(op name, args) of every registered op one CPU training step calls (the routing, the forward with its
    stores, the backward's GEMMs, the LoRA gradients and the combine), recorded through ``ops.run`` while the
    step runs for real; for replaying the ops' traced bodies."""
    calls = _step_calls(monkeypatch, t, seed=seed, grad=True)
    names = [name for name, _ in calls]
    assert {"routing", "moe_experts", "moe_down_bwd", "moe_up_bwd", "lora_grad", "combine"} <= set(names), names
    return calls


def inference_step_calls(monkeypatch, t: int, *, seed: int) -> list:
    """``training_step_calls`` of one CPU inference call (no gradient): the routing and the layer op, under the
    plan overrides in force."""
    calls = _step_calls(monkeypatch, t, seed=seed, grad=False)
    assert [name for name, _ in calls] == ["routing", "moe_experts"], calls
    return calls


def _step_calls(monkeypatch, t: int, *, seed: int, grad: bool) -> list:
    from nf4moe.kernels import ops

    calls = []
    real_run = ops.run  # ops.route, the layer and its backward all call the module's ``run``
    monkeypatch.setattr(ops, "run", lambda name, *args: calls.append((name, args)) or real_run(name, *args))
    m = make_layer(4, 128, 64, rank=8, seed=seed)
    m.check_ids = False
    x = torch.randn(t, 128, dtype=torch.bfloat16, requires_grad=grad)
    idx, w = routing(t, 4, 2, seed=seed + 1)
    if grad:
        m(x, idx, w.to(torch.bfloat16)).float().square().sum().backward()
    else:
        with torch.no_grad():
            m(x, idx, w.to(torch.bfloat16))
    monkeypatch.setattr(ops, "run", real_run)
    return calls
