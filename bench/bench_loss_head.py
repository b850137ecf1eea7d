"""Peak memory and time of the LM-head loss, forward + backward: chunked per_token_ce vs naive full logits.

    python bench/bench_loss_head.py                      # 2048 tokens, hidden 512, vocab 32000, fp32, 1 thread
    python bench/bench_loss_head.py --quick              # a small shape, seconds
    python bench/bench_loss_head.py --seq 1024 --batch 1 --hidden 512 --vocab 8000 --chunks auto 256 keep
    python bench/bench_loss_head.py --select 1.0 0.6 --rounds 3   # every token, and 60% selected (grad 0 elsewhere)

Variants: naive (F.cross_entropy on full logits), `auto` (per_token_ce defaults), a chunk size, `keep` (defaults
plus a keep_bytes budget that holds every chunk's softmax: memory for speed), `fused` (the fused head: gradients
formed in the forward, given the upstream gradient as per-token weights up front) or fN (fused, N-token chunks). With `--select f` the upstream
gradient is nonzero on a random fraction f of the tokens (SLM), exactly 0 elsewhere; naive runs the same.
Columns: "beyond w.grad / logits" is (peak - weight gradient) / one fp32 [tokens, vocab] tensor; "time vs naive"
is against naive at the same --select. Rounds alternate the variants; the median is printed.

Each (variant, shape) runs in a fresh subprocess. Peak memory: growth of the process's peak RSS (VmHWM, reset
just before the step) over its RSS once the inputs exist; the weight gradient counts in both variants. Children
run with MALLOC_MMAP_THRESHOLD_=131072 so that freed buffers leave RSS. Time: CPU time of the process (user + system)
for one forward + backward after a tiny warm-up (first-touch page faults included, for both variants); with one
thread it is the work done, and unlike wall time it holds on a machine shared with other jobs. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _memory import MIB, peak_bytes, reset_peak, rss_bytes  # bench/ is on sys.path when run as a script


def _child_env() -> dict:
    # A fixed malloc mmap threshold: every large buffer is mmapped and unmapped when freed, so RSS follows the
    # live tensors (glibc's adaptive threshold would keep freed buffers of up to 32 MiB in the heap).
    return dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")


def child(variant: str, tokens: int, hidden_size: int, vocab: int, threads: int, select: float) -> dict:
    import torch
    import torch.nn.functional as F

    from megaslm.loss import per_token_ce

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size).div_(hidden_size**0.5).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,))
    grad_out = torch.rand(tokens) * (torch.rand(tokens) < select)

    def step(h, w, y, g):
        if variant == "naive":
            loss = F.cross_entropy(h @ w.t(), y, reduction="none")
        elif variant == "keep":
            loss = per_token_ce(h, w, y, keep_bytes=4 * h.shape[0] * w.shape[0])
        elif variant == "fused" or variant.startswith("f"):
            chunk = None if variant == "fused" else int(variant[1:])
            loss = per_token_ce(h, w, y, grad_weights=g, fused_chunk=chunk)
        elif variant.startswith("b"):
            loss = per_token_ce(h, w, y, vocab_block=int(variant[1:]))
        else:
            loss = per_token_ce(h, w, y, chunk_size=None if variant == "auto" else int(variant))
        (loss * g).sum().backward()
        return loss

    # Warm up on a tiny slice so that kernels, thread pools and the autograd engine are not counted.
    step(hidden[:4].detach().requires_grad_(), weight[:64].detach().requires_grad_(), labels[:4] % 64, grad_out[:4])
    reset_peak()
    base = rss_bytes()
    start, cpu = time.perf_counter(), time.process_time()
    loss = step(hidden, weight, labels, grad_out)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = peak_bytes()
    return {"peak_extra_mib": (peak - base) / MIB, "wall_s": elapsed, "time_s": cpu, "loss_mean": loss.mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--chunks", nargs="+", default=["auto", "keep"],
                    help="per_token_ce variants: 'auto' (defaults), 'keep' (memory for speed), a chunk size (tokens), "
                         "bN (vocab_block N), 'fused' or fN (fused head, N-token chunks)")
    ap.add_argument("--select", type=float, nargs="+", default=[1.0, 0.6],
                    help="fractions of tokens with a nonzero gradient")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="seq 512, hidden 256, vocab 8000, 1 round")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.seq, args.hidden, args.vocab, args.rounds = 512, 256, 8000, 1
    if args.child:
        tokens = args.seq * args.batch[0]
        print(json.dumps(child(args.child, tokens, args.hidden, args.vocab, args.threads, args.select[0])))
        return

    print(f"loss head fwd+bwd, fp32, hidden {args.hidden}, vocab {args.vocab}, {args.threads} threads, "
          f"one fresh process per run, median of {args.rounds} rounds")
    header = (f"{'tokens':>7} {'select':>6} {'variant':>12} {'peak MiB':>9} {'cpu s':>7} "
              f"{'beyond w.grad / logits':>23} {'mem vs naive':>13} {'time vs naive':>14}")
    print(header)
    print("-" * len(header))
    variants = ["naive"] + args.chunks
    for batch in args.batch:
        tokens = args.seq * batch
        logits_mib = tokens * args.vocab * 4 / MIB
        wgrad_mib = args.vocab * args.hidden * 4 / MIB
        for select in args.select:
            runs = {v: [] for v in variants}
            for _ in range(args.rounds):  # alternate the variants so that machine noise hits them alike
                for v in variants:
                    cmd = [sys.executable, __file__, "--child", v, "--seq", str(args.seq), "--batch", str(batch),
                           "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--threads", str(args.threads),
                           "--select", str(select)]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=_child_env()).stdout
                    runs[v].append(json.loads(out.strip().splitlines()[-1]))
            med = {v: {k: statistics.median(r[k] for r in rs) for k in ("peak_extra_mib", "time_s")}
                   for v, rs in runs.items()}
            naive = med["naive"]
            for v in variants:
                r = med[v]
                name = v if v in ("naive", "keep", "auto") or v[0] in "bf" else f"chunk {v}"
                print(f"{tokens:>7} {select:>6.2f} {name:>12} {r['peak_extra_mib']:>9.0f} {r['time_s']:>7.2f} "
                      f"{(r['peak_extra_mib'] - wgrad_mib) / logits_mib:>23.3f} "
                      f"{r['peak_extra_mib'] / naive['peak_extra_mib']:>12.2f}x "
                      f"{r['time_s'] / naive['time_s']:>13.2f}x", flush=True)
        print(f"{'':>7} (one fp32 [tokens, vocab] logits tensor: {logits_mib:.0f} MiB; weight grad: {wgrad_mib:.0f} MiB)")


if __name__ == "__main__":
    main()
