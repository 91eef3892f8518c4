"""The independent eager reference other tests compare serving against.

``load_eager(version_dir)`` rebuilds the eager PyTorch model of an exported version from
``manifest.architecture`` and ``weights.pt`` (checksums verified). The module it returns offers

* ``step(x_or_tokens, *states) -> (y[B,T,O], *states)`` (states ``(L, B, H)``, manifest order);
* ``sequence(x_or_tokens, lengths) -> y[B,O]`` (right-padded rows, read at each row's end);
* ``init_states(batch) -> list[Tensor]`` (zeros, manifest order).

These run the eager code paths (packed sequences, or the Elman cell one step at a time), not the
exported graphs, so agreeing with them means something.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from training.export import load_model


def load_eager(version_dir: Path) -> nn.Module:
    return load_model(Path(version_dir))[2]
