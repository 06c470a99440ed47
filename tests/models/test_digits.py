"""Training on real data that needs no download, scikit-learn's bundled 8x8 handwritten digits:
fastdl's models and their torch.nn twins (fastdl.reference.models) take the same steps (losses equal
step by step, in float64), and the fused model learns (held-out accuracy far above the 10% of chance)."""
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from fastdl import models
from fastdl.reference import models as reference
from fastdl.testing import assert_close


def digits():
    """(train x, train y, test x, test y): 1500 / 297 images (N, 1, 8, 8) in [0, 1], float64."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float64).unsqueeze(1) / 16
    y = torch.tensor(data.target)
    return x[:1500], y[:1500], x[1500:], y[1500:]


@pytest.mark.parametrize("name", ["mlp", "cnn-bn"])
def test_digits_training(name):
    torch.manual_seed(0)
    if name == "mlp":
        model, twin = models.mlp(in_features=64), reference.mlp(in_features=64)
    else:
        model, twin = models.cnn(batch_norm=True, image_size=8), reference.cnn(batch_norm=True, image_size=8)
    model, twin = model.double(), twin.double()
    twin.load_state_dict(model.state_dict())
    x, y, x_test, y_test = digits()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, twin)]
    first = last = None
    for epoch in range(2):
        for step, batch in enumerate(order.split(64)):
            losses = []
            for m, opt in zip((model, twin), opts):
                torch.manual_seed(1000 * epoch + step)  # the same dropout masks
                loss = nn.functional.cross_entropy(m(x[batch]), y[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.detach())
            assert_close(f"loss at epoch {epoch} step {step}", losses[0], losses[1], n=len(batch))
            first = losses[0] if first is None else first
            last = losses[0]
    assert last < first / 3
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).double().mean().item()
    print(f"{name}: loss {first.item():.3f} -> {last.item():.3f}, held-out accuracy {accuracy:.3f}")
    assert accuracy > 0.8, f"held-out accuracy {accuracy:.3f}"
