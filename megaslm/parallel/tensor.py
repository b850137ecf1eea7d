"""Tensor parallelism (parallel.tensor = T > 1) on DeepSpeed's AutoTP, and merging its shards back for export.

What is sharded: DeepSpeed AutoTP (`"tensor_parallel": {"autotp_size": T, "vocab_parallel_lm_head": true}`)
replaces the attention and MLP projections of every block by column/row-parallel layers (q/k/v, gate/up split by
output rows, o/down by input columns) and the LM head by a `VocabParallelLinear` that keeps rank-local logits
(rows split like `torch.tensor_split`). megaslm's `per_token_ce(..., tp_group=...)` consumes those local rows
directly, so full logits are never gathered. Embeddings (unless tied to the head), norms and rotary buffers stay
replicated within the tensor-parallel group.

Groups: T consecutive ranks form a tensor-parallel group; ranks with the same position inside their group form
a data-parallel group. These are DeepSpeed's own groups (`deepspeed.utils.groups`, a (dp, tp) device mesh):
AutoTP always uses them, so megaslm takes them too and checks that they have this layout.

Export: DeepSpeed writes one set of files per tensor-parallel rank (`*mp_rank_0Y*`). The trainer records, in
RUN_DIR/tp_layout.json, which dimension of which parameter is split and the size of each rank's piece (found by
comparing the local shapes with those of the unsharded model: nothing is hard-coded). `merge_tp_shards` puts the
pieces back together into the ordinary Hugging Face layout.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from megaslm.atomic import write_json
from megaslm.errors import UserError

LAYOUT_FILE = "tp_layout.json"


def autotp_section(tp_size: int) -> dict:
    """The DeepSpeed config section that turns AutoTP training on with a no-gather vocab-parallel LM head."""
    return {"autotp_size": int(tp_size), "vocab_parallel_lm_head": True}


def check_parallel_setup(tp_size: int, world_size: int, zero_stage: int, source: str, advice: str) -> None:
    """Refuse (UserError) tensor-parallel settings that cannot run, before any model is built.

    source names the setting that chose the ZeRO stage (a deepspeed.config file, a reference placement);
    advice says what to use instead of ZeRO-3.
    """
    if tp_size < 1:
        raise UserError(f"parallel.tensor must be >= 1, got {tp_size}")
    if world_size % tp_size:
        raise UserError(f"parallel.tensor={tp_size} does not divide the world size {world_size}")
    if tp_size > 1 and zero_stage == 3:
        raise UserError(f"{source} uses ZeRO stage 3, which megaslm does not combine with parallel.tensor={tp_size}: "
                        f"{advice}")


def check_model_config(hf_config, tp_size: int, what: str = "model") -> None:
    """The model must split into whole attention heads and non-empty vocabulary shards over `tp_size` ranks."""
    if tp_size <= 1:
        return
    vocab = int(hf_config.vocab_size)
    if vocab < tp_size:
        raise UserError(f"parallel.tensor={tp_size} is larger than the vocabulary of {what} ({vocab} tokens)")
    heads = getattr(hf_config, "num_attention_heads", None)
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    if kv is None:
        raise UserError(f"parallel.tensor={tp_size}: {what} has no num_attention_heads in its config")
    if kv % tp_size or (heads and heads % tp_size):
        raise UserError(f"parallel.tensor={tp_size} must divide the key-value head count of {what} "
                        f"(num_key_value_heads={kv}, num_attention_heads={heads}): every rank needs whole heads")


def init_groups(tp_size: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(tensor-parallel group, data-parallel group) of this rank, created by DeepSpeed and checked here.

    deepspeed.initialize with autotp_size > 1 always uses `deepspeed.utils.groups`, so the trainer's groups
    must be those very groups; a later engine (the reference model) reuses them.
    """
    from deepspeed.utils import groups

    groups._init_tp_mesh_device(tensor_model_parallel_size=tp_size)  # no-op once created
    tp_group = groups.get_tensor_model_parallel_group()
    dp_group = groups.get_data_parallel_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    first = rank - rank % tp_size
    want_tp = list(range(first, first + tp_size))
    want_dp = list(range(rank % tp_size, world, tp_size))
    got_tp, got_dp = dist.get_process_group_ranks(tp_group), dist.get_process_group_ranks(dp_group)
    if sorted(got_tp) != want_tp or sorted(got_dp) != want_dp:
        raise RuntimeError(f"DeepSpeed's process groups {got_tp} (tensor) / {got_dp} (data) do not have megaslm's "
                           f"layout {want_tp} / {want_dp} (tensor-parallel size {tp_size})")
    return tp_group, dp_group


def full_param_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    """Shapes of every parameter of the unsharded Hugging Face model, without allocating it."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def capture_layout(lm: nn.Module, hf_config, tp_group: dist.ProcessGroup) -> dict:
    """How AutoTP split `lm`: {"tp_size": T, "params": {name: {"dim": d, "sizes": [size on rank 0, 1, ...]}},
    "tied": {alias: name}}.

    Compares this rank's parameter shapes with the unsharded model's and all-gathers the local sizes of the
    split dimension over the tensor-parallel group. Collective: every rank of the group calls it. Replicated
    parameters are not listed in "params"; "tied" names the second name of a shared parameter (a tied LM head).
    Raises if a parameter is split in more than one dimension or if the pieces do not add up to the full size.
    """
    full = full_param_shapes(hf_config)
    local = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in lm.named_parameters()}
    if set(local) != set(full):
        raise RuntimeError(f"tensor parallel: parameter names changed under AutoTP: "
                           f"{sorted(set(local) ^ set(full))[:5]}")
    first: dict[int, str] = {}
    tied = {}
    for n, p in lm.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[n] = first[id(p)]
        else:
            first[id(p)] = n
    names = sorted(full)
    dims, sizes = [], []
    for n in names:
        diff = [d for d, (a, b) in enumerate(zip(local[n], full[n])) if a != b]
        if len(local[n]) != len(full[n]) or len(diff) > 1:
            raise RuntimeError(f"tensor parallel: {n} has local shape {local[n]} for full shape {full[n]}")
        dims.append(diff[0] if diff else -1)
        sizes.append(local[n][diff[0]] if diff else 0)
    # One all-gather for every parameter: a rank whose piece happens to equal the full size still reports it.
    mine = torch.tensor([dims, sizes], dtype=torch.int64)
    world = dist.get_world_size(tp_group)
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=tp_group)
    params = {}
    for i, n in enumerate(names):
        split_dims = {int(g[0, i]) for g in gathered} - {-1}
        if not split_dims:
            continue
        if len(split_dims) > 1:
            raise RuntimeError(f"tensor parallel: {n} is split along different dimensions on different ranks")
        d = split_dims.pop()
        per_rank = [int(g[1, i]) if int(g[0, i]) == d else full[n][d] for g in gathered]
        if sum(per_rank) != full[n][d]:
            raise RuntimeError(f"tensor parallel: the pieces {per_rank} of {n} do not add up to {full[n][d]}")
        params[n] = {"dim": d, "sizes": per_rank}
    return {"tp_size": world, "params": params, "tied": tied}


def check_vocab_head(lm: nn.Module, layout: dict, tp_group: dist.ProcessGroup) -> None:
    """The head's weight must be split by vocabulary rows, and DeepSpeed's vocab range must be the contiguous one
    per_token_ce derives from the row counts."""
    head = lm.get_output_embeddings()
    name = next((n for n, p in lm.named_parameters() if p is head.weight), None)
    spec = layout["params"].get(name)
    if spec is None or spec["dim"] != 0:
        raise RuntimeError("tensor parallel: the LM head's weight is not split by vocabulary rows")
    want = sum(spec["sizes"][: dist.get_rank(tp_group)])
    start = getattr(head, "vocab_start_index", want)
    if start != want:
        raise RuntimeError(f"tensor parallel: LM head vocab_start_index {start} is not the contiguous offset {want}")


def write_layout(run_dir: Path, layout: dict) -> None:
    """RUN_DIR/tp_layout.json: the record capture_layout returned."""
    write_json(Path(run_dir) / LAYOUT_FILE, layout, indent=1)


def read_layout(run_dir: Path) -> dict | None:
    """The record capture_layout returned, as the trainer wrote it, or None for a run without tensor parallelism."""
    path = Path(run_dir) / LAYOUT_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def shard(full: dict[str, torch.Tensor], layout: dict, rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s pieces of a full state dict (the inverse of merge_tp_shards)."""
    out = {}
    for n, t in full.items():
        spec = layout["params"].get(layout.get("tied", {}).get(n, n))
        if spec is None:
            out[n] = t
        else:
            out[n] = torch.split(t, spec["sizes"], dim=spec["dim"])[rank]
    return out


def merge_tp_shards(shards: list[dict[str, torch.Tensor]], layout: dict) -> dict[str, torch.Tensor]:
    """One full state dict from the state dicts of tensor-parallel ranks 0..T-1.

    `layout` is capture_layout's record. Split parameters are concatenated along their recorded dimension
    (checking each piece's size); every other entry is taken from rank 0 after checking that all ranks hold the
    same values (replicated parameters get identical updates, so a difference means the shards do not belong
    together). A tied name gets the merged tensor of the name it is tied to.
    """
    if not shards:
        raise ValueError("merge_tp_shards: no shards")
    tied = layout.get("tied", {})
    # DeepSpeed does not record a tied alias consistently on every rank: drop aliases, put them back at the end.
    shards = [{n: t for n, t in sd.items() if n not in tied} for sd in shards]
    names = set(shards[0])
    for r, sd in enumerate(shards[1:], 1):
        if set(sd) != names:
            raise ValueError(f"merge_tp_shards: rank {r} holds other parameters than rank 0: "
                             f"{sorted(set(sd) ^ names)[:5]}")
    out = {}
    for n in shards[0]:
        spec = layout["params"].get(n)
        if spec is None:
            base = shards[0][n]
            for r, sd in enumerate(shards[1:], 1):
                if sd[n].shape != base.shape or not torch.allclose(sd[n].float(), base.float(), rtol=1e-5,
                                                                   atol=1e-6):
                    raise ValueError(f"merge_tp_shards: replicated parameter {n} differs between rank 0 and {r}")
            out[n] = base
            continue
        d, sizes = spec["dim"], spec["sizes"]
        if len(sizes) != len(shards):
            raise ValueError(f"merge_tp_shards: {n} has {len(sizes)} pieces in the layout, {len(shards)} given")
        for r, sd in enumerate(shards):
            if sd[n].shape[d] != sizes[r]:
                raise ValueError(f"merge_tp_shards: {n} on rank {r} has {sd[n].shape[d]} along dim {d}, "
                                 f"layout says {sizes[r]}")
        out[n] = torch.cat([sd[n] for sd in shards], dim=d)
    for alias, target in tied.items():
        if target in out:
            out[alias] = out[target]
    return out


def tp_rank_files(tag_dir: Path, tp_rank: int) -> list[Path]:
    """DeepSpeed's files of one tensor-parallel rank in a checkpoint tag directory."""
    return sorted(p for p in Path(tag_dir).iterdir() if f"mp_rank_{tp_rank:02d}_" in p.name)


def consolidate_tp_checkpoint(ckpt_root: Path, tag: str, tp_size: int, consolidate) -> list[dict]:
    """Per tensor-parallel rank, the state dict `consolidate(root, tag)` gives for that rank's files alone.

    DeepSpeed's consolidation tools read every file of a tag directory; each rank's files are linked into a
    scratch directory of their own so the ZeRO partitions of one tensor-parallel rank are merged at a time.
    """
    tag_dir = Path(ckpt_root) / tag
    out = []
    for r in range(tp_size):
        files = tp_rank_files(tag_dir, r)
        if not files:
            raise UserError(f"{tag_dir}: no DeepSpeed files of tensor-parallel rank {r} (mp_rank_{r:02d})")
        with tempfile.TemporaryDirectory(prefix="megaslm-tp-") as tmp:
            sub = Path(tmp) / tag
            sub.mkdir()
            for f in files:
                (sub / f.name).symlink_to(f.resolve())
            out.append(consolidate(Path(tmp), tag))
    return out
