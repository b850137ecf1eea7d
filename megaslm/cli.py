"""The `megaslm` command line. Bad input prints one line, `error: ...`, and exits with status 2."""

from __future__ import annotations

import argparse
import os
import sys

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

    fields = sft_fields_from(a.prompt_field, a.response_field, a.messages_field)
    meta = prepare(a.input, a.tokenizer, a.out, text_field=a.text_field, num_proc=a.num_proc, sft_fields=fields,
                   on_bad_utf8=a.on_bad_utf8,
                   log=lambda s: print(s, file=sys.stderr) if s.startswith("skipped") else None)
    masked = ", with loss masks" if meta["loss_mask"] else ""
    skipped = f"; skipped {meta['bad_utf8_documents']} not valid UTF-8" if meta["bad_utf8_documents"] else ""
    print(f"wrote {meta['num_tokens']} tokens in {meta['num_documents']} documents ({meta['dtype']}{masked}) "
          f"to {a.out}{skipped}")
    return 0


def cmd_train(a) -> int:
    from megaslm.config import load_config

    cfg = load_config(a.config, a.overrides)
    from megaslm.train.trainer import main_entry

    return main_entry(cfg)


def cmd_export(a) -> int:
    from megaslm.export import export

    out = export(a.run_dir, a.out, tag=a.tag)
    print(f"exported Hugging Face model to {out}")
    return 0


def cmd_submit(a) -> int:
    from megaslm import submit

    return submit.run(a)


def cmd_score(a) -> int:
    from megaslm import score

    return score.run(a)


def cmd_demo(a) -> int:
    from megaslm.demo import run_demo

    return run_demo(a.out, quick=a.quick, steps=a.steps)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="megaslm", description="Pretraining with Selective Language Modeling "
                                 "(Rho-1) on DeepSpeed ZeRO.")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

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
    tr.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    tr.set_defaults(func=cmd_train)

    ex = sub.add_parser("export", help="write a Hugging Face model directory from a run's latest checkpoint")
    ex.add_argument("run_dir")
    ex.add_argument("--out", required=True)
    ex.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete one)")
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
    from megaslm import score

    score.add_arguments(sc)
    sc.set_defaults(func=cmd_score)

    de = sub.add_parser("demo", help="the Rho-1 experiment on CPU with text that ships on this machine")
    de.add_argument("--out", default="demo_run", help="output directory (default ./demo_run)")
    de.add_argument("--quick", action="store_true", help="a smaller, faster version (used by the tests)")
    de.add_argument("--steps", type=int, default=None, help="training steps per model (overrides the default)")
    de.set_defaults(func=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "DS_ACCELERATOR" not in os.environ and not _has_cuda():
        os.environ["DS_ACCELERATOR"] = "cpu"  # otherwise DeepSpeed warns on every import that it found no GPU
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
