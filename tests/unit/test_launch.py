"""megaslm.parallel.launch: after a signal, torchrun's agent waits STOP_GRACE_S for the ranks' save, not 30 s."""

from __future__ import annotations

import signal

import pytest


def test_the_agent_waits_the_grace_only_after_a_signal():
    import torch.distributed.elastic.multiprocessing.api as mp
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    from megaslm.parallel.launch import STOP_GRACE_S, patch_agent_grace

    closed = []

    class Agent:  # what LocalElasticAgent._shutdown touches
        _worker_watchdog = _health_check_server = None

        class _pcontext:
            @staticmethod
            def close(death_sig, timeout):
                closed.append((death_sig, timeout))

    patch_agent_grace()
    patch_agent_grace()  # idempotent: one wrapper
    LocalElasticAgent._shutdown(Agent())  # a normal end or a failed worker: torch's 30 s
    with pytest.raises(mp.SignalException):
        mp._terminate_process_handler(signal.SIGINT, None)  # what the agent registered: records, then raises
    LocalElasticAgent._shutdown(Agent(), signal.SIGINT)
    assert closed == [(signal.SIGTERM, 30), (signal.SIGINT, STOP_GRACE_S)] and STOP_GRACE_S > 30
