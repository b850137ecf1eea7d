"""`python -m megaslm.parallel.launch [torchrun options] -m megaslm.cli ...`: torchrun, minus its traceback.

When a worker exits non-zero (a user error prints its one `error: ...` line, then exits 2), torchrun itself
raises ChildFailedError and prints a Python traceback plus a framed failure report, which reads like a crash
of the launcher. Here the same launch runs (torch.distributed.run's own argument parser and `run`), and a failed
worker ends in one line naming the first rank that failed and its exit code; this process exits with that code.
The worker's own output, its error line included, is untouched.
"""

from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun's agent logs the same failure at ERROR level, with pids and its own file:line: the line below says it.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        rc = int(failure.exitcode)
        how, code = (f"exit code {rc}", rc or 1) if rc >= 0 else (f"signal {-rc}", 128 - rc)  # torchrun: -signal
        prog = "megaslm" if args.training_script == "megaslm.cli" else args.training_script
        print(f"megaslm: `{' '.join([prog, *args.training_script_args])}` stopped: rank {rank} ended with {how} "
              "(its output above says why)", file=sys.stderr, flush=True)
        return code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
