"""Archives and TorchServe's configuration, without starting TorchServe.

An archive holds what a worker needs (the handler loads and predicts from an extracted .mar), is
skipped when nothing it is built from changed, and keeps its settings unless told otherwise. The
effective config.properties keeps every API on loopback unless a --config file says otherwise.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml
from ts.context import Context, RequestProcessor

from serving.torchserve import archive, control
from serving.torchserve.handler import RnnHandler

MODELS = ("sum_sign_lstm", "char_hello")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def store(quick_store: Path, tmp_path: Path) -> Path:
    """A writable store whose models are the (read-only) quick store's, linked."""
    for name in MODELS:
        (tmp_path / name).symlink_to(quick_store / name, target_is_directory=True)
    return tmp_path


def test_one_archive_per_model_with_everything_a_worker_needs(store: Path) -> None:
    built = archive.build_archives(store, overrides={"batch_size": 4, "max_batch_delay_ms": 50})
    assert [(b.name, b.rebuilt) for b in built] == [(n, True) for n in sorted(MODELS)]
    with zipfile.ZipFile(store / "torchserve" / "sum_sign_lstm.mar") as z:
        names = set(z.namelist())
        mar_manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        config = yaml.safe_load(z.read("model-config.yaml"))
        listed = json.loads(z.read("manifest.json"))["files"]
    assert {"handler.py", "manifest.json", "model-config.yaml", *listed} <= names
    assert mar_manifest["model"]["handler"] == "handler.py"
    assert mar_manifest["model"]["configFile"] == "model-config.yaml"
    assert config["batchSize"] == 4 and config["maxBatchDelay"] == 50
    assert config["minWorkers"] == config["maxWorkers"] == 1 and config["responseTimeout"] == 60
    assert config["handler"]["backend"] == "onnx"
    assert not [p for p in (store / "torchserve").iterdir() if p.suffix != ".mar"]  # no staging


def test_the_handler_runs_from_an_extracted_archive(store: Path, tmp_path: Path) -> None:
    archive.build_archives(store, ["sum_sign_lstm"])
    model_dir = tmp_path / "extracted"
    with zipfile.ZipFile(store / "torchserve" / "sum_sign_lstm.mar") as z:
        z.extractall(model_dir)  # what TorchServe does before it starts a worker
    config = yaml.safe_load((model_dir / "model-config.yaml").read_text())
    ctx = Context("sum_sign_lstm", str(model_dir), {}, 4, None, "0.12.0", model_yaml_config=config)
    handler = RnnHandler()
    handler.initialize(ctx)  # verifies every file's sha256 against the manifest
    ctx.request_processor = [RequestProcessor({})]
    (reply,) = handler.handle([{"body": b'{"inputs": [[0.5], [0.25]]}'}], ctx)
    assert json.loads(reply)["label"] in ("negative", "positive")


def test_up_to_date_archives_are_skipped_and_keep_their_settings(store: Path) -> None:
    archive.build_archives(store, overrides={"batch_size": 4})
    mar = store / "torchserve" / "char_hello.mar"
    before = mar.stat().st_mtime_ns
    again = archive.build_archives(store)  # no flags: keep batch_size 4, nothing changed
    assert [b.rebuilt for b in again] == [False, False]
    assert mar.stat().st_mtime_ns == before
    changed = archive.build_archives(store, ["char_hello"], {"workers": 2})
    assert changed[0].rebuilt
    stamp = archive.read_stamp(mar)
    assert stamp is not None
    assert stamp["settings"]["batch_size"] == 4 and stamp["settings"]["workers"] == 2


def test_a_changed_model_rebuilds_its_archive(store: Path, quick_store: Path) -> None:
    archive.build_archives(store, ["char_hello"])
    (store / "char_hello").unlink()  # replace the link with a copy we may change
    shutil.copytree(quick_store / "char_hello", store / "char_hello")
    manifest = store / "char_hello" / "1" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"description": "', '"description": "v2 '))
    (built,) = archive.build_archives(store, ["char_hello"])
    assert built.rebuilt
    with zipfile.ZipFile(built.path) as z:
        assert json.loads(z.read("manifest.json"))["description"].startswith("v2 ")


def test_archive_command_line(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from serving.cli import main

    assert main(["archive", "--store", str(store), "--batch-size", "2"]) == 0
    assert main(["archive", "--store", str(store)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("0 built, 2 up to date")
    with pytest.raises(SystemExit, match="unknown model 'nope'"):
        main(["archive", "--store", str(store), "--model", "nope"])
    with pytest.raises(SystemExit, match="batch_size must be a positive integer, got 0"):
        main(["archive", "--store", str(store), "--batch-size", "0"])


@pytest.mark.parametrize(
    ("field", "value"), [("batch_size", 0), ("workers", -1), ("backend", "tensorrt")]
)
def test_settings_refuse_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field if field != "backend" else "backend must be"):
        archive.ArchiveSettings(**{field: value})


# ---- config.properties ------------------------------------------------------------------------


def test_default_config_keeps_everything_on_loopback_with_model_api_off() -> None:
    props = control.effective_properties(None, control.Ports())
    for key in ("inference_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:")
    assert props["management_address"] == "unix:management.sock"  # on no TCP port
    assert props["use_native_io"] == "true"  # TorchServe's Unix sockets need it
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["disable_token_authorization"] == "true"
    assert props["enable_model_api"] == "false"
    assert props["decode_input_request"] == "false"  # the handler parses and measures bodies


def test_ports_and_a_config_file_lay_over_the_defaults(tmp_path: Path) -> None:
    ports = control.Ports(inference=18080, management=18081, grpc_inference=17070)
    props = control.effective_properties(None, ports, enable_model_api=True)
    assert props["inference_address"] == "http://127.0.0.1:18080"
    assert props["management_address"] == "http://127.0.0.1:18081"
    assert props["metrics_address"] == "http://127.0.0.1:8082"
    assert props["grpc_inference_port"] == "17070" and props["enable_model_api"] == "true"
    deploy = ROOT / "deploy" / "torchserve" / "config.properties"
    props = control.effective_properties(deploy, control.Ports(inference=9999))
    assert props["inference_address"] == "http://0.0.0.0:9999"  # the container binds all
    assert props["management_address"] == "unix:management.sock"
    run = Path("/run/x")
    assert control.in_run_dir(props["management_address"], run) == "unix:/run/x/management.sock"
    assert control.in_run_dir("unix:/abs.sock", run) == "unix:/abs.sock"
    assert control.local_url(props["inference_address"]) == "http://127.0.0.1:9999"


def test_run_folder_is_outside_the_store_and_short_enough_for_worker_sockets(tmp_path: Path):
    deep = tmp_path / ("x" * 120) / "store"
    run = control.run_dir(deep)
    assert deep not in run.parents
    assert len(str(run / "tmp" / ".ts.sock.65535")) < 100
    assert control.run_dir(deep) == run != control.run_dir(tmp_path)
