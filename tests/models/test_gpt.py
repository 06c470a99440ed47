"""fastdl.models.gpt against its twin fastdl.reference.models.gpt, built from torch.nn alone
(nn.MultiheadAttention with an explicit causal attn_mask) and holding the same state_dict: logits, loss
and every gradient in float64, in training (dropout 0) and eval mode; weight tying through state_dict
loading; and generate."""
import pytest
import torch
from torch import nn

from fastdl import models
from fastdl.reference import models as reference
from fastdl.testing import assert_close

CONFIG = dict(vocab_size=29, block_size=8, n_layer=2, n_head=3, n_embd=12)
N, T = 3, 7


def make_twins(bias=True):
    """(model, twin) in float64, the twin loading the model's state_dict (strict). LayerNorm
    parameters are randomised so their gradients are not those of the identity."""
    torch.manual_seed(0)
    model = models.gpt(**CONFIG, bias=bias).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                if m.bias is not None:
                    m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.MultiheadAttention) and m.in_proj_bias is not None:
                m.in_proj_bias.uniform_(-0.1, 0.1)
    twin = reference.gpt(**CONFIG, bias=bias).double()
    twin.load_state_dict(model.state_dict(), strict=True)
    return model, twin


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, CONFIG["vocab_size"], (N, T), generator=g)
    targets = torch.randint(0, CONFIG["vocab_size"], (N, T), generator=g)
    targets[0, 2] = -1  # ignored
    return idx, targets


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_twin(bias, mode):
    """Logits, loss, and the gradient of loss + <logits, dout> for every parameter, by name."""
    model, twin = make_twins(bias)
    assert model.state_dict().keys() == twin.state_dict().keys()
    idx, targets = batch()
    dout = torch.randn(N, T, CONFIG["vocab_size"], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    results = []
    for m in (model, twin):
        m.train(mode == "train")
        logits, loss = m(idx, targets)
        names, params = zip(*m.named_parameters())
        grads = torch.autograd.grad(loss + (logits * dout).sum(), params)
        results.append((logits, loss, dict(zip(names, grads))))
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = results
    assert_close("logits", logits, ref_logits, n=CONFIG["n_embd"])
    assert_close("loss", loss, ref_loss, n=N * T)
    assert grads.keys() == ref_grads.keys() and "transformer.wte.weight" in grads
    assert "lm_head.weight" not in grads  # tied: one parameter, its gradient from both uses
    for name in ref_grads:
        assert_close(f"grad of {name}", grads[name], ref_grads[name], n=N * T * 4 * CONFIG["n_embd"])
    if mode == "eval":
        with torch.no_grad():
            assert_close("no_grad logits", model(idx)[0], twin(idx)[0], n=CONFIG["n_embd"])
    assert model(idx)[1] is None


def test_weight_tying_survives_load():
    """Both keys are in the state_dict; loading another model's keeps lm_head and wte one tensor."""
    model, _ = make_twins()
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    torch.manual_seed(5)
    fresh = models.gpt(**CONFIG).double()
    fresh.load_state_dict(state, strict=True)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert torch.equal(fresh.lm_head.weight, model.transformer.wte.weight)
    with torch.no_grad():
        fresh.transformer.wte.weight[0, 0] += 1
    assert fresh.lm_head.weight[0, 0] == fresh.transformer.wte.weight[0, 0]


def test_generate_is_deterministic_under_a_seed():
    model, _ = make_twins()
    model.eval()
    idx = batch()[0][:, :3]
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(model.generate(idx, 10, temperature=0.8, top_k=5))
    assert outs[0].shape == (N, 13) and outs[0].dtype == torch.int64
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0][:, :3], idx)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(model.generate(idx, 10, 0.8, 5, generator=torch.Generator().manual_seed(7)),
                       model.generate(idx, 10, 0.8, 5, generator=g))
    assert not model.training and not outs[0].requires_grad


def test_greedy_generate_is_the_twins_argmax():
    """top_k=1 picks the argmax of the twin's last logits at every step, the context cropped to
    block_size once it grows past it (3 + 9 tokens > block_size 8)."""
    model, twin = make_twins()
    model.eval(), twin.eval()
    idx = batch()[0][:, :3]
    out = model.generate(idx, 9, top_k=1)
    assert out.shape == (N, 12)
    with torch.no_grad():
        for t in range(3, 12):
            context = out[:, max(0, t - CONFIG["block_size"]):t]
            assert torch.equal(out[:, t], twin(context)[0][:, -1].argmax(-1)), f"token {t}"


def test_rejects_long_context():
    model = models.gpt(**CONFIG)
    with pytest.raises(ValueError, match="block_size=8"):
        model(torch.zeros(1, 9, dtype=torch.int64))
