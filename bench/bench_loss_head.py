"""Peak memory and time of the LM-head loss, forward + backward: chunked per_token_ce vs naive full logits.

    python bench/bench_loss_head.py                      # seq 2048 x batch 1, 2; hidden 2048; vocab 32000; fp32
    python bench/bench_loss_head.py --quick              # a small shape, seconds
    python bench/bench_loss_head.py --seq 1024 --batch 1 --hidden 512 --vocab 8000 --chunks auto 256

Each (variant, shape) runs in a fresh subprocess. Peak memory: growth of the process's peak RSS (VmHWM, reset
just before the step) over its RSS once the inputs exist; the weight gradient counts in both variants. Children
run with MALLOC_MMAP_THRESHOLD_=131072 so that freed buffers leave RSS. Time: wall time of one forward + backward
after a tiny warm-up (first-touch page faults included, for both variants). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _memory import MIB, peak_bytes, reset_peak, rss_bytes  # bench/ is on sys.path when run as a script


def _child_env() -> dict:
    # A fixed malloc mmap threshold: every large buffer is mmapped and unmapped when freed, so RSS follows the
    # live tensors (glibc's adaptive threshold would keep freed buffers of up to 32 MiB in the heap).
    return dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")


def child(variant: str, tokens: int, hidden_size: int, vocab: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from megaslm.loss import per_token_ce

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size).div_(hidden_size**0.5).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,))
    grad_out = torch.rand(tokens)

    def step(h, w, y, g):
        if variant == "naive":
            loss = F.cross_entropy(h @ w.t(), y, reduction="none")
        else:
            loss = per_token_ce(h, w, y, chunk_size=None if variant == "auto" else int(variant))
        (loss * g).sum().backward()
        return loss

    # Warm up on a tiny slice so that kernels, thread pools and the autograd engine are not counted.
    step(hidden[:4].detach().requires_grad_(), weight[:64].detach().requires_grad_(), labels[:4] % 64, grad_out[:4])
    reset_peak()
    base = rss_bytes()
    start = time.perf_counter()
    loss = step(hidden, weight, labels, grad_out)
    elapsed = time.perf_counter() - start
    peak = peak_bytes()
    return {"peak_extra_mib": (peak - base) / MIB, "time_s": elapsed, "loss_mean": loss.mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--chunks", nargs="+", default=["auto", "512"],
                    help="per_token_ce chunk sizes to run ('auto' = the default)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="seq 512, batch 1 2, hidden 256, vocab 8000")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.seq, args.hidden, args.vocab = 512, 256, 8000
    if args.child:
        tokens = args.seq * args.batch[0]
        print(json.dumps(child(args.child, tokens, args.hidden, args.vocab, args.threads)))
        return

    print(f"loss head fwd+bwd, fp32, hidden {args.hidden}, vocab {args.vocab}, {args.threads} threads, "
          f"one fresh process per row")
    header = f"{'tokens':>7} {'variant':>16} {'peak MiB':>10} {'time s':>8} {'mem vs naive':>13} {'time vs naive':>14}"
    print(header)
    print("-" * len(header))
    for batch in args.batch:
        tokens = args.seq * batch
        results = {}
        for variant in ["naive"] + args.chunks:
            cmd = [sys.executable, __file__, "--child", variant, "--seq", str(args.seq), "--batch", str(batch),
                   "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=_child_env()).stdout
            results[variant] = r = json.loads(out.strip().splitlines()[-1])
            name = "naive" if variant == "naive" else f"chunked({variant})"
            naive = results["naive"]
            print(f"{tokens:>7} {name:>16} {r['peak_extra_mib']:>10.0f} {r['time_s']:>8.2f} "
                  f"{r['peak_extra_mib'] / naive['peak_extra_mib']:>12.2f}x "
                  f"{r['time_s'] / naive['time_s']:>13.2f}x", flush=True)
        logits_mib = tokens * args.vocab * 4 / MIB
        print(f"{'':>7} (one fp32 [tokens, vocab] logits tensor: {logits_mib:.0f} MiB; "
              f"weight grad: {args.vocab * args.hidden * 4 / MIB:.0f} MiB)")


if __name__ == "__main__":
    main()
