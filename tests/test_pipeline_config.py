"""Pipeline configs: weights on the simplex, strict YAML, overrides, presets and their YAML mirrors."""
from pathlib import Path

import pytest

from sipo_fast.pipeline import PRESETS, PipelineConfig, load_config, preset, resolve_weights

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_bare_weights_mean_w_and_one_minus_w():
    assert resolve_weights([0.2, 0.7, 1, 0], 2, "w") == [[0.2, 0.8], [0.7, 0.3], [1.0, 0.0], [0.0, 1.0]]


def test_vector_weights_for_three_objectives():
    assert resolve_weights([[0.2, 0.3, 0.5], [1, 0, 0]], 3, "w") == [[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]


@pytest.mark.parametrize("weights,n,match", [
    ([1.2], 2, "off the simplex"),             # 1 - 1.2 < 0
    ([[0.5, 0.6]], 2, "off the simplex"),      # sums to 1.1
    ([[-0.1, 1.1]], 2, "off the simplex"),
    ([[0.5, 0.5]], 3, "has 2 entries"),
    ([0.5], 3, "only works with two"),
    ([], 2, "non-empty"),
    (["a"], 2, "neither a number"),
    ([[float("nan"), 1.0]], 2, "off the simplex"),
])
def test_bad_weights_fail_with_what_to_do(weights, n, match):
    with pytest.raises(ValueError, match=match):
        resolve_weights(weights, n, "sample.weights")


@pytest.mark.parametrize("vec, ok", [([0.5, 0.5 + 5e-7], True), ([0.5, 0.5 + 2e-6], False), ([1 + 1e-9, -1e-9], False)])
def test_one_simplex_check_for_config_sweeps_and_decoder(vec, ok):
    """The config (resolve_weights), the evaluation's sweeps (sweep_weights) and the MOD ops (check_weights) take
    the same weights: entries >= 0 summing to 1 within WEIGHT_TOL = 1e-6. A sum 5e-7 above 1 passes, 2e-6 above
    fails, and so does an entry of -1e-9."""
    from sipo_fast.eval.sweep import sweep_weights
    from sipo_fast.ops.mod import WEIGHT_TOL, check_weights

    assert WEIGHT_TOL == 1e-6
    checks = [lambda: resolve_weights([vec], 2, "w"), lambda: sweep_weights([vec], 2), lambda: check_weights(vec, 2)]
    for check in checks:
        if ok:
            check()
        else:
            with pytest.raises(ValueError, match="non-negative|sum to 1"):
                check()


def test_pipeline_resolves_every_weight_list():
    cfg = PipelineConfig.from_dict({"data": {"objectives": ["a", "b", "c"]},
                                    "sample": {"weights": [[0.2, 0.3, 0.5]]},
                                    "filter": {"soup_weights": [[1, 0, 0], [0, 0.5, 0.5]]},
                                    "eval": {"weights": [[0, 0, 1]]}})
    assert cfg.sample.weights == [[0.2, 0.3, 0.5]]
    assert cfg.soup_weights == [[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]
    assert cfg.eval.weights == [[0.0, 0.0, 1.0]]
    # With the default (two-objective) sample weights, three objectives cannot resolve them.
    with pytest.raises(ValueError, match="only works with two"):
        PipelineConfig.from_dict({"data": {"objectives": ["a", "b", "c"]}})


def test_unknown_keys_are_rejected():
    with pytest.raises(ValueError, match="unknown top-level key"):
        PipelineConfig.from_dict({"sampel": {}})
    with pytest.raises(ValueError, match="unknown key.*'sample'"):
        PipelineConfig.from_dict({"sample": {"max_new_token": 3}})


@pytest.mark.parametrize("data,match", [
    ({"data": {"objectives": ["helpful"]}}, "at least two objectives"),
    ({"data": {"objectives": ["a", "a"]}}, "repeats"),
    ({"refine": {"review_objective": "funny"}}, "review_objective"),
    ({"align": {"policies": ["x"]}}, "one per objective"),
    ({"data": {"eval_fraction": 0}}, "select_best needs held-out data"),
    ({"eval": {"scorers": ["relevance"]}}, "one per objective"),
    ({"align": {"learning_rate": -1}}, "positive"),
    ({"finetune": {"loss": "ipo"}}, "sipo"),
    ({"eval": {"baselines": ["dpo_lww"]}}, "baselines"),
    ({"eval": {"prompt_select": "last:0"}}, "prompt_select"),
    ({"eval": {"prompt_select": "middle"}}, "prompt_select"),
    ({"refine": {"template": "sipo"}}, "sipo-helpsteer"),
    ({"data": {"conflict_mix": "max"}}, "conflict_mix"),
    ({"align": {"lr_scheduler": "cosinus"}}, "cosine"),
    ({"finetune": {"warmup_ratio": 1.0}}, "warmup_ratio"),
    ({"finetune": {"weight_decay": -0.1}}, "weight_decay"),
    ({"finetune": {"select_best": True}, "data": {"eval_fraction": 0}, "align": {"select_best": False}},
     "finetune.select_best needs held-out"),
    ({"model": {"dtype": "int8"}}, "float32"),
    ({"model": {"template": "no placeholder"}}, "{prompt}"),
    ({"refine": {"rewrite_template": "{question} {response}"}}, "{review}"),
    ({"data": {"conflict_ratio": 1.0}}, "conflict_ratio"),
])
def test_cross_field_validation(data, match):
    with pytest.raises(ValueError, match=match):
        PipelineConfig.from_dict(data)


def test_overrides_are_typed_and_checked():
    cfg = preset("smoke").override(["sample.max_new_tokens=32", "sample.weights=[0.1, 0.9]", "refine.enabled=false",
                                    "seed=3", "model.name=tiny:qwen2"])
    assert cfg.sample.max_new_tokens == 32 and cfg.sample.weights == [[0.1, 0.9], [0.9, 0.1]]
    assert cfg.refine.enabled is False and cfg.seed == 3 and cfg.model.name == "tiny:qwen2"
    for bad, match in [("sample.max_new_tokens", "section.key=value"), ("sample.nope=1", "no field 'nope'"),
                       ("sampl.x=1", "section one of"), ("sample.max_new_tokens=-4", "positive")]:
        with pytest.raises(ValueError, match=match):
            preset("smoke").override([bad])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_yaml_round_trip(name):
    cfg = preset(name)
    assert PipelineConfig.from_yaml(cfg.to_yaml()) == cfg


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_shipped_yaml_mirrors_the_preset(name):
    """configs/<name>.yaml and the Python preset table must describe the same run."""
    path = CONFIGS / f"{name}.yaml"
    assert path.exists(), f"configs/{name}.yaml is missing; write it with `sipo-fast config --preset {name}`"
    assert PipelineConfig.from_yaml(path.read_text()) == preset(name)


def test_paper_presets_keep_the_papers_stage_defaults():
    """SIPO.md §3: LoRA r=64, alpha=1, q/k/v/o, lr 5e-4, beta 0.1, 3 epochs, max length 512, W = {.2,.4,.6,.8};
    stage 3 lr 5e-6 with alpha 0.1."""
    for name in ("beavertails", "helpsteer"):
        c = preset(name)
        assert (c.align.lora_r, c.align.lora_alpha, c.align.lora_dropout) == (64, 1.0, 0.0)
        assert sorted(c.align.target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
        assert (c.align.learning_rate, c.align.beta, c.align.epochs, c.align.max_length) == (5e-4, 0.1, 3, 512)
        assert c.sample.weights == [[0.2, 0.8], [0.4, 0.6], [0.6, 0.4], [0.8, 0.2]] and not c.sample.do_sample
        assert (c.finetune.learning_rate, c.finetune.alpha, c.finetune.loss) == (5e-6, 0.1, "sipo")
        assert c.filter.soups
    assert not preset("beavertails").refine.enabled and preset("helpsteer").refine.enabled


def test_load_config_layers(tmp_path):
    """defaults <- preset <- file <- overrides."""
    f = tmp_path / "c.yaml"
    f.write_text("sample:\n  max_new_tokens: 12\nrefine:\n  enabled: false\n")
    cfg = load_config(str(f), "smoke", ["refine.enabled=true"])
    assert cfg.model.name == "tiny"               # from the preset
    assert cfg.sample.max_new_tokens == 12        # file over preset
    assert cfg.refine.enabled is True             # override over file
    assert cfg.align.beta == 0.1                  # dataclass default
    f.write_text("- just a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(str(f))


def test_unknown_preset():
    with pytest.raises(ValueError, match="smoke"):
        preset("tiny")
