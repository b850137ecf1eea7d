"""`python -m megaslm.parallel.prebuild`: compile DeepSpeed's CPU ops once, at install time.

DeepSpeed builds these C++ extensions just in time, the first time a process needs them, into
~/.cache/torch_extensions (or $TORCH_EXTENSIONS_DIR), and later runs reuse the build:
- ShareMemCommBuilder: the shared-memory collectives of the CPU backend, loaded by every `deepspeed.init_distributed`
  on a CPU-only machine (45 s of compiling on 2 cores);
- CPUAdamBuilder: DeepSpeedCPUAdam, the optimizer of ZeRO with `offload_optimizer` (65 s).
Built here, the first CPU training run (the demo, a test) starts at once instead of compiling silently for about
two minutes. On a machine with a GPU nothing is built here: the CUDA ops build on first use, as DeepSpeed does.
Best effort: an op that cannot build is reported and the command still exits 0, since DeepSpeed would only try
again (and report the same error) at run time.
"""

from __future__ import annotations

import sys
import time

OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")


def main() -> int:
    import torch

    if torch.cuda.is_available():
        print("megaslm prebuild: a GPU is present; DeepSpeed builds its ops on first use")
        return 0
    from deepspeed.accelerator import get_accelerator

    for name in OPS:
        t0 = time.time()
        try:
            builder = get_accelerator().create_op_builder(name)
            if builder is None:
                print(f"megaslm prebuild: {name}: not available on this accelerator")
                continue
            builder.load(verbose=False)
            print(f"megaslm prebuild: {name} ready ({time.time() - t0:.0f} s)", flush=True)
        except Exception as e:  # noqa: BLE001 - a missing compiler or header: say so, DeepSpeed retries at run time
            print(f"megaslm prebuild: {name} could not be built ({type(e).__name__}: {e}); DeepSpeed will try "
                  "again when a run needs it", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
