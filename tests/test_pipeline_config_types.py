"""Typed config (issue 14, defect class 5 and the config half of 4): booleans, counts and lists are checked
against the field annotations whichever way the value arrives (YAML, override, Python), so a truthy string or
a fractional count fails at once instead of giving a silently wrong run."""
import pytest

from sipo_fast.pipeline import AlignConfig, PipelineConfig, SampleConfig, load_config, preset


@pytest.mark.parametrize("override,match", [
    ("align.use_lora=no-thanks", "align.use_lora must be true or false, got 'no-thanks'"),
    ('align.use_lora="no"', "align.use_lora must be true or false, got 'no'.*not booleans"),
    ('sample.do_sample="yes please"', "sample.do_sample must be true or false"),
    ("refine.enabled=1", "refine.enabled must be true or false, got 1"),
    ("sample.max_new_tokens=1.5", "sample.max_new_tokens must be a whole number, got 1.5"),
    ("sample.batch_size=2.5", "sample.batch_size must be a whole number"),
    ("align.lora_r=8.5", "align.lora_r must be a whole number"),
    ("data.max_rows=abc", "data.max_rows must be a whole number or null"),
    ("align.max_steps=0", r"align.max_steps=0: use -1 .*\(0 would train nothing"),
    ("finetune.max_steps=0", "finetune.max_steps=0"),
    ("align.max_steps=-5", "align.max_steps=-5"),
    ("align.target_modules=q_proj", "align.target_modules must be a list, e.g. \\[a, b\\], got 'q_proj'"),
    ("align.target_modules=[]", "align.target_modules must be a non-empty list"),
    ("align.target_modules=[q_proj, 3]", "align.target_modules must be a non-empty list of non-empty strings"),
    ("data.objectives=helpful", "data.objectives must be a list"),
    ("eval.scorers=relevance", "eval.scorers must be a list"),
    ("align.learning_rate=fast", "align.learning_rate must be a number"),
    ("data.eval_fraction=.nan", "data.eval_fraction must be a number"),
    ("seed=1.5", "seed must be a whole number"),
    ("seed=abc", "seed must be a whole number"),
    ("model.name=[a]", "model.name must be a string"),
])
def test_loose_types_are_refused_with_the_field_and_value(override, match):
    with pytest.raises(ValueError, match=match):
        preset("smoke").override([override])


def test_whole_floats_become_ints_and_real_types_pass():
    cfg = preset("smoke").override(["sample.max_new_tokens=16.0", "align.use_lora=false", "data.max_rows=null",
                                    "align.max_steps=3", "seed=7"])
    assert cfg.sample.max_new_tokens == 16 and isinstance(cfg.sample.max_new_tokens, int)
    assert cfg.align.use_lora is False and cfg.data.max_rows is None and cfg.align.max_steps == 3 and cfg.seed == 7
    assert AlignConfig(max_steps=-1).max_steps == -1  # -1 (train the epochs) stays the default


def test_exponent_floats_that_yaml_reads_as_strings_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) loads 1e-4 without a dot as the string '1e-4'; a float field takes it as the number."""
    cfg = preset("smoke").override(["finetune.learning_rate=1e-4", "align.learning_rate=5E-4"])
    assert cfg.finetune.learning_rate == 1e-4 and cfg.align.learning_rate == 5e-4
    f = tmp_path / "c.yaml"
    f.write_text("align:\n  learning_rate: 2e-5\n")
    assert load_config(f).align.learning_rate == 2e-5
    with pytest.raises(ValueError, match="align.learning_rate must be a number"):
        preset("smoke").override(["align.learning_rate=1e-4x"])
    with pytest.raises(ValueError, match="sample.max_new_tokens must be a whole number"):
        preset("smoke").override(["sample.max_new_tokens=1e2"])  # int fields stay strict


def test_python_construction_is_checked_too():
    with pytest.raises(ValueError, match="sample.do_sample must be true or false"):
        SampleConfig(do_sample="yes")
    with pytest.raises(ValueError, match="sample.max_new_tokens must be a whole number"):
        SampleConfig(max_new_tokens=0.5)


def test_section_that_is_not_a_mapping_is_an_error_not_a_traceback():
    with pytest.raises(ValueError, match="section 'align' must be a mapping"):
        PipelineConfig.from_dict({"align": 5})


def test_yaml_file_with_truthy_string_is_refused(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("align:\n  use_lora: 'no'\n")
    with pytest.raises(ValueError, match="align.use_lora must be true or false"):
        load_config(str(f))


@pytest.mark.parametrize("content,match", [
    ("align:\n  lora_r: [1\n", r"c.yaml:3:1: YAML syntax error"),
    (b"align:\n  lora_r: 8 \xff\n", r"c.yaml:2: not UTF-8"),
])
def test_config_file_errors_name_the_file_and_line(tmp_path, content, match):
    f = tmp_path / "c.yaml"
    f.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(ValueError, match=match):
        load_config(str(f))


def test_missing_or_directory_config_file(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ValueError, match="is a directory"):
        load_config(str(tmp_path))


def test_override_with_broken_yaml_value():
    with pytest.raises(ValueError, match="not valid YAML"):
        preset("smoke").override(["sample.weights=[0.3, 0.7"])
