"""Task files of the user's (megaslm/eval/tasks): a YAML given to --include-path as a file, a missing data file,
a malformed YAML: loaded, or one line naming the file and the cause."""

from __future__ import annotations

import json

import pytest

from megaslm.errors import UserError
from megaslm.eval.tasks import load_tasks


def task_yaml(path, data):
    path.write_text(
        f"task: my_sums\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {data}}}}}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: gold\n"
        "doc_to_choice: '{{choices}}'\nmetric_list: [{metric: acc}]\n")
    return path


def test_a_task_file_given_as_include_path_is_loaded(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"q": "1 plus 2 is", "choices": [" 3", " 4"], "gold": 0}) + "\n")
    f = task_yaml(tmp_path / "mine.yaml", data)
    loaded = load_tasks(["my_sums"], [str(f)])
    assert list(loaded["tasks"]) == ["my_sums"]


def test_a_missing_data_file_names_the_task_file_and_the_data_file(tmp_path):
    f = task_yaml(tmp_path / "mine.yaml", tmp_path / "absent.jsonl")
    with pytest.raises(UserError) as e:
        load_tasks(["my_sums"], [str(tmp_path)])
    assert str(e.value).startswith(f"task my_sums ({f}): data file {tmp_path / 'absent.jsonl'} not found")


def test_a_malformed_task_yaml_is_named_with_its_parse_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: my_sums\ndoc_to_text: [unclosed\n")
    with pytest.raises(UserError) as e:
        load_tasks(["my_sums"], [str(bad)])
    print(e.value)
    assert str(e.value).startswith(f"--include-path {bad}: not a readable task file: ")
    assert str(e.value).endswith("at line 3, column 1")
    with pytest.raises(UserError) as e:  # in a directory: lm-eval skips it; the unknown task names it
        load_tasks(["my_sums"], [str(tmp_path)])
    print(e.value)
    assert str(e.value).startswith("--tasks: unknown task my_sums (")
    assert f"; {bad} could not be read: " in str(e.value)
