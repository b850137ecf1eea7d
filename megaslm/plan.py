"""`megaslm plan CONFIG.yaml`: memory per device, FLOPs, time and GPU-hours of a run, before it is queued.

Nothing heavy is built: the model and the reference are described on the meta device (megaslm/model/describe.py),
the DeepSpeed JSON is read, and every figure is a formula stated beside it (docs/plan.md lists them with sources):

- model states per device: DeepSpeed's estimators (`estimate_zero2_model_states_mem_needs`,
  `estimate_zero3_model_states_mem_needs`; 16-bit weights: 2 bytes of weights + 18 bytes of gradients, fp32
  master, Adam moments per parameter, partitioned by stage), extended to stages 0 and 1 with the same split;
- the reference by its placement: replicated (all weights), zero3 (1/dp of them plus the gathered working set),
  zero3_offload (the working set only), cache (nothing);
- saved activations of one micro-batch, with and without activation checkpointing
  (`ModelDescription.activation_bytes`, Korthikanti et al. 2022's method on a Llama layer);
- the loss head's working set (one fp32 [chunk, vocab block] tile of logits and its 16-bit copy, the compacted
  hidden states and their fp32 gradient, the fp32 weight-gradient accumulator when there is more than one token
  chunk, and the tiles kept under loss_head.keep_logits_mib);
- communication buckets from the DeepSpeed JSON (DeepSpeed's defaults when absent) and a fixed allowance for the
  CUDA context, NCCL and allocator fragmentation.

Exit status: 0, also when the total exceeds --gpu-memory-gib (a WARNING line says so); with --check, 1 then.
Bad configs are a UserError (exit 2), as everywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from megaslm.config import Config, load_config
from megaslm.errors import UserError
from megaslm.model.describe import ModelDescription, describe, dtype_bytes

GIB = 2**30
H100_BF16_TFLOPS = 989.0  # dense bf16, megaslm/monitor.py PEAK_TFLOPS
ALLOWANCE_GIB = 2.0  # CUDA context (~0.5 GiB), NCCL buffers, allocator fragmentation: not computed, reserved
# DeepSpeed's defaults (deepspeed/runtime/zero/config.py) when the JSON does not set a bucket.
DS_DEFAULT_BUCKETS = {"reduce_bucket_size": int(5e8), "allgather_bucket_size": int(5e8),
                      "stage3_prefetch_bucket_size": int(5e7)}


@dataclass
class Hardware:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    peak_tflops: float = H100_BF16_TFLOPS
    mfu: float = 0.4

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


# ----------------------------------------------------------------------------------------------- model states
def model_states_bytes(params: int, largest_module: int, stage: int, dp: int, *, offload_optimizer: bool = False,
                       offload_param: bool = False) -> int:
    """GPU bytes of weights, gradients and optimizer states per device, 16-bit weights with fp32 Adam.

    Stages 2 and 3 are DeepSpeed's estimators (tested equal); stage 1 keeps 16-bit gradients whole (2 + 2 bytes)
    and partitions the 16 fp32 bytes, stage 0 keeps all 20 bytes per parameter.
    """
    p = params
    if stage >= 3:
        gathered = 4 * largest_module  # one module's 16-bit weights and gradients, gathered
        if offload_optimizer and offload_param:
            return gathered
        if offload_optimizer:
            return gathered + int(2 * p / dp)
        return gathered + int(18 * p / dp)
    if stage == 2:
        return 2 * p if offload_optimizer else 2 * p + int(18 * p / dp)
    if stage == 1:
        return 4 * p if offload_optimizer else 4 * p + int(16 * p / dp)
    return 20 * p


def host_bytes_per_node(params: int, stage: int, nodes: int, gpus_per_node: int, *, offload_optimizer: bool,
                        offload_param: bool) -> int:
    """CPU RAM per node for offloaded states: DeepSpeed's estimators with their 1.5 buffer factor (zero.Init)."""
    if not offload_optimizer:
        return 0
    gpus = nodes * gpus_per_node
    if stage >= 3:
        return int(params * (18 if offload_param else 16) / nodes * 1.5)
    return int(params * max(4 * gpus, 16) * 1.5)


# ----------------------------------------------------------------------------------------------- the reference
def reference_device_bytes(ref: ModelDescription, placement: str, d: int, dp: int, tp: int,
                           prefetch_elements: int) -> int:
    if placement == "cache":
        return 0
    if placement == "ema":  # an fp32 copy of the trained model on every rank (megaslm/reference/ema.py)
        return ref.params * 4
    if placement == "replicated":
        return ref.params * d // tp
    working = min(ref.params, max(ref.largest_module, prefetch_elements)) * d  # gathered for the forward
    if placement == "zero3_offload":
        return working
    return ref.params * d // dp + working


def resolve_placement(cfg: Config, ref: ModelDescription, d: int, hw: Hardware) -> str:
    """Where one reference model lives, as training resolves it (EMA and ensembles: `reference_members`)."""
    if cfg.reference.cache:
        return "cache"  # planned as cached: `megaslm score` fills it before training
    if cfg.reference.placement != "auto":
        return cfg.reference.placement
    from megaslm.reference.online import auto_placement

    return auto_placement(ref.params * d / cfg.parallel.tensor, hw.gpu_memory_gib * GIB)


def reference_members(cfg: Config, model: ModelDescription, d: int, hw: Hardware) -> list[tuple[ModelDescription, str]]:
    """(description, placement) of every reference model the run holds: none for CLM and `slm.score: loss`; the
    EMA copy of the trained model; else one per reference.path entry (an ensemble lists several; a path that does
    not exist yet is planned as the trained model's architecture)."""
    from megaslm.reference.sources import claim

    source, members = claim(cfg, assume_cache_scored=True)  # the precedence training uses
    return [source.plan(cfg, m, model, d, hw) for m in members]


def describe_reference(cfg: Config, member, model: ModelDescription, d: int,
                       hw: Hardware) -> tuple[ModelDescription, str]:
    """A reference model's share of the plan: its description (the trained model's architecture when its path does
    not exist yet) and placement."""
    from megaslm.preflight import reference_hf_config

    ref_cfg = reference_hf_config(cfg, member.path)
    ref = describe(ref_cfg) if ref_cfg is not None else model
    return ref, resolve_placement(cfg, ref, d, hw)


# ----------------------------------------------------------------------------------------------- the loss head
def loss_head_bytes(tokens: int, vocab_local: int, hidden: int, d: int, *, chunk_tokens: int | None = None,
                    vocab_block: int | None = None, keep_bytes: int = 0) -> tuple[int, int]:
    """(bytes of per_token_ce's working set, tokens per chunk) for one micro-batch on one device."""
    from megaslm.loss.per_token_ce import default_vocab_block  # the tile per_token_ce picks by default

    chunk = min(tokens, chunk_tokens or tokens)
    block = min(vocab_local, vocab_block or default_vocab_block(hidden))
    work = chunk * block * (4 + d)  # an fp32 tile of logits, its 16-bit copy in backward
    work += chunk * hidden * (d + 4)  # compacted hidden states of the tokens with a gradient, their fp32 gradient
    if chunk < tokens:
        work += vocab_local * hidden * 4  # the weight gradient summed over the token chunks in fp32
    return work + min(keep_bytes, tokens * vocab_local * 4), chunk


# ----------------------------------------------------------------------------------------------- the plan
def _ds_json(cfg: Config) -> dict:
    from megaslm.train.build import load_ds_json

    return load_ds_json(cfg)


def _buckets_bytes(zero: dict, stage: int, d: int) -> int:
    if stage == 0:
        return 0
    second = "stage3_prefetch_bucket_size" if stage >= 3 else "allgather_bucket_size"
    return sum(int(zero.get(k, DS_DEFAULT_BUCKETS[k])) for k in ("reduce_bucket_size", second)) * d


def _plan_dtype(cfg: Config) -> str:
    return "fp32" if cfg.model.dtype == "fp32" else "bf16"  # auto: bf16 on the GPUs this plans for


def plan(cfg: Config, hw: Hardware) -> dict:
    """Every figure of the plan, as a JSON-able dict (bytes and FLOPs as numbers, GiB rounded for display)."""
    from megaslm.preflight import check_config, known_vocab, model_hf_config

    check_config(cfg)
    t, tp = cfg.train, cfg.parallel.tensor
    if hw.gpus % tp:
        raise UserError(f"parallel.tensor {tp} must divide the {hw.gpus} GPUs (--nodes x --gpus-per-node)")
    dp = hw.gpus // tp
    vocab = known_vocab(cfg)
    model = describe(model_hf_config(cfg, vocab))
    dtype = _plan_dtype(cfg)
    d = dtype_bytes(dtype)
    ds = _ds_json(cfg)
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    off_opt = zero.get("offload_optimizer", {}).get("device", "none") == "cpu"
    off_par = zero.get("offload_param", {}).get("device", "none") == "cpu"
    refs = reference_members(cfg, model, d, hw)
    kinds = [pl for _, pl in refs]
    placement = "none" if not refs else kinds[0] if len(set(kinds)) == 1 and (len(refs) == 1 or kinds[0] == "cache") \
        else f"ensemble[{','.join(kinds)}]"
    tokens_micro = t.seq_len * t.micro_batch_size
    ckpt = cfg.model.activation_checkpointing
    act = {False: model.activation_bytes(tokens_micro, dtype, False) // tp,
           True: model.activation_bytes(tokens_micro, dtype, True) // tp}
    lh = cfg.loss_head
    head, chunk = loss_head_bytes(tokens_micro, -(-model.vocab_size // tp), model.hidden, d,
                                  chunk_tokens=lh.chunk_tokens, vocab_block=lh.vocab_block,
                                  keep_bytes=int(lh.keep_logits_mib * 2**20))
    memory = {
        "model_states": model_states_bytes(model.params // tp, model.largest_module // tp, stage, dp,
                                           offload_optimizer=off_opt, offload_param=off_par),
        "reference": sum(reference_device_bytes(ref, pl, d, dp, tp, _ref_prefetch(pl)) for ref, pl in refs),
        "activations": act[ckpt],
        "loss_head": head,
        "buckets": _buckets_bytes(zero, stage, d),
        "allowance": int(ALLOWANCE_GIB * GIB),
    }
    total = sum(memory.values())
    tokens_step = t.seq_len * t.micro_batch_size * t.grad_accum * dp
    flops_train = model.train_flops_per_token(t.seq_len)
    flops_ref = sum(ref.forward_flops_per_token(t.seq_len) for ref, pl in refs if pl != "cache")
    flops_score = sum(ref.forward_flops_per_token(t.seq_len) for ref, pl in refs if pl == "cache")
    total_tokens = tokens_step * t.steps
    rate = hw.gpus * hw.peak_tflops * 1e12 * hw.mfu  # model FLOP/s of the whole job
    seconds = total_tokens * (flops_train + flops_ref) / rate
    score_seconds = total_tokens * flops_score / rate
    return {
        "model": {**model.to_dict(), "vocab_known": vocab is not None},
        "reference": ({**refs[0][0].to_dict(), "params": sum(r.params for r, _ in refs), "placement": placement,
                       "from": ("EMA of the trained model" if placement == "ema"
                                else cfg.reference.path or "same as model"),
                       "members": [{"params": r.params, "placement": pl} for r, pl in refs]} if refs else None),
        "hardware": {**hw.__dict__, "gpus": hw.gpus, "dp": dp, "tp": tp},
        "dtype": dtype, "zero_stage": stage, "offload_optimizer": off_opt, "offload_param": off_par,
        "activation_checkpointing": ckpt, "micro_batch_tokens": tokens_micro, "loss_head_chunk_tokens": chunk,
        "memory_bytes": memory, "memory_total_bytes": total,
        "activations_bytes": {"no_checkpointing": act[False], "checkpointing": act[True]},
        "full_logits_bytes": tokens_micro * model.vocab_size * (4 + d) // tp,
        "host_bytes_per_node": host_bytes_per_node(model.params // tp, stage, hw.nodes, hw.gpus_per_node,
                                                   offload_optimizer=off_opt, offload_param=off_par)
        + sum(ref.params * d // dp * hw.gpus_per_node for ref, pl in refs if pl == "zero3_offload"),
        "fits": total <= hw.gpu_memory_gib * GIB,
        "tokens_per_step": tokens_step, "steps": t.steps, "total_tokens": total_tokens,
        "flops_per_token": {"train": flops_train, "reference_forward": flops_ref, "total": flops_train + flops_ref},
        "time_hours": seconds / 3600, "gpu_hours": seconds * hw.gpus / 3600,
        "score_gpu_hours": score_seconds * hw.gpus / 3600,
    }


def _ref_prefetch(placement: str) -> int:
    """stage3_prefetch_bucket_size of the reference's DeepSpeed JSON (ds_configs/reference_<placement>.json)."""
    from megaslm.config import REPO_ROOT

    f = REPO_ROOT / "ds_configs" / f"reference_{placement}.json"
    zero = json.loads(f.read_text()).get("zero_optimization", {}) if f.is_file() else {}
    return int(zero.get("stage3_prefetch_bucket_size", 0))


# ----------------------------------------------------------------------------------------------- output
def _gib(b: float) -> str:
    return f"{b / GIB:.2f} GiB"


def render(name: str, p: dict) -> str:
    m, hw, mem = p["model"], p["hardware"], p["memory_bytes"]
    ref = p["reference"]
    lines = [
        f"plan for {name}",
        f"model      {m['arch']} {m['params'] / 1e9:.3f}B params (embedding {m['embedding'] / 1e6:.1f}M, LM head "
        f"{m['lm_head'] / 1e6:.1f}M, {m['per_layer'] / 1e6:.1f}M per layer x {m['layers']}), hidden {m['hidden']}, "
        f"vocab {m['vocab_size']}{'' if m['vocab_known'] else ' (assumed: no model.vocab_size, no shards yet)'}, "
        f"max positions {m['max_position_embeddings']}",
        f"hardware   {hw['nodes']} node(s) x {hw['gpus_per_node']} GPUs = {hw['gpus']} (dp {hw['dp']} x tp {hw['tp']}),"
        f" {hw['gpu_memory_gib']:g} GiB each, {hw['peak_tflops']:g} TFLOP/s peak, MFU {hw['mfu']:g}",
        f"precision  {p['dtype']}, ZeRO-{p['zero_stage']}"
        f"{', optimizer offload' if p['offload_optimizer'] else ''}{', param offload' if p['offload_param'] else ''}",
        f"memory per device: {_gib(p['memory_total_bytes'])} of {hw['gpu_memory_gib']:g} GiB"
        f"{'' if p['fits'] else '  <-- does not fit'}",
        "  model states (weights, grads, Adam)".ljust(46) + f"{_gib(mem['model_states'])}",
        f"  reference ({ref['placement'] if ref else 'none'})".ljust(46) + f"{_gib(mem['reference'])}",
        f"  activations (checkpointing {'on' if p['activation_checkpointing'] else 'off'})".ljust(46)
        + f"{_gib(mem['activations'])}   [{p['micro_batch_tokens']} tokens; checkpointing off "
        f"{_gib(p['activations_bytes']['no_checkpointing'])}, on {_gib(p['activations_bytes']['checkpointing'])}]",
        f"  loss head ({p['loss_head_chunk_tokens']}-token chunks)".ljust(46) + f"{_gib(mem['loss_head'])}   "
        f"[full logits would be {_gib(p['full_logits_bytes'])}]",
        "  DeepSpeed buckets".ljust(46) + _gib(mem["buckets"]),
        "  CUDA context, NCCL, fragmentation".ljust(46) + _gib(mem["allowance"]) + " (allowance)",
    ]
    if p["host_bytes_per_node"]:
        lines.append(f"host RAM per node for offload: {_gib(p['host_bytes_per_node'])}")
    f = p["flops_per_token"]
    lines += [
        f"tokens per step {p['tokens_per_step']:,}; {p['steps']:,} steps = {p['total_tokens'] / 1e9:.2f}B tokens",
        f"FLOPs per token {f['total'] / 1e9:.2f} G (train 6N+attention {f['train'] / 1e9:.2f} G, reference "
        f"forward {f['reference_forward'] / 1e9:.2f} G)",
        f"time at MFU {hw['mfu']:g}: {p['time_hours']:.1f} h on {hw['gpus']} GPUs = {p['gpu_hours']:,.0f} GPU-hours",
    ]
    if p["score_gpu_hours"]:
        lines.append(f"scoring the cache first (megaslm score, one reference forward per token): "
                     f"{p['score_gpu_hours']:,.0f} GPU-hours")
    if not p["fits"]:
        lines.append(f"WARNING: {_gib(p['memory_total_bytes'])} per device exceeds --gpu-memory-gib "
                     f"{hw['gpu_memory_gib']:g}: lower train.micro_batch_size, turn on model.activation_checkpointing "
                     "or use a higher ZeRO stage")
    return "\n".join(lines)


TABLE_HEADER = ("| config | model | objective | GPUs | memory/GPU GiB | tokens/step | tokens | FLOPs/token | "
                "time h | GPU-hours |\n|---|---|---|---|---|---|---|---|---|---|")


def binary_count(n: float) -> str:
    """2097152 -> '2Mi', 262144 -> '256Ki' (three significant digits)."""
    for unit, size in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def table_row(name: str, p: dict) -> str:
    """One row under TABLE_HEADER; the README's cost table is these rows, pasted."""
    m, ref, hw = p["model"], p["reference"], p["hardware"]
    obj = ("CLM" if ref is None else "SLM, cached reference" if ref["placement"] == "cache"
           else f"SLM, reference {ref['placement']}")
    nodes = f"{hw['nodes']} node{'s' if hw['nodes'] > 1 else ''}"
    extra = f" (+{p['score_gpu_hours']:,.0f} scoring)" if p["score_gpu_hours"] else ""
    return (f"| {name} ({nodes}, ZeRO-{p['zero_stage']}) | {m['params'] / 1e9:.2f}B | {obj} | {hw['gpus']} | "
            f"{p['memory_total_bytes'] / GIB:.1f} | {binary_count(p['tokens_per_step'])} | "
            f"{p['total_tokens'] / 1e9:.1f}B | {p['flops_per_token']['total'] / 1e9:.1f}G | {p['time_hours']:.1f} | "
            f"{p['gpu_hours']:,.0f}{extra} |")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("config", nargs="+", help="YAML config(s) of the run(s) to plan")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value (repeatable)")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help=f"per-GPU peak (default train.peak_tflops, else H100 bf16 dense {H100_BF16_TFLOPS:g})")
    ap.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume (default 0.4)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--table", action="store_true", help="print one markdown table row per config")
    ap.add_argument("--check", action="store_true", help="exit 1 when a plan does not fit --gpu-memory-gib")


def run(a: argparse.Namespace) -> int:
    for name, v in (("--nodes", a.nodes), ("--gpus-per-node", a.gpus_per_node)):
        if v < 1:
            raise UserError(f"{name} must be >= 1, got {v}")
    if not 0 < a.mfu <= 1 or a.gpu_memory_gib <= 0:
        raise UserError(f"--mfu must be in (0, 1] and --gpu-memory-gib > 0, got {a.mfu} and {a.gpu_memory_gib}")
    plans = []
    for path in a.config:
        cfg = load_config(path, a.overrides)
        hw = Hardware(a.nodes, a.gpus_per_node, a.gpu_memory_gib,
                      a.peak_tflops or cfg.train.peak_tflops or H100_BF16_TFLOPS, a.mfu)
        plans.append((Path(path).name, plan(cfg, hw)))
    if a.json:
        out = {n: p for n, p in plans}
        print(json.dumps(out if len(plans) > 1 else plans[0][1], indent=1))
    elif a.table:
        print("\n".join([TABLE_HEADER] + [table_row(n, p) for n, p in plans]))
    else:
        print("\n\n".join(render(n, p) for n, p in plans))
    if any(not p["fits"] for _, p in plans):
        print(f"warning: a plan exceeds --gpu-memory-gib {a.gpu_memory_gib:g}", file=sys.stderr)
        return 1 if a.check else 0
    return 0

