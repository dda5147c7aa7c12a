"""Rebuilding ``manifest.json`` from the stages' own ``stage.json`` (``sipo-fast repair``, or a run by itself).

A finished stage's directory holds ``stage.json``: its fingerprint, the config values and upstream artifact
hashes that made it, its summary, and the size and sha256 of every file of the artifact. That is everything
its manifest entry holds, so a manifest that is lost, truncated or of the wrong shape costs nothing: each
stage whose files still match their records gets its entry back; one that does not match simply runs again.
The run's identity comes from the old manifest when that part is still readable, else from the run's own
``config.yaml``.
"""
from __future__ import annotations

import json
import logging
import time

from .directory import FORMAT, MANIFEST, ManifestError, RunDir, identity
from .files import STAGE_JSON, atomic_write_json, check_records, dir_hash

log = logging.getLogger("sipo_fast.pipeline")


def entry_from_record(record: dict, artifact: str) -> dict:
    """The manifest entry a finished stage's ``stage.json`` stands for (what ``SIPOPipeline._record`` writes)."""
    return {"fingerprint": record["fingerprint"], "inputs": record.get("inputs", {}), "artifact": artifact,
            "summary": record["summary"], "config": record.get("config", {}), "version": record.get("version")}


def read_record(run_dir: RunDir, stage: str) -> tuple[dict | None, str | None]:
    """(stage.json content, None) when the stage's files match its records, else (None, why not)."""
    path = run_dir.stage_dir(stage) / STAGE_JSON
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"its {STAGE_JSON} is unreadable ({exc})"
    if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), str) \
            or not isinstance(record.get("summary"), dict):
        return None, f"its {STAGE_JSON} lacks fingerprint or summary"
    why = check_records(run_dir.stage_dir(stage), record.get("files"))
    return (None, why) if why else (record, None)


def _old_identity(run_dir: RunDir) -> dict | None:
    try:
        data = json.loads(run_dir.manifest_path.read_text())
        if isinstance(data, dict) and isinstance(data.get("identity"), dict):
            return data["identity"]
    except (OSError, ValueError):
        pass
    config_file = run_dir.root / "config.yaml"
    if config_file.is_file():
        from ..config.pipeline_config import PipelineConfig

        try:
            return identity(PipelineConfig.from_yaml(config_file.read_text()))
        except Exception:  # noqa: BLE001 - best effort: a config.yaml that no longer loads leaves it unknown
            return None
    return None


def rebuild(run_dir: RunDir, stage_names) -> tuple[dict, list[str]]:
    """(manifest rebuilt from the stage records, one note per stage directory found)."""
    stages, notes = {}, []
    for name in stage_names:
        if not (run_dir.stage_dir(name) / STAGE_JSON).is_file():
            continue
        record, why = read_record(run_dir, name)
        if record is None:
            notes.append(f"{name}: not recovered, {why}; it will run again")
            continue
        stages[name] = entry_from_record(record, dir_hash(run_dir.stage_dir(name)))
        notes.append(f"{name}: recovered from {name}/{STAGE_JSON}")
    return {"format": FORMAT, "identity": _old_identity(run_dir), "stages": stages}, notes


def repair(run_dir: RunDir, stage_names, *, write: bool = True, force: bool = False) -> list[str]:
    """Rebuild the manifest if it is broken (or always with ``force``); the broken file is kept beside it as
    ``manifest.json.broken-<time>``. Returns the notes (empty when the manifest was fine)."""
    if not force:
        try:
            run_dir.manifest()
            return []
        except ManifestError:
            pass
    data, notes = rebuild(run_dir, stage_names)
    if write:
        if run_dir.manifest_path.exists():
            run_dir.manifest_path.rename(run_dir.root / f"{MANIFEST}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
        atomic_write_json(run_dir.manifest_path, data)
    return notes or ["no finished stage found; the manifest starts empty"]
