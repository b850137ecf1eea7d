"""Resume on another layout (megaslm/train/reshard.py): ZeRO-3 with a co-located reference, 2 ranks -> 1, exact
against the uninterrupted run; another ZeRO family refused in one line; another step batch said and recorded.
(The EMA reference across a layout change: tests/integration/test_objectives.py; tensor-parallel 2 -> 1:
test_tensor_parallel.py; the whole matrix with its figures: bench/reshard_matrix.py.)"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import read_metrics, run_cli, write_config
from tests.integration.test_slm import reference_dir, slm_config  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow
SAME = ("loss", "loss_selected", "ref_loss", "selected_frac", "threshold", "n_selected", "grad_norm")


def test_zero3_slm_resumes_on_one_rank_exactly(tmp_path, tiny_data, reference_dir):  # noqa: F811
    kw = dict(zero="zero3", placement="zero3", steps=4, save_every=2, keep_checkpoints=0)
    full = tmp_path / "full"
    run_cli("train", str(write_config(tmp_path / "full.yaml", slm_config(full, tiny_data, reference_dir / "good",
                                                                         mb=2, **kw))), nproc=2, check=True)
    want = read_metrics(full)
    tag = full / "checkpoints" / "step_00000002"
    assert json.loads((tag / "manifest.json").read_text())["layout"] == {"dp": 2, "tp": 1, "zero_stage": 3}

    cut = tmp_path / "cut"
    shutil.copytree(full, cut, ignore=shutil.ignore_patterns("lease.json"))
    cfg = slm_config(cut, tiny_data, reference_dir / "good", mb=4, **{**kw, "resume_from": "step_00000002"})
    res = run_cli("train", str(write_config(tmp_path / "cut.yaml", cfg)), check=True)
    assert ("megaslm: checkpoint step_00000002 was written by 2 data-parallel ranks, ZeRO-3; this launch has 1 "
            "data-parallel rank, ZeRO-3: loading it as DeepSpeed's universal checkpoint (converted once into") \
        in res.stdout
    assert "unusable" not in res.stdout + res.stderr and "damaged" not in res.stdout + res.stderr
    marker = json.loads((cut / "checkpoints" / "step_00000002" / "universal" / "megaslm_universal.json").read_text())
    assert marker["source"] == {"dp": 2, "tp": 1, "zero_stage": 3}
    got = read_metrics(cut)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(got[2:], want[2:]):
        for key in SAME:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    info = json.loads((cut / "run_info.json").read_text())
    assert info["dp_size"] == 1 and info["step_batch_changes"] == []

    # Another ZeRO family: refused in one line before any step, the checkpoints untouched.
    cfg2 = slm_config(cut, tiny_data, reference_dir / "good", zero="zero2", mb=4, steps=6, save_every=2,
                      keep_checkpoints=0)
    res = run_cli("train", str(write_config(tmp_path / "z2.yaml", cfg2)))
    err = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.returncode == 2 and len(err) == 1, res.stderr[-3000:]
    assert "was written under 1 data-parallel rank, ZeRO-3; this launch is ZeRO-2" in err[0]
    assert "Traceback" not in res.stderr and (cut / "checkpoints" / "latest_complete").read_text() == \
        "step_00000004"

    # Another step batch (4 -> 2 sequences): allowed, said, and recorded.
    cfg3 = slm_config(cut, tiny_data, reference_dir / "good", mb=2, **{**kw, "steps": 5})
    res = run_cli("train", str(write_config(tmp_path / "small.yaml", cfg3)), check=True)
    assert "the optimizer step's batch changes from 4 to 2 sequences" in res.stdout and "from step 5" in res.stdout
    info = json.loads((cut / "run_info.json").read_text())
    assert info["step_batch_changes"] == [{"step": 5, "from": 4, "to": 2}]
    assert [r["step"] for r in read_metrics(cut)] == [1, 2, 3, 4, 5]
