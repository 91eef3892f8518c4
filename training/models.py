"""Every network of the zoo, in one file.

Two families of modules live here:

* the eager models that training optimises and tests use as the reference: ``RecurrentNet``
  (nn.RNN / nn.LSTM / nn.GRU, bidirectional allowed) and ``ElmanRNN`` (seed 004's hand-written
  cell). Both offer ``step(inputs, *states) -> (y, *states)`` and
  ``sequence(inputs, lengths) -> y``; ``sequence`` reads the final states off a packed sequence,
  an implementation independent of the exported graphs;
* the export graphs (``HiddenGraph``, ``LstmGraph``, ``BidirectionalGraph``): TorchScript-able
  modules whose ``forward`` is the sequence graph (gather at ``lengths - 1``) and whose ``step`` is
  the step graph, traced to ONNX and scripted to TorchScript by ``training.export``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from training.zoo import Arch

CELLS: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


# ---- inputs and head -----------------------------------------------------------------------
class FeatureInput(nn.Module):
    """Features go straight in: (B, T, F) -> (B, T, F)."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class OneHotInput(nn.Module):
    """Token ids -> one-hot rows inside the graph, as seed 002 encodes its characters."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.register_buffer("eye", torch.eye(vocab_size), persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.eye[tokens]  # (B, T) -> (B, T, V)


def make_encoder(arch: Arch) -> nn.Module:
    if arch.input_kind == "features":
        return FeatureInput()
    if arch.input_kind == "onehot":
        return OneHotInput(arch.input_size)
    return nn.Embedding(arch.input_size, arch.embedding)


def encoded_size(arch: Arch) -> int:
    return arch.embedding if arch.input_kind == "embedding" else arch.input_size


def make_head(arch: Arch, width: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(width, arch.output_size)]
    if arch.log_softmax:
        layers.append(nn.LogSoftmax(dim=-1))
    return nn.Sequential(*layers)


def state_names(arch: Arch) -> list[str]:
    return ["h", "c"] if arch.cell == "lstm" else ["h"]


def state_layers(arch: Arch) -> int:
    return arch.layers * (2 if arch.bidirectional else 1)


# ---- eager models ----------------------------------------------------------------------------
class RecurrentNet(nn.Module):
    """Encoder -> nn.RNN/LSTM/GRU (batch_first) -> dropout -> head."""

    def __init__(self, arch: Arch) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = make_encoder(arch)
        self.rnn = CELLS[arch.cell](
            encoded_size(arch),
            arch.hidden,
            arch.layers,
            batch_first=True,
            bidirectional=arch.bidirectional,
            dropout=arch.dropout if arch.layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(arch.dropout)
        width = arch.hidden * (2 if arch.bidirectional else 1)
        self.head = make_head(arch, width)

    def init_states(self, batch: int) -> list[Tensor]:
        shape = (state_layers(self.arch), batch, self.arch.hidden)
        return [torch.zeros(shape) for _ in state_names(self.arch)]

    def step(self, inputs: Tensor, *states: Tensor) -> tuple[Tensor, ...]:
        """(B, T[, F]), states (L, B, H) -> y (B, T, O), new states (L, B, H)."""
        x = self.encoder(inputs)  # (B, T, F)
        hx = tuple(states) if self.arch.cell == "lstm" else states[0]
        out, new = self.rnn(x, hx)  # (B, T, H)
        new_states = new if isinstance(new, tuple) else (new,)
        return (self.head(self.drop(out)), *new_states)

    def sequence(self, inputs: Tensor, lengths: Tensor) -> Tensor:
        """Right-padded rows -> y (B, O) after each row's last valid step (both directions)."""
        x = self.encoder(inputs)  # (B, T, F)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, final = self.rnn(packed)
        h = final[0] if isinstance(final, tuple) else final  # (L * D, B, H)
        # the last layer's final states: forward ends at len-1, backward ends at step 0
        last = torch.cat([h[-2], h[-1]], dim=-1) if self.arch.bidirectional else h[-1]
        return self.head(self.drop(last))  # (B, O)

    def forward(self, inputs: Tensor, lengths: Tensor) -> Tensor:
        return self.sequence(inputs, lengths)


class ElmanRNN(nn.Module):
    """Seed 004's hand-written cell: Linear(concat(x, h)) -> tanh -> Linear -> LogSoftmax."""

    def __init__(self, arch: Arch) -> None:
        super().__init__()
        self.arch = arch
        self.hidden_size = arch.hidden
        self.input_to_hidden = nn.Linear(arch.input_size + arch.hidden, arch.hidden)
        self.tanh = nn.Tanh()
        self.input_to_output = nn.Linear(arch.hidden, arch.output_size)
        self.softmax = nn.LogSoftmax(dim=-1)

    def forward(self, current_input: Tensor, prev_hidden: Tensor) -> tuple[Tensor, Tensor]:
        """One step, exactly as the seed: (B, F), (B, H) -> log-probs (B, O), hidden (B, H)."""
        concatenated = torch.cat((current_input, prev_hidden), dim=1)  # (B, F + H)
        hidden = self.tanh(self.input_to_hidden(concatenated))  # (B, H)
        return self.softmax(self.input_to_output(hidden)), hidden

    def init_hidden(self, batch: int = 1) -> Tensor:
        return torch.zeros(batch, self.hidden_size)

    def init_states(self, batch: int) -> list[Tensor]:
        return [self.init_hidden(batch).unsqueeze(0)]  # (1, B, H), nn.RNN's layout

    def step(self, inputs: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, F), (1, B, H) -> y (B, T, O), h (1, B, H): the cell, one step at a time."""
        hidden, outputs = h[0], []
        for t in range(inputs.shape[1]):
            y, hidden = self(inputs[:, t], hidden)
            outputs.append(y)
        return torch.stack(outputs, dim=1), hidden.unsqueeze(0)

    def sequence(self, inputs: Tensor, lengths: Tensor) -> Tensor:
        """Right-padded rows -> y (B, O) at each row's last valid step; padding never read."""
        hidden, last = self.init_hidden(inputs.shape[0]), None
        for t in range(inputs.shape[1]):
            y, new_hidden = self(inputs[:, t], hidden)
            valid = (t < lengths).unsqueeze(1)  # (B, 1)
            hidden = torch.where(valid, new_hidden, hidden)
            last = y if last is None else torch.where(valid, y, last)
        assert last is not None, "sequence needs at least one step"
        return last

    def to_rnn(self) -> RecurrentNet:
        """The same function as an nn.RNN: W_ih = W[:, :F], W_hh = W[:, F:], b_hh = 0."""
        F = self.arch.input_size
        net = RecurrentNet(
            Arch(
                cell="rnn",
                input_kind="features",
                input_size=F,
                hidden=self.arch.hidden,
                output_size=self.arch.output_size,
                log_softmax=True,
            )
        )
        W, b = self.input_to_hidden.weight.detach(), self.input_to_hidden.bias.detach()
        with torch.no_grad():
            net.rnn.weight_ih_l0.copy_(W[:, :F])
            net.rnn.weight_hh_l0.copy_(W[:, F:])
            net.rnn.bias_ih_l0.copy_(b)
            net.rnn.bias_hh_l0.zero_()
            net.head[0].load_state_dict(self.input_to_output.state_dict())
        return net.eval()


def build(arch: Arch) -> RecurrentNet | ElmanRNN:
    return ElmanRNN(arch) if arch.cell == "elman" else RecurrentNet(arch)


# ---- export graphs (TorchScript-able; traced for ONNX) -------------------------------------
def gather_last(out: Tensor, lengths: Tensor) -> Tensor:
    """(B, T, D), (B,) -> (B, D): each row's output at its step lengths - 1."""
    index = (lengths - 1).view(-1, 1, 1).expand(-1, 1, out.size(2))  # (B, 1, D)
    return out.gather(1, index).squeeze(1)


def reverse_index(lengths: Tensor, steps: int) -> Tensor:
    """(B,) -> (B, T): rev[b, t] = len_b - 1 - t for t < len_b, else t (padding stays put)."""
    t = torch.arange(steps, device=lengths.device).unsqueeze(0)  # (1, T)
    n = lengths.unsqueeze(1)  # (B, 1)
    return torch.where(t < n, n - 1 - t, t)


def reverse_within(x: Tensor, rev: Tensor) -> Tensor:
    """Reverse each row inside its own length; applying it twice is the identity."""
    return x.gather(1, rev.unsqueeze(-1).expand(-1, -1, x.size(2)))


class HiddenGraph(nn.Module):
    """RNN / GRU (one state, "h"): forward = sequence graph, step = step graph."""

    def __init__(self, net: RecurrentNet) -> None:
        super().__init__()
        self.encoder, self.rnn, self.head = net.encoder, net.rnn, net.head

    def forward(self, inputs: Tensor, lengths: Tensor) -> Tensor:
        out, _ = self.rnn(self.encoder(inputs))  # (B, T, H), zero initial state
        return self.head(gather_last(out, lengths))  # (B, O)

    @torch.jit.export
    def step(self, inputs: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        out, h_out = self.rnn(self.encoder(inputs), h)  # (B, T, H), (L, B, H)
        return self.head(out), h_out


class LstmGraph(nn.Module):
    """LSTM (states "h" and "c"): forward = sequence graph, step = step graph."""

    def __init__(self, net: RecurrentNet) -> None:
        super().__init__()
        self.encoder, self.rnn, self.head = net.encoder, net.rnn, net.head

    def forward(self, inputs: Tensor, lengths: Tensor) -> Tensor:
        out, _ = self.rnn(self.encoder(inputs))  # (B, T, H)
        return self.head(gather_last(out, lengths))  # (B, O)

    @torch.jit.export
    def step(self, inputs: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out, (h_out, c_out) = self.rnn(self.encoder(inputs), (h, c))
        return self.head(out), h_out, c_out


class BiLayer(nn.Module):
    """One bidirectional layer as two unidirectional LSTMs; the backward one reads each row
    reversed within its own length, so it starts at the row's last valid step."""

    def __init__(self, rnn: nn.LSTM, layer: int) -> None:
        super().__init__()
        size = rnn.input_size if layer == 0 else 2 * rnn.hidden_size
        self.fwd = nn.LSTM(size, rnn.hidden_size, batch_first=True)
        self.bwd = nn.LSTM(size, rnn.hidden_size, batch_first=True)
        for direction, suffix in ((self.fwd, ""), (self.bwd, "_reverse")):
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                source = getattr(rnn, f"{kind}_l{layer}{suffix}").detach()
                getattr(direction, f"{kind}_l0").data.copy_(source)

    def forward(self, x: Tensor, rev: Tensor) -> tuple[Tensor, Tensor]:
        out_f, _ = self.fwd(x)  # (B, T, H)
        out_b_rev, _ = self.bwd(reverse_within(x, rev))  # (B, T, H), in reversed time
        return out_f, reverse_within(out_b_rev, rev)


class BidirectionalGraph(nn.Module):
    """Bidirectional LSTM, sequence graph only: head(forward state at len-1 ++ backward at 0)."""

    def __init__(self, net: RecurrentNet) -> None:
        super().__init__()
        self.encoder, self.head = net.encoder, net.head
        self.layers = nn.ModuleList(BiLayer(net.rnn, k) for k in range(net.arch.layers))

    def forward(self, inputs: Tensor, lengths: Tensor) -> Tensor:
        x = self.encoder(inputs)  # (B, T, F)
        rev = reverse_index(lengths, x.size(1))  # (B, T)
        out_f, out_b = x, x
        for layer in self.layers:
            out_f, out_b = layer(x, rev)
            x = torch.cat([out_f, out_b], dim=-1)  # (B, T, 2H)
        last = torch.cat([gather_last(out_f, lengths), out_b[:, 0]], dim=-1)  # (B, 2H)
        return self.head(last)


class StepAsForward(nn.Module):
    """Exposes a graph's ``step`` as ``forward``, for the ONNX tracer."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, inputs: Tensor, *states: Tensor) -> tuple[Tensor, ...]:
        return self.graph.step(inputs, *states)


def export_graph(model: RecurrentNet | ElmanRNN) -> nn.Module:
    """The export graph computing the same function as the eager ``model`` (in eval mode)."""
    net = model.to_rnn() if isinstance(model, ElmanRNN) else model
    if net.arch.bidirectional:
        if net.arch.cell != "lstm":
            raise ValueError("bidirectional export is implemented for LSTM only")
        return BidirectionalGraph(net).eval()
    return (LstmGraph(net) if net.arch.cell == "lstm" else HiddenGraph(net)).eval()
