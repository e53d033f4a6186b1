"""Meta-step speed: the vmap engine against a per-task clone-and-loop reference.

Sine MAML, second order, meta-batch 25, K=10, net 1-40-40-1, with 1 and 5
inner steps. The reference clones the parameters for each task and loops,
the way learn2learn's ``clone()`` + ``adapt()`` do.

    python benchmarks/meta_engine.py [--json] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fedmeta.data import SineTasks
from fedmeta.meta import MAML
from fedmeta.models import MultiTaskModel, TaskSpec

META_BATCH, SHOTS, LR = 25, 10, 0.01


def clone_module(module):
    """learn2learn's ``clone_module``: a shallow module copy whose parameters are differentiable clones."""
    clone = module.__new__(type(module))
    clone.__dict__ = module.__dict__.copy()
    clone._parameters = {k: p.clone() if p is not None else None for k, p in module._parameters.items()}
    clone._buffers = module._buffers.copy()
    clone._modules = {k: clone_module(m) for k, m in module._modules.items()}
    return clone


def update_module(module, lr, grads):
    """learn2learn's ``maml_update``: replace every parameter by ``p - lr * g``, keeping the graph."""
    params = [(m, k) for m in module.modules() for k in m._parameters]
    for (m, k), g in zip(params, grads):
        m._parameters[k] = m._parameters[k] - lr * g


def loop_meta_step(model, batch, steps):
    """The learn2learn loop: per task, clone the module, adapt with create_graph=True, add the query loss."""
    total = 0.0
    for i in range(batch.size):
        learner = clone_module(model)
        sx, sy, _, qx, qy, _ = (t[i] for t in batch.tensors())
        for _ in range(steps):
            loss = ((learner(sx, "sine").squeeze(-1) - sy) ** 2).mean()
            fast = [p for m in learner.modules() for p in m._parameters.values()]
            update_module(learner, LR, torch.autograd.grad(loss, fast, create_graph=True))
        total = total + ((learner(qx, "sine").squeeze(-1) - qy) ** 2).mean()
    total = total / batch.size
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(total, list(params.values()))
    return dict(zip(params, grads))


def engine_meta_step(model, state, batch, algo, use_vmap=None):
    return algo.meta_loss_and_grad(model, state, batch, use_vmap=use_vmap)[1]["params"]


def time_ms(fn, repeats):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1000 * times[len(times) // 2]


def measure(steps, repeats):
    torch.manual_seed(0)
    model = MultiTaskModel.mlp(1, [TaskSpec(name="sine", kind="regression")], hidden=(40, 40))
    algo = MAML(lr=LR, adaptation_steps=steps)
    state = algo.init_state(model)
    batch = SineTasks(seed=0).sample(META_BATCH, SHOTS)
    g_engine = engine_meta_step(model, state, batch, algo)
    g_loop = loop_meta_step(model, batch, steps)
    diff = max((g_engine[k] - g_loop[k]).abs().max().item() for k in g_loop)
    engine_ms = time_ms(lambda: engine_meta_step(model, state, batch, algo), repeats)
    vmap_ms = time_ms(lambda: engine_meta_step(model, state, batch, algo, use_vmap=True), repeats)
    loop_ms = time_ms(lambda: loop_meta_step(model, batch, steps), repeats)
    return engine_ms, vmap_ms, loop_ms, diff


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; sine MAML 2nd order, meta-batch {META_BATCH}, K={SHOTS}, 1-40-40-1")
    result = {}
    for steps in (1, 5):
        engine_ms, vmap_ms, loop_ms, diff = measure(steps, args.repeats)
        print(
            f"inner steps {steps}: engine {engine_ms:6.2f} ms (forced vmap path {vmap_ms:6.2f} ms)  "
            f"loop {loop_ms:6.2f} ms  speedup {loop_ms / engine_ms:5.1f}x  max|grad diff| {diff:.2e}"
        )
        suffix = "" if steps == 1 else f"_{steps}"
        result[f"engine_ms{suffix}"] = round(engine_ms, 3)
        result[f"engine_vmap_ms{suffix}"] = round(vmap_ms, 3)
        result[f"loop_ms{suffix}"] = round(loop_ms, 3)
        if steps == 1:
            result["speedup"] = round(loop_ms / engine_ms, 2)
            result["max_grad_diff"] = diff
        else:
            result[f"speedup{suffix}"] = round(loop_ms / engine_ms, 2)
            result[f"max_grad_diff{suffix}"] = diff
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
