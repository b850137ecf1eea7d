"""`megaslm eval`'s progress: a line as soon as the scoring starts (the timer's later lines are not timed here)."""

from megaslm.eval.adapter import Progress


def test_scoring_prints_a_first_line_at_once_and_lines_name_the_work_done(capsys):
    with Progress(4, "batches", True, every=3600, weights=[4, 3, 2, 1]) as prog:
        assert capsys.readouterr().err == "megaslm eval: scoring 4 batches, a line every 3600 s\n"
        prog.line()
        assert "batches 0/4" in capsys.readouterr().err
        prog.update(2)
        prog.line()
        line = capsys.readouterr().err
        assert "batches 2/4" in line and "ETA" in line
    assert prog._stop.is_set()  # leaving the block stops the timer thread


def test_rank_other_than_0_and_empty_work_print_nothing(capsys):
    with Progress(3, "batches", False):
        pass
    with Progress(0, "batches", True):
        pass
    assert capsys.readouterr().err == ""
