"""Collectives and host syncs per training step of `megaslm train`, counted by wrapping the calls.

    python bench/count_step_syncs.py                        # SLM (global scope) and CLM, 2 ranks, ZeRO-2
    python bench/count_step_syncs.py --baseline /tmp/main   # the same counts for another megaslm checkout
    python bench/count_step_syncs.py --loop                 # also the hand-written loop of bench_vs_naive

With --loop, the hand-written HF + DeepSpeed loop of bench/bench_vs_naive.py (clm; slm: ZeRO-0 reference engine,
per-sequence topk) is counted the same way, under the same DeepSpeed config, and each table ends with
megaslm's totals minus the loop's (every source counted: DeepSpeed's too).

Each rank runs the real trainer with torch.distributed's collectives and the tensor methods that wait for a
device (`item`, `tolist`, `__bool__`, `nonzero`, `__float__`, `__int__`) wrapped by counters. Counts are taken over steps after the first
(steady state), per step, split by the code that issued them: megaslm (by function) and DeepSpeed. On a CPU
`item` does not wait for anything, but on a GPU each of these is a stall of the host. Prints a table.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "barrier", "all_to_all_single", "all_gather_object", "all_reduce_coalesced")
SYNCS = ("item", "tolist", "__bool__", "nonzero", "__float__", "__int__")


def _caller() -> str:
    """Who issued the call: the innermost megaslm function on the stack, or DeepSpeed / transformers (their
    innermost function, and from which megaslm function) when their code sits between the two."""
    import traceback

    frames = traceback.extract_stack()[:-2]  # drop this function and the counting wrapper
    lib = None
    for f in reversed(frames):
        for name in ("deepspeed", "transformers", "torch/optim"):
            if lib is None and f"/{name}/" in f.filename:
                lib = f"{name.replace('/', '.')} {Path(f.filename).stem}.{f.name}"
        if "/megaslm/" in f.filename:
            where = f"{Path(f.filename).stem}.{f.name}"
            return f"{lib}, under megaslm {where}" if lib else f"megaslm {where}"
    return lib or "other"


def worker(out: str, argv: list[str]) -> None:
    """Run `megaslm <argv>` (or, for argv ["loop", objective, seq, mbs, steps, shards, model], the hand-written
    loop) in this process with counters installed."""
    import torch
    import torch.distributed as dist

    counts: list[collections.Counter] = [collections.Counter()]

    def wrap(owner, name, kind):
        real = getattr(owner, name)

        def counted(*a, **k):
            counts[-1][(kind, name, _caller())] += 1
            return real(*a, **k)

        setattr(owner, name, counted)

    for name in COLLECTIVES:
        if hasattr(dist, name):
            wrap(dist, name, "collective")
    for name in SYNCS:
        wrap(torch.Tensor, name, "sync")

    def new_step():
        counts.append(collections.Counter())  # everything from here to the next step's start is this step's

    try:
        if argv[0] == "loop":
            import argparse

            from bench_vs_naive import loop_worker

            objective, seq, mbs, steps, shards, model = argv[1:7]
            loop_worker(argparse.Namespace(objective=objective, seq=int(seq), mbs=int(mbs), steps=int(steps),
                                           shards=shards, model=model, out=f"{out}.loop.json", step_hook=new_step))
            counts.append(collections.Counter())  # the end of the last step
        else:
            from megaslm.train import trainer as trainer_mod

            real_step = trainer_mod.Trainer.train_step

            def step(self):
                new_step()
                return real_step(self)

            trainer_mod.Trainer.train_step = step
            from megaslm.cli import main

            main(argv)
    finally:
        rank = int(os.environ.get("RANK", 0))
        steady = counts[2:-1]  # steps 2 .. n-1: not the first, not the last (checkpoint)
        per_step = collections.Counter()
        for c in steady:
            per_step.update(c)
        rows = [[*k, v / max(1, len(steady))] for k, v in per_step.items()]
        Path(f"{out}.{rank}").write_text(json.dumps(rows))


def run(root: Path, shards: str, model: str, objective: str, repo: Path, steps: int, loop: bool = False,
        weight_decay: float | None = None) -> list:
    from bench_vs_naive import launch, megaslm_config, torchrun

    name = f"{objective}{'_loop' if loop else ''}{'' if weight_decay is None else '_wd'}"
    out = root / f"counts_{name}"
    if loop:
        argv = ["loop", objective, "128", "2", str(steps), shards, model]
    else:
        path = megaslm_config(root, shards, model, objective, 128, 2, steps, False, root / f"run_{name}")
        if weight_decay is not None:
            cfg = yaml.safe_load(path.read_text())
            cfg["train"]["weight_decay"] = weight_decay
            path.write_text(yaml.safe_dump(cfg))
        argv = ["train", str(path)]
    launch(torchrun(str(Path(__file__).resolve()), "--worker", str(out), *argv), repo)
    return json.loads(Path(f"{out}.0").read_text())


def _print(rows: list, title: str) -> dict:
    print(f"\n{title}")
    totals = {}
    for kind in ("collective", "sync"):
        sel = sorted((r for r in rows if r[0] == kind), key=lambda r: (r[2], r[1]))
        totals[kind] = sum(r[3] for r in sel)
        print(f"  {kind}s: {totals[kind]:g}")
        for _, name, where, n in sel:
            print(f"    {n:6g}  {name:<24} {where}")
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", help="another megaslm checkout to count instead of this one")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--loop", action="store_true", help="also count the hand-written loop of bench_vs_naive")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.worker:
        sys.path.insert(0, os.getcwd())  # the checkout under test (launch runs in it)
        worker(args.worker, rest)
        return
    from bench_vs_naive import make_setup

    repo = Path(args.baseline).resolve() if args.baseline else REPO
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        shards, model = make_setup(root)
        for objective in ("slm", "clm"):
            rows = run(root, shards, model, objective, repo, args.steps)
            ours = _print(rows, f"{objective.upper()} (global scope, ratio 0.6), rank 0, per step (steady state), "
                                f"checkout {repo}")
            if args.loop:
                # The loop hands DeepSpeed one parameter group (weight decay on everything); megaslm keeps norms and
                # biases out of the decay, in a second group, unless train.weight_decay is 0.
                one = _print(run(root, shards, model, objective, repo, args.steps, weight_decay=0.0),
                             f"{objective.upper()}, megaslm with train.weight_decay 0 (one parameter group)")
                theirs = _print(run(root, shards, model, objective, repo, args.steps, loop=True),
                                f"{objective.upper()}, the hand-written loop (bench_vs_naive), rank 0, per step")
                for name, t in (("megaslm", ours), ("megaslm, one parameter group,", one)):
                    print(f"  {name} minus the loop: {t['sync'] - theirs['sync']:+g} host syncs, "
                          f"{t['collective'] - theirs['collective']:+g} collectives")


if __name__ == "__main__":
    main()
