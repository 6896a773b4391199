"""Word-level recurrent language models: one config, a zoo of cells, one model class.

Cells (``ModelConfig.cell``), on input x_t, previous state (h, c) and σ the logistic sigmoid:

``rnn`` (Elman)::
    h' = tanh(W x + b_W + R h + b_R)

``lstm`` (Hochreiter & Schmidhuber, with the forget gate of Gers et al.)::
    i = σ(W_i x + R_i h + b_i)   f = σ(W_f x + R_f h + b_f)
    g = tanh(W_g x + R_g h + b_g)   o = σ(W_o x + R_o h + b_o)
    c' = f ⊙ c + i ⊙ g            h' = o ⊙ tanh(c')

``peephole`` (Gers & Schmidhuber 2000): the gates also see the cell state::
    i = σ(W_i x + R_i h + p_i ⊙ c + b_i)   f = σ(W_f x + R_f h + p_f ⊙ c + b_f)
    c' = f ⊙ c + i ⊙ g                      o = σ(W_o x + R_o h + p_o ⊙ c' + b_o)

``cifg`` (coupled input-forget gate, Greff et al. 2017): the forget gate is tied to the input
gate, f = 1 − i, and has no weights of its own.

``gru`` (Cho et al. 2014, the form PyTorch and ONNX ``linear_before_reset=1`` compute)::
    r = σ(W_r x + b_Wr + R_r h + b_Rr)   z = σ(W_z x + b_Wz + R_z h + b_Rz)
    n = tanh(W_n x + b_Wn + r ⊙ (R_n h + b_Rn))   h' = (1 − z) ⊙ n + z ⊙ h

``highway`` (stacked LSTM with highway connections across depth, after Srivastava et al. 2015):
each layer l runs an LSTM over its input x_l and emits, per time step::
    t = σ(T_x x_l + T_h h_l + b_t)      y_l = t ⊙ h_l + (1 − t) ⊙ C x_l
so a layer may carry its input past itself (C is the identity when sizes match).

Zoneout (Krueger et al. 2016, ``ModelConfig.zoneout`` = p, for lstm/peephole/cifg/gru): each
state unit keeps its previous value with probability p during training,
``s' = d ⊙ s + (1 − d) ⊙ s̃`` with d ~ Bernoulli(p); at inference the expectation
``s' = p s + (1 − p) s̃``. Applied to h (and c for the LSTM family).

Regularisation (training only; evaluation and the exported graphs compute none of it):

* ``dropout_embedding`` / ``dropout`` / ``dropout_output``: dropout on the layer-0 input, between
  recurrent layers, and on the decoder input. With ``locked_dropout`` each is *variational*
  (Gal & Ghahramani 2016): one mask per sequence of the batch, shared by every time step.
* ``dropout_words`` (embedding dropout, Gal & Ghahramani 2016): whole words are dropped, i.e. one
  Bernoulli draw per vocabulary entry per batch; a dropped word's embedding is zero at every
  position where it occurs, the others are scaled by 1/(1 − p).
* ``weight_drop`` (DropConnect on the recurrent weights, Merity et al. 2017): dropout on the
  hidden-to-hidden matrices ``weight_hh`` (R above), one mask per batch (forward call) shared by
  every time step. It applies to every cell: the fused ``nn.LSTM``/``nn.GRU``/``nn.RNN`` layers
  (plain cells and highway) are then run one layer at a time through ``torch.lstm``/``torch.gru``/
  ``torch.rnn_tanh`` with the dropped matrix, still fused. Not dropped: peephole vectors (they are
  diagonal, per unit, not a hidden-to-hidden matrix) and the highway gate ``T_h`` (it reads the
  layer's output, not the recurrence).

AR/TAR (activation and temporal activation regularisation) and weight averaging are losses and
optimiser state, not model structure: see ``training/train.py``.

All parameters keep PyTorch's ``nn.LSTM``/``nn.GRU`` names and gate order (i, f, g, o / r, z, n)
so that export has one layout to read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CELLS = ("rnn", "lstm", "peephole", "cifg", "gru", "highway")
ZONEOUT_CELLS = ("lstm", "peephole", "cifg", "gru")
State = tuple[Tensor, ...]


@dataclass
class ModelConfig:
    vocab_size: int
    cell: str = "lstm"
    embedding_size: int = 400
    hidden_size: int = 400
    num_layers: int = 2
    dropout_embedding: float = 0.1
    dropout: float = 0.3  # between layers
    dropout_output: float = 0.4
    tied: bool = True
    zoneout: float = 0.0
    locked_dropout: bool = False  # one dropout mask per sequence, shared across time steps
    dropout_words: float = 0.0  # embedding dropout: drop whole words (vocabulary rows)
    weight_drop: float = 0.0  # DropConnect on hidden-to-hidden weights

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; choose from {', '.join(CELLS)}")
        if self.zoneout and self.cell not in ZONEOUT_CELLS:
            raise ValueError(f"zoneout works with {', '.join(ZONEOUT_CELLS)}, not {self.cell!r}")
        if not 0.0 <= self.zoneout < 1.0:
            raise ValueError("zoneout must be in [0, 1)")
        if self.num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        for name in ("dropout_embedding", "dropout", "dropout_output", "dropout_words", "weight_drop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1)")

    @property
    def state_names(self) -> list[str]:
        return ["h"] if self.cell in ("rnn", "gru") else ["h", "c"]

    @property
    def gates(self) -> int:
        return {"rnn": 1, "gru": 3, "cifg": 3}.get(self.cell, 4)

    def to_dict(self) -> dict:
        return asdict(self)


def sequence_dropout(x: Tensor, p: float, training: bool, locked: bool) -> Tensor:
    """Dropout on ``[B, T, D]``; ``locked``: one mask per sequence, the same at every time step."""
    if not training or not p:
        return x
    if not locked:
        return F.dropout(x, p, True)
    mask = x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1 - p) / (1 - p)
    return x * mask


def word_dropout_scale(tokens: Tensor, vocab_size: int, p: float) -> Tensor:
    """``[B, T, 1]`` factors: 0 where the word was drawn for dropping (the same for every
    occurrence of that word in the batch), 1/(1 − p) elsewhere."""
    keep = torch.empty(vocab_size, device=tokens.device).bernoulli_(1 - p) / (1 - p)
    return keep[tokens][..., None]


def _fused_layer(cell: str, x: Tensor, state: State, weights: list[Tensor], training: bool) -> tuple[Tensor, State]:
    """One layer of PyTorch's fused recurrence over batch-first ``x``, with explicit weights
    (``[w_ih, w_hh, b_ih, b_hh]``), so ``w_hh`` can be a dropped copy of the parameter."""
    if cell in ("lstm", "highway"):
        y, h, c = torch.lstm(x, (state[0], state[1]), weights, True, 1, 0.0, training, False, True)
        return y, (h, c)
    fn = torch.gru if cell == "gru" else torch.rnn_tanh
    y, h = fn(x, state[0], weights, True, 1, 0.0, training, False, True)
    return y, (h,)


class CustomRecurrent(nn.Module):
    """lstm/peephole/cifg/gru with optional zoneout, stepped in Python (the input projection of
    every time step is one matmul up front, so only the recurrent part runs per step)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H, G = cfg.hidden_size, cfg.gates
        for layer in range(cfg.num_layers):
            size_in = cfg.embedding_size if layer == 0 else H
            k = 1.0 / H**0.5
            for name, shape in (
                (f"weight_ih_l{layer}", (G * H, size_in)),
                (f"weight_hh_l{layer}", (G * H, H)),
                (f"bias_ih_l{layer}", (G * H,)),
                (f"bias_hh_l{layer}", (G * H,)),
            ):
                self.register_parameter(name, nn.Parameter(torch.empty(shape).uniform_(-k, k)))
            if cfg.cell == "peephole":
                # rows: p_i, p_f, p_o
                self.register_parameter(f"peephole_l{layer}", nn.Parameter(torch.empty(3, H).uniform_(-k, k)))

    def _step(self, layer: int, xw: Tensor, state: list[Tensor], w_hh: Tensor) -> list[Tensor]:
        """One time step of one layer; ``xw`` is W x + b_W already computed, ``w_hh`` is R
        (dropped under weight drop)."""
        cell = self.cfg.cell
        h = state[0]
        hw = F.linear(h, w_hh, getattr(self, f"bias_hh_l{layer}"))
        if cell == "gru":
            xr, xz, xn = xw.chunk(3, dim=-1)
            hr, hz, hn = hw.chunk(3, dim=-1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            return [(1 - z) * n + z * h]
        c = state[1]
        gates = xw + hw
        if cell == "cifg":
            gi, gg, go = gates.chunk(3, dim=-1)
            i = torch.sigmoid(gi)
            f = 1 - i
            c_new = f * c + i * torch.tanh(gg)
            o = torch.sigmoid(go)
        else:
            gi, gf, gg, go = gates.chunk(4, dim=-1)
            if cell == "peephole":
                p = getattr(self, f"peephole_l{layer}")
                gi, gf = gi + p[0] * c, gf + p[1] * c
            i, f = torch.sigmoid(gi), torch.sigmoid(gf)
            c_new = f * c + i * torch.tanh(gg)
            if cell == "peephole":
                go = go + p[2] * c_new
            o = torch.sigmoid(go)
        h_new = o * torch.tanh(c_new)
        return [h_new, c_new]

    def _zoneout(self, old: list[Tensor], new: list[Tensor]) -> list[Tensor]:
        p = self.cfg.zoneout
        if not p:
            return new
        if self.training:
            return [torch.where(torch.rand_like(n) < p, o, n) for o, n in zip(old, new, strict=True)]
        return [p * o + (1 - p) * n for o, n in zip(old, new, strict=True)]

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        out_state: list[list[Tensor]] = []
        cfg = self.cfg
        for layer in range(cfg.num_layers):
            if layer:
                x = sequence_dropout(x, cfg.dropout, self.training, cfg.locked_dropout)
            xw = F.linear(x, getattr(self, f"weight_ih_l{layer}"), getattr(self, f"bias_ih_l{layer}"))
            # one DropConnect mask per forward call (= per batch), shared by every time step
            w_hh = getattr(self, f"weight_hh_l{layer}")
            if self.training and cfg.weight_drop:
                w_hh = F.dropout(w_hh, cfg.weight_drop)
            s = [t[layer] for t in state]
            ys = []
            for t in range(x.shape[1]):
                s = self._zoneout(s, self._step(layer, xw[:, t], s, w_hh))
                ys.append(s[0])
            x = torch.stack(ys, dim=1)
            out_state.append(s)
        return x, tuple(torch.stack(parts) for parts in zip(*out_state, strict=True))


class HighwayLSTM(nn.Module):
    """Stacked single-layer ``nn.LSTM``s with a highway gate per layer (see module docstring)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden_size
        self.layers = nn.ModuleList()
        self.gates = nn.ModuleList()
        self.carry = nn.ModuleList()
        for layer in range(cfg.num_layers):
            size_in = cfg.embedding_size if layer == 0 else H
            self.layers.append(nn.LSTM(size_in, H, batch_first=True))
            self.gates.append(nn.Linear(size_in + H, H))
            # Identity carry when sizes match, a learned projection otherwise.
            self.carry.append(nn.Identity() if size_in == H else nn.Linear(size_in, H, bias=False))

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        hs, cs = [], []
        cfg = self.cfg
        drop_weights = self.training and cfg.weight_drop > 0
        for layer, (lstm, gate, carry) in enumerate(zip(self.layers, self.gates, self.carry, strict=True)):
            if layer:
                x = sequence_dropout(x, cfg.dropout, self.training, cfg.locked_dropout)
            s = (state[0][layer : layer + 1], state[1][layer : layer + 1])
            if drop_weights:
                weights = [
                    lstm.weight_ih_l0,
                    F.dropout(lstm.weight_hh_l0, cfg.weight_drop),
                    lstm.bias_ih_l0,
                    lstm.bias_hh_l0,
                ]
                h, (hn, cn) = _fused_layer("lstm", x, s, weights, True)
            else:
                h, (hn, cn) = lstm(x, s)
            t = torch.sigmoid(gate(torch.cat([x, h], dim=-1)))
            x = t * h + (1 - t) * carry(x)
            hs.append(hn)
            cs.append(cn)
        return x, (torch.cat(hs), torch.cat(cs))


class NativeRecurrent(nn.Module):
    """``nn.RNN``/``nn.LSTM``/``nn.GRU``: PyTorch's fused loops, used for the plain cells."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        kind = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cfg.cell]
        self.net = kind(
            cfg.embedding_size,
            cfg.hidden_size,
            num_layers=cfg.num_layers,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
            batch_first=True,
        )

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        cfg = self.cfg
        if self.training and (cfg.weight_drop or (cfg.locked_dropout and cfg.dropout and cfg.num_layers > 1)):
            return self._layer_by_layer(x, state)
        if len(state) == 2:
            y, (h, c) = self.net(x, (state[0], state[1]))
            return y, (h, c)
        y, h = self.net(x, state[0])
        return y, (h,)

    def _layer_by_layer(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """Training with weight drop or locked dropout between layers: one fused layer at a time
        (``nn.LSTM``'s own inter-layer dropout draws a fresh mask per time step)."""
        cfg, net = self.cfg, self.net
        outs: list[State] = []
        for layer in range(cfg.num_layers):
            if layer:
                x = sequence_dropout(x, cfg.dropout, True, cfg.locked_dropout)
            w = [getattr(net, f"{k}_l{layer}") for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            w[1] = F.dropout(w[1], cfg.weight_drop, cfg.weight_drop > 0)
            x, s = _fused_layer(cfg.cell, x, tuple(t[layer : layer + 1] for t in state), w, True)
            outs.append(s)
        return x, tuple(torch.cat(parts) for parts in zip(*outs, strict=True))


def make_recurrent(cfg: ModelConfig) -> nn.Module:
    if cfg.cell == "highway":
        return HighwayLSTM(cfg)
    if cfg.cell in ("rnn", "lstm", "gru") and not cfg.zoneout:
        return NativeRecurrent(cfg)
    return CustomRecurrent(cfg)


class LanguageModel(nn.Module):
    """Embedding → recurrent stack → (projection) → softmax over the vocabulary."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embedding_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        self.recurrent = make_recurrent(cfg)
        # Tying needs the decoder input to have the embedding's width.
        self.projection = (
            nn.Linear(cfg.hidden_size, cfg.embedding_size, bias=False)
            if cfg.tied and cfg.hidden_size != cfg.embedding_size
            else None
        )
        out_size = cfg.embedding_size if cfg.tied else cfg.hidden_size
        self.decoder = nn.Linear(out_size, cfg.vocab_size)
        if cfg.tied:
            self.decoder.weight = self.embedding.weight
        nn.init.zeros_(self.decoder.bias)

    def initial_state(self, batch: int, device: torch.device | str = "cpu") -> State:
        shape = (self.cfg.num_layers, batch, self.cfg.hidden_size)
        return tuple(torch.zeros(shape, device=device) for _ in self.cfg.state_names)

    def features(self, tokens: Tensor, state: State, with_hidden: bool = False) -> tuple[Tensor, ...]:
        """Decoder inputs for every position ``[B, T, D]`` and the state after the last one (with
        ``with_hidden``, also the last layer's output before output dropout, for TAR)."""
        cfg = self.cfg
        x = self.embedding(tokens)
        if self.training and cfg.dropout_words:
            x = x * word_dropout_scale(tokens, cfg.vocab_size, cfg.dropout_words)
        x = sequence_dropout(x, cfg.dropout_embedding, self.training, cfg.locked_dropout)
        hidden, state = self.recurrent(x, state)
        y = hidden if self.projection is None else self.projection(hidden)
        y = sequence_dropout(y, cfg.dropout_output, self.training, cfg.locked_dropout)
        return (y, state, hidden) if with_hidden else (y, state)

    def forward(
        self, tokens: Tensor, state: State, features_only: bool = False, with_hidden: bool = False
    ) -> tuple[Tensor, ...]:
        """Log-probabilities of the next word at every position ``[B, T, V]`` (or, with
        ``features_only``, the decoder inputs, for losses that never form the full softmax;
        ``with_hidden`` as in :meth:`features`)."""
        if features_only:
            return self.features(tokens, state, with_hidden)
        y, state = self.features(tokens, state)
        return F.log_softmax(self.decoder(y), dim=-1), state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
