"""FusedLSTM / FusedGRU / FusedRNN and FusedLSTMCell / FusedGRUCell / FusedRNNCell: drop-ins for
torch.nn's recurrent layers and cells, on fastdl's rnn op (fastdl/ops/rnn.py).

The layers subclass nn.RNNBase and the cells the nn cell they replace: the same constructor, parameter names
(weight_ih_l{k}[_reverse], weight_hh_l{k}, bias_ih_l{k}, bias_hh_l{k}; the cells' weight_ih,
weight_hh, bias_ih, bias_hh), initialisation and state_dict (loadable both ways), and the same
forward signature and outputs, PackedSequence in -> PackedSequence out and unbatched inputs included.
The layers are not nn.LSTM / nn.GRU / nn.RNN instances on purpose: torch.compile refuses to trace
those (torch._dynamo.config.allow_rnn), and traces these with fullgraph=True.
Not implemented (NotImplementedError naming them): LSTM's proj_size > 0 and double backward.
"""
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from fastdl._tensor import autocast_dtype, cast_all, same_device
from fastdl.nn._share import share_parameters
from fastdl.ops import rnn as _rnn

_MODES = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}


_LAYER_NAMES: dict = {}


def _layer_names(num_layers, bidirectional, bias):
    """Per layer and direction, the names of (w_ih, w_hh[, b_ih, b_hh]) in nn.RNNBase's scheme
    (made once per configuration; a dict, which torch.compile traces through)."""
    key = (num_layers, bidirectional, bias)
    names = _LAYER_NAMES.get(key)
    if names is None:
        kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")[:4 if bias else 2]
        names = _LAYER_NAMES[key] = tuple(
            tuple(f"{k}_l{layer}{suffix}" for k in kinds)
            for layer in range(num_layers) for suffix in ("", "_reverse")[:2 if bidirectional else 1])
    return names


def _parameters(module, names):
    """module's parameters of these names. Read from module._parameters, a dict lookup where
    nn.Module.__getattr__ costs about 2 us a name at small shapes; through getattr when a name is
    not there (a parametrization or weight_norm replaced it)."""
    p = module._parameters
    try:
        return tuple(p[n] for n in names)
    except KeyError:
        return tuple(getattr(module, n) for n in names)


def _check_state(name, t, shape, like):
    """t of `shape`, like's dtype and device, or a ValueError / TypeError naming `name`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name}: expected dtype {like.dtype} (input's), got {t.dtype}")
    if not same_device(t, like):
        raise ValueError(f"{name}: expected device {like.device} (input's), got {t.device}")


def _check_input(x, p, input_size, dims):
    """x: a floating tensor of `dims` dims ending in input_size, of parameter p's dtype and device."""
    if not isinstance(x, torch.Tensor) or x.dim() not in dims:
        got = f"{x.dim()}-D" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"input: expected {' or '.join(f'{d}-D' for d in dims)}, got {got}")
    if x.shape[-1] != input_size:
        raise ValueError(f"input: expected size {input_size} (input_size) in its last dim, got {x.shape[-1]}")
    if x.dtype != p.dtype:
        raise TypeError(f"input: expected dtype {p.dtype} (the module's parameters'), got {x.dtype}")
    if not same_device(x, p):
        raise ValueError(f"input: expected device {p.device} (the module's parameters'), got {x.device}")


class _FusedRNNBase:
    """forward, from_module and flatten_parameters shared by FusedLSTM, FusedGRU and FusedRNN."""

    @classmethod
    def from_module(cls, m: nn.RNNBase):
        """The fastdl module with m's configuration and parameters (shared, not copied)."""
        p = m.weight_ih_l0
        kwargs = dict(num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first, dropout=m.dropout,
                      bidirectional=m.bidirectional, device=p.device, dtype=p.dtype)
        if m.mode.startswith("RNN_"):
            kwargs["nonlinearity"] = m.nonlinearity
        if m.mode == "LSTM":
            kwargs["proj_size"] = m.proj_size
        out = cls(m.input_size, m.hidden_size, **kwargs)
        share_parameters(out, m)
        return out.train(m.training)

    def flatten_parameters(self):
        """Does nothing: fastdl's kernels read each weight where it is (nn's cuDNN flattening is not needed)."""

    def _weights(self):
        """Per layer and direction: (w_ih, w_hh, b_ih, b_hh), biases None without bias."""
        return [_parameters(self, names) + ((None, None) if len(names) == 2 else ())
                for names in _layer_names(self.num_layers, self.bidirectional, self.bias)]

    def forward(self, input, hx=None):
        """input: (T, N, input_size) ((N, T, input_size) if batch_first), (T, input_size) unbatched, or
        a PackedSequence; hx: (num_layers * D, N, hidden_size) (a pair (h_0, c_0) for FusedLSTM), or
        None for zeros. Returns (output, h_n) (output, (h_n, c_n) for FusedLSTM), shaped as nn's."""
        lstm = self.mode == "LSTM"
        weights = self._weights()
        packed = isinstance(input, PackedSequence)
        if packed:
            x, batch_sizes, sorted_indices, unsorted_indices = input
            _check_input(x, weights[0][0], self.input_size, (2,))
            batched, N = True, int(batch_sizes[0])
        else:
            _check_input(input, weights[0][0], self.input_size, (2, 3))
            batch_sizes = sorted_indices = unsorted_indices = None
            batched = input.dim() == 3
            x = input.unsqueeze(1) if not batched else input.transpose(0, 1) if self.batch_first else input
            N = x.shape[1]
        D = 2 if self.bidirectional else 1
        shape = (self.num_layers * D, N, self.hidden_size) if batched else (self.num_layers * D, self.hidden_size)
        states = self._initial_states(hx, shape, x, lstm)
        if not batched:
            states = [s.unsqueeze(1) for s in states]
        if sorted_indices is not None:
            states = [s.index_select(1, sorted_indices) for s in states]
        out, h_n, c_n = _rnn.rnn(_MODES[self.mode], x, batch_sizes, states[0], states[1] if lstm else None,
                                 weights, self.num_layers, self.bidirectional, self.dropout, self.training)
        states = [h_n, c_n] if lstm else [h_n]
        if packed:
            out = PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices)
            if unsorted_indices is not None:
                states = [s.index_select(1, unsorted_indices) for s in states]
        elif not batched:
            out, states = out.squeeze(1), [s.squeeze(1) for s in states]
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, (tuple(states) if lstm else states[0])

    def _initial_states(self, hx, shape, x, lstm):
        """[h_0] or [h_0, c_0] of `shape`, zeros when hx is None, checked against x."""
        if hx is None:
            zeros = x.new_zeros(shape)
            return [zeros, zeros] if lstm else [zeros]
        if lstm:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"hx: expected a pair (h_0, c_0) for {type(self).__name__}, got {type(hx).__name__}")
            names = ("hx[0] (h_0)", "hx[1] (c_0)")
        else:
            hx, names = (hx,), ("hx",)
        for name, t in zip(names, hx):
            _check_state(name, t, shape, x)
        return list(hx)


class FusedLSTM(_FusedRNNBase, nn.RNNBase):
    """Drop-in for nn.LSTM (gates i, f, g, o): per layer, one GEMM for the input projections of all
    steps, then per step the recurrent GEMM and one fused pointwise kernel, the time loop and
    backpropagation through time in C++. proj_size > 0 raises NotImplementedError."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None):
        if proj_size:
            raise NotImplementedError(f"proj_size: FusedLSTM does not implement projections (got proj_size="
                                      f"{proj_size}); use torch.nn.LSTM")
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype)


class FusedGRU(_FusedRNNBase, nn.RNNBase):
    """Drop-in for nn.GRU (gates r, z, n; n = tanh(W_in x + b_in + r * (W_hn h + b_hn)))."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, device=None, dtype=None):
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype)


class FusedRNN(_FusedRNNBase, nn.RNNBase):
    """Drop-in for nn.RNN (Elman, nonlinearity 'tanh' or 'relu')."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__("RNN_" + nonlinearity.upper(), input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, device=device, dtype=dtype)


class _FusedCellBase:
    """forward and from_module shared by the cells: one step of the layer op (T = 1)."""

    @classmethod
    def from_module(cls, m: nn.RNNCellBase):
        """The fastdl cell with m's configuration and parameters (shared, not copied)."""
        p = m.weight_ih
        kwargs = dict(bias=m.bias, device=p.device, dtype=p.dtype)
        if isinstance(m, nn.RNNCell):
            kwargs["nonlinearity"] = m.nonlinearity
        out = cls(m.input_size, m.hidden_size, **kwargs)
        share_parameters(out, m)
        return out.train(m.training)

    def _step(self, mode, input, hx):
        """(h', c' or None) for input (N, input_size) or (input_size,) and hx as nn's cells take it."""
        lstm = mode == "lstm"
        if lstm and hx is not None and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError(f"hx: expected a pair (h, c) for {type(self).__name__}, got {type(hx).__name__}")
        h0, c0 = (None, None) if hx is None else hx if lstm else (hx, None)
        p = self._parameters  # see _parameters; spelt out: a generator costs microseconds here
        try:
            w_ih, w_hh, b_ih, b_hh = p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"]
        except KeyError:
            w_ih, w_hh, b_ih, b_hh = self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh
        if (isinstance(input, torch.Tensor) and (h0 is None or isinstance(h0, torch.Tensor))
                and (c0 is None or isinstance(c0, torch.Tensor)) and _rnn.cell_is_fused(input)):
            return _rnn.cell(input, h0, c0, w_ih, w_hh, b_ih, b_hh, mode)
        # Under autocast, or without a kernel for input's device and dtype: the checks here, then the
        # projection and the step as the layers run them.
        _check_input(input, w_ih, self.input_size, (1, 2))
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if hx is None:
            h0 = x.new_zeros(x.shape[0], self.hidden_size)
            c0 = h0 if lstm else None
        else:
            shape = (x.shape[0], self.hidden_size) if batched else (self.hidden_size,)
            for name, t in zip(("hx[0] (h)", "hx[1] (c)") if lstm else ("hx",), (h0, c0)):
                _check_state(name, t, shape, x)
            if not batched:
                h0, c0 = h0.unsqueeze(0), c0.unsqueeze(0) if lstm else None
        if _rnn.autocast_runs_low(mode, x.device.type, cell=True):
            x, h0, c0, w_ih, w_hh, b_ih, b_hh = cast_all(autocast_dtype(x.device.type), x, h0, c0, w_ih, w_hh, b_ih,
                                                         b_hh)
        _, h, c = _rnn.scan(_rnn.project(x, w_ih, b_ih).unsqueeze(0), None, h0, c0, w_hh, b_hh, mode, False)
        return (h, c) if batched else (h.squeeze(0), None if c is None else c.squeeze(0))


class FusedLSTMCell(_FusedCellBase, nn.LSTMCell):
    """Drop-in for nn.LSTMCell: forward(input, hx=None) -> (h', c'); one input GEMM, then the
    recurrent GEMM and one fused pointwise kernel (backward: one fused pointwise kernel)."""

    def forward(self, input, hx=None):
        return self._step("lstm", input, hx)


class FusedGRUCell(_FusedCellBase, nn.GRUCell):
    """Drop-in for nn.GRUCell: forward(input, hx=None) -> h'."""

    def forward(self, input, hx=None):
        return self._step("gru", input, hx)[0]


class FusedRNNCell(_FusedCellBase, nn.RNNCell):
    """Drop-in for nn.RNNCell (nonlinearity 'tanh' or 'relu'): forward(input, hx=None) -> h'."""

    def forward(self, input, hx=None):
        return self._step("rnn_" + self.nonlinearity, input, hx)[0]
