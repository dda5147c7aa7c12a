"""The pipeline's configuration, built once per run and passed whole (STYLE.md 6).

- ``pipeline_config.py``: :class:`PipelineConfig` (top-level keys + one section per stage, cross-section rules,
  dict / YAML / override conversion), :func:`load_config` and :func:`preset`;
- ``sections.py``: the section dataclasses, every field documented and validated there;
- ``checks.py``: the field checks the sections share (annotation types, positive numbers, simplex weights);
- ``presets.py``: the table of named presets (``configs/<name>.yaml`` mirror it).
"""
