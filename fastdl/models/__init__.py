"""The models, built from fastdl's fused modules: one file per model."""
from fastdl.models.mobilenet import mobilenet_v1, mobilenet_v2
from fastdl.models.resnet import resnet18, resnet34, resnet50
from fastdl.models.mlp import MLP, MLPConfig, mlp
from fastdl.models.cnn import CNN, CNNConfig, cnn
from fastdl.models.rnn import RNNClassifier, RNNConfig, rnn
from fastdl.models.lstm import LSTMConfig, LSTMForecaster, lstm
from fastdl.models.transformer import TransformerClassifier, TransformerConfig, transformer
from fastdl.models.attention import AttentionClassifier, AttentionConfig, attention
from fastdl.models.gpt import GPT, GPTConfig, gpt
from fastdl.models.diffusion import DDPM, DiffusionConfig, diffusion
from fastdl.models.gan import Discriminator, GANConfig, Generator, gan, train_step
