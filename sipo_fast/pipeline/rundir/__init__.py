"""The run directory as storage: everything a run keeps on disk and how it stays consistent.

- ``lock.py``: :class:`RunLock`, the one writer's lock on a run directory;
- ``files.py``: content hashes, per-file records, atomic writes, JSON lines;
- ``directory.py``: :class:`RunDir` (``manifest.json``, the run's identity, stage and work directories);
- ``parts.py``: :class:`Parts`, the resumable parts of a stage in progress;
- ``repair.py``: ``manifest.json`` rebuilt from the stages' own ``stage.json``.
"""
