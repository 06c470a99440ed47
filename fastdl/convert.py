"""fastdl.convert: swap a model's torch.nn modules for fastdl's, and fuse BN -> (add ->) ReLU.

    model = fastdl.convert(torchvision.models.resnet18(), inplace=False)
    model, report = fastdl.convert(model, report=True); print(report)

Two passes, weights preserved (the new modules share the converted model's parameters and
buffers, so with inplace=False the original is deep-copied first):
1. Fusion, module by module (children before parents). torch.fx traces one module's forward with
   its children as leaves; in that graph a BatchNorm2d child whose only use feeds an activation
   (ReLU, ReLU6, LeakyReLU; module, function or method), or an add whose result feeds one, becomes
   one FusedBatchNorm2d computing act(BN(x) + residual), and the module's forward becomes the
   rewritten graph's. Every module keeps its class, attributes and other methods (a DDPM still
   samples, a GPT still generates) and its state_dict keys. A module whose forward torch.fx cannot
   trace (data-dependent control flow, ...) is left as it is, and the report says why when it has
   a BatchNorm2d child.
2. Swaps, by module type: MultiheadAttention, TransformerEncoderLayer, LSTM / GRU / RNN and their
   cells, depthwise Conv2d (groups == in_channels) and any remaining BatchNorm2d.
"""
import copy
import operator
import types
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from fastdl.nn import (DepthwiseConv2d, FusedAttention, FusedBatchNorm2d, FusedGRU, FusedGRUCell, FusedLSTM,
                       FusedLSTMCell, FusedRNN, FusedRNNCell, FusedTransformerEncoderLayer)

_FASTDL_MODULES = (DepthwiseConv2d, FusedAttention, FusedBatchNorm2d, FusedGRU, FusedGRUCell, FusedLSTM,
                   FusedLSTMCell, FusedRNN, FusedRNNCell, FusedTransformerEncoderLayer)


@dataclass
class Report:
    """What convert changed: swapped modules (name, from, to), fused patterns (name, pattern),
    modules left alone (name, why), the modules with a BatchNorm2d child whose forward could
    not be traced (name, error): nothing in them was fused, and (sync_bn=True) the names of the
    FusedBatchNorm2d set to synchronize."""
    swapped: list = field(default_factory=list)
    fused: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    untraced: list = field(default_factory=list)
    synchronized: list = field(default_factory=list)

    def __str__(self):
        lines = [f"fastdl.convert: {len(self.swapped)} modules swapped, {len(self.fused)} patterns fused"
                 + (f", {len(self.synchronized)} batch norms synchronized" if self.synchronized else "")]
        lines += [f"  swapped {name}: {a} -> {b}" for name, a, b in self.swapped]
        lines += [f"  fused   {name}: {pattern}" for name, pattern in self.fused]
        lines += [f"  kept    {name}: {why}" for name, why in self.skipped]
        lines += [f"  not traced (no fusion in it) {name or '(the model)'}: {why}" for name, why in self.untraced]
        return "\n".join(lines)


def _swap_for(m):
    """(the fastdl module replacing m, sharing its parameters) or (None, why not) or (None, None)."""
    if isinstance(m, _FASTDL_MODULES):
        return None, None
    if isinstance(m, nn.MultiheadAttention):
        return FusedAttention.from_module(m), None
    if isinstance(m, nn.TransformerEncoderLayer):
        return FusedTransformerEncoderLayer.from_module(m), None
    if isinstance(m, nn.LSTM):
        if m.proj_size:
            return None, "proj_size > 0 is not implemented by FusedLSTM"
        return FusedLSTM.from_module(m), None
    for ref, fused in ((nn.GRU, FusedGRU), (nn.RNN, FusedRNN), (nn.LSTMCell, FusedLSTMCell),
                       (nn.GRUCell, FusedGRUCell), (nn.RNNCell, FusedRNNCell)):
        if isinstance(m, ref):
            return fused.from_module(m), None
    if isinstance(m, nn.Conv2d) and m.groups == m.in_channels and m.in_channels > 1:
        if m.out_channels % m.in_channels:
            return None, "groups == in_channels but out_channels is not a multiple of it"
        return DepthwiseConv2d.from_module(m), None
    if isinstance(m, nn.BatchNorm2d):
        return FusedBatchNorm2d.from_module(m), None
    if isinstance(m, nn.SyncBatchNorm):
        return None, ("nn.SyncBatchNorm (of inputs of any rank) is kept: convert the model's BatchNorm2d "
                      "with sync_bn=True instead")
    return None, None


def _swap_modules(module, report, prefix=""):
    for name, child in module.named_children():
        qualified = f"{prefix}{name}"
        new, why = _swap_for(child)
        if new is not None:
            setattr(module, name, new)
            report.swapped.append((qualified, type(child).__name__, type(new).__name__))
        else:
            if why:
                report.skipped.append((qualified, why))
            if not isinstance(child, _FASTDL_MODULES):
                _swap_modules(child, report, qualified + ".")


class _ChildrenAsLeaves(torch.fx.Tracer):
    """Traces one module's own forward: every submodule call is a leaf (a call_module node)."""

    def is_leaf_module(self, m, qualname):
        return qualname != ""


def _activation_of(node, modules):
    """(activation, negative_slope) when node applies a ReLU, ReLU6 or LeakyReLU to its first
    argument (module, function or method), else None."""
    if node.op == "call_module":
        m = modules[node.target]
        if type(m) is nn.ReLU:
            return "relu", 0.01
        if type(m) is nn.ReLU6:
            return "relu6", 0.01
        if type(m) is nn.LeakyReLU:
            return "leaky_relu", m.negative_slope
        return None
    if node.op == "call_function" and node.target in (torch.relu, torch.nn.functional.relu, torch.relu_):
        return "relu", 0.01
    if node.op == "call_function" and node.target is torch.nn.functional.relu6:
        return "relu6", 0.01
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu", 0.01
    return None


def _single_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _residual_of(add, bn_node):
    """The other operand when `add` is bn_node + other (or other + bn_node), else None."""
    is_add = ((add.op == "call_function" and add.target in (operator.add, operator.iadd, torch.add))
              or (add.op == "call_method" and add.target in ("add", "add_")))
    if not is_add or add.kwargs or len(add.args) != 2:
        return None
    a, b = add.args
    other = b if a is bn_node else a if b is bn_node else None
    return other if isinstance(other, torch.fx.Node) and other is not bn_node else None


def _fuse_graph(gm, modules, report, prefix):
    """Rewrites gm's graph, fusing each BN -> (add ->) act of modules (gm's submodules by name) into a
    FusedBatchNorm2d set on gm; returns how many were fused."""
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(modules.get(node.target)) is not nn.BatchNorm2d:
            continue
        user = _single_user(node)
        residual = _residual_of(user, node) if user is not None else None
        act_node = _single_user(user) if residual is not None else user
        act = _activation_of(act_node, modules) if act_node is not None else None
        if act is None or act_node.args[0] is not (user if residual is not None else node):
            continue
        parent, _, leaf = node.target.rpartition(".")
        setattr(gm.get_submodule(parent), leaf,
                FusedBatchNorm2d.from_module(modules[node.target], activation=act[0], negative_slope=act[1]))
        if residual is not None:  # the residual may be computed after the BN (a downsample branch)
            node.args = (node.args[0], residual)
            user.prepend(node)
        act_node.replace_all_uses_with(node)
        gm.graph.erase_node(act_node)
        if residual is not None:
            gm.graph.erase_node(user)
        report.fused.append((prefix + node.target, f"BatchNorm2d{' -> add' if residual is not None else ''} -> {act[0]}"))
        fused += 1
    return fused


def _fuse(module, report, prefix=""):
    """Fuses inside module's children (depth first), then in module's own forward: when torch.fx
    traces it and a pattern is found, the rewritten graph becomes this instance's forward (the
    modules it calls are module's own, so its class, attributes and methods stay)."""
    for name, child in module.named_children():
        if not isinstance(child, _FASTDL_MODULES):
            _fuse(child, report, f"{prefix}{name}.")
    modules = dict(module.named_modules())
    if not any(type(m) is nn.BatchNorm2d for m in modules.values()):
        return
    try:
        graph = _ChildrenAsLeaves().trace(module)
    except Exception as e:  # any Python the tracer cannot follow: data-dependent control flow, ...
        if any(type(c) is nn.BatchNorm2d for c in module.children()):
            report.untraced.append((prefix[:-1], f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
        return
    gm = torch.fx.GraphModule(module, graph)
    if not _fuse_graph(gm, modules, report, prefix):
        return
    gm.graph.lint()
    gm.recompile()
    for node in gm.graph.nodes:  # the new FusedBatchNorm2d modules, set on module itself
        if node.op == "call_module":
            parent, _, leaf = node.target.rpartition(".")
            new = gm.get_submodule(node.target)
            if new is not module.get_submodule(node.target):
                setattr(module.get_submodule(parent), leaf, new)
        elif node.op == "get_attr" and not hasattr(module, node.target):  # constants made by the tracer
            setattr(module, node.target, getattr(gm, node.target))
    module.forward = types.MethodType(type(gm).forward, module)


def convert(model: nn.Module, inplace: bool = False, *, fuse: bool = True, report: bool = False,
            sync_bn: bool = False, process_group=None):
    """The model with torch.nn modules swapped for fastdl's and (fuse=True) BN -> ReLU and
    BN -> add -> ReLU fused into FusedBatchNorm2d in every module whose forward torch.fx can trace.
    sync_bn=True: every FusedBatchNorm2d then synchronizes its batch statistics across
    process_group (default: torch.distributed's world; torch.distributed must be initialized), as
    nn.SyncBatchNorm.convert_sync_batchnorm does. The model keeps its class; inplace=False works on a
    deep copy. Returns the model, or (model, Report) with report=True."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if sync_bn and process_group is None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError("sync_bn=True: torch.distributed is not initialized; call "
                               "torch.distributed.init_process_group first, or pass process_group")
        process_group = torch.distributed.group.WORLD
    rep = Report()
    if not inplace:
        model = copy.deepcopy(model)
    if fuse:
        _fuse(model, rep)
    _swap_modules(model, rep)
    if sync_bn:
        for name, m in model.named_modules():
            if isinstance(m, FusedBatchNorm2d):
                m.process_group = process_group
                rep.synchronized.append(name)
    return (model, rep) if report else model
