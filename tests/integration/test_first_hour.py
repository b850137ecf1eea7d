"""What a new user meets first: a run directory of another configuration (one line, no traceback through the
launcher), files readable by the team under umask 022, step lines with elapsed time and ETA."""

import os
import re
import stat
import subprocess
import sys

import pytest

from megaslm.parallel.dist import free_port
from tests.conftest import REPO, read_metrics, run_cli, write_config

pytestmark = pytest.mark.slow
STEPS = 8


def config(run_dir, data, tok="tok", train="train", **t):
    return {"run": {"dir": str(run_dir)}, "model": {"preset": "tiny"},
            "data": {"train": data[train], "tokenizer": str(data["tok"] if tok == "tok" else data["root"] / tok),
                     "valid": data["valid"] if tok == "tok" else data["valid_other"], "valid_sequences": 4},
            "train": {"steps": STEPS, "seq_len": 32, "micro_batch_size": 2, "save_every": 4, "eval_every": 4,
                      "log_every": 1, "lr": 2e-3, "warmup_steps": 2, "seed": 1, **t},
            "deepspeed": {"config": "ds_configs/zero2.json"}, "wandb": {"mode": "offline"}}


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, tiny_data):
    """A run, its export and an `analyze tokens` page, all written under umask 022."""
    root = tmp_path_factory.mktemp("first_hour")
    old = os.umask(0o022)
    try:
        run = root / "run"
        res = run_cli("train", str(write_config(root / "a.yaml", config(run, tiny_data))), nproc=2, check=True)
        run_cli("export", str(run), "--out", str(root / "hf"), check=True)
        run_cli("analyze", "tokens", "--model", str(root / "hf"), "--reference", str(root / "hf"), "--data",
                tiny_data["train"], "--out", str(root / "view"), "--docs", "2", "--seq-len", "32", check=True)
    finally:
        os.umask(old)
    return root, run, res


def test_everything_written_under_umask_022_is_readable_by_others(shared_run):
    root, _, _ = shared_run
    paths = [p for sub in ("run", "hf", "view") for p in (root / sub).rglob("*")]
    kinds = {sub: sum(1 for p in (root / sub).rglob("*") if p.is_file()) for sub in ("run", "hf", "view")}
    assert kinds["run"] > 10 and kinds["hf"] >= 3 and kinds["view"] >= 2, kinds  # the checks saw real outputs
    for p in [root / "run", root / "hf", root / "view", *paths]:
        if p.is_symlink():
            continue
        mode = stat.S_IMODE(p.stat().st_mode)
        want = 0o755 if p.is_dir() else 0o644
        assert mode & want & 0o444 == want & 0o444 and not mode & 0o022, (p, oct(mode))  # r for all, w for owner


def test_step_lines_carry_elapsed_and_eta(shared_run):
    _, run, res = shared_run
    lines = [x for x in res.stdout.splitlines() if x.startswith("step ")]
    assert len(lines) == STEPS and all(" | elapsed 00:" in x and " | eta 00:" in x for x in lines), lines
    recs = read_metrics(run)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert recs[-1]["eta_s"] == 0
    elapsed = [r["elapsed_s"] for r in recs]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    # Halfway the estimate is within a factor of two of the rest as it turned out (a loaded 2-core machine with
    # an evaluation and a checkpoint in the second half; the demo's longer runs are checked to 25%).
    half = recs[STEPS // 2 - 1]
    rest = elapsed[-1] - half["elapsed_s"]
    assert 0.5 * rest <= half["eta_s"] <= 2 * rest, (half["eta_s"], rest)


def launch(cfg_path, nproc=2):
    cmd = [sys.executable, "-m", "megaslm.parallel.launch", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "megaslm.cli", "train", str(cfg_path)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _one_error(res, cfg) -> str:
    """The one error line of a refused 2-rank launch; no traceback; the launcher's closing line."""
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [x for x in res.stderr.splitlines() if x.startswith("error: ")]
    assert len(set(errors)) == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "ChildFailedError" not in res.stderr
    assert re.fullmatch(rf"megaslm: `megaslm train {re.escape(str(cfg))}` stopped: rank [01] ended with exit code 2 "
                        r"\(its output above says why\)", res.stderr.splitlines()[-1]), res.stderr[-500:]
    return errors[0]


def test_resuming_another_configs_checkpoint_is_one_line_and_no_traceback(tmp_path, shared_run, tiny_data):
    import shutil

    _, run, _ = shared_run
    mine = tmp_path / "run"
    shutil.copytree(run, mine)
    before = sorted(str(p.relative_to(mine)) for p in (mine / "checkpoints").rglob("*"))
    # Another tokenizer (vocabulary 600, not 512) and seq_len: the checkpoint is intact but not this model's.
    cfg = write_config(tmp_path / "other.yaml", config(mine, tiny_data, tok="tok_other", train="valid_other",
                                                       seq_len=16))
    res = launch(cfg)
    e = _one_error(res, cfg)
    # The saved config.yaml says what changed before any engine is built.
    assert f"error: cannot resume {mine} under another data.tokenizer/data.train/train.seq_len: " in e
    assert "train.seq_len 32 -> 16" in e and "these fix what its checkpoints mean" in e
    assert "train.resume_from=none" in e and "run.dir" in e
    # A run directory without its config.yaml (written by an older megaslm): the checkpoint's own tensors say it.
    (mine / "config.yaml").rename(tmp_path / "saved_config.yaml")
    e = _one_error(launch(cfg), cfg)
    assert f"error: checkpoint step_00000008 in {mine / 'checkpoints'} belongs to another configuration" in e
    assert "not damaged" in e and "vocabulary 512 there, 600 here" in e and "Restore" not in e
    assert "train.resume_from=none" in e and "run.dir" in e
    # Nothing was touched, and the two ways on work: resume_from=none starts over here.
    assert sorted(str(p.relative_to(mine)) for p in (mine / "checkpoints").rglob("*")) == before
    over = write_config(tmp_path / "over.yaml", config(mine, tiny_data, tok="tok_other", train="valid_other",
                                                      seq_len=16, steps=2, resume_from="none", save_every=2))
    res = launch(over)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "starting at step 0" in res.stdout


def test_analyze_tokens_names_its_page_once(shared_run, tiny_data):
    root, _, _ = shared_run
    res = run_cli("analyze", "tokens", "--model", str(root / "hf"), "--reference", str(root / "hf"), "--data",
                  tiny_data["train"], "--out", str(root / "view2") + "/", "--docs", "1", "--seq-len", "32", check=True)
    assert f"wrote {root / 'view2' / 'tokens.html'} and tokens.jsonl" in res.stdout and "//" not in res.stdout


def test_readme_cost_table_is_what_plan_table_prints():
    readme = (REPO / "README.md").read_text()
    for configs, nodes in ((("reference_1b", "slm_1b", "slm_1b_cached"), "4"),
                           (("reference_7b", "slm_7b", "slm_7b_cached"), "16")):
        res = run_cli("plan", "--table", *(f"configs/{c}.yaml" for c in configs), "--nodes", nodes, check=True)
        lines = res.stdout.strip().splitlines()
        assert len(lines) == 2 + len(configs)
        for line in lines:
            assert line in readme, line
