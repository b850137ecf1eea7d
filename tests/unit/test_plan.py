"""`megaslm plan` figures against independent computations: DeepSpeed's own estimators, closed-form token and
FLOP counts; every shipped config in configs/ loads and plans."""

from __future__ import annotations

from pathlib import Path

import pytest

from megaslm import plan as P
from megaslm.config import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("gpus_per_node,nodes", [(1, 1), (8, 1), (8, 4), (8, 16)])
@pytest.mark.parametrize("params,largest", [(1_100_048_384, 65_536_000), (7_241_732_096, 131_072_000)])
def test_model_states_equal_deepspeed_estimators(params, largest, gpus_per_node, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    dp = gpus_per_node * nodes
    for off in (False, True):
        cpu2, gpu2 = estimate_zero2_model_states_mem_needs(params, gpus_per_node, nodes, cpu_offload=off)
        assert P.model_states_bytes(params, largest, 2, dp, offload_optimizer=off) == gpu2
        if off:  # without offload DeepSpeed's CPU figure is for loading; the plan counts only offloaded states
            assert P.host_bytes_per_node(params, 2, nodes, gpus_per_node, offload_optimizer=True,
                                         offload_param=False) == cpu2
        for off_p in ((False, True) if off else (False,)):
            cpu3, gpu3, _ = estimate_zero3_model_states_mem_needs(params, largest, gpus_per_node, nodes,
                                                                  cpu_offload=off, cpu_offload_params=off_p)
            assert P.model_states_bytes(params, largest, 3, dp, offload_optimizer=off, offload_param=off_p) == gpu3
            if off:
                assert P.host_bytes_per_node(params, 3, nodes, gpus_per_node, offload_optimizer=True,
                                             offload_param=off_p) == cpu3


def test_stage_0_and_1_follow_stage_2_accounting():
    p = 1000
    assert P.model_states_bytes(p, 10, 0, 8) == 20 * p  # nothing partitioned: 2 + 18 bytes
    assert P.model_states_bytes(p, 10, 1, 8) == 4 * p + 16 * p // 8  # fp32 master + Adam partitioned
    assert P.model_states_bytes(p, 10, 2, 1) == P.model_states_bytes(p, 10, 0, 1)


def test_plan_of_slm_1b_matches_hand_computation():
    cfg = load_config(REPO / "configs" / "slm_1b.yaml")
    hw = P.Hardware(nodes=4, gpus_per_node=8, gpu_memory_gib=80, peak_tflops=989, mfu=0.4)
    p = P.plan(cfg, hw)
    n, seq = 1_100_048_384, 2048
    assert p["tokens_per_step"] == 2048 * 8 * 4 * 32 and p["total_tokens"] == p["tokens_per_step"] * 38147
    assert p["total_tokens"] >= 80e9
    train = 6 * n + 12 * 22 * 2048 * seq
    ref = 2 * n + 4 * 22 * 2048 * seq
    assert p["flops_per_token"]["train"] == train
    assert p["flops_per_token"]["reference_forward"] == pytest.approx(ref)
    assert p["gpu_hours"] == pytest.approx(p["total_tokens"] * (train + ref) / (989e12 * 0.4) / 3600)
    mem = p["memory_bytes"]
    assert mem["model_states"] == 2 * n + int(18 * n / 32)  # ZeRO-2, DeepSpeed's estimator
    assert p["reference"]["placement"] == "replicated" and mem["reference"] == 2 * n  # bf16 weights, auto
    tokens = 2048 * 8
    layer = 8 * 2048 + 2 * (6 * 2048 + 2 * 256 + 4 * 5632) + 4 * 32 + 8
    assert mem["activations"] == tokens * (22 * layer + 4 * 2048 + 4 * 2048)  # checkpointing off
    assert p["activations_bytes"]["checkpointing"] == tokens * (22 * 2 * 2048 + layer + 4 * 2048 + 4 * 2048)
    assert p["memory_total_bytes"] == sum(mem.values()) and p["fits"]


def test_cached_run_has_no_reference_cost_but_a_scoring_pass():
    online = P.plan(load_config(REPO / "configs" / "slm_1b.yaml"), P.Hardware(nodes=4))
    cached = P.plan(load_config(REPO / "configs" / "slm_1b_cached.yaml"), P.Hardware(nodes=4))
    assert cached["reference"]["placement"] == "cache" and cached["memory_bytes"]["reference"] == 0
    assert cached["flops_per_token"]["reference_forward"] == 0
    assert cached["gpu_hours"] + cached["score_gpu_hours"] == pytest.approx(online["gpu_hours"])


def test_zero3_reference_placement_partitions_weights():
    cfg = load_config(REPO / "configs" / "slm_7b.yaml", ["reference.placement=zero3"])
    p = P.plan(cfg, P.Hardware(nodes=16))
    n = 7_241_732_096
    assert p["memory_bytes"]["reference"] == 2 * n // 128 + 2 * 131_072_000  # 1/dp + the gathered embedding


@pytest.mark.parametrize("path", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_shipped_config_loads_and_plans(path):
    cfg = load_config(path)  # paths such as shards/web need not exist
    p = P.plan(cfg, P.Hardware(nodes=16 if "7b" in path.name else 4))
    assert p["fits"], (path.name, p["memory_total_bytes"] / P.GIB)
    if cfg.objective == "slm":  # pretraining toward 80B+ tokens; the Rho-1 math recipe continues for the paper's 15B
        assert p["total_tokens"] >= (15e9 if path.name.startswith("rho1_math") else 80e9)
    assert {"reference_1b.yaml", "slm_1b.yaml", "slm_1b_cached.yaml", "reference_7b.yaml", "slm_7b.yaml",
            "slm_7b_cached.yaml"} <= {c.name for c in CONFIGS}


def test_ema_ensemble_and_loss_score_references_are_planned_as_training_builds_them():
    hw = P.Hardware(nodes=4)
    n, seq = 1_100_048_384, 2048
    fwd = 2 * n + 4 * 22 * 2048 * seq
    base = P.plan(load_config(REPO / "configs" / "slm_1b.yaml"), hw)
    # EMA: an fp32 copy of the trained model on every rank, one forward of it per token
    ema = P.plan(load_config(REPO / "configs" / "slm_1b.yaml", ["reference.ema_decay=0.999", "reference.path=null"]),
                 hw)
    assert ema["reference"]["placement"] == "ema" and ema["memory_bytes"]["reference"] == 4 * n
    assert ema["flops_per_token"]["reference_forward"] == pytest.approx(fwd)
    # an ensemble of two references: both held, both run
    two = P.plan(load_config(REPO / "configs" / "slm_1b.yaml", ["reference.path=[/none/a, /none/b]",
                                                                 "reference.placement=replicated"]), hw)
    assert two["reference"]["placement"] == "ensemble[replicated,replicated]"
    assert two["memory_bytes"]["reference"] == 2 * base["memory_bytes"]["reference"] == 4 * n
    assert two["flops_per_token"]["reference_forward"] == pytest.approx(2 * fwd)
    # slm.score: loss needs no reference at all
    loss = P.plan(load_config(REPO / "configs" / "slm_1b.yaml", ["slm.score=loss"]), hw)
    assert loss["reference"] is None and loss["memory_bytes"]["reference"] == 0
    assert loss["flops_per_token"]["reference_forward"] == 0
