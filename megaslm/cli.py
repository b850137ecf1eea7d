"""The `megaslm` command line. Bad input prints one line, `error: ...`, and exits with status 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megaslm.accelerator import set_accelerator
from megaslm.errors import UserError


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.steps=200")


def cmd_tokenizer_train(a) -> int:
    from megaslm.data.tokenizer import train_tokenizer

    out = train_tokenizer(a.input, a.vocab_size, a.out, text_field=a.text_field)
    print(f"tokenizer written to {out}")
    return 0


def cmd_prepare(a) -> int:
    from megaslm.data.prepare import prepare, sft_fields_from
    from megaslm.ioerrors import io_errors_as_user_errors

    fields = sft_fields_from(a.prompt_field, a.response_field, a.messages_field)
    with io_errors_as_user_errors("prepare", a.out, "the shard directory there, if any, is unchanged"):
        meta = prepare(a.input, a.tokenizer, a.out, text_field=a.text_field, num_proc=a.num_proc, sft_fields=fields,
                       on_bad_utf8=a.on_bad_utf8,
                       log=lambda s: print(s, file=sys.stderr) if s.startswith("skipped") else None)
    masked = ", with loss masks" if meta["loss_mask"] else ""
    skipped = f"; skipped {meta['bad_utf8_documents']} not valid UTF-8" if meta["bad_utf8_documents"] else ""
    print(f"wrote {meta['num_tokens']} tokens in {meta['num_documents']} documents ({meta['dtype']}{masked}) "
          f"to {a.out}{skipped}")
    return 0


def cmd_train(a) -> int:
    from pathlib import Path

    from megaslm.config import load_config

    cfg = load_config(a.config, a.overrides)
    from megaslm.lease import LEASE_FILE, acquire_for_launch
    from megaslm.preflight import check_config, check_data

    check_data(cfg, a.config)  # before anything is written: a run directory only for a run that can start
    run_dir = Path(cfg.run.dir).resolve()
    # Rank 0 takes the run directory's lease before anything is written (and before the slow imports: a second
    # launch is refused in seconds); a refusal ends every rank.
    lease = acquire_for_launch(run_dir / LEASE_FILE, f"run directory {run_dir}", force=a.force or cfg.run.take_over,
                               stale_after_s=cfg.run.lease_stale_after_s)
    try:
        set_accelerator()
        check_config(cfg)  # before any engine: refuse what cannot run (release() then removes the new run dir)
        from megaslm.launch import main_entry

        return main_entry(cfg)
    finally:
        if lease is not None:
            lease.release()


def cmd_export(a) -> int:
    from megaslm.export import export
    from megaslm.lease import warn_if_live

    warn_if_live(a.run_dir, "exporting its newest complete checkpoint as of now (the run may write newer ones)")
    out = export(a.run_dir, a.out, tag=a.tag, force=a.force)
    print(f"exported Hugging Face model to {out}")
    return 0


def cmd_submit(a) -> int:
    from megaslm import submit
    from megaslm.config import load_config
    from megaslm.lease import warn_if_live

    try:
        run_dir = load_config(a.config, a.overrides).run.dir
    except (UserError, AttributeError):
        run_dir = None  # submit reports a bad config itself
    if run_dir:  # not refused: a job queued behind the live run (--dependency) is fine
        warn_if_live(run_dir, "this job is refused when it starts unless that run has ended by then")
    return submit.run(a)


def cmd_score(a) -> int:
    from megaslm.config import load_config
    from megaslm.ioerrors import io_errors_as_user_errors
    from megaslm.lease import acquire_for_launch
    from megaslm.reference import score

    cfg = load_config(a.config, a.overrides)
    cache = cfg.reference.cache
    lease = None
    if cache:  # two scorers of one cache would share its work directory: one at a time
        lease = acquire_for_launch(f"{cache.rstrip('/')}.lease.json", f"reference.cache {cache}",
                                   force=cfg.run.take_over, stale_after_s=cfg.run.lease_stale_after_s,
                                   force_hint="--set run.take_over=true")  # score's --force means "score again"
    try:
        with io_errors_as_user_errors("score", cache or "reference.cache",
                                      "the cache there, if any, is unchanged; a re-run resumes the chunks written"):
            return score.run(a)
    finally:
        if lease is not None:
            lease.release()


def cmd_plan(a) -> int:
    from megaslm import plan

    return plan.run(a)


def cmd_demo(a) -> int:
    from megaslm.demo import run_demo

    return run_demo(a.out, quick=a.quick, steps=a.steps, seed=a.seed)


def cmd_analyze_tokens(a) -> int:
    from megaslm.analyze.tokens import analyze_tokens

    s = analyze_tokens(a.model, a.reference, a.data, a.out, text_field=a.text_field, docs=a.docs,
                       seq_len=a.seq_len, ratio=a.ratio, batch_size=a.batch_size)
    for name, v in s["sources"].items():
        print(f"{name}: {v['tokens']} tokens, selected {v['selected_frac']:.3f}, loss {v['mean_loss']:.4f}, "
              f"ref_loss {v['mean_ref_loss']:.4f}")
    print(f"wrote {Path(a.out) / 'tokens.html'} and tokens.jsonl ({s['all']['tokens']} tokens, {s['seconds']:.1f} s)")
    return 0


def cmd_analyze_dynamics(a) -> int:
    from megaslm.analyze.dynamics import analyze_dynamics
    from megaslm.lease import warn_if_live

    warn_if_live(a.run_dir, "reading the checkpoints it has now (it may prune some meanwhile)")
    s = analyze_dynamics(a.run_dir, a.data, a.out, reference=a.reference, n_tokens=a.tokens,
                         threshold=a.threshold, ratio=a.ratio, text_field=a.text_field, batch_size=a.batch_size)
    print(f"threshold {s['threshold']:.4f} nats; " + ", ".join(f"{c} {n}" for c, n in s["counts"].items()))
    print(f"wrote {Path(a.out) / 'dynamics.csv'} and dynamics.png ({len(s['steps'])} checkpoints, {s['seconds']:.1f} s)")
    return 0


def cmd_report(a) -> int:
    from megaslm.report import build_report

    path = build_report(a.run_dirs, a.out)["path"]
    print(f"report written to {path}")
    return 0


def _add_analyze(sub) -> None:
    an = sub.add_parser("analyze", help="look at the selection: per-token view, token-loss dynamics")
    asub = an.add_subparsers(dest="analyze_command", metavar="ACTION")
    asub.required = True
    at = asub.add_parser("tokens", help="score documents with a model and a reference: tokens.html, tokens.jsonl")
    at.add_argument("--model", required=True, help="Hugging Face directory or megaslm run directory")
    at.add_argument("--reference", required=True, help="Hugging Face directory or megaslm run directory")
    at.add_argument("--data", nargs="+", required=True, help="a shard directory, or .txt/.jsonl/.parquet files")
    at.add_argument("--text-field", default="text")
    at.add_argument("--docs", type=int, default=20, help="documents per source (default 20)")
    at.add_argument("--seq-len", type=int, default=256, help="window length in tokens (default 256)")
    at.add_argument("--ratio", type=float, default=0.6, help="fraction of tokens selected (default 0.6)")
    at.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    at.add_argument("--out", required=True)
    at.set_defaults(func=cmd_analyze_tokens)
    ad = asub.add_parser("dynamics", help="token losses of a held-out sample at every checkpoint of a run")
    ad.add_argument("run_dir")
    ad.add_argument("--data", nargs="+", required=True, help="held-out shard directory or text files")
    ad.add_argument("--reference", default=None, help="reference model: adds the selected fraction per category")
    ad.add_argument("--tokens", type=int, default=8192, help="tokens in the sample (default 8192)")
    ad.add_argument("--threshold", type=float, default=None,
                    help="loss (nats) between L and H (default: the mean loss at the last checkpoint)")
    ad.add_argument("--ratio", type=float, default=None, help="selection ratio (default: the run's slm.ratio)")
    ad.add_argument("--text-field", default="text")
    ad.add_argument("--batch-size", type=int, default=8)
    ad.add_argument("--out", required=True)
    ad.set_defaults(func=cmd_analyze_dynamics)


def _command(argv: list[str] | None) -> str | None:
    """The subcommand named on the command line ("" if none, as for `megaslm --help`; None: build the whole
    parser): the parser then imports only its own module, so that `megaslm train` reaches its lease check, and
    `megaslm --help` its answer, without loading the model code of `score` and `plan`."""
    if argv is None:  # a caller that builds the whole parser
        return None
    known = ("tokenizer", "prepare", "train", "export", "submit", "score", "analyze", "report", "plan", "demo",
             "eval", "recipe", "contamination")
    return next((x for x in argv if x in known), "")  # the first, past options such as `--local_rank 0`


def _add_data_and_train(sub) -> None:
    """`tokenizer train`, `prepare` and `train`."""
    tok = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer")
    tsub = tok.add_subparsers(dest="tok_command", metavar="ACTION")
    tsub.required = True
    tt = tsub.add_parser("train", help="train a SentencePiece model on local text")
    tt.add_argument("--input", nargs="+", required=True, help="text files (.txt, .jsonl, .json, .parquet, .gz)")
    tt.add_argument("--vocab-size", type=int, required=True)
    tt.add_argument("--out", required=True, help="output directory (gets tokenizer.model)")
    tt.add_argument("--text-field", default="text", help="field holding the text in jsonl/parquet (default text)")
    tt.set_defaults(func=cmd_tokenizer_train)

    pr = sub.add_parser("prepare", help="tokenize local text into token shards")
    pr.add_argument("--input", nargs="+", required=True, help="files or directories of .txt/.jsonl/.json/.parquet/.gz")
    pr.add_argument("--tokenizer", required=True,
                    help="directory from `tokenizer train`, a SentencePiece .model, or a Hugging Face tokenizer dir")
    pr.add_argument("--out", required=True, help="output shard directory")
    pr.add_argument("--text-field", default="text")
    pr.add_argument("--num-proc", type=int, default=1, help="tokenizer processes")
    pr.add_argument("--prompt-field", help="SFT: field with the prompt (no loss); needs --response-field")
    pr.add_argument("--response-field", help="SFT: field with the response (takes the loss)")
    pr.add_argument("--messages-field", help="SFT chat: field with a list of {role, content}; loss on assistant turns")
    pr.add_argument("--on-bad-utf8", choices=("error", "skip"), default="error",
                    help="text that is not valid UTF-8: refuse the input (default) or skip the document")
    pr.set_defaults(func=cmd_prepare)

    tr = sub.add_parser("train", help="train (CLM or SLM) from a YAML config; re-run to resume")
    tr.add_argument("config", help="YAML config file")
    _add_set(tr)
    tr.add_argument("--force", action="store_true",
                    help="take the run directory's lease even if a live run seems to hold it (see docs/resilience.md)")
    tr.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    tr.set_defaults(func=cmd_train, sets_accelerator=True)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    command = _command(argv)
    ap = argparse.ArgumentParser(prog="megaslm", description="Pretraining with Selective Language Modeling "
                                 "(Rho-1) on DeepSpeed ZeRO.")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    _add_data_and_train(sub)

    ex = sub.add_parser("export", help="write a Hugging Face model directory from a run's latest checkpoint")
    ex.add_argument("run_dir")
    ex.add_argument("--out", required=True)
    ex.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete one)")
    ex.add_argument("--force", action="store_true", help="write into a non-empty --out that is not an earlier "
                    "export: its other files are kept (only an earlier export's files are replaced)")
    ex.set_defaults(func=cmd_export)

    sm = sub.add_parser("submit", help="write a Slurm batch script for a run and sbatch it")
    try:
        from megaslm import submit

        submit.add_arguments(sm)
    except ImportError:
        pass
    sm.set_defaults(func=cmd_submit)

    sc = sub.add_parser("score", help="score the training shards with the reference model into reference.cache "
                        "(Rho-1 step 2, optional: SLM can also run the reference online)")
    if command in (None, "score"):
        from megaslm.reference import score

        score.add_arguments(sc)
    sc.set_defaults(func=cmd_score)

    _add_analyze(sub)
    from megaslm.eval.run import add_parser as add_eval  # `megaslm eval` (megaslm/eval/run.py)

    add_eval(sub)
    rp = sub.add_parser("report", help="report.md and PNG plots from runs' metrics.jsonl")
    rp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rp.add_argument("--out", required=True)
    rp.set_defaults(func=cmd_report)

    pl = sub.add_parser("plan", help="memory per device, FLOPs, time and GPU-hours of a config, without running it")
    if command in (None, "plan"):
        from megaslm import plan

        plan.add_arguments(pl)
    pl.set_defaults(func=cmd_plan)

    de = sub.add_parser("demo", help="the Rho-1 experiment on CPU with text that ships on this machine")
    de.add_argument("--out", default=None, help="output directory (default ./demo_run, with --quick ./demo_quick)")
    de.add_argument("--quick", action="store_true", help="a smaller, faster version (used by the tests)")
    de.add_argument("--steps", type=int, default=None, help="training steps per model (overrides the default)")
    de.add_argument("--seed", type=int, default=0, help="seed of the corpora, the inits and the data order")
    de.set_defaults(func=cmd_demo)
    from megaslm.recipe.cli import add_parser as add_recipe  # `megaslm recipe rho1-math` (megaslm/recipe/)
    from megaslm.contamination import add_parser as add_contamination  # `megaslm contamination SHARDS --tasks`

    add_recipe(sub)
    add_contamination(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        if not getattr(args, "sets_accelerator", False):  # train and eval: after their refusals (torch takes seconds)
            set_accelerator()
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _leave(code: int) -> None:
    """Exit with `code`. After torch.distributed was used, without the interpreter's teardown: gloo's worker
    threads can still own tensors then, and destroying them aborts a rank whose run had finished ("terminate
    called without an active exception", SIGABRT: seen once in CI after `done`), which the launcher reports as a
    failed run. Every file is closed and every process group destroyed by then; only stdio is left to flush."""
    if "torch.distributed" in sys.modules:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def run() -> None:
    """The `megaslm` command."""
    _leave(main())


if __name__ == "__main__":
    run()
