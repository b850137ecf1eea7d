"""Log analysis pages (`wandb.Html`) and plots (`wandb.Image`) to the wandb run of the run they analyze.

The run is resumed by the id in RUN_DIR/wandb_id (written by the trainer, megaslm/monitor.py) with
dir=RUN_DIR, in the mode of `WANDB_MODE` or else the run's `wandb.mode`, when that is `online`. Nothing is logged
when it is `disabled` or `offline`, or the run never used wandb: an offline wandb run cannot be resumed in place
(every `wandb.init` writes a new `offline-run-*` folder), so `report`, `analyze` and `eval` would add a folder
inside the run they read on every call; offline, their files on disk are the result. As in training, a wandb failure is reported and survived: the files on
disk are the result.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from megaslm import run_files



def _wandb_settings(run_dir: Path) -> dict | None:
    id_file = run_dir / "wandb_id"
    if not id_file.is_file():
        return None
    w = (run_files.saved_config(run_dir) or {}).get("wandb") or {}
    mode = os.environ.get("WANDB_MODE") or w.get("mode", "offline")
    if mode in ("disabled", "offline"):
        return None
    return {"id": id_file.read_text().strip(), "mode": mode, "project": w.get("project", "megaslm"),
            "entity": w.get("entity")}


def log_media(run_dir: Path | None, media: dict[str, Path]) -> bool:
    """Log each file under its key (.html as a page, anything else as an image); True if it was logged."""
    def payload(wandb):
        return {key: wandb.Html(Path(p).read_text(), inject=False) if str(p).endswith(".html")
                else wandb.Image(str(p)) for key, p in media.items()}

    return _log(run_dir, payload, list(media))


def log_values(run_dir: Path | None, values: dict[str, float]) -> bool:
    """Log scalars (e.g. `megaslm eval`'s eval/<task>/<metric>) to the run's wandb; True if they were logged."""
    return _log(run_dir, lambda wandb: dict(values), list(values)[:3] + (["..."] if len(values) > 3 else []))


def _log(run_dir: Path | None, payload, names: list[str]) -> bool:
    if run_dir is None:
        return False
    run_dir = Path(run_dir)
    settings = _wandb_settings(run_dir)
    if settings is None:
        return False
    # wandb.init starts a service and publishes its address in os.environ (WANDB_SERVICE), which every process
    # started later from this one inherits: a training run launched afterwards (a script, the test suite) would
    # log through this process's service, and a crashed run's state there breaks its resume. A service started
    # here is stopped and unpublished when done; one we inherited is left as it is.
    own_service = "WANDB_SERVICE" not in os.environ
    try:
        import wandb

        run = wandb.init(project=settings["project"], entity=settings["entity"], id=settings["id"], resume="allow",
                         mode=settings["mode"], dir=str(run_dir), settings=wandb.Settings(silent=True))
        run.log(payload(wandb))
        run.finish()
        print(f"megaslm: logged {', '.join(names)} to wandb run {settings['id']} ({settings['mode']}, "
              f"{run_dir / 'wandb'})", flush=True)
        return True
    except Exception as e:  # noqa: BLE001 - the files on disk are the result; wandb is a copy of them
        print(f"megaslm: logging to wandb failed ({type(e).__name__}: {e}); the files on disk are complete",
              file=sys.stderr, flush=True)
        return False
    finally:
        if own_service and "wandb" in sys.modules:
            _stop_service()


def _stop_service() -> None:
    import wandb

    try:
        wandb.teardown()
    except Exception as e:  # noqa: BLE001 - the media are logged; a failed teardown must not fail the command
        print(f"megaslm: stopping wandb's service failed ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
    os.environ.pop("WANDB_SERVICE", None)
