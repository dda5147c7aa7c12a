"""FusedDPOTrainer against TRL's stock DPOTrainer (same batch, same weights), SIPO/MODPO losses inside the trainer,
dataset tokenisation, and train_preference end to end on a tiny model."""
import copy
import os

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")

from datasets import Dataset  # noqa: E402
from peft import LoraConfig, PeftModel  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from sipo_fast.data.formatting import encode_pairs  # noqa: E402
from sipo_fast.models import tiny  # noqa: E402
from sipo_fast.training import (FusedDPOConfig, FusedDPOTrainer, dpo_loss, dpo_lw_loss, modpo_loss,  # noqa: E402
                                sequence_logprobs_ref, sipo_loss, train_preference)

ROWS = [
    {"prompt": "Say hi.", "chosen": "Hello, nice to meet you!", "rejected": "Go away.",
     "chosen_margin_rewards": [0.9, 0.1], "rejected_margin_rewards": [0.2, 0.4]},
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "It is five, obviously, everyone knows that.",
     "chosen_margin_rewards": [0.5, 0.3], "rejected_margin_rewards": [0.6, -0.1]},
    {"prompt": "Insult my neighbour.", "chosen": "I'd rather help you talk to them kindly.", "rejected": "Sure.",
     "chosen_margin_rewards": [0.7, 0.0], "rejected_margin_rewards": [0.1, 0.2]},
]
COMMON = dict(output_dir="unused", report_to="none", bf16=False, gradient_checkpointing=False,
              per_device_train_batch_size=3, max_length=64)


def _perturbed(model, seed=7, scale=0.05):
    """A reference that differs from the policy, so the DPO loss is not the trivial log 2."""
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return ref.requires_grad_(False)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_rel_close(a: dict, b: dict, rel=1e-4):
    assert a.keys() == b.keys() and a
    for n in a:
        err = (a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)
        assert err <= rel, f"{n}: relative error {err:.2e}"


@pytest.fixture(scope="module")
def policy(tokenizer):
    return tiny("llama", tokenizer=tokenizer, seed=11)[0]


def _pair(tokenizer, policy, tmp_path, peft_config=None, **ours_kwargs):
    """(stock trainer, our trainer, one collated batch from the stock trainer's own pipeline)."""
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in ROWS])
    common = dict(COMMON, output_dir=str(tmp_path))
    ref = None if peft_config is not None else _perturbed(policy)
    stock = DPOTrainer(copy.deepcopy(policy), copy.deepcopy(ref), DPOConfig(**common), train_dataset=ds,
                       processing_class=tokenizer, peft_config=peft_config)
    ours = FusedDPOTrainer(copy.deepcopy(policy), copy.deepcopy(ref), FusedDPOConfig(**common, **ours_kwargs),
                           train_dataset=ds, processing_class=tokenizer, peft_config=peft_config)
    batch = stock.data_collator([stock.train_dataset[i] for i in range(len(ds))])
    return stock, ours, batch


def test_dpo_loss_and_gradients_equal_stock_trl(tokenizer, policy, tmp_path):
    stock, ours, batch = _pair(tokenizer, policy, tmp_path)
    stock.model.train(), ours.model.train()
    l_stock = stock.compute_loss(stock.model, batch)
    l_ours = ours.compute_loss(ours.model, batch)
    assert abs(l_stock.item() - 0.6931) > 1e-3  # a non-trivial loss
    assert l_ours.item() == pytest.approx(l_stock.item(), rel=1e-4)
    l_stock.backward(), l_ours.backward()
    _assert_rel_close(_grads(ours.model), _grads(stock.model))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert ours._metrics["train"][key][-1] == pytest.approx(stock._metrics["train"][key][-1], rel=1e-4, abs=1e-6)


def test_lora_dpo_equals_stock_trl(tokenizer, policy, tmp_path):
    """LoRA: the reference is the base with adapters disabled; non-zero adapters make the loss non-trivial."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     init_lora_weights=False)
    stock, ours, batch = _pair(tokenizer, policy, tmp_path, peft_config=cfg)
    stock.model.train(), ours.model.train()
    l_stock, l_ours = stock.compute_loss(stock.model, batch), ours.compute_loss(ours.model, batch)
    assert l_ours.item() == pytest.approx(l_stock.item(), rel=1e-4)
    l_stock.backward(), l_ours.backward()
    g_ours = _grads(ours.model)
    assert g_ours and all("lora_" in n for n in g_ours)
    _assert_rel_close(g_ours, _grads(stock.model))


def _trainer(tokenizer, policy, tmp_path, **cfg):
    ds = Dataset.from_list(ROWS)
    return FusedDPOTrainer(copy.deepcopy(policy), _perturbed(policy), FusedDPOConfig(**dict(COMMON, output_dir=str(tmp_path)), **cfg),
                           train_dataset=ds, processing_class=tokenizer)


def _expected_logps(trainer, policy, batch):
    with torch.no_grad():
        args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        pol = sequence_logprobs_ref(policy, *args).chunk(2)
        ref = sequence_logprobs_ref(trainer.ref_model, *args).chunk(2)
    return pol, ref


def test_sipo_loss_in_trainer(tokenizer, policy, tmp_path):
    """loss = DPO + α · NLL(y_c)/|y_c| per example, |y_c| = the chosen response's scored tokens (EOS included)."""
    tr = _trainer(tokenizer, policy, tmp_path, loss_type="sipo", sipo_alpha=0.3)
    batch = tr.data_collator([tr.train_dataset[i] for i in range(3)])
    (pc, pr), (rc, rr) = _expected_logps(tr, policy, batch)
    lengths = torch.tensor([len(tr.train_dataset[i]["chosen_ids"]) for i in range(3)])
    expected = sipo_loss(pc, pr, rc, rr, lengths, beta=0.1, alpha=0.3)
    tr.model.train()
    with torch.no_grad():
        got = tr.compute_loss(tr.model, batch)
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)
    assert got.item() != pytest.approx(dpo_loss(pc, pr, rc, rr).item(), rel=1e-3)
    assert "nll/chosen" in tr._metrics["train"] and "loss/dpo" in tr._metrics["train"]


def test_modpo_loss_in_trainer_and_per_objective_metrics(tokenizer, policy, tmp_path):
    tr = _trainer(tokenizer, policy, tmp_path, loss_type="modpo", modpo_weight=0.5, modpo_margin_weights=[0.3, 0.2],
                  objective_names=["helpful", "harmless", "honest"])
    batch = tr.data_collator([tr.train_dataset[i] for i in range(3)])
    assert batch["chosen_margin_rewards"].shape == (3, 2)
    (pc, pr), (rc, rr) = _expected_logps(tr, policy, batch)
    cm = torch.tensor([r["chosen_margin_rewards"] for r in ROWS])
    rm = torch.tensor([r["rejected_margin_rewards"] for r in ROWS])
    expected = modpo_loss(pc, pr, rc, rr, cm, rm, weight=0.5, margin_weights=[0.3, 0.2])
    tr.model.train()
    with torch.no_grad():
        got = tr.compute_loss(tr.model, batch)
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)
    m = tr._metrics["train"]
    assert m["rewards/harmless/margins"][-1] == pytest.approx((cm[:, 0] - rm[:, 0]).mean().item(), rel=1e-6)
    assert m["rewards/honest/accuracies"][-1] == pytest.approx(1 / 3)  # 0.1<0.4, 0.3>-0.1, 0.0<0.2
    assert m["rewards/helpful/margins"][-1] == pytest.approx(m["rewards/margins"][-1])


def test_dpo_lw_loss_in_trainer(tokenizer, policy, tmp_path):
    """DPO LW inside the trainer: the signs column reaches the loss, which equals w_1·DPO(y_w, y_l) + w_2·DPO of
    each row in objective 2's orientation, recomputed from plain log-probs with dpo_loss."""
    rows = [{**r, "objective_signs": s} for r, s in zip(ROWS, ([1, -1], [1, 1], [1, -1]))]
    tr = FusedDPOTrainer(copy.deepcopy(policy), _perturbed(policy),
                         FusedDPOConfig(**dict(COMMON, output_dir=str(tmp_path)), loss_type="dpo_lw",
                                        dpo_lw_weights=[0.4, 0.6]),
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = tr.data_collator([tr.train_dataset[i] for i in range(3)])
    assert batch["objective_signs"].tolist() == [[1, -1], [1, 1], [1, -1]]
    (pc, pr), (rc, rr) = _expected_logps(tr, policy, batch)
    obj2 = torch.tensor([True, False, True])  # rows where objective 2 prefers the "rejected" response
    pc2, pr2 = torch.where(obj2, pr, pc), torch.where(obj2, pc, pr)
    rc2, rr2 = torch.where(obj2, rr, rc), torch.where(obj2, rc, rr)
    expected = (0.4 * dpo_loss(pc, pr, rc, rr, reduction="none") + 0.6 * dpo_loss(pc2, pr2, rc2, rr2, reduction="none")).mean()
    tr.model.train()
    with torch.no_grad():
        got = tr.compute_loss(tr.model, batch)
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)
    assert got.item() == pytest.approx(dpo_lw_loss(pc, pr, rc, rr, batch["objective_signs"], weights=[0.4, 0.6]).item(),
                                       rel=1e-4)


def test_dataset_uses_sipo_fast_tokenisation(tokenizer, policy, tmp_path):
    """prompt_ids + chosen_ids is exactly the row encode_pairs builds (template, separate tokenisation, EOS)."""
    tr = _trainer(tokenizer, policy, tmp_path, prompt_template="chat")
    enc = encode_pairs(tokenizer, [r["prompt"] for r in ROWS], [r["chosen"] for r in ROWS])
    for i, row in enumerate(tr.train_dataset):
        n = int(enc["attention_mask"][i].sum())
        assert row["prompt_ids"] + row["chosen_ids"] == enc["input_ids"][i, :n].tolist()
        assert len(row["chosen_ids"]) == int(enc["response_mask"][i].sum())


def test_precomputed_reference_logprobs_use_the_fused_path(tokenizer, policy, tmp_path):
    tr = FusedDPOTrainer(copy.deepcopy(policy), _perturbed(policy),
                         FusedDPOConfig(**dict(COMMON, output_dir=str(tmp_path)), precompute_ref_log_probs=True),
                         train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)
    batch = tr.data_collator([tr.train_dataset[i] for i in range(3)])
    _, (rc, rr) = _expected_logps(tr, policy, batch)
    torch.testing.assert_close(batch["ref_chosen_logps"], rc, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(batch["ref_rejected_logps"], rr, rtol=1e-5, atol=1e-4)


def test_train_preference_with_lora(tokenizer, policy, tmp_path):
    model = copy.deepcopy(policy)
    before = {n: p.clone() for n, p in model.named_parameters()}
    out = train_preference(model, None, ROWS, tokenizer, loss_type="sipo", lr=5e-3, epochs=1, batch_size=3,
                           max_length=64, output_dir=str(tmp_path),
                           lora_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert isinstance(out, PeftModel)
    lora_b = [p for n, p in out.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: training moved it
    for n, p in out.get_base_model().named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, before[n.replace(".base_layer", "")])  # the base stays frozen


def test_trainer_logs_trl_names_and_keeps_best_eval_checkpoint(tokenizer, policy, tmp_path):
    from sipo_fast.training import build_preference_trainer

    tr = build_preference_trainer(copy.deepcopy(policy), _perturbed(policy), ROWS, tokenizer, lr=1e-3, epochs=2,
                                  batch_size=3, max_length=64, output_dir=str(tmp_path), logging_steps=1,
                                  eval_dataset=ROWS[:2], objective_names=["helpful", "harmless", "honest"])
    tr.train()
    logged = {k for entry in tr.state.log_history for k in entry}
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "rewards/helpful/margins", "rewards/harmless/chosen", "rewards/honest/rejected",
            "eval_loss", "eval_rewards/margins"} <= logged
    eval_losses = [e["eval_loss"] for e in tr.state.log_history if "eval_loss" in e]
    assert len(eval_losses) == 2 and tr.state.best_metric == pytest.approx(min(eval_losses))
    assert tr.state.best_model_checkpoint is not None


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="ipo"), "choose one of"),
    (dict(loss_type=["sigmoid", "sft"]), "choose one of"),
    (dict(loss_type="modpo"), "modpo_weight"),
    (dict(loss_type="modpo", modpo_weight=0.0, modpo_margin_weights=[1.0]), "modpo_weight"),
    (dict(loss_type="dpo_lw"), "dpo_lw_weights"),
    (dict(loss_type="dpo_lw", dpo_lw_weights=[1.2, -0.2]), "dpo_lw_weights"),
    (dict(label_smoothing=0.1), "does not support"),
    (dict(sipo_alpha=-1.0), "sipo_alpha"),
])
def test_config_validation(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        FusedDPOConfig(**dict(COMMON, output_dir=str(tmp_path)), **kwargs)


def test_train_preference_rejects_bad_dataset(tokenizer, policy, tmp_path):
    with pytest.raises(ValueError, match="prompt, chosen and rejected"):
        train_preference(policy, None, [{"prompt": "x", "chosen": "y"}], tokenizer, output_dir=str(tmp_path))


def test_reference_table_equals_the_trainers_own_reference_and_skips_its_forward(tokenizer, policy, tmp_path,
                                                                                monkeypatch):
    """reference_table gives, per (prompt, response), the log π_ref the trainer computes in its loop (same
    tokenisation, EOS, truncation at max_length, fused path): checked against sequence_logprobs_ref on the
    trainer's own collated batch, for pairs in both orders (stage 1's second objective flips some pairs).
    A trainer given those columns computes the same loss and never runs its reference forward."""
    from sipo_fast.training import reference_table, with_reference
    from sipo_fast.training.trainer import build_preference_trainer

    long = {"prompt": "Tell me a story.", "chosen": "Once upon a time " * 30, "rejected": "No."}  # truncated at 40
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in ROWS] + [long]
    ref = _perturbed(policy)
    table = reference_table(ref, pairs, tokenizer, max_length=40, batch_size=2)
    assert len(table) == 2 * len(pairs)
    flipped = [{"prompt": p["prompt"], "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
    for rows in (pairs, flipped):
        plain = build_preference_trainer(copy.deepcopy(policy), ref, rows, tokenizer, max_length=40, batch_size=4,
                                         output_dir=str(tmp_path / "plain"))
        batch = plain.data_collator([plain.train_dataset[i] for i in range(len(rows))])
        args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        with torch.no_grad():
            rc, rr = sequence_logprobs_ref(ref, *args).chunk(2)
        given = with_reference(rows, table)
        torch.testing.assert_close(torch.tensor([g["ref_chosen_logps"] for g in given]), rc, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(torch.tensor([g["ref_rejected_logps"] for g in given]), rr, rtol=1e-5, atol=1e-4)

        fast = build_preference_trainer(copy.deepcopy(policy), ref, given, tokenizer, max_length=40, batch_size=4,
                                        output_dir=str(tmp_path / "fast"))
        fast_batch = fast.data_collator([fast.train_dataset[i] for i in range(len(rows))])
        calls = []
        monkeypatch.setattr(type(fast), "_ref_logps", lambda self, inputs: calls.append(1) or (_ for _ in ()).throw(
            AssertionError("reference forward ran")))
        with torch.no_grad():
            loss_fast = fast.compute_loss(fast.model, fast_batch)
        monkeypatch.undo()
        with torch.no_grad():
            loss_plain = plain.compute_loss(plain.model, batch)
        assert calls == []
        torch.testing.assert_close(loss_fast, loss_plain, rtol=1e-5, atol=1e-6)


def test_reference_table_scores_a_shared_chosen_once(tokenizer, policy, monkeypatch):
    """Stage 3's D_c holds (x, y_c, y_a) and (x, y_c, y_b): the table scores y_c once, and its values are the
    full-logits reference's on the sequences the trainer would build."""
    from sipo_fast.data.formatting import encode_pairs
    from sipo_fast.training import reference_table
    from sipo_fast.training import logprobs as L

    pairs = []
    for i in range(3):
        x = f"Question number {i}?"
        pairs += [{"prompt": x, "chosen": f"best {i}", "rejected": f"first {i}"},
                  {"prompt": x, "chosen": f"best {i}", "rejected": "second" + " answer" * (12 * i)}]
    rows = []
    real = L.policy_logprobs
    monkeypatch.setattr(L, "policy_logprobs", lambda m, b, **kw: rows.append(b["input_ids"].shape[0]) or real(m, b, **kw))
    monkeypatch.setattr("sipo_fast.training.reference.policy_logprobs", L.policy_logprobs)
    table = reference_table(policy, pairs, tokenizer, max_length=48, batch_size=2)
    assert len(table) == 9 and sum(rows) == 9  # 3 prompts x (y_c, y_a, y_b), none scored twice
    keys = list(table)
    batch = encode_pairs(tokenizer, [k[0] for k in keys], [k[1] for k in keys], max_length=48)
    with torch.no_grad():
        want = sequence_logprobs_ref(policy, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    torch.testing.assert_close(torch.tensor([table[k] for k in keys]), want, rtol=1e-5, atol=1e-4)


def test_with_reference_leaves_rows_alone_without_a_table():
    from sipo_fast.training import with_reference

    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    assert with_reference(rows, None) is rows
    out = with_reference(rows, {("p", "a"): -1.0})
    assert out[0]["ref_chosen_logps"] == -1.0 and out[0]["ref_rejected_logps"] != out[0]["ref_rejected_logps"]  # NaN


PAIRS4 = [{"prompt": "Say hi.", "chosen": "Hello, nice to meet you!", "rejected": "Go away."},
          {"prompt": "What is 2+2?", "chosen": "4", "rejected": "It is five, obviously."},
          {"prompt": "Insult my neighbour.", "chosen": "I'd rather help you talk to them kindly.", "rejected": "Sure."},
          {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "I will not answer that."}]


def test_default_config_is_a_drop_in_for_trls_dpo_trainer(tokenizer, policy, tmp_path):
    """A TRL user's recipe with only the class names changed: the same string dataset gives the same tokens, the
    same logps/chosen and the same loss (FusedDPOConfig's prompt_template defaults to TRL's "none"; "chat" would
    re-template the prompts)."""
    ds = Dataset.from_list(PAIRS4)
    common = dict(COMMON, output_dir=str(tmp_path), per_device_train_batch_size=4)
    ref = _perturbed(policy)
    stock = DPOTrainer(copy.deepcopy(policy), copy.deepcopy(ref), DPOConfig(**common), train_dataset=ds,
                       processing_class=tokenizer)
    ours = FusedDPOTrainer(copy.deepcopy(policy), copy.deepcopy(ref), FusedDPOConfig(**common), train_dataset=ds,
                           processing_class=tokenizer)
    assert ours.args.prompt_template == "none"
    b_stock = stock.data_collator([stock.train_dataset[i] for i in range(4)])
    b_ours = ours.data_collator([ours.train_dataset[i] for i in range(4)])
    assert torch.equal(b_stock["input_ids"], b_ours["input_ids"])
    stock.model.train(), ours.model.train()
    with torch.no_grad():
        l_stock, l_ours = stock.compute_loss(stock.model, b_stock), ours.compute_loss(ours.model, b_ours)
    assert l_ours.item() == pytest.approx(l_stock.item(), rel=1e-4)
    for key in ("logps/chosen", "logps/rejected", "rewards/margins"):
        assert ours._metrics["train"][key][-1] == pytest.approx(stock._metrics["train"][key][-1], rel=1e-4, abs=1e-6)
    chat = FusedDPOTrainer(copy.deepcopy(policy), copy.deepcopy(ref), FusedDPOConfig(**common, prompt_template="chat"),
                           train_dataset=ds, processing_class=tokenizer)
    b_chat = chat.data_collator([chat.train_dataset[i] for i in range(4)])
    assert b_chat["input_ids"].shape[1] > b_stock["input_ids"].shape[1]  # the chat template is opt-in
