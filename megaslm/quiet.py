"""Third-party console lines that carry no information for a megaslm user, dropped where they are printed.

- DeepSpeed prints "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" on every rank of every
  launch, also when it only loaded the op compiled at set-up (`megaslm.parallel.prebuild`): it reads like a rebuild.
- deepspeed.utils.zero_to_fp32 prints four to six lines per consolidated checkpoint ("Processing zero checkpoint",
  "Parsing checkpoint created by", "Detected checkpoint of type", "Reconstructed ... fp32 state dict"): `export`
  and `analyze dynamics` say which checkpoint they read in their own line; its "Loading checkpoint shards"
  progress bar (stderr) lasts a fraction of a second.
Anything else printed meanwhile still reaches its stream (stdout or stderr), after the call.
"""

from __future__ import annotations

import contextlib
import io
import sys

DEEPSPEED_OP_LOADED = ("DeepSpeed deepspeed.ops.comm.", )
ZERO_TO_FP32 = ("Processing zero checkpoint", "Parsing checkpoint created by", "Detected checkpoint of type",
                "Reconstructed ", "Loading checkpoint shards")


@contextlib.contextmanager
def dropping_lines(prefixes: tuple[str, ...]):
    """Run the block with stdout and stderr captured; then write out the captured lines (a progress bar's
    carriage-return updates count as lines) that start with none of `prefixes`."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        for buf, stream in ((out, sys.stdout), (err, sys.stderr)):
            kept = [line for line in buf.getvalue().splitlines(keepends=True) if not line.startswith(prefixes)]
            if kept:
                stream.write("".join(kept))
                stream.flush()
