"""Vocab-parallel per_token_ce over T gloo processes: per-rank peak memory, time, and bytes communicated.

    python bench/bench_vocab_parallel.py                       # T = 1 2 4, 1024 tokens, hidden 1024, vocab 32000
    python bench/bench_vocab_parallel.py --tp 1 2 --tokens 2048 --hidden 2048

Each rank holds torch.tensor_split(W, T)[rank] and runs one forward + backward of the loss head. The all-reduce
payloads (the tensors handed to dist.all_reduce) are counted per rank, split into forward and backward, and
compared with gathering the full logits (V * 4 bytes per token per rank in forward). The backward all-reduce of
hidden.grad (H * 4 bytes per token) is needed by any tensor-parallel LM head, whichever way the loss is computed.
Peak memory is the growth of each process's peak RSS (VmHWM, reset just before the step) over its RSS
once its inputs exist. With T processes on
few cores the times mostly show the shared CPU; this prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megaslm.parallel.dist import free_port

from _memory import MIB, peak_bytes, reset_peak, rss_bytes  # bench/ is on sys.path when run as a script


def _worker(rank, world, port, args, out_path):
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # only affects new processes; set by the parent too
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from megaslm.loss import per_token_ce

    g = torch.Generator().manual_seed(rank)
    rows = len(torch.tensor_split(torch.empty(args.vocab, 0), world, dim=0)[rank])  # this rank's shard size
    shard = torch.randn(rows, args.hidden, generator=g).div_(args.hidden**0.5).requires_grad_()
    g.manual_seed(1234)  # the same hidden states and labels on every rank
    hidden = torch.randn(args.tokens, args.hidden, generator=g).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    grad_out = torch.rand(args.tokens, generator=g)
    group = dist.group.WORLD if world > 1 else None
    chunk = None if args.chunk == "auto" else int(args.chunk)

    # Warm-up on a slice (kernels, gloo buffers, autograd threads), then count and measure the real step.
    warm = hidden[:8].detach().requires_grad_()
    (per_token_ce(warm, shard, labels[:8], tp_group=group) * grad_out[:8]).sum().backward()
    shard.grad = None

    payload = {"fwd": 0, "bwd": 0, "calls_fwd": 0, "calls_bwd": 0}
    phase = ["fwd"]
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *a, **kw):
        payload[phase[0]] += tensor.numel() * tensor.element_size()
        payload["calls_" + phase[0]] += 1
        return real_all_reduce(tensor, *a, **kw)

    fwd_s = total_s = float("inf")
    for rep in range(args.repeats):  # memory and payloads from the first step, the best time over all
        counting = rep == 0
        if counting:
            dist.all_reduce = counting_all_reduce
            phase[0] = "fwd"
        shard.grad = hidden.grad = None
        dist.barrier()
        reset_peak()
        base = rss_bytes()
        start = time.perf_counter()
        loss = per_token_ce(hidden, shard, labels, chunk_size=chunk, tp_group=group)
        fwd_s = min(fwd_s, time.perf_counter() - start)
        phase[0] = "bwd"
        (loss * grad_out).sum().backward()
        total_s = min(total_s, time.perf_counter() - start)
        del loss
        if counting:
            dist.all_reduce = real_all_reduce
            peak = peak_bytes()
    row = {"rank": rank, "rows": shard.shape[0], "peak_extra_mib": (peak - base) / MIB, "fwd_s": fwd_s,
           "total_s": total_s, **payload}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--chunk", default="auto", help="per_token_ce chunk size ('auto' = the default)")
    ap.add_argument("--repeats", type=int, default=2, help="timed steps per rank (the best is shown)")
    args = ap.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # inherited by the workers: RSS follows live tensors

    print(f"vocab-parallel per_token_ce fwd+bwd, fp32, {args.tokens} tokens, hidden {args.hidden}, "
          f"vocab {args.vocab}, chunk {args.chunk}, {os.cpu_count()} cores, best of {args.repeats}")
    head = (f"{'T':>2} {'rank':>4} {'rows':>6} {'peak MiB':>9} {'fwd s':>7} {'fwd+bwd s':>9} "
            f"{'fwd B/tok':>9} {'bwd B/tok':>9} {'fwd calls':>9} {'gather-logits fwd B/tok':>23}")
    print(head)
    print("-" * len(head))
    for world in args.tp:
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            mp.start_processes(_worker, args=(world, free_port(), args, tmp.name), nprocs=world,
                               start_method="spawn")
            with open(tmp.name) as f:
                rows = json.load(f)
        for r in rows:
            print(f"{world:>2} {r['rank']:>4} {r['rows']:>6} {r['peak_extra_mib']:>9.0f} {r['fwd_s']:>7.2f} "
                  f"{r['total_s']:>9.2f} {r['fwd'] / args.tokens:>9.1f} {r['bwd'] / args.tokens:>9.1f} "
                  f"{r['calls_fwd']:>9} {args.vocab * 4 if world > 1 else 0:>23}", flush=True)
    print("B/tok: all-reduce payload bytes per token per rank (forward: max, then [sum-exp, target] per chunk, "
          "plus the shard sizes once; backward: hidden.grad).")


if __name__ == "__main__":
    main()
