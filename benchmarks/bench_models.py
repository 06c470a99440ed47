"""Models: fastdl.models against the PyTorch reference they load their weights from.

So far the models with a torchvision reference: resnet18, resnet50 and mobilenet_v2 (fastdl's
model loads the torchvision model's state_dict). fastdl is the fastdl model, eager the torchvision
model, compile torch.compile of the torchvision model. "train" is one step: forward,
cross-entropy loss, backward and SGD (momentum 0.9); "infer" is an eval-mode forward under
no_grad. Inputs (N, 3, S, S) in channels_last, the fast layout of both on CPU and GPU.

    python -m pytest benchmarks/bench_models.py [--quick] [--device cuda]
"""
import pytest
import torch
import torchvision

import fastdl.models

MODELS = ("resnet18", "resnet50", "mobilenet_v2")


def case(model, N, size, dtype, mode):
    return dict(op="models", name=f"{model}-N{N}-{size}x{size}-{str(dtype)[6:]}-{mode}", model=model,
                shape=[N, 3, size, size], dtype=str(dtype)[6:], mode=mode, **{"pass": mode})


def cases(device, quick):
    if quick:
        return [case("resnet18", 8, 64, torch.float32, "train")]
    N, size = (8, 96) if device == "cpu" else (64, 224)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    return [case(m, N, size, dtype, mode) for m in MODELS for mode in ("train", "infer")]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cs = cases(metafunc.config.getoption("--device"), metafunc.config.getoption("--quick"))
        metafunc.parametrize("case", cs, ids=[c["name"] for c in cs])


def make_step(impl, case, device):
    dtype = getattr(torch, case["dtype"])
    torch.manual_seed(0)
    reference = getattr(torchvision.models, case["model"])(num_classes=100)
    model = reference
    if impl == "fastdl":
        model = getattr(fastdl.models, case["model"])(num_classes=100)
        model.load_state_dict(reference.state_dict())
    model = model.to(device, dtype, memory_format=torch.channels_last)
    call = torch.compile(model) if impl == "compile" else model
    x = torch.randn(case["shape"], device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (case["shape"][0],), device=device)
    if case["mode"] == "infer":
        model.eval()

        def step():
            with torch.no_grad():
                return call(x)
        return step
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(call(x).float(), y)
        loss.backward()
        opt.step()
    return step


@pytest.mark.parametrize("impl", ["fastdl", "eager", "compile"])
def test_models(case, impl, device, measure):
    if impl == "compile":
        torch._dynamo.reset()
    measure(make_step(impl, case, device), case, impl)
