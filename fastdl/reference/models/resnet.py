"""Reference ResNets: torchvision's ResNet-18/34/50, the ground truth for fastdl.models.resnet18/34/50
(the same module names and state_dict).

torchvision is a development dependency of fastdl, not a runtime one: each constructor imports it
when called.
"""
from fastdl.models.resnet import ResNetConfig


def resnet(config: ResNetConfig):
    """torchvision.models.ResNet of a ResNetConfig: forward(x) (N, 3, H, W) -> logits (N, num_classes)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    block = {"basic": BasicBlock, "bottleneck": Bottleneck}[config.block]
    return ResNet(block, list(config.layers), config.num_classes, config.zero_init_residual)


def resnet18(num_classes=1000, **kwargs):
    """torchvision's ResNet-18; keyword arguments are ResNetConfig's fields. Needs torchvision."""
    return resnet(ResNetConfig("basic", (2, 2, 2, 2), num_classes, **kwargs))


def resnet34(num_classes=1000, **kwargs):
    """torchvision's ResNet-34; keyword arguments are ResNetConfig's fields. Needs torchvision."""
    return resnet(ResNetConfig("basic", (3, 4, 6, 3), num_classes, **kwargs))


def resnet50(num_classes=1000, **kwargs):
    """torchvision's ResNet-50; keyword arguments are ResNetConfig's fields. Needs torchvision."""
    return resnet(ResNetConfig("bottleneck", (3, 4, 6, 3), num_classes, **kwargs))
