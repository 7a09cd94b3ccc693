"""`skinml data`: the bundled sample's table by default (the folder errors are tested with
the data layer, tests/data/)."""

from __future__ import annotations

from skinml.data.cache import cache_root
from skinml.training.choices import load_run_config
from skinml.workflows.prepared import prepare_data

from ..conftest import skinml_in_process


def test_data_check_without_argument_prints_the_sample_table():
    result = skinml_in_process("data", "check")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1] == "images           660 (missing 0, corrupt 0, without metadata 0)"
    assert lines[2] == "lesions          450"
    assert lines[-1].split() == ["total", "660", "450"]
    assert "nv                  Melanocytic nevi     250      193" in result.stdout


def test_data_check_of_a_folder_with_a_corrupt_image_prints_the_error_alone(make_folder):
    root = make_folder()
    broken = sorted(root.glob("*.jpg"))[1]
    broken.write_bytes(b"not a jpeg")
    result = skinml_in_process("data", "check", str(root))
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {broken}: cannot decode image")
    assert line.endswith("(1 corrupt image(s) in all; `skinml data prepare --skip-corrupt` "
                         "leaves them out)")


def test_a_bare_data_prepare_builds_the_cache_the_default_training_reads(make_folder):
    root = make_folder()
    result = skinml_in_process("data", "prepare", str(root), "--workers", "1")
    assert result.returncode == 0, result.stderr
    default = load_run_config("demo", [f"data.dir={root}", "runtime.progress=false"])
    data = prepare_data(default)  # what `skinml train --set data.dir=...` opens
    assert data.cache.reused and data.cache.size == default.data.cache_size
    assert result.stdout.startswith(f"built image cache {data.cache.path}: ")
    other = skinml_in_process("data", "prepare", str(root), "--size", "48", "--workers", "1")
    assert other.returncode == 0, other.stderr
    assert "at 64x48 px" in other.stdout and str(data.cache.path) not in other.stdout


def test_every_command_takes_the_folder_as_data_dir(make_folder):
    """`data check` and `data prepare` take the folder as an argument, as they always did,
    and as --data-dir like train, cv, tune, pipeline and evaluate."""
    folder = make_folder()
    as_argument = skinml_in_process("data", "check", str(folder), "--no-decode")
    as_option = skinml_in_process("data", "check", "--data-dir", str(folder), "--no-decode")
    assert as_argument.returncode == as_option.returncode == 0
    assert as_option.stdout == as_argument.stdout and str(folder) in as_option.stdout
    both = skinml_in_process("data", "check", str(folder), "--data-dir", "elsewhere")
    assert both.returncode == 2 and "--data-dir" in both.stderr
    for command in ("train", "cv", "tune", "pipeline", "evaluate", "data check",
                    "data prepare"):
        help_text = skinml_in_process(*command.split(), "--help").stdout
        assert "--data-dir" in help_text, command


def test_missing_imagenet_weights_stop_every_training_command_before_any_work(
        tmp_path, monkeypatch):
    """Offline with model.pretrained=true: one line and exit 2, with no run made, no image
    cache built and no study opened."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")  # nothing listens: fails at once
    weights = ["--set", "model.arch=resnext50_32x4d", "--set", "model.pretrained=true",
               "--storage", f"sqlite:///{tmp_path / 'optuna.db'}"]
    for command in (["train"], ["cv"], ["tune"], ["pipeline"]):
        args = weights if command[0] in ("tune", "pipeline") else weights[:4]
        result = skinml_in_process(*command, *args)
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.strip().splitlines()[-1].startswith(
            "error: cannot fetch ImageNet weights for resnext50_32x4d"), command
    assert sorted(p.name for p in tmp_path.iterdir()) == ["torch"]  # no store, no study
    assert not cache_root().exists() or not any(cache_root().iterdir())  # no image cache
