"""The fastdl command line: info and check print their tables; bad arguments exit non-zero."""
import json

import pytest
import torch

from fastdl.__main__ import main


def test_info_table(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    rows = {tuple(line.split()[:4]) for line in out.splitlines()}
    assert ("batch_norm_act", "cpu", "float32", "cpp") in rows
    assert ("depthwise_conv2d", "cpu", "float32", "cpp") in rows
    assert "extension: fastdl._C loaded" in out
    import torch.distributed as dist

    assert ("torch.distributed: gloo" in out) == dist.is_gloo_available()


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["torch"] == torch.__version__ and info["ops"]


def test_check_passes_on_cpu(capsys):
    assert main(["check", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.rstrip().endswith("passed, 0 failed")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_check_cuda_without_gpu_says_so(capsys):
    assert main(["check", "--device", "cuda"]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as e:
        main(["bogus"])
    assert e.value.code == 2


def test_check_covers_every_model_and_catches_a_difference(monkeypatch):
    """fastdl check has an output row and a gradient row for every model of fastdl.models, all
    passing; a fastdl model that differs from its reference by 1e-9 fails both its rows."""
    from fastdl import check_models, models

    rows = list(check_models.check_models("cpu"))
    assert {case for _, case, *_ in rows} == set(check_models.MODELS) | set(check_models.TORCHVISION)
    assert all(ok for *_, ok, _ in rows) and len(rows) == 2 * len({case for _, case, *_ in rows})

    class Nudged(torch.nn.Module):  # the cnn, its output scaled by 1 + 1e-9
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x) * (1 + 1e-9)

        def load_state_dict(self, state):
            return self.model.load_state_dict(state)

    make = models.cnn
    monkeypatch.setattr(models, "cnn", lambda **kw: Nudged(make(**kw)))
    monkeypatch.setattr(check_models, "TORCHVISION", {})
    rows = [r for r in check_models.check_models("cpu") if r[1] == "cnn"]
    assert [ok for *_, ok, _ in rows] == [False, False]
