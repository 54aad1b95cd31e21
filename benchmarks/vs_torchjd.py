"""mtlvision against TorchJD (the published anchor for Jacobian-based methods) on the same model and data.

Model: mtlvision's ResNet-18 (CIFAR stem, --width, default 0.25) with `hps` (one linear head per task),
T tasks of 10 classes, random 32x32 images (--batch-size, default 64), SGD. Every variant trains its own
copy of the same initial weights on the same batches; one training step (forward, T losses, backward
with the method, optimiser step) is timed per variant:

  ew             backward of the summed losses (context: the cheapest step)
  mtl-feature    mtlvision's default: T gradients w.r.t. the shared features, one trunk backward
  mtl-parameter  mtlvision, parameter space: the exact Jacobian, T trunk backwards
  jd-autojac     TorchJD: autojac.mtl_backward(losses, features) + autojac.jac_to_grad(trunk, aggregator)
  jd-autogram    TorchJD: autogram.Engine(backbone, batch_dim=None).compute_gramian(losses) -> weighting ->
                 losses.backward(weights). The fast batch_dim=0 path refuses BatchNorm (ResNet-18 has 20);
                 batch_dim=None accepts it. Heads receive w_t-weighted gradients here (the others: plain).

Methods at their defaults: TorchJD's UPGrad() (quadprog, reg_eps 1e-4), MGDA() (Frank-Wolfe, eps 1e-3, 100
iterations), PCGrad(); mtlvision's upgrad (exact QP), mgda (exact min-norm solver), pcgrad (seeded orders).
Timing: for each T, every variant of every method is interleaved step by step (`_timing.py`); a ratio is
the median of per-cycle ratios to jd-autojac of the same method [95% interval]; `vs_ew` is to the EW step.

Agreement (before timing, once per method and T): on one more copy of the same weights, in float64, and the
first 8 images of one batch, mtlvision's parameter-space step against TorchJD's autojac step with the
solvers set alike (float64: in float32 the two libraries' Jacobians, accumulated in different orders,
agree to ~1e-7, and at T = 40 UPGrad's QP amplifies that to ~2e-5 in the weights: conditioning, not a
difference of method; float64 leaves only the solvers' own differences): UPGrad with
TorchJD's QuadprogProjector(reg_eps=0) (mtlvision solves the same QP exactly); MGDA with both Frank-Wolfe
at eps 1e-5, 250 iterations (mtlvision's `exact=False`; the min-norm objective w'Gw of its default exact
solver is reported beside, never above); PCGrad with TorchJD's global RNG seeded like mtlvision's step
generator, so both draw the same task orders. Compared (max |a - b| / max |b|): the Gramians (same
per-task gradients), the weights, the trunk update and the heads' gradients; pass: update and heads <= 1e-5.

Memory: on a GPU, the peak allocated CUDA memory of one step per variant; on the CPU with --memory, the
peak RSS of a fresh process per variant (as balancing_memory.py) minus EW's.

Example:  python benchmarks/vs_torchjd.py --json                   (T = 3 10 40, UPGrad MGDA PCGrad)
          python benchmarks/vs_torchjd.py --tasks 10 --methods upgrad --memory
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import subprocess
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F

from _common import environment
from _timing import add_timing_args, check_timing_args, interleave, ratio_fields, ratio_stats
from balancing_memory import peak_rss_mib

from mtlvision.balancing import StepContext, build_balancer
from mtlvision.balancing.methods.mgda import MGDA, mgda
from mtlvision.config import load_config
from mtlvision.models import build_model
from mtlvision.rng import keyed_generator
from mtlvision.tasks import Task

try:
    from torchjd import aggregation as jd
    from torchjd.autogram import Engine
    from torchjd.autojac import jac_to_grad, mtl_backward
    from torchjd.linalg import QuadprogProjector
except ImportError:  # reported by main()
    jd = None

METHODS = ("upgrad", "mgda", "pcgrad")
KINDS = ("mtl-feature", "mtl-parameter", "jd-autojac", "jd-autogram")
TOL = 1e-5
SMOKE = {"tasks": [3], "width": 0.0625, "batch_size": 8, "threads": 1}


class MGDAFrankWolfe(MGDA):
    """mtlvision's MGDA with its Frank-Wolfe solver at TorchJD's settings (agreement check only)."""

    solver = staticmethod(functools.partial(mgda, exact=False, tol=1e-5, max_iter=250))


def torchjd_aggregator(method: str, exact: bool = False) -> Any:
    """TorchJD's aggregator at its defaults, or (exact) set up as mtlvision's solver."""
    if method == "upgrad":
        return jd.UPGrad(projector=QuadprogProjector(reg_eps=0.0)) if exact else jd.UPGrad()
    if method == "mgda":
        return jd.MGDA(epsilon=1e-5, max_iters=250) if exact else jd.MGDA()
    return jd.PCGrad()


class Variant:
    """One model copy, its optimiser, and the step of one (kind, method)."""

    def __init__(self, kind: str, method: str, base: torch.nn.Module, tasks: list[Task]) -> None:
        self.kind, self.method, self.names = kind, method, [t.name for t in tasks]
        self.model = copy.deepcopy(base).train()
        self.shared, self.heads = self.model.shared_parameters(), self.model.task_parameters()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.step_no = 0
        if kind.startswith("mtl"):
            space = kind.split("-")[1]
            spec = {"method": method, "space": space, **({"seed": 0} if method == "pcgrad" else {})}
            self.balancer = build_balancer(spec, tasks)
            self.split = space == "feature"  # the training forward the assembly gives feature-space methods
        elif kind == "jd-autojac":
            self.aggregator = torchjd_aggregator(method)
        elif kind == "jd-autogram":
            self.engine = Engine(self.model.backbone, batch_dim=None)
            self.weighting = torchjd_aggregator(method).gramian_weighting

    def losses(self, x: torch.Tensor, ys: dict[str, torch.Tensor]) -> tuple[Any, list[torch.Tensor]]:
        out = self.model(x, split=getattr(self, "split", False))
        return out, [F.cross_entropy(out.logits[n], ys[n]) for n in self.names]

    def backward(self, out: Any, losses: list[torch.Tensor]) -> torch.Tensor | None:
        """The method's backward; returns the task weights where the variant has them."""
        if self.kind == "ew":
            torch.stack(losses).sum().backward()
            return None
        if self.kind.startswith("mtl"):
            ctx = StepContext(out.shared, self.shared, self.heads, self.step_no, 0, trunk=out.trunk)
            w = self.balancer.backward(dict(zip(self.names, losses)), ctx)
            return torch.tensor([w[n] for n in self.names], dtype=torch.float64)
        if self.kind == "jd-autojac":
            mtl_backward(losses, features=out.shared[0], shared_params=self.shared,
                         tasks_params=[list(h.parameters()) for h in self.model.heads])
            return jac_to_grad(self.shared, self.aggregator)
        vec = torch.stack(losses)
        w = self.weighting(self.engine.compute_gramian(vec))
        vec.backward(w)
        return w

    def step(self, x: torch.Tensor, ys: dict[str, torch.Tensor]) -> None:
        out, losses = self.losses(x, ys)
        self.opt.zero_grad(set_to_none=True)
        self.backward(out, losses)
        self.opt.step()
        self.step_no += 1


def setup(tasks: int, args: argparse.Namespace) -> tuple[torch.nn.Module, list[Task], list]:
    """The shared initial model, the tasks and a few random batches (the same for every variant)."""
    task_list = [Task(f"t{i}", [str(c) for c in range(10)]) for i in range(tasks)]
    cfg = load_config(data={"name": "vs-torchjd", "data": {"source": {"name": "shapes"}},
                            "model": {"backbone": {"name": "resnet18", "width": args.width, "stem": "cifar"},
                                      "architecture": {"name": "hps"}, "head": {"name": "linear"}}})
    torch.manual_seed(0)
    base = build_model(cfg.model, task_list, (32, 32, 3)).to(args.device)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch_size, 3, 32, 32, generator=g).to(args.device),
                {t.name: torch.randint(0, 10, (args.batch_size,), generator=g).to(args.device) for t in task_list})
               for _ in range(2)]
    return base, task_list, batches


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def flat_grads(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def agreement(method: str, base: torch.nn.Module, tasks: list[Task], batch: tuple) -> dict[str, Any]:
    """mtlvision's parameter-space step against TorchJD's autojac step, solvers set alike (module doc)."""
    base = copy.deepcopy(base).double()
    batch = (batch[0][:8].double(), {t: y[:8] for t, y in batch[1].items()})
    mtl, ref = Variant("mtl-parameter", method, base, tasks), Variant("jd-autojac", method, base, tasks)
    if method == "mgda":
        mtl.balancer.__class__ = MGDAFrankWolfe
    ref.aggregator = torchjd_aggregator(method, exact=True)
    out, losses = mtl.losses(*batch)
    w_mtl = mtl.backward(out, losses)
    out, losses = ref.losses(*batch)
    mtl_backward(losses, features=out.shared[0], shared_params=ref.shared,
                 tasks_params=[list(h.parameters()) for h in ref.model.heads])
    jac = torch.cat([p.jac.reshape(len(tasks), -1) for p in ref.shared], 1)
    if method == "pcgrad":  # TorchJD draws from the global RNG: seed it as mtlvision's step generator
        torch.manual_seed(keyed_generator(mtl.balancer.seed, 0, 0).initial_seed())
    w_ref = jac_to_grad(ref.shared, ref.aggregator)
    G = jac.double() @ jac.double().T
    res = {"gramian": rel_err(mtl.balancer.gramian, G), "weights": rel_err(w_mtl, w_ref),
           "update": rel_err(flat_grads(mtl.shared), flat_grads(ref.shared)),
           "heads": rel_err(flat_grads(mtl.heads), flat_grads(ref.heads))}
    res["pass"] = res["update"] <= TOL and res["heads"] <= TOL
    if method == "mgda":  # min-norm objective of mtlvision's default exact solver vs Frank-Wolfe's
        exact = mgda(G)
        fw = w_ref.double()
        res["min_norm_exact"], res["min_norm_frank_wolfe"] = float(exact @ G @ exact), float(fw @ G @ fw)
    return res


def child(args: argparse.Namespace) -> int:
    """--_child METHOD/KIND (a variant's name, as `bench` keys them; EW is equal/ew): two steps of that variant
    in this fresh process, then its peak RSS as JSON."""
    method, kind = args._child.split("/")
    base, tasks, batches = setup(args.tasks[0], args)
    v = Variant(kind, method, base, tasks)
    for i in range(2):
        v.step(*batches[i % len(batches)])
    print(json.dumps({"peak_rss_mib": peak_rss_mib()}))
    return 0


def memory(name: str, tasks: int, args: argparse.Namespace) -> float:
    cmd = [sys.executable, __file__, "--_child", name, "--tasks", str(tasks), "--width", str(args.width),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.splitlines()[-1])["peak_rss_mib"]


def bench(tasks: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    base, task_list, batches = setup(tasks, args)
    variants = {"ew": Variant("ew", "equal", base, task_list)}
    variants.update({f"{m}/{k}": Variant(k, m, base, task_list) for m in args.methods for k in KINDS})
    checks = {m: agreement(m, base, task_list, batches[0]) for m in args.methods}
    cuda = args.device.startswith("cuda")
    peaks: dict[str, float] = {}
    for name, v in variants.items():
        if cuda:
            v.step(*batches[0])
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            v.step(*batches[1])
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated() / 2**20
        elif args.memory:
            peaks[name] = memory(name if name != "ew" else "equal/ew", tasks, args)

    def runner(v: Variant) -> Callable[[], None]:
        return lambda: v.step(*batches[v.step_no % len(batches)])

    times = interleave({n: runner(v) for n, v in variants.items()}, args.rounds * args.steps, args.warmup,
                       torch.cuda.synchronize if cuda else None, args.clock)
    rows = [{"tasks": tasks, "method": "equal", "variant": "ew", "ms_per_step": 1000 * statistics.median(times["ew"]),
             "peak_mib": peaks.get("ew")}]
    for m in args.methods:
        for k in KINDS:
            name = f"{m}/{k}"
            rows.append({"tasks": tasks, "method": m, "variant": k,
                         "ms_per_step": 1000 * statistics.median(times[name]),
                         **ratio_fields(ratio_stats(times[name], times[f"{m}/jd-autojac"])),
                         "vs_ew": ratio_stats(times[name], times["ew"])["median"], "peak_mib": peaks.get(name),
                         "peak_over_ew_mib": peaks[name] - peaks["ew"] if name in peaks else None,
                         **({"agreement": checks[m]} if k == "mtl-parameter" else {})})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[3, 10, 40])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--memory", action="store_true", help="CPU: peak RSS of a fresh process per variant")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    add_timing_args(ap, steps=2, warmup=1, rounds=3)
    args = ap.parse_args(argv)
    check_timing_args(ap, args, **SMOKE)
    if jd is None:
        ap.error("TorchJD is not installed (pip install 'torchjd[full]~=0.18.0')")
    if min(args.tasks) < 2 or args.batch_size < 1 or args.width <= 0:
        ap.error("--tasks must be >= 2, --batch-size >= 1, --width > 0")
    torch.set_num_threads(args.threads)
    if args._child:
        return child(args)
    rows = [r for t in args.tasks for r in bench(t, args)]
    agree = [r["agreement"]["pass"] for r in rows if "agreement" in r]
    result = {"benchmark": "vs_torchjd", "env": environment(), "args": vars(args), "agreement_pass": all(agree),
              "rows": rows}
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    print(f"mtlvision vs TorchJD: resnet18 w{args.width} + hps, batch {args.batch_size}, "
          f"{args.rounds * args.steps} interleaved cycles ({args.clock} clock), {environment()}")
    print(f"{'T':>3} {'method':7} {'variant':14} {'ms/step':>9} {'vs autojac [95% interval]':>27} {'vs EW':>6} "
          f"{'peak MiB':>9}  agreement (rel. error: update / heads / weights / Gramian)")
    for r in rows:
        ratio = f"{r['ratio']:6.3f} [{r['ratio_ci'][0]:6.3f}, {r['ratio_ci'][1]:6.3f}]" if "ratio" in r else "-"
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        a = r.get("agreement")
        agree_text = (f"{'ok' if a['pass'] else 'DIFFERS'} {a['update']:.1e} / {a['heads']:.1e} / {a['weights']:.1e} / "
                      f"{a['gramian']:.1e}") if a else ""
        print(f"{r['tasks']:>3} {r['method']:7} {r['variant']:14} {r['ms_per_step']:9.1f} {ratio:>27} "
              f"{r.get('vs_ew', 1.0):6.2f} {peak:>9}  {agree_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
