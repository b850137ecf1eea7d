"""The optimizer's parameter groups: decay on matrices only, one group when there is no decay."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megaslm.train.build import param_groups


def _model():
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


def test_decay_on_matrices_only():
    model = _model()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert {id(p) for p in decay["params"] + no_decay["params"]} == {id(p) for p in model.parameters()}
    assert no_decay["params"]  # the RMSNorm weights


def test_no_decay_is_one_group_with_the_same_update():
    """weight_decay 0: one group (DeepSpeed steps, gathers and norms each group on its own), and AdamW takes
    exactly the step the two groups would."""
    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    (group,) = param_groups(a, 0.0)
    assert group["weight_decay"] == 0.0 and len(group["params"]) == len(list(a.parameters()))
    groups_b = [{"params": [p for p in b.parameters() if p.dim() >= 2], "weight_decay": 0.0},
                {"params": [p for p in b.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    ids = torch.randint(0, 64, (2, 8))
    for model, groups in ((a, [group]), (b, groups_b)):
        opt = torch.optim.AdamW(groups, lr=1e-2)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


def test_resume_across_zero_weight_decay_is_named_as_another_configuration(tmp_path):
    """A checkpoint's optimizer state holds its parameter groups: crossing weight_decay 0 cannot load it, and the
    refusal says why, as another configuration's checkpoint (not as damage)."""
    from megaslm.train.config_change import group_layout_change

    (tmp_path / "config.yaml").write_text("train:\n  weight_decay: 0.1\n")
    why = group_layout_change(tmp_path, {"train": {"weight_decay": 0.0}})
    assert "2 parameter group(s) (train.weight_decay 0.1), this run's 1 (train.weight_decay 0.0" in why
    assert group_layout_change(tmp_path, {"train": {"weight_decay": 0.05}}) is None  # two groups either way
    assert group_layout_change(tmp_path / "missing", {"train": {"weight_decay": 0.0}}) is None


def test_resume_changes_sorts_changeable_from_fixed_keys():
    from megaslm.train.config_change import resume_changes

    old = {"run": {"dir": "a"}, "train": {"lr": 0.001, "seq_len": 32, "steps": 10},
           "data": {"train": "d", "valid": {"x": "v"}}, "slm": {"ratio": 0.6}}
    new = {"run": {"dir": "b"}, "train": {"lr": 0.003, "seq_len": 64, "steps": 20, "new_key": 1},
           "data": {"train": "e", "valid": {"x": "w"}}, "slm": {"ratio": 0.6}}
    changed, fixed = resume_changes(old, new)
    assert changed == ["data.valid {'x': 'v'} -> {'x': 'w'}", "train.lr 0.001 -> 0.003", "train.steps 10 -> 20"]
    assert fixed == ["data.train d -> e", "train.seq_len 32 -> 64"]
