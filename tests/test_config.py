"""Config loading and validation, the CLI's error contract, configs/ and docs/config.md in sync.

Fast: the in-process checks import only ddp_train.config; the few CLI subprocesses (each imports
torch) are started together once and shared by the tests that read them.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys

import pytest
import yaml

from ddp_train.bundled import bundled_configs, config_path, template
from ddp_train.config import (Config, ConfigError, RunConfig, annotated_yaml, describe,
                              from_dict, load_config)
from ddp_train.config.load import resolve_config_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def write(tmp_path, text: str, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_of(path=None, overrides=()) -> str:
    """The ConfigError message of load_config(path, overrides); fails if it loads."""
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


# ------------------------------------------------------------------ the validation battery

# (dotted key, bad value, words the message must contain). Each case is tried twice: written
# into a YAML file (the message must name the file) and as a command-line override.
BAD_VALUES = [
    ("train.epochs", "ten", "expected an integer"),  # str for int
    ("train.batch_size", True, "expected an integer"),  # bool for int
    ("optim.lr", [0.1], "expected a number"),  # list for float
    ("engine.find_unused_parameters", 1, "expected true/false"),  # int for bool
    ("model.name", 50, "expected a string"),  # int for str
    ("data.scale", 0.5, "expected a list"),  # float for list
    ("train.batch_size", -4, "must be >= 1"),  # negative batch
    ("optim.lr", 0, "must be > 0"),  # lr 0
    ("engine.precision", "fp8", "'fp8' is not one of"),
    ("early_stop.metric", "f1", "'f1' is not one of"),
    ("data.scale", [1.0, 0.08], "0 < min <= max <= 1"),  # reversed
    ("log.progress", "verbose", "'verbose' is not one of"),
    ("schedule.name", "linear", "'linear' is not one of"),
    ("data.mean", ["a", 0.4, 0.4], "data.mean[0]: expected a number"),  # list element type
    ("optim.betas", [0.9, "x"], "optim.betas[1]: expected a number"),
]


def nested(dotted: str, value) -> dict:
    tree: dict = {}
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


@pytest.mark.parametrize("key,value,words", BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_bad_value_in_file_names_key_and_file(tmp_path, key, value, words):
    path = write(tmp_path, yaml.safe_dump(nested(key, value)))
    message = error_of(path)
    assert message.startswith((f"{key}: ", f"{key}[")), message
    assert words in message and message.endswith(f"[in {path}]"), message


@pytest.mark.parametrize("key,value,words", BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_bad_value_as_override_names_key_and_command_line(key, value, words):
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    message = error_of(overrides=[f"{key}={text}"])
    assert message.startswith((f"{key}: ", f"{key}[")), message
    assert words in message and message.endswith("[in command-line override]"), message


def test_unknown_top_level_key(tmp_path):
    path = write(tmp_path, "trainer:\n  epochs: 3\n")
    message = error_of(path)
    assert message == f"trainer: unknown key (did you mean 'train'?) [in {path}]"


def test_unknown_nested_key_suggests_close_match(tmp_path):
    path = write(tmp_path, "train:\n  batchsize: 64\n")
    message = error_of(path)
    assert message == f"train.batchsize: unknown key (did you mean 'batch_size'?) [in {path}]"


def test_unknown_key_without_close_match_has_no_suggestion(tmp_path):
    message = error_of(write(tmp_path, "optim:\n  zzzz: 1\n"))
    assert message.startswith("optim.zzzz: unknown key [in ") and "did you mean" not in message


def test_bad_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "train: [1\n")
    message = error_of(path)
    assert message.startswith(f"{path}: not valid YAML"), message


def test_non_mapping_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "- train\n- optim\n")
    assert error_of(path) == f"{path}: the top level must be a mapping of sections"


def test_section_that_is_not_a_mapping(tmp_path):
    path = write(tmp_path, "train: 5\n")
    message = error_of(path)
    assert message.startswith("train: expected a mapping") and message.endswith(f"[in {path}]")


def test_missing_file_names_the_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    message = error_of(path)
    assert message.startswith(f"{path}: cannot read config"), message


def test_override_without_equals():
    message = error_of(overrides=["train.epochs"])
    assert message == ("override 'train.epochs': expected dotted.key=value "
                       "[in command-line override]")


def test_override_of_unknown_section():
    message = error_of(overrides=["trian.epochs=3"])
    assert message == "trian: unknown key (did you mean 'train'?) [in command-line override]"


def test_override_of_unknown_nested_key():
    message = error_of(overrides=["optim.learning_rate=0.1"])
    assert message.startswith("optim.learning_rate: unknown key")
    assert message.endswith("[in command-line override]")


def test_override_with_empty_key():
    assert "key before '=' is empty" in error_of(overrides=["=5"])


def test_empty_section_in_file_takes_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n"), ["train.epochs=2"])
    assert cfg.train.epochs == 2


def test_falsy_non_mapping_section_is_an_error(tmp_path):
    assert "train" in error_of(write(tmp_path, "train: 0\n"))


def test_long_strings_print_on_one_line():
    from ddp_train.config import annotated_yaml

    cfg = load_config(None, ["data.shards=" + "/very long/path with spaces" * 6])
    assert from_dict(Config, yaml.safe_load(annotated_yaml(cfg))) == cfg


def test_file_is_validated_before_overrides(tmp_path):
    # An override cannot rescue a bad file: the error is reported against the file.
    path = write(tmp_path, "train:\n  batch_size: 0\n")
    message = error_of(path, ["train.batch_size=8"])
    assert message == f"train.batch_size: must be >= 1 [in {path}]"


# ----------------------------------------------------------------------- what is accepted

def test_defaults_are_the_digits_demo():
    cfg = load_config()
    assert cfg == Config()
    assert (cfg.data.shards, cfg.model.name, cfg.data.image_size) == ("shards/digits",
                                                                      "resnet10t", 32)


def test_scientific_notation_without_dot_in_yaml(tmp_path):
    # YAML 1.1 reads 1e-4 (no '.') as a string; float keys accept it.
    path = write(tmp_path, "optim:\n  lr: 1e-4\n  eps: 1e-8\nearly_stop:\n  target: 9e-1\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.eps == 1e-8 and cfg.early_stop.target == 0.9
    assert load_config(None, ["optim.lr=1e-4"]).optim.lr == 1e-4


def test_int_accepted_for_float_and_null_for_optional():
    cfg = load_config(None, ["optim.lr=1", "early_stop.target=null", "optim.betas=[0.9, 0.95]"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.early_stop.target is None and cfg.optim.betas == [0.9, 0.95]


def test_overrides_apply_in_order_on_top_of_the_file(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: 64\n  epochs: 3\n")
    cfg = load_config(path, ["train.epochs=5", "train.epochs=7", "run.path=", "run.name='2024'"])
    assert (cfg.train.batch_size, cfg.train.epochs) == (64, 7)
    assert cfg.run.path == "" and cfg.run.name == "2024"
    assert cfg.optim == Config().optim  # untouched sections keep their defaults


def test_annotated_yaml_round_trips():
    cfg = load_config(None, ["optim.lr=3e-4", "data.scale=[0.08, 1.0]", "early_stop.target=0.99"])
    assert from_dict(Config, yaml.safe_load(annotated_yaml(cfg))) == cfg


# Every key the issue asks for, by its dotted name.
REQUIRED_KEYS = """run.name run.dir seed data.shards data.image_size data.num_workers
train.batch_size train.epochs train.max_steps train.grad_accum model.name optim.name optim.lr
optim.weight_decay schedule.name engine.name engine.precision eval.every_steps
checkpoint.every_steps log.interval early_stop.metric early_stop.patience
early_stop.target""".split()


def test_required_keys_exist():
    keys = {key for key, _, _ in describe()}
    assert not set(REQUIRED_KEYS) - keys, sorted(set(REQUIRED_KEYS) - keys)


def test_every_key_has_a_one_line_doc():
    for key, _, text in describe():
        assert text and "\n" not in text, key


# ------------------------------------------------------------------------- configs/ files

@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_every_config_file_loads(path):
    assert isinstance(load_config(path), Config)


def test_config_files_present():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"digits.yaml", "gpu_4x32_resnet50.yaml"} <= names


def test_digits_yaml_equals_the_defaults():
    assert load_config(os.path.join(ROOT, "configs", "digits.yaml")) == Config()


def test_gpu_recipe_is_what_it_says():
    cfg = load_config(os.path.join(ROOT, "configs", "gpu_4x32_resnet50.yaml"))
    assert (cfg.model.name, cfg.data.image_size, cfg.train.batch_size) == ("resnet50", 224, 32)
    assert (cfg.optim.name, cfg.schedule.name, cfg.engine.precision) == ("adamw", "cosine", "bf16")
    assert cfg.schedule.warmup_epochs > 0 and cfg.train.channels_last
    assert cfg.data.num_workers == 8 and cfg.data.scale == [0.08, 1.0] and cfg.data.hflip == 0.5
    assert cfg.eval.every_epoch
    assert (cfg.checkpoint.every_steps, cfg.checkpoint.keep_last) == (1000, 3)
    assert cfg.early_stop.metric == "macro_f1" and cfg.early_stop.patience > 0


# ------------------------------------------------------------- bundled configs and templates

def test_bundled_configs_are_the_files_of_configs():
    names = {os.path.basename(p)[:-len(".yaml")] for p in CONFIGS}
    assert set(bundled_configs()) == names and "digits" in names
    for name in names:  # through the package's symlink, the very same files
        assert os.path.samefile(config_path(name), os.path.join(ROOT, "configs", f"{name}.yaml"))
    for name in ("train.sbatch", "train_multinode.sbatch"):
        with open(os.path.join(ROOT, "slurm", name), encoding="utf-8") as f:
            assert template(name) == f.read()
    with pytest.raises(FileNotFoundError):
        template("cluster.sh")  # test infrastructure, not a template


def test_bundled_name_loads_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("digits") == load_config(os.path.join(ROOT, "configs", "digits.yaml"))
    cfg = load_config("gpu_4x32_resnet50", ["data.shards=/data/defects"])
    assert (cfg.model.name, cfg.run.name) == ("resnet50", "resnet50")  # the file's run.name


def test_existing_file_wins_over_a_bundled_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "seed: 5\n", name="digits")
    assert load_config("digits").seed == 5
    assert resolve_config_path("digits") == "digits"


def test_unknown_bundled_name_lists_the_bundled_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = error_of("digist")
    assert message.startswith("--config digist: no such file, and not a bundled config "
                              "(bundled: ")
    assert "digits" in message and "gpu_4x32_resnet50" in message
    # Something that looks like a path stays a path: the usual missing-file error.
    assert error_of("digits.yaml").startswith("digits.yaml: cannot read config")
    assert error_of("sub/digits").startswith("sub/digits: cannot read config")


# ------------------------------------------------------------------------- default run name

@pytest.mark.parametrize("shards,name", [
    ("shards/digits", "digits"),
    ("shards/defects", "defects"),
    ("/data/shards/defects/", "defects"),
    ("https://host/datasets/defects", "defects"),
    ("s3://bucket/ds/", "ds"),
    ("pipe:aws s3 cp s3://bucket/ds/{} -", "ds"),
])
def test_run_name_defaults_to_the_shards_folder(shards, name):
    assert load_config(None, [f"data.shards={shards}"]).run.name == name


def test_run_name_set_in_file_or_override_wins(tmp_path):
    path = write(tmp_path, "run:\n  name: exp1\ndata:\n  shards: shards/defects\n")
    assert load_config(path).run.name == "exp1"
    assert load_config(path, ["run.name=exp2"]).run.name == "exp2"
    assert load_config(path, ["run.name="]).run.name == "defects"  # '' = from the shards
    # the demo file leaves it '': a copy pointed at other shards names runs after them
    assert load_config(os.path.join(ROOT, "configs", "digits.yaml"),
                       ["data.shards=shards/defects"]).run.name == "defects"
    assert load_config(os.path.join(ROOT, "configs", "digits.yaml")).run.name == "digits"


def test_run_name_is_resolved_in_the_printed_config():
    cfg = load_config(None, ["data.shards=shards/defects"])
    assert "  name: defects  #" in annotated_yaml(cfg)
    assert RunConfig().name == "" and Config().run.name == "digits"


def test_run_name_validation():
    assert "run.name: must be a non-empty name without '/'" in error_of(None, ["run.name=a/b"])
    assert "run.name: cannot be derived from data.shards '/'" in error_of(None, ["data.shards=/"])


# ---------------------------------------------------------------------------- docs in sync

def load_generator():
    spec = importlib.util.spec_from_file_location("gen_config_doc",
                                                  os.path.join(ROOT, "docs", "gen_config_doc.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_docs_and_digits_yaml_are_in_sync(capsys):
    assert load_generator().main(["--check"]) == 0, capsys.readouterr().err


def test_config_md_lists_every_key():
    with open(os.path.join(ROOT, "docs", "config.md"), encoding="utf-8") as f:
        text = f.read()
    missing = [key for key, _, _ in describe() if f"| `{key}` |" not in text]
    assert not missing, missing


# ----------------------------------------------------------------------------- launch/*.sh

@pytest.mark.parametrize("script", ["torchrun_single_node.sh", "torchrun_multi_node.sh"])
def test_launch_script_usage(script):
    path = os.path.join(ROOT, "launch", script)
    with open(path, encoding="utf-8") as f:
        assert "set -euo pipefail" in f.read()
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    proc = subprocess.run(["bash", path], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr.startswith("usage:")


# ------------------------------------------------------------------------ the CLI contract

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT")

# name -> (files to write in the working directory, argv after -m ddp_train)
CLI_CASES = {
    "unknown_section": ({}, ["trian.epochs=3"]),
    "bad_value_in_file": ({"neg.yaml": "train:\n  batch_size: -1\n"}, ["--config", "neg.yaml"]),
    # The defaults' own values, written the way YAML 1.1 reads as strings (no '.'): the output
    # must still parse back to exactly Config().
    "print_config": ({"sci.yaml": "optim:\n  lr: 3e-3\nschedule:\n  warmup_lr: 1e-6\n"},
                     ["--config", "sci.yaml", "--print-config"]),
    # options between overrides; a --resume value YAML would read as a bool stays a string
    "intermixed": ({"yes": "a checkpoint file named yes"},
                   ["seed=1", "--resume", "yes", "train.epochs=2", "--print-config"]),
    "missing_resume": ({}, ["--resume", "nope.pt", "data.num_workers=0"]),
    "unknown_bundled_name": ({}, ["--config", "digist"]),
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Run every CLI case at once (each pays torch's import time); name -> CompletedProcess."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    running = {}
    for name, (files, argv) in CLI_CASES.items():
        cwd = tmp_path_factory.mktemp(name)
        for fname, text in files.items():
            (cwd / fname).write_text(text, encoding="utf-8")
        running[name] = (cwd, subprocess.Popen([sys.executable, "-m", "ddp_train", *argv],
                                               cwd=cwd, env=env, stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, text=True))
    done = {}
    for name, (cwd, proc) in running.items():
        out, err = proc.communicate(timeout=120)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        done[name].cwd = cwd
    return done


@pytest.mark.parametrize("name,expected", [
    ("unknown_section", "ddp-train: error: trian: unknown key (did you mean 'train'?) "
                        "[in command-line override]"),
    ("bad_value_in_file", "ddp-train: error: train.batch_size: must be >= 1 [in neg.yaml]"),
    ("missing_resume", "ddp-train: error: run.resume: nope.pt is not a checkpoint file"),
    ("unknown_bundled_name", "ddp-train: error: --config digist: no such file, and not a "
                             "bundled config (bundled: "),
])
def test_cli_config_error_is_one_line_and_exit_2(cli, name, expected):
    proc = cli[name]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr
    assert not os.path.exists(proc.cwd / "runs")  # nothing was created


def test_cli_options_between_overrides(cli):
    proc = cli["intermixed"]
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert (cfg["seed"], cfg["train"]["epochs"], cfg["run"]["resume"]) == (1, 2, "yes")


def test_cli_print_config_parses_back_to_the_defaults_and_accepts_1e_4(cli):
    proc = cli["print_config"]
    assert proc.returncode == 0, proc.stderr
    assert "  lr: 0.003  # " in proc.stdout  # '3e-3' in the file became a float
    assert from_dict(Config, yaml.safe_load(proc.stdout)) == Config()
    assert not os.path.exists(proc.cwd / "runs") and not os.path.exists(proc.cwd / "shards")
