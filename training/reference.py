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

import torch
from torch import nn

from serving.errors import ArtifactError
from serving.manifest import load_manifest
from training.export import arch_from_manifest
from training.models import build


def load_eager(version_dir: Path) -> nn.Module:
    version_dir = Path(version_dir)
    manifest = load_manifest(version_dir)
    model = build(arch_from_manifest(manifest))
    try:
        model.load_state_dict(torch.load(version_dir / "weights.pt", weights_only=True))
    except RuntimeError as e:
        raise ArtifactError(f"{version_dir}/weights.pt does not fit the manifest") from e
    return model.eval()
