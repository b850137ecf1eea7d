"""`python -m megaslm.parallel.launch [torchrun options] -m megaslm.cli ...`: torchrun, minus its traceback.

When a worker exits non-zero (a user error prints its one `error: ...` line, then exits 2), torchrun itself
raises ChildFailedError and prints a Python traceback plus a framed failure report, which reads like a crash
of the launcher. Here the same launch runs (torch.distributed.run's own argument parser and `run`), and a failed
worker ends in one line naming the first rank that failed and its exit code; this process exits with that code.
The worker's own output, its error line included, is untouched.

A Ctrl-C (or SIGTERM) that reaches this launcher makes torchrun's agent pass the signal to the workers (which finish
the step, save and stop) and then raise SignalException, with a traceback; here it ends in one line and exit code
128 + the signal, as a shell reports it. The agent then waits for the workers up to STOP_GRACE_S before SIGKILL
(torch's own 30 s cut off a 135M model's ZeRO-2 save on 2 CPU cores before its manifest was written); a failed
worker still has the others stopped within torch's 30 s.
"""

from __future__ import annotations

import logging
import os
import signal
import sys


# Seconds the ranks get, after a signal reached this launcher, to finish their step and save before SIGKILL.
STOP_GRACE_S = int(os.environ.get("MEGASLM_STOP_GRACE_S", "900"))


def patch_agent_grace() -> None:
    """After a signal, torchrun's agent calls its `_shutdown(signal)` (pass it on, SIGKILL after 30 s): give it
    STOP_GRACE_S instead, only when the signal came (its handler records it); other shutdowns keep 30 s."""
    import torch.distributed.elastic.multiprocessing.api as mp
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    if getattr(LocalElasticAgent._shutdown, "megaslm_grace", False):
        return
    handler, shutdown, signalled = mp._terminate_process_handler, LocalElasticAgent._shutdown, []

    def on_signal(signum, frame):  # registered by the agent when it starts the workers (a module-level lookup)
        signalled.append(signum)
        handler(signum, frame)

    def graceful_shutdown(self, death_sig=signal.SIGTERM, timeout=30):
        shutdown(self, death_sig, max(timeout, STOP_GRACE_S) if signalled else timeout)

    graceful_shutdown.megaslm_grace = True
    mp._terminate_process_handler = on_signal
    LocalElasticAgent._shutdown = graceful_shutdown


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun's agent logs the same failure at ERROR level, with pids and its own file:line: the line below says it.
    # (and its "Received 2 death signal" warning on a Ctrl-C). Some of its loggers carry a level of their own, which
    # the parent's does not override: set each.
    for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]:
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    patch_agent_grace()
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
    except SignalException as e:
        sig = signal.Signals(e.sigval)
        print(f"megaslm: stopped by {sig.name}: passed to the ranks, which save a checkpoint at the end of their step "
              "and stop (run the same command again to resume)", file=sys.stderr, flush=True)
        return 128 + int(sig)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
