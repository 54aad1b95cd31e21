"""Time per solve of every Gramian weighting method (w = f(G)) for T tasks, on realistic Gramians.

Every registered `GramianWeighting` method is timed through its own `step(G, ctx)` (the call a training
step makes; methods with state are first run for a few steps so that the state is not its initial value),
on float32 Gramians (as training computes them) of four kinds:

  real      G = J Jᵀ of a feature-space step: ResNet-18 (CIFAR stem, width 0.25) with task-features
            heads, 32 px random images, batch 64, random initialisation (`--model-tasks` rows are taken
            and subsets used for smaller T)
  lowrank   J = A B + noise: rank max(2, T/4), entries N(0, 1), noise 1e-3 relative
  nearsing  lowrank with task 1 = -task 0 (1 + 1e-6) and task 3 = task 2 + 1e-7 noise: condition ~1e12
  conflict  random gradients with cos(g_i, g_j) ≈ -1/(T-1) (a regular simplex: 0 in their convex hull,
            up to 1e-4): Pareto-stationary, the hardest case for MGDA, CAGrad and Nash-MTL

A solve that raises (e.g. `GramianSolverError`: no silent fallback) is reported as such, not timed.
The table gives the median milliseconds per solve over --repeats calls; --json prints one JSON object.

Example:  python benchmarks/gramian_solvers.py
          python benchmarks/gramian_solvers.py --tasks 40 50 --methods upgrad nash_mtl --json
          python benchmarks/gramian_solvers.py --smoke
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch

from mtlvision.balancing import METHODS, StepContext, build_balancer
from mtlvision.balancing.gradient import GramianWeighting
from mtlvision.config import ModelConfig
from mtlvision.models import build_model
from mtlvision.tasks import Task

KINDS = ("real", "lowrank", "nearsing", "conflict")


def gramian_methods() -> list[str]:
    return [n for n in METHODS.names() if issubclass(METHODS.get(n).factory, GramianWeighting)]


def real_gramian(tasks: int, width: float, batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """G of one feature-space step (task-features architecture, random images, random labels)."""
    torch.manual_seed(seed)
    names = [Task(f"t{i}", [str(c) for c in range(10 if i % 2 == 0 else 2)]) for i in range(tasks)]
    model = build_model(ModelConfig(backbone={"name": "resnet18", "width": width, "stem": "cifar"},
                                    architecture={"name": "task-features", "feature_dim": 128}),
                        names, (size, size, 3))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    out = model(x, split=True)
    losses = [t.loss(out.logits[t.name], torch.randint(0, t.num_classes, (batch,), generator=g)) for t in names]
    shared = list(out.shared)
    J = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
                     for loss in losses]).float()
    return J @ J.T


def synthetic(kind: str, T: int, n: int = 4096, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + T)
    f64 = torch.float64
    if kind == "conflict":
        E = torch.eye(T, dtype=f64) - 1.0 / T  # regular simplex centred at 0: cos = -1/(T-1)
        Q = torch.linalg.qr(torch.randn(n, T, generator=g, dtype=f64)).Q
        J = (E @ Q.T) * torch.exp(torch.randn(T, 1, generator=g, dtype=f64))
        J = J + 1e-4 * torch.randn(T, n, generator=g, dtype=f64) / n ** 0.5
    else:
        r = max(2, T // 4)
        J = torch.randn(T, r, generator=g, dtype=f64) @ torch.randn(r, n, generator=g, dtype=f64) / r ** 0.5
        J = J + 1e-3 * torch.randn(T, n, generator=g, dtype=f64)
        if kind == "nearsing" and T >= 4:
            J[1] = -J[0] * (1 + 1e-6)
            J[3] = J[2] + 1e-7 * torch.randn(n, generator=g, dtype=f64)
    return (J @ J.T).float()


def solve_fn(name: str, T: int) -> Callable[[torch.Tensor], Any]:
    """A function that solves one G with the method as a training step would (state advanced first)."""
    tasks = [Task(f"t{i}", ["0", "1"]) for i in range(T)]
    balancer = build_balancer({"method": name}, tasks)
    ctx = StepContext(torch.zeros(1), [], [], 0, 0)

    def solve(G: torch.Tensor) -> Any:
        return balancer.step(G, ctx)

    solve.balancer = balancer  # type: ignore[attr-defined]
    return solve


def time_one(name: str, G: torch.Tensor, repeats: int) -> dict[str, Any]:
    T = G.shape[0]
    solve = solve_fn(name, T)
    balancer = solve.balancer  # type: ignore[attr-defined]
    try:
        for _ in range(3 if balancer.state_names else 1):  # stateful methods: a few committed steps first
            _, state = solve(G)
            balancer.commit(state)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            w, _ = solve(G)
            times.append(time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - reported, not hidden
        return {"ms": None, "error": f"{type(exc).__name__}: {exc}"}
    finite = bool(torch.isfinite(w).all())
    return {"ms": 1000 * statistics.median(times), "ms_min": 1000 * min(times), "finite": finite}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40, 50])
    ap.add_argument("--methods", nargs="+", default=None, help="default: every Gramian method")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the solvers are tiny)")
    ap.add_argument("--width", type=float, default=0.25, help="backbone width of the real step")
    ap.add_argument("--batch", type=int, default=64, help="batch of the real step")
    ap.add_argument("--smoke", action="store_true", help="T = 2, 10, tiny model, 2 repeats (a seconds-long check)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    if args.smoke:
        args.tasks, args.repeats, args.width, args.batch = [2, 10], 2, 0.0625, 8
    torch.set_num_threads(args.threads)
    methods = args.methods or gramian_methods()
    real: dict[int, torch.Tensor] = {}
    if "real" in args.kinds:
        full = real_gramian(max(args.tasks), args.width, args.batch, 32)
        real = {T: full[:T, :T].contiguous() for T in args.tasks}
    rows = []
    for T in args.tasks:
        for kind in args.kinds:
            G = real[T] if kind == "real" else synthetic(kind, T)
            ev = torch.linalg.eigvalsh(G.double())
            cond = float(ev.max() / ev.min()) if float(ev.min()) > 0 else float("inf")
            for m in methods:
                rows.append({"tasks": T, "gramian": kind, "cond": cond, "method": m, **time_one(m, G, args.repeats)})
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": sys.version.split()[0]}
    if args.json:
        json.dump({"env": env, "args": vars(args), "rows": rows}, sys.stdout, indent=1)
        print()
        return 0
    print(f"Gramian solvers: median ms per solve over {args.repeats} calls, float32 G, {env}")
    kinds = args.kinds
    print(f"{'method':12} {'T':>3} " + " ".join(f"{k:>10}" for k in kinds))
    for m in methods:
        for T in args.tasks:
            cells = []
            for k in kinds:
                r = next(r for r in rows if r["method"] == m and r["tasks"] == T and r["gramian"] == k)
                cells.append(f"{r['ms']:10.2f}" if r["ms"] is not None else f"{'error':>10}")
            print(f"{m:12} {T:>3} " + " ".join(cells))
    errors = [r for r in rows if r["ms"] is None]
    for r in errors:
        print(f"  {r['method']} T={r['tasks']} {r['gramian']}: {r['error']}")
    print(json.dumps({"env": env, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
