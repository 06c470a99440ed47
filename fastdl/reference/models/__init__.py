"""The models built from torch.nn alone (or torchvision's), one file per model as in fastdl/models:
the ground truth that each model of fastdl.models is tested against.

Each constructor takes exactly the arguments of fastdl.models' constructor of the same name and returns
a model with the same state_dict keys, so one state_dict loads into both (strict). resnet18/34/50 and
mobilenet_v2 are torchvision's models; torchvision, a development dependency only, is imported when
they are called.
"""
from fastdl.reference.models.attention import attention
from fastdl.reference.models.cnn import cnn
from fastdl.reference.models.diffusion import diffusion
from fastdl.reference.models.gan import gan, train_step
from fastdl.reference.models.gpt import gpt
from fastdl.reference.models.lstm import lstm
from fastdl.reference.models.mlp import mlp
from fastdl.reference.models.mobilenet import mobilenet_v1, mobilenet_v2
from fastdl.reference.models.resnet import resnet18, resnet34, resnet50
from fastdl.reference.models.rnn import rnn
from fastdl.reference.models.transformer import transformer
