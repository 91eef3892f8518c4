"""``rnnserve client models|model|step|generate|forecast|predict``: the API from a shell.

Examples::

    rnnserve client models
    rnnserve client step --model sum_sign_lstm --values '[[0.5], [-0.2], [0.9]]'
    rnnserve client generate --model char --prompt 'def ' --max-tokens 60 --temperature 0.8 --seed 1
    rnnserve client forecast --model sine --values '0,0.156,0.309,0.454' --steps 50 --plot sine.png
    rnnserve client predict --model seq_bilstm --values '[[0.1], [0.4]]' --values '[[0.9]]'
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from serving.client import Client
from serving.codec import float32_text

DEFAULT_ADDRESS = "127.0.0.1:50051"
# (flag, environment variable, help) for a server started with --tls-cert / --auth-token-file
SECURITY_OPTIONS = [
    ("--tls-ca", "RNNSERVE_TLS_CA", "PEM CA the server's certificate chains to (turns TLS on)"),
    ("--tls-cert", "RNNSERVE_CLIENT_TLS_CERT", "PEM client certificate, for mutual TLS"),
    ("--tls-key", "RNNSERVE_CLIENT_TLS_KEY", "PEM key of --tls-cert"),
    ("--token-file", "RNNSERVE_TOKEN_FILE", "a file holding the bearer token (kept out of ps)"),
]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("client", help="call a running rnnserve gRPC server")
    p.add_argument(
        "--address",
        default=os.environ.get("RNNSERVE_ADDRESS", DEFAULT_ADDRESS),
        help=f"server host:port [RNNSERVE_ADDRESS, {DEFAULT_ADDRESS}]",
    )
    for flag, env, text in SECURITY_OPTIONS:
        p.add_argument(flag, default=os.environ.get(env, ""), help=f"{text} [{env}, none]")
    p.set_defaults(func=client_command)
    sub = p.add_subparsers(dest="client_command", metavar="ACTION", required=True)
    sub.add_parser("models", help="list the loaded models").set_defaults(action=_models)

    m = sub.add_parser("model", help="one model's description and manifest")
    m.add_argument("name", help="a model name, as `client models` lists them")
    m.add_argument("--version", type=_non_negative, default=0, help="0 = latest (default)")
    m.set_defaults(action=_model)

    s = sub.add_parser("step", help="open a session, send the steps, print each output")
    _model_arg(s)
    s.add_argument("--values", help="features as JSON [[f..], ...] or comma-separated scalars")
    s.add_argument("--text", help="char models: text, one step per character")
    s.add_argument("--one-call", action="store_true", help="send all steps in one Step call")
    s.set_defaults(action=_step)

    g = sub.add_parser("generate", help="char models: text from a prompt")
    _model_arg(g)
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--max-tokens", type=_non_negative, default=64, help="characters (64)")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    g.add_argument(
        "--top-k", type=_non_negative, default=0, help="0 = sample among all characters (default)"
    )
    g.add_argument("--seed", type=_non_negative, default=0, help="the sampler's seed (0)")
    g.set_defaults(action=_generate)

    f = sub.add_parser("forecast", help="regression models (sine): forecast by feeding back")
    _model_arg(f)
    f.add_argument("--values", required=True, help="the history: comma-separated or JSON")
    f.add_argument("--steps", type=_non_negative, default=50, help="values to forecast (50)")
    f.add_argument("--plot", help="write a PNG of history + forecast here (default: no plot)")
    f.set_defaults(action=_forecast)

    r = sub.add_parser("predict", help="whole sequences, stateless (every model)")
    _model_arg(r)
    r.add_argument("--values", action="append", default=[], help="one sequence (repeatable)")
    r.add_argument("--text", action="append", default=[], help="one text sequence (repeatable)")
    r.set_defaults(action=_predict)


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a model name, as `client models` lists them")
    p.add_argument("--version", type=_non_negative, default=0, help="0 = latest (default)")


def _non_negative(text: str) -> int:
    """The request fields are unsigned: a negative value is a usage error, not a traceback."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_values(text: str) -> list[Any]:
    """JSON (``[[0.1], [0.2]]`` or ``[0.1, 0.2]``) or comma-separated scalars → a list."""
    text = text.strip()
    try:
        if text.startswith("["):
            return json.loads(text)
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:  # JSONDecodeError is one too
        raise ValueError(f"--values takes JSON or comma-separated numbers, got {text!r}") from e


def _features(values: list[Any]) -> list[list[float]]:
    """Scalars become 1-feature steps, so ``0.1,0.2`` means two steps."""
    return [v if isinstance(v, list) else [v] for v in values]


class UsageError(Exception):
    """A mistake in the command line: ``rnnserve client: ...`` and exit status 2."""


def message_dict(message: Message) -> dict[str, Any]:
    """A reply as JSON-ready data for people: fields that are empty (``[]``, ``""``, an unset
    message) are left out, 64-bit integers stay integers (protobuf's JSON writes them as strings),
    float32 numbers are the shortest decimals that read back as them, and ``*_at`` unix times are
    ISO 8601 (UTC)."""
    out: dict[str, Any] = {}
    for fd in message.DESCRIPTOR.fields:
        value = getattr(message, fd.name)
        if _is_repeated(fd):
            if len(value):
                out[fd.name] = [_field_value(fd, v) for v in value]
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            if message.HasField(fd.name):
                out[fd.name] = message_dict(value)
        elif fd.has_presence and not message.HasField(fd.name):
            continue
        elif value != "" and value != b"":
            out[fd.name] = _field_value(fd, value)
    return out


def _is_repeated(fd: FieldDescriptor) -> bool:
    if hasattr(fd, "is_repeated"):  # protobuf >= 5.29; `label` is deprecated there
        return bool(fd.is_repeated)
    return fd.label == FieldDescriptor.LABEL_REPEATED


def _field_value(fd: FieldDescriptor, value: Any) -> Any:
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return message_dict(value)
    if fd.type == FieldDescriptor.TYPE_FLOAT:
        return float32_text(value)
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return fd.enum_type.values_by_number[value].name
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return value.hex()
    if fd.name.endswith("_at") and isinstance(value, float):
        return datetime.fromtimestamp(value, UTC).isoformat(timespec="milliseconds")
    return value


def _print(data: Any) -> None:
    print(json.dumps(data if isinstance(data, dict) else message_dict(data), indent=1))


def _with_labels(reply: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    """Each classification output names the labels its probabilities are aligned with, as the
    HTTP reply does; a regression output has no ``index`` (0 there means nothing)."""
    for out in reply.get("outputs", []):
        if "label" in out:
            out["labels"] = labels
        elif "char" not in out:
            out.pop("index", None)
    return reply


def _models(c: Client, args: argparse.Namespace) -> None:
    for m in c.models():
        kind = "streamable" if m.streamable else "Predict only"
        print(f"{m.name}\tv{m.version}\t{m.input.kind}->{m.output.kind}\t{kind}\t{m.task}")


def _model(c: Client, args: argparse.Namespace) -> None:
    info = c.model(args.name, args.version)
    shown = message_dict(info)
    manifest = shown.pop("manifest_json", "")
    if manifest:
        shown["manifest"] = json.loads(manifest)
    _print(shown)


def _step(c: Client, args: argparse.Namespace) -> None:
    if (args.values is None) == (args.text is None):
        raise UsageError("step: give exactly one of --values or --text")
    if args.text is not None:
        chunks: list[Any] = [args.text] if args.one_call else list(args.text)
    else:  # parsed before a session is opened for them
        steps = _features(parse_values(args.values))
        chunks = [steps] if args.one_call else [[row] for row in steps]
    with c.session(args.model, args.version) as s:
        if args.text is not None:
            replies = [s.step(text=t) for t in chunks]
        else:
            replies = [s.step(chunk) for chunk in chunks]
    labels = list(c.model(args.model, args.version).output.labels)
    for reply in replies:
        _print(_with_labels(message_dict(reply), labels))


def _generate(c: Client, args: argparse.Namespace) -> None:
    with c.session(args.model, args.version) as s:
        events = s.generate(
            args.prompt,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
        )
        shown = False  # the prompt only once the server has accepted it
        for g in events:
            sys.stdout.write(g.text if shown else args.prompt + g.text)
            sys.stdout.flush()
            shown = True
    sys.stdout.write(("" if shown else args.prompt) + "\n")


def _forecast(c: Client, args: argparse.Namespace) -> None:
    history = _features(parse_values(args.values))
    manifest_json = c.model(args.model, args.version).manifest_json
    warning = input_range_warning(json.loads(manifest_json) if manifest_json else {}, history)
    if warning:
        print(f"rnnserve client: warning: {warning}", file=sys.stderr)
    with c.session(args.model, args.version) as s:
        forecast = [list(g.value) for g in s.generate(history, max_tokens=args.steps)]
    print(json.dumps({"history": history, "forecast": forecast}))
    if args.plot:
        dt, _ = _sampling(json.loads(manifest_json) if manifest_json else {})
        truth = known_continuation([h[0] for h in history], dt, len(forecast)) if dt else None
        plot_forecast(history, forecast, args.plot, args.model, truth)
        print(f"wrote {args.plot}", file=sys.stderr)


def input_range_warning(manifest: dict[str, Any], history: list[list[float]]) -> str | None:
    """Why ``history`` looks unlike what the model was trained on, or None (also when the
    manifest does not say): a value outside ``input.range``, or, for a sampled signal (sine,
    ``input.sampling``), a frequency outside the trained ``angular_frequency`` at its ``dt``."""
    values = [row[0] for row in history if row]
    name = manifest.get("name", "the model")
    low_high = _min_max((manifest.get("input") or {}).get("range"))
    if low_high and any(not low_high[0] <= v <= low_high[1] for v in values):
        return f"values outside [{low_high[0]}, {low_high[1]}], the range {name} was trained on"
    dt, w_range = _sampling(manifest)
    w = _sine_frequency(values, dt) if dt and w_range else None
    if w is None or w_range is None or w_range[0] * 0.9 <= w <= w_range[1] * 1.1:
        return None  # a tenth of slack: the estimate from a few rounded values is rough
    return (
        f"these values step like sin(w t) with w ≈ {w:.2f} ({w * dt:.3f} rad per value); {name} "
        f"was trained on w in [{w_range[0]}, {w_range[1]}] sampled every dt = {dt}, so the "
        "forecast may be poor"
    )


def _sampling(manifest: dict[str, Any]) -> tuple[float | None, tuple[float, float] | None]:
    """(dt, (w_min, w_max)) from ``input.sampling``, or from the training task's arguments in a
    manifest written before the input said so; (None, None) when neither has them."""
    sampling = (manifest.get("input") or {}).get("sampling")
    if isinstance(sampling, dict):
        return float(sampling["dt"]), _min_max(sampling.get("angular_frequency"))
    task = (manifest.get("training") or {}).get("task_args") or {}
    if {"dt", "w_min", "w_max"} <= task.keys():
        return float(task["dt"]), (float(task["w_min"]), float(task["w_max"]))
    return None, None


def _min_max(value: Any) -> tuple[float, float] | None:
    if isinstance(value, dict) and {"min", "max"} <= value.keys():
        return float(value["min"]), float(value["max"])
    return None


def _sine_frequency(values: list[float], dt: float) -> float | None:
    """The angular frequency of sin(w t + phase) sampled every ``dt`` that ``values`` follow:
    x[k-1] + x[k+1] = 2 cos(w dt) x[k]. None when there are too few usable values."""
    ratios = [
        (values[k - 1] + values[k + 1]) / (2 * values[k])
        for k in range(1, len(values) - 1)
        if abs(values[k]) > 0.2
    ]
    if not ratios:
        return None
    ratios.sort()
    cos_w_dt = min(1.0, max(-1.0, ratios[len(ratios) // 2]))
    return math.acos(cos_w_dt) / dt


def known_continuation(values: list[float], dt: float, steps: int) -> list[float] | None:
    """When ``values`` are samples of a sine every ``dt`` (a sin(w t) + b cos(w t), fitted to
    within 1e-3), its next ``steps`` values: the truth a forecast can be drawn against. None for
    anything else."""
    w = _sine_frequency(values, dt) if len(values) >= 3 else None
    if w is None:
        return None
    t = np.arange(len(values) + steps) * dt
    basis = np.stack([np.sin(w * t), np.cos(w * t)], axis=1)  # (n + steps, 2)
    coef, *_ = np.linalg.lstsq(basis[: len(values)], np.asarray(values), rcond=None)
    if np.abs(basis[: len(values)] @ coef - values).max() > 1e-3:
        return None
    return (basis[len(values) :] @ coef).tolist()


def plot_forecast(
    history: list[list[float]],
    forecast: list[list[float]],
    path: str,
    title: str,
    truth: list[float] | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.2))
    n = len(history)
    ax.plot(range(n), [h[0] for h in history], "o-", label="history (sent)")
    ahead = range(n, n + len(forecast))
    if truth is not None:
        ax.plot(
            ahead,
            truth,
            "--",
            color="0.5",
            label="true continuation\n(the sine the history follows)",
        )
    ax.plot(ahead, [f[0] for f in forecast], ".-", label="forecast")
    ax.set_xlabel("step")
    ax.set_ylabel("value (the model's input feature)")
    ax.set_title(f"{title}: forecast by feeding predictions back")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside, off the data
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _predict(c: Client, args: argparse.Namespace) -> None:
    inputs: list[Any] = [*args.text, *(_features(parse_values(v)) for v in args.values)]
    if not inputs:
        raise UsageError("predict: give at least one --values or --text sequence")
    reply = message_dict(c.predict(args.model, inputs, version=args.version))
    _print(_with_labels(reply, list(c.model(args.model, args.version).output.labels)))


def _connect(args: argparse.Namespace) -> Client:
    """A client as the security flags say; OSError for a file that cannot be read."""
    token = Path(args.token_file).read_text().strip() if args.token_file else None
    return Client(
        args.address,
        tls_ca=args.tls_ca or None,
        tls_cert=args.tls_cert or None,
        tls_key=args.tls_key or None,
        token=token,
    )


def client_command(args: argparse.Namespace) -> int:
    try:
        client = _connect(args)
    except (OSError, ValueError) as e:
        print(f"rnnserve client: {e}", file=sys.stderr)
        return 2
    with client as c:
        try:
            args.action(c, args)
        except grpc.RpcError as e:
            print(f"rnnserve client: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        except (ValueError, UsageError) as e:  # --values that do not parse, a missing flag
            print(f"rnnserve client: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # an unwritable --plot path: the user's argument is at fault
            print(f"rnnserve client: {e}", file=sys.stderr)
            return 2
    return 0
