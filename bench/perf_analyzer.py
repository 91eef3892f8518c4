"""Triton's perf_analyzer (C++), unchanged, against rnnserve's Open Inference Protocol.

``ensure()`` fetches it once into ``.cache/perf_analyzer``: the binary ships only inside the
manylinux wheel of tritonclient 2.41.0 (later wheels are pure Python; the PyPI package
``perf-analyzer`` is a placeholder). It links ``libcudart.so.12`` even on a CPU host, taken from the
``nvidia-cuda-runtime-cu12`` wheel, and ``libb64.so.0d`` (Debian ``libb64-0d``). ``run()`` drives
one model at one concurrency and parses what perf_analyzer prints.

    python -m bench.perf_analyzer --address 127.0.0.1:50051 --model seq_lstm --streaming
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "perf_analyzer"
TRITONCLIENT = ("tritonclient==2.41.0", "manylinux1_x86_64")
CUDART = ("nvidia-cuda-runtime-cu12==12.9.79", "manylinux2014_x86_64")
BINARY_IN_WHEEL = "tritonclient-2.41.0.data/data/bin/perf_analyzer"
CUDART_IN_WHEEL = "nvidia/cuda_runtime/lib/libcudart.so.12"
MAX_SEQUENCE_ID = 2**31 - 1  # perf_analyzer's sequence ids must stay below 2^31


class PerfAnalyzerUnavailable(RuntimeError):
    """perf_analyzer cannot be fetched or cannot run on this machine; the message says why."""


@dataclass(frozen=True)
class PerfResult:
    returncode: int
    request_count: int  # requests answered within the measured windows
    sequence_count: int  # sequences ended within them (0 for a stateless model)
    throughput: float  # inferences per second
    p50_us: float
    p99_us: float
    server_success: int  # the server's successful-request count over the windows (its statistics)
    errors: list[str]  # perf_analyzer's error lines
    output: str  # everything it printed

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.errors and self.request_count > 0


# ---- fetching ---------------------------------------------------------------------------------


def ensure(cache: Path = CACHE) -> Path:
    """The cached perf_analyzer binary, fetched on first use (one fetch at a time)."""
    binary, lib = cache / "bin" / "perf_analyzer", cache / "lib" / "libcudart.so.12"
    if not (binary.is_file() and lib.is_file()):
        if platform.machine() != "x86_64":
            raise PerfAnalyzerUnavailable(
                f"perf_analyzer ships for x86_64 only; this machine is {platform.machine()}"
            )
        cache.mkdir(parents=True, exist_ok=True)
        with _locked(cache / ".lock"):
            if not (binary.is_file() and lib.is_file()):
                _fetch(cache)
    _check_libraries(binary, lib.parent)
    return binary


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _fetch(cache: Path) -> None:
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        staging = Path(tmp)
        _extract(_download(*TRITONCLIENT, staging), BINARY_IN_WHEEL, staging / "bin")
        _extract(_download(*CUDART, staging), CUDART_IN_WHEEL, staging / "lib")
        (staging / "bin" / "perf_analyzer").chmod(0o755)
        for folder in ("bin", "lib"):
            shutil.rmtree(cache / folder, ignore_errors=True)
            (staging / folder).rename(cache / folder)


def _download(requirement: str, wheel_platform: str, into: Path) -> Path:
    """One wheel from PyPI through pip (whatever index pip is configured for)."""
    args = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    args += ["--only-binary=:all:", "--platform", wheel_platform, "--python-version", "3.11"]
    args += ["--dest", str(into), requirement]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    wheels = sorted(into.glob(requirement.split("==")[0].replace("-", "_") + "-*.whl"))
    if done.returncode != 0 or not wheels:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise PerfAnalyzerUnavailable(f"pip download {requirement} failed: {' / '.join(tail)}")
    return wheels[0]


def _extract(wheel: Path, member: str, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z, z.open(member) as src:
        (folder / Path(member).name).write_bytes(src.read())


def _check_libraries(binary: Path, lib_dir: Path) -> None:
    """Every shared library resolves, or a message naming the missing ones."""
    env = {**os.environ, "LD_LIBRARY_PATH": str(lib_dir)}
    done = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env)
    missing = [line.split()[0] for line in done.stdout.splitlines() if "not found" in line]
    if missing:
        hint = " (Debian: apt-get install libb64-0d)" if any("b64" in m for m in missing) else ""
        raise PerfAnalyzerUnavailable(f"perf_analyzer needs {', '.join(missing)}{hint}")


# ---- running ----------------------------------------------------------------------------------


def command(
    binary: Path,
    address: str,
    model: str,
    *,
    shape: str = "x:1,10",
    concurrency: int = 4,
    streaming: bool = False,
    sequence_length: int = 20,
    window_ms: int = 1000,
    extra: Sequence[str] = (),
) -> list[str]:
    """Three measurement windows, stable by construction (-s 10000: a busy 2-core machine never
    holds three windows within the default 10%, and this is a check, not a benchmark)."""
    args = [str(binary), "-m", model, "-i", "grpc", "-u", address, "--shape", shape]
    args += ["--input-data", "random", "--concurrency-range", f"{concurrency}:{concurrency}"]
    args += ["-p", str(window_ms), "-s", "10000", "--max-trials", "3", "--percentile", "99"]
    args += ["--sequence-length", str(sequence_length)]
    args += ["--sequence-id-range", f"1:{MAX_SEQUENCE_ID}"]
    if streaming:
        args += ["--async", "--streaming"]
    return [*args, *extra]


def run(
    address: str,
    model: str,
    *,
    timeout_s: float = 180.0,
    cache: Path = CACHE,
    **options: object,
) -> PerfResult:
    """Run perf_analyzer once (see ``command`` for the options) and parse its report."""
    binary = ensure(cache)
    env = {**os.environ, "LD_LIBRARY_PATH": str(binary.parent.parent / "lib")}
    args = command(binary, address, model, **options)  # type: ignore[arg-type]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout_s)
    return parse(done.returncode, done.stdout + done.stderr)


_NUMBERS = {
    "request_count": r"Request count: (\d+)",
    "sequence_count": r"Sequence count: (\d+)",
    "throughput": r"Throughput: ([\d.]+) infer/sec",
    "p50_us": r"p50 latency: (\d+) usec",
    "p99_us": r"p99 latency: (\d+) usec",
    "server_success": r"Successful request count: (\d+)",
}
_ERROR = re.compile(r"error|failed|unable", re.IGNORECASE)


def parse(returncode: int, output: str) -> PerfResult:
    """perf_analyzer's report: the last value of each number (one concurrency per run)."""
    found: dict[str, float] = {}
    for name, pattern in _NUMBERS.items():
        values = re.findall(pattern, output)
        found[name] = float(values[-1]) if values else 0.0
    errors = [line.strip() for line in output.splitlines() if _ERROR.search(line)]
    return PerfResult(
        returncode=returncode,
        request_count=int(found["request_count"]),
        sequence_count=int(found["sequence_count"]),
        throughput=found["throughput"],
        p50_us=found["p50_us"],
        p99_us=found["p99_us"],
        server_success=int(found["server_success"]),
        errors=errors,
        output=output,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--model", default="seq_lstm")
    p.add_argument("--shape", default="x:1,10", help="input:dims without the batch dimension")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--streaming", action="store_true")
    p.add_argument("--window-ms", type=int, default=1000)
    args = p.parse_args(argv)
    try:
        result = run(
            args.address,
            args.model,
            shape=args.shape,
            concurrency=args.concurrency,
            streaming=args.streaming,
            window_ms=args.window_ms,
        )
    except PerfAnalyzerUnavailable as e:
        print(f"perf_analyzer: {e}", file=sys.stderr)
        return 2
    print(result.output)
    print(
        f"requests {result.request_count}, sequences {result.sequence_count}, "
        f"{result.throughput:.0f} infer/s, p50 {result.p50_us:.0f} µs, p99 {result.p99_us:.0f} µs, "
        f"errors {len(result.errors)}"
    )
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
