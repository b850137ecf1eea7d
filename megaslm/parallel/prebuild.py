"""`python -m megaslm.parallel.prebuild`: compile DeepSpeed's CPU ops once, at install time.

DeepSpeed builds these C++ extensions just in time, the first time a process needs them, into
~/.cache/torch_extensions (or $TORCH_EXTENSIONS_DIR), and later runs reuse the build:
- ShareMemCommBuilder: the shared-memory collectives of the CPU backend, loaded by every `deepspeed.init_distributed`
  on a CPU-only machine (45 s of compiling on 2 quiet cores, ~2 min on busy ones);
- CPUAdamBuilder: DeepSpeedCPUAdam, the optimizer of ZeRO with `offload_optimizer` (65 s quiet, ~3.5 min busy).
Built here, the first CPU training run (the demo, a test) starts at once instead of compiling silently for
minutes. Each op says what it is and how long it takes before it starts, and every 30 s that it is still going
(the compiler prints nothing meanwhile); an op already in the cache loads in a second. On a machine with a GPU nothing is built here: the CUDA ops build on first use, as DeepSpeed does.
Best effort: an op that cannot build is reported and the command still exits 0, since DeepSpeed would only try
again (and report the same error) at run time.
"""

from __future__ import annotations

import os
import sys
import threading
import time

OPS = {"ShareMemCommBuilder": ("DeepSpeed's shared-memory collectives for CPU training", "1-2 min"),
       "CPUAdamBuilder": ("DeepSpeed's CPU Adam, for ZeRO with optimizer offload", "1-4 min")}
HEARTBEAT_S = 30


def _heartbeat(name: str, t0: float, done: threading.Event) -> None:
    while not done.wait(HEARTBEAT_S):
        print(f"megaslm prebuild: {name}: still compiling ({time.time() - t0:.0f} s)", flush=True)


def main() -> int:
    import torch

    if torch.cuda.is_available():
        print("megaslm prebuild: a GPU is present; DeepSpeed builds its ops on first use")
        return 0
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns that it found no GPU
    from deepspeed.accelerator import get_accelerator

    for i, (name, (what, takes)) in enumerate(OPS.items(), 1):
        t0 = time.time()
        done = threading.Event()
        try:
            builder = get_accelerator().create_op_builder(name)
            if builder is None:
                print(f"megaslm prebuild: {name}: not available on this accelerator")
                continue
            print(f"megaslm prebuild: {i}/{len(OPS)} {name} ({what}): compiling once, about {takes} on 2 cores "
                  "(seconds if already built)", flush=True)
            threading.Thread(target=_heartbeat, args=(name, t0, done), daemon=True).start()
            builder.load(verbose=False)
            done.set()
            print(f"megaslm prebuild: {name} ready ({time.time() - t0:.0f} s)", flush=True)
        except Exception as e:  # noqa: BLE001 - a missing compiler or header: say so, DeepSpeed retries at run time
            done.set()
            print(f"megaslm prebuild: {name} could not be built ({type(e).__name__}: {e}); DeepSpeed will try "
                  "again when a run needs it", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
