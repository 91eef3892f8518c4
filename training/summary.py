"""The store's training summary: every model's held-out metric against its quality bar, one PNG.

``rnnserve train`` and ``rnnserve export`` redraw it after they ran, from the manifests alone (the
newest version of each model), so it also shows models trained by earlier runs.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

from serving.errors import ArtifactError
from serving.manifest import list_models, load_manifest, resolve, summary_path
from training import plots

BAR = re.compile(r"^(?P<metric>\w+) (?P<op>>=|<=) (?P<limit>\S+)$")  # zoo.Bar.describe


def bar_result(version_dir: Path) -> plots.BarResult:
    """A version's metric and bar, as its manifest recorded them when it was trained."""
    m = load_manifest(version_dir, verify=False)  # the summary reads numbers, not weights
    found = BAR.match(str(m.metrics.get("bar", "")))
    if found is None or found["metric"] not in m.metrics:
        raise ArtifactError(f"{m.name} v{m.version}: no quality bar in manifest.metrics")
    return plots.BarResult(
        name=m.name,
        version=m.version,
        metric=found["metric"],
        value=float(m.metrics[found["metric"]]),
        limit=float(found["limit"]),
        higher_is_better=found["op"] == ">=",
        quick=bool(m.training.get("quick", False)),
    )


def write_summary(store: Path) -> Path:
    """Draw ``summary.png`` into ``store``'s root and return its path."""
    results, unreadable = [], {}
    for name in list_models(store):
        try:
            results.append(bar_result(resolve(store, name)))
        except ArtifactError as e:
            unreadable[name] = str(e)
    path = summary_path(store)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    plots.summary(results, unreadable, f"Held-out quality of {store}  ({when})", path)
    return path
