"""megaslm/train/reshard.py without training: which layout wrote a checkpoint, what needs a conversion, what is
refused, and that a failed or cut conversion never counts."""

from __future__ import annotations

import json

import pytest

from megaslm.errors import UserError
from megaslm.train import reshard
from megaslm.train.reshard import Layout


def _touch(d, *names):
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        (d / n).write_bytes(b"x")
    return d


def test_layout_from_the_manifest_or_the_file_names(tmp_path):
    assert reshard.saved_layout(tmp_path, {"dp": 4, "tp": 2, "zero_stage": 1}) == Layout(4, 2, 1)
    z3 = _touch(tmp_path / "z3", *(f"zero_pp_rank_{d}_mp_rank_{t:02d}_{k}_states.pt" for d in range(3)
                                   for t in range(2) for k in ("model", "optim")))
    assert reshard.saved_layout(z3, None) == Layout(3, 2, 3)
    z2 = _touch(tmp_path / "z2", "mp_rank_00_model_states.pt",
                *(f"bf16_zero_pp_rank_{d}_mp_rank_00_optim_states.pt" for d in range(2)))
    assert reshard.saved_layout(z2, None) == Layout(2, 1, 0)  # ZeRO-1 or -2: one format, unrecorded
    assert str(Layout(2, 1, 0)) == "2 data-parallel ranks, ZeRO-1/2"
    assert reshard.saved_layout(_touch(tmp_path / "none", "notes.txt"), None) is None


def test_what_needs_a_conversion_and_what_is_refused(tmp_path):
    assert not reshard.differs(Layout(2, 1, 2), Layout(2, 1, 2))
    assert not reshard.differs(Layout(2, 1, 0), Layout(2, 1, 1))  # unrecorded 1/2 against 1: DeepSpeed loads it
    assert reshard.differs(Layout(2, 1, 2), Layout(1, 1, 2))
    assert reshard.differs(Layout(1, 2, 2), Layout(1, 1, 2))
    assert reshard.differs(Layout(2, 1, 1), Layout(2, 1, 2))
    reshard.check_supported(tmp_path, Layout(2, 1, 1), Layout(3, 1, 2))
    with pytest.raises(UserError, match=r"written under 2 data-parallel ranks, ZeRO-2; this launch is ZeRO-3\. .*"
                                        r"resume with a ZeRO-1 or ZeRO-2 config"):
        reshard.check_supported(tmp_path, Layout(2, 1, 2), Layout(2, 1, 3))


def test_a_failed_conversion_leaves_nothing_and_a_finished_one_is_reused(tmp_path):
    tag = _touch(tmp_path / "step_00000002", "mp_rank_00_model_states.pt")  # not a DeepSpeed checkpoint
    _touch(tag / f"{reshard.STAGING}123" / "universal", "fp32.pt")  # a conversion cut short earlier
    out, problem, _ = reshard.convert(tag, Layout(2, 1, 2))
    assert out is None and problem.startswith(f"DeepSpeed's ds_to_universal failed on {tag}: ")
    assert sorted(p.name for p in tag.iterdir()) == ["mp_rank_00_model_states.pt"]
    assert reshard.ready(tag) is None
    done = _touch(tag / "universal", "mp_rank_00_model_states.pt")
    (done / reshard.MARKER).write_text(json.dumps({"source": Layout(2, 1, 2).to_dict(), "seconds": 1.0}))
    assert reshard.convert(tag, Layout(2, 1, 2)) == (done, None, 0.0)
