"""Every console script turns every user error into one line on stderr and exit 2, with no
traceback: bad options, bad or missing run directories, an invalid config.yaml in a run or export
directory."""
import pytest
import torch
from safetensors.torch import save_file

from tiny_run import REPO, TINY, run_cli


def assert_one_line(p, needle):
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    last = err.splitlines()[-1]
    assert needle in last, err


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A valid export folder (config.yaml + ema.safetensors) of the tiny UNet."""
    from pipeline.config import load_config, to_yaml
    from pipeline.factory import build_model

    d = tmp_path_factory.mktemp("export")
    cfg = load_config(REPO / "configs/demo.yaml", [f"run_dir={d}", *TINY])
    (d / "config.yaml").write_text(to_yaml(cfg))
    torch.manual_seed(0)
    save_file(build_model(cfg).state_dict(), d / "ema.safetensors")
    return d


BAD_CONFIGS = {
    "invalid YAML": ("data: [unclosed\n", "not valid YAML"),
    "not UTF-8": (b"run_dir: \xff\xfe\n", "not UTF-8"),
    "not a mapping": ("- a\n- b\n", "expected a mapping"),
    "unknown key": ("optim:\n  learning_rate: 1\n", "unknown key 'optim.learning_rate'"),
}


@pytest.mark.parametrize("what", sorted(BAD_CONFIGS))
@pytest.mark.parametrize("command", ["pipeline.cli.sample", "pipeline.cli.export"])
def test_an_invalid_config_yaml_in_a_run_or_export_directory_is_one_line(tmp_path, what, command):
    text, needle = BAD_CONFIGS[what]
    d = tmp_path / "dir"
    d.mkdir()
    (d / "config.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    args = [str(d), "--out", str(tmp_path / "g.png")] if command.endswith("sample") else [str(d), str(tmp_path / "o")]
    assert_one_line(run_cli(command, *args), needle)


def test_a_config_yaml_that_is_a_directory_is_one_line(tmp_path):
    (tmp_path / "run" / "config.yaml").mkdir(parents=True)
    assert_one_line(run_cli("pipeline.cli.sample", str(tmp_path / "run"), "--out", str(tmp_path / "g.png")),
                    "is a directory")


@pytest.mark.parametrize("args, needle", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--num", "0"], "--num must be >= 1"),
    (["--device", "bogus"], "--device 'bogus' is not usable"),
    (["--steps", "5000"], "--steps must be in [1, 1000]"),
])
def test_sample_options_are_checked_before_any_work(tmp_path, export_dir, args, needle):
    p = run_cli("pipeline.cli.sample", str(export_dir), "--out", str(tmp_path / "g.png"), *args)
    assert_one_line(p, needle)
    assert not (tmp_path / "g.png").exists()


def test_sample_output_that_cannot_be_written_is_refused_before_sampling(tmp_path, export_dir):
    (tmp_path / "adir").mkdir()
    assert_one_line(run_cli("pipeline.cli.sample", str(export_dir), "--out", str(tmp_path / "adir")),
                    "is a directory")


def test_sample_weights_that_do_not_fit_the_config_are_one_line(tmp_path, export_dir):
    d = tmp_path / "mismatch"
    d.mkdir()
    (d / "config.yaml").write_text((export_dir / "config.yaml").read_text().replace("channels: 8", "channels: 16"))
    (d / "ema.safetensors").write_bytes((export_dir / "ema.safetensors").read_bytes())
    assert_one_line(run_cli("pipeline.cli.sample", str(d), "--out", str(tmp_path / "g.png")), "does not match")


@pytest.mark.parametrize("override, needle", [
    ("optim.lr=[", "optim.lr"),
    ("train.max_steps=lots", "train.max_steps: expected int"),
])
def test_train_override_errors_are_one_line(tmp_path, override, needle):
    p = run_cli("pipeline.train", "configs/demo.yaml", f"run_dir={tmp_path}/r", override)
    assert_one_line(p, needle)


def test_train_on_a_run_dir_whose_config_is_invalid_is_one_line(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("model: {channels: [\n")
    p = run_cli("pipeline.train", "configs/demo.yaml", f"run_dir={run}", *TINY, "train.max_steps=1")
    assert_one_line(p, "not valid YAML")


def test_shards_errors_are_one_line(tmp_path):
    assert_one_line(run_cli("pipeline.cli.shards", str(tmp_path / "missing"), str(tmp_path / "out")), "missing")
    (tmp_path / "empty").mkdir()
    assert_one_line(run_cli("pipeline.cli.shards", str(tmp_path / "empty"), str(tmp_path / "out")), "no images")
    assert_one_line(run_cli("pipeline.cli.shards", str(tmp_path / "empty"), str(tmp_path / "out"),
                            "--shard-size", "0"), "--shard-size must be >= 1")


def test_export_of_a_run_without_checkpoints_is_one_line(tmp_path, export_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text((export_dir / "config.yaml").read_text())
    assert_one_line(run_cli("pipeline.cli.export", str(run), str(tmp_path / "o")), "has no checkpoint yet")
