"""The command line over a temporary store, including a user's own experiment."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from study import cli
from study.store import tracking
from study.tools import mode_cost
from tests.conftest import free_port, real_data_present

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "protocols" / "smoke.yaml")


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(tracking, "STORE_DIR", tmp_path)
    monkeypatch.setattr(cli, "REPORTS", tmp_path / "reports")
    return tracking.client()


def _log_own_runs(store, name: str) -> None:
    """Runs logged by hand with only the schema's required keys, as a user would."""
    exp = store.create_experiment(name)
    accs = {(0.0, 0.0): [0.880, 0.884, 0.879, 0.886, 0.882],
            (0.2, 0.5): [0.871, 0.874, 0.869, 0.877, 0.872]}
    for (d1, d2), values in accs.items():
        for seed, acc in enumerate(values):
            run = store.create_run(exp, run_name=f"mine {d1} {d2} {seed}")
            rid = run.info.run_id
            for key, value in (("dropout1", d1), ("dropout2", d2), ("seed", seed)):
                store.log_param(rid, key, value)
            for epoch in (1, 2):
                store.log_metric(rid, "test_acc", acc - 0.01 * (2 - epoch), step=epoch)
                store.log_metric(rid, "train_acc", acc + 0.01, step=epoch)
                store.log_metric(rid, "train_loss", 0.35, step=epoch)
            store.set_terminated(rid, "FINISHED")


def test_analyze_any_experiment_that_follows_the_schema(store, tmp_path):
    _log_own_runs(store, "mine")
    assert cli.main(["analyze", "--experiment", "mine", "--baseline", "0.2,0.5"]) == 0
    results = json.loads((tmp_path / "reports" / "mine" / "results.json").read_text())
    assert {(g["dropout1"], g["dropout2"]): g["n"] for g in results["groups"]} == {
        (0.0, 0.0): 5, (0.2, 0.5): 5}
    (comparison,) = results["comparisons"]
    assert comparison["mean_diff"] == pytest.approx(0.0096, abs=1e-9)  # 0.8822 - 0.8726
    assert comparison["paired"] is True
    # The analysis run holds the results, so they open from the MLflow UI.
    exp = store.get_experiment_by_name("mine")
    (analysis,) = store.search_runs([exp.experiment_id], "tags.`study.kind` = 'analysis'")
    assert "results.json" in {a.path for a in store.list_artifacts(analysis.info.run_id)}


def test_missing_schema_key_names_run_and_key(store, capsys):
    exp = store.create_experiment("broken")
    run = store.create_run(exp, run_name="no seed")
    store.log_param(run.info.run_id, "dropout1", 0.1)
    store.log_param(run.info.run_id, "dropout2", 0.1)
    store.set_terminated(run.info.run_id, "FINISHED")
    assert cli.main(["analyze", "--experiment", "broken"]) == 2
    err = capsys.readouterr().err
    assert "'broken'" in err and run.info.run_id in err and "'seed'" in err


def test_bad_protocol_exits_2_with_the_key(tmp_path, capsys, store):
    path = tmp_path / "p.yaml"
    path.write_text("name: x\ndropout: [[0.5, 2.0]]\nseeds: {count: 2}\nbaseline: [0.5, 2.0]\n")
    assert cli.main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "dropout.0.1" in err and "2.0" in err


def test_plan_lists_every_cell(store, capsys):
    assert cli.main(["plan", SMOKE, "--set", "seeds.count=2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("todo") for line in out) == 3 * 2
    assert out[-1] == "6 cells: 0 done, 6 to run"


def _costs(path: Path, ratio: float, cpu: str, date: str = "2026-12-04") -> None:
    costs = [{"engine": "sequential", "variant": "strict", "paired_median": 1.04},
             {"engine": "batched", "variant": "portable", "paired_median": ratio}]
    path.write_text(json.dumps(mode_cost.record(costs, {"cpu_model": cpu},
                                                "python -m study.tools.bench", date)))


def test_the_mode_line_follows_the_measured_costs_file(store, capsys, tmp_path, monkeypatch):
    path = tmp_path / "mode-costs.json"
    monkeypatch.setattr(mode_cost, "PATH", path)
    argv = ["plan", SMOKE, "--set", "seeds.count=1", "--set", "execution=batched", "--set",
            "determinism=[default, portable]", "--set", "randomness=portable", "--set", "threads=1"]

    def lines() -> list[str]:
        assert cli.main(argv) == 0
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("mode ")]

    default = "mode default (batched): the reference (native kernels: its bits follow the CPU)"
    assert lines() == [default, "mode portable (batched): cost not measured on this machine "
                                "(make bench measures it)"]
    _costs(path, 1.0712, mode_cost.this_cpu())
    assert lines()[1] == ("mode portable (batched): 1.07x default's CPU time (make bench, "
                          f"2026-12-04, {mode_cost.this_cpu()})")
    _costs(path, 0.96, "Other CPU 9000", "2027-01-02")
    assert lines()[1] == ("mode portable (batched): 0.96x default's CPU time (make bench, "
                          "2027-01-02, Other CPU 9000, not this machine's CPU)")
    path.write_text("{not json")  # a broken file is no measurement
    assert "cost not measured" in lines()[1]
    _costs(path, 0.96, mode_cost.this_cpu())
    argv += ["--set", "execution=sequential"]  # measured for strict only on that engine
    assert lines()[1] == ("mode portable (sequential): cost not measured (the bench of "
                          "2026-12-04 timed no portable here)")


@pytest.mark.parametrize("command", ["plan", "run", "analyze", "report", "verify"])
def test_a_lesson_file_given_as_a_protocol_says_to_use_paper(command, store, capsys):
    lesson = str(ROOT / "protocols" / "lesson.yaml")
    assert cli.main([command, lesson]) == 2
    assert capsys.readouterr().err == (f"error: {lesson} is a lesson file (a list of protocols), "
                                       f"not a protocol: run it with `python -m study paper "
                                       f"{lesson}`\n")


def test_an_adaptive_plan_shows_round_0_and_the_ceiling(store, capsys):
    d2l = str(ROOT / "protocols" / "d2l-dropout.yaml")
    assert cli.main(["plan", d2l]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "round 0: 60 runs (to run, 60 not finished)" in out
    assert out[-1] == ("ceiling: at most 110 runs (adaptive.max_runs), 30 seeds per setting; "
                       "60 planned so far")


# --- bad input: one line per wrong key, naming file, key and value; exit 2; no traceback ------

def _smoke_with(tmp_path: Path, changes: dict[str, object]) -> Path:
    """smoke.yaml with dotted keys set (REMOVE deletes one), written as bad.yaml."""
    raw = yaml.safe_load(Path(SMOKE).read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        if value is REMOVE:
            node.pop(last)
        else:
            node[last] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


INF, NAN = float("inf"), float("nan")
REMOVE = object()
# (id, changes to smoke.yaml, fragments the one error line must hold besides the file's path)
BAD_VALUES = [
    ("unknown-key", {"colour": "red"}, ["colour: unknown key", "'red'"]),
    ("misspelt-section", {"trainng": {"epochs": 3}}, ["trainng", "did you mean 'training'"]),
    ("misspelt-key", {"training.epoch": 3}, ["training.epoch", "did you mean 'epochs'", "3"]),
    ("name-pattern", {"name": "my study"}, ["name:", "'my study'"]),
    ("name-number", {"name": 7}, ["name:", "string", "(value: 7)"]),
    ("description-number", {"description": 5}, ["description:", "(value: 5)"]),
    ("dropout-above-1", {"dropout": [[0.2, 0.5], [0.2, 1.5]]}, ["dropout.1.1", "1.5"]),
    ("dropout-negative", {"dropout": [[0.2, 0.5], [-0.1, 0.5]]}, ["dropout.1.0", "-0.1"]),
    ("dropout-nan", {"dropout": [[NAN, 0.5]], "baseline": [0.2, 0.5]},
     ["dropout.0.0", "finite", "nan"]),
    ("dropout-single", {"dropout": [[0.2]], "baseline": [0.2, 0.5]}, ["dropout.0", "[0.2]"]),
    ("dropout-triple", {"dropout": [[0.2, 0.5, 0.1]]}, ["dropout.0", "[0.2, 0.5, 0.1]"]),
    ("dropout-text", {"dropout": "lots"}, ["dropout:", "'lots'"]),
    ("dropout-empty", {"dropout": []}, ["dropout: must not be empty", "[]"]),
    ("dropout-repeat", {"dropout": [[0.2, 0.5], [0.2, 0.5]]},
     ["dropout: must not repeat", "[0.2, 0.5]"]),
    ("baseline-absent", {"baseline": [0.3, 0.3]}, ["baseline:", "[0.3, 0.3]"]),
    ("seeds-missing", {"seeds": REMOVE}, ["seeds: required key is missing"]),
    ("seeds-both", {"seeds": {"count": 2, "list": [1, 2]}}, ["seeds:", "exactly one",
                                                            "'list': [1, 2]"]),
    ("seeds-count-zero", {"seeds.count": 0}, ["seeds.count", "(value: 0)"]),
    ("seeds-count-text", {"seeds.count": "3"}, ["seeds.count", "integer", "'3'"]),
    ("seeds-list-repeat", {"seeds": {"list": [1, 1]}}, ["seeds:", "repeats", "[1, 1]"]),
    ("seeds-start-negative", {"seeds.start": -1}, ["seeds.start", "-1"]),
    ("epochs-zero", {"training.epochs": 0}, ["training.epochs", "(value: 0)"]),
    ("epochs-fraction", {"training.epochs": 2.5}, ["training.epochs", "integer", "2.5"]),
    ("epochs-bool", {"training.epochs": True}, ["training.epochs", "integer", "True"]),
    ("lr-inf", {"training.lr": INF}, ["training.lr", "finite", "inf"]),
    ("lr-negative", {"training.lr": -0.1}, ["training.lr", "-0.1"]),
    ("lr-text", {"training.lr": "fast"}, ["training.lr", "'fast'"]),
    ("batch-zero", {"training.batch_size": 0}, ["training.batch_size", "(value: 0)"]),
    ("optimizer", {"training.optimizer": "adam"}, ["training.optimizer", "'adam'"]),
    ("training-null", {"training": None}, ["training:", "(value: None)"]),
    ("model-text", {"model": "mlp"}, ["model:", "'mlp'"]),
    ("arch", {"model.arch": "resnet"}, ["model.arch", "'resnet'"]),
    ("hidden-one-layer", {"model.hidden": [256]}, ["model.hidden", "[256]"]),
    ("hidden-zero", {"model.hidden": [0, 256]}, ["model.hidden.0", "(value: 0)"]),
    ("init-std-nan", {"model.init_std": NAN}, ["model.init_std", "finite", "nan"]),
    ("init", {"model.init": "uniform"}, ["model.init", "'uniform'"]),
    ("subset-too-large", {"data.train_subset": 1_000_000_000},
     ["data.train_subset", "60000 training images", "1000000000"]),
    ("subset-zero", {"data.train_subset": 0}, ["data.train_subset", "(value: 0)"]),
    ("dataset", {"data.dataset": "mnist"}, ["data.dataset", "'mnist'"]),
    ("device", {"devices": ["tpu"]}, ["devices.0", "'tpu'"]),
    ("required-not-listed", {"required_devices": ["cuda"]},
     ["required_devices", "['cuda']", "not listed in devices"]),
    ("determinism", {"determinism": ["fast"]}, ["determinism.0", "'fast'"]),
    ("implementation", {"implementations": ["keras"]}, ["implementations.0", "'keras'"]),
    ("vary", {"vary": ["everything"]}, ["vary.0", "'everything'"]),
    ("execution", {"execution": "parallel"}, ["execution", "'parallel'"]),
    ("randomness", {"randomness": "random"}, ["randomness", "'random'"]),
    ("batch-members-zero", {"batch_members": 0}, ["batch_members", "(value: 0)"]),
    ("replicates-zero", {"replicates": 0}, ["replicates", "(value: 0)"]),
    ("threads-zero", {"threads": 0}, ["threads", "(value: 0)"]),
    ("threads-list-zero", {"threads": [1, 0]}, ["threads.1", "(value: 0)"]),
    ("alpha-above-1", {"analysis.alpha": 1.5}, ["analysis.alpha", "1.5"]),
    ("alpha-inf", {"analysis.alpha": INF}, ["analysis.alpha", "finite", "inf"]),
    ("margin-zero", {"analysis.equivalence_margin": 0}, ["analysis.equivalence_margin",
                                                         "(value: 0)"]),
    ("bootstrap-small", {"analysis.bootstrap": 10}, ["analysis.bootstrap", "(value: 10)"]),
    ("power-one", {"analysis.power": 1}, ["analysis.power", "(value: 1)"]),
]


def _error_lines(capsys, path: Path | str) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines and all(line.startswith(f"error: {path}: ") for line in lines), err
    return lines


@pytest.mark.parametrize("changes, fragments", [c[1:] for c in BAD_VALUES],
                         ids=[c[0] for c in BAD_VALUES])
def test_bad_value_is_one_line_naming_file_key_and_value(tmp_path, capsys, changes, fragments):
    path = _smoke_with(tmp_path, changes)
    assert cli.main(["plan", str(path)]) == 2
    (line,) = _error_lines(capsys, path)
    for fragment in fragments:
        assert fragment in line, line


def test_every_wrong_key_gets_its_own_line(tmp_path, capsys):
    path = _smoke_with(tmp_path, {"training.lr": INF, "data.train_subset": 70_000,
                                  "colour": "red"})
    assert cli.main(["plan", str(path)]) == 2
    lines = _error_lines(capsys, path)
    assert len(lines) == 3
    for key in ("training.lr", "data.train_subset", "colour"):
        assert sum(f": {key}: " in line for line in lines) == 1, lines


BAD_FILES = [
    ("missing", None, ["no such protocol file"]),
    ("empty", "", ["expected a mapping", "None"]),
    ("a-list", "- 1\n- 2\n", ["expected a mapping", "[1, 2]"]),
    ("not-utf8", b"name: \xff\xfe\n", ["not UTF-8"]),
    ("unclosed", "name: smoke\ndropout: [[0.1, 0.2]\n", ["line 3", "not valid YAML"]),
    ("tab-indent", "name: smoke\ntraining:\n\tepochs: 2\n", ["line 3", "not valid YAML"]),
    ("repeated-key", "name: a\nname: b\n", ["key 'name' is given twice", "'a' on line 1",
                                            "'b' on line 2"]),
    ("repeated-nested", "training: {epochs: 2, epochs: 3}\n", ["'epochs' is given twice"]),
]


@pytest.mark.parametrize("content, fragments", [c[1:] for c in BAD_FILES],
                         ids=[c[0] for c in BAD_FILES])
def test_bad_file_is_one_line(tmp_path, capsys, content, fragments):
    path = tmp_path / "bad.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert cli.main(["plan", str(path)]) == 2
    (line,) = _error_lines(capsys, path)
    for fragment in fragments:
        assert fragment in line, line


BAD_OVERRIDES = [
    ("broken-yaml", "dropout=[[0.1,", ["--set dropout", "'[[0.1,'", "not valid YAML"]),
    ("no-equals", "training.epochs", ["'training.epochs'", "expected key=value"]),
    ("no-key", "=3", ["'=3'", "expected key=value"]),
    ("empty-part", "training..epochs=1", ["'training..epochs=1'", "expected key=value"]),
    ("into-a-scalar", "name.first=1", ["--set name.first", "'name' holds 'smoke'"]),
    ("repeated-key", "seeds={count: 2, count: 3}", ["--set seeds", "'count' is given twice"]),
    ("inf", "training.lr=.inf", ["training.lr", "finite", "inf", "(set by --set)"]),
    ("unknown", "trainng.epochs=1", ["trainng", "did you mean 'training'", "(set by --set)"]),
    ("too-large", "data.train_subset=1000000000", ["data.train_subset", "1000000000"]),
]


@pytest.mark.parametrize("item, fragments", [c[1:] for c in BAD_OVERRIDES],
                         ids=[c[0] for c in BAD_OVERRIDES])
def test_bad_override_is_one_line(capsys, item, fragments):
    assert cli.main(["plan", SMOKE, "--set", item]) == 2
    (line,) = _error_lines(capsys, SMOKE)
    for fragment in fragments:
        assert fragment in line, line


def test_the_issues_cases_through_the_real_entry_point(tmp_path):
    """`python -m study` itself: a directory, and broken YAML inside --set."""
    for argv, fragment in ((["plan", str(tmp_path)], "is a directory"),
                           (["plan", SMOKE, "--set", "dropout=[[0.1,"], "not valid YAML")):
        done = subprocess.run([sys.executable, "-m", "study", *argv], cwd=ROOT, text=True,
                              capture_output=True, timeout=120)
        assert done.returncode == 2
        (line,) = done.stderr.splitlines()
        assert line.startswith("error: ") and fragment in line


# --- a command line that answers at once ------------------------------------------------------

HEAVY = ("torch", "torchvision", "mlflow", "pandas", "scipy")
# Runs the CLI in a fresh interpreter and reports which heavy modules it imported.
_PROBE = """
import json, sys
from study import cli
try:
    code = cli.main(sys.argv[1:])
except SystemExit as done:
    code = done.code
print(json.dumps({"code": code, "loaded": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def _probe(argv: list[str], env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=300)
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("argv, allowed", [
    (["--help"], set()),
    (["plan", "--help"], set()),
    (["plan", "protocols"], set()),  # a bad protocol is refused before any heavy import
    # The store says which cells are done: MLflow and what it imports itself, but no torch.
    (["plan", SMOKE], {"mlflow", "pandas", "scipy"}),
    (["paper", "protocols"], set()),  # a bad lesson file too
], ids=["help", "plan-help", "bad-protocol", "plan", "bad-lesson"])
def test_commands_import_only_what_they_need(argv, allowed, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    found = _probe(argv, env)
    assert found["code"] in (0, 2)
    assert set(found["loaded"]) <= allowed, found


# Variables that make MLflow turn telemetry off by itself (mlflow/telemetry/utils.py), removed so
# that only the harness's own setting can be what turns it off.
NOT_TRACKED_ANYWAY = {"PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "CI", "CIRCLECI", "GITLAB_CI",
                      "JENKINS_URL", "TRAVIS", "TF_BUILD", "BITBUCKET_BUILD_NUMBER",
                      "CODEBUILD_BUILD_ARN", "BUILDKITE", "TEAMCITY_VERSION",
                      "CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME",
                      "RUNBOT_WORKER_ID", "DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY"}
_TELEMETRY = """
import json, sys, threading
from study import cli
cli.main(["plan", sys.argv[1]])
from mlflow.telemetry import client, utils
print(json.dumps({"ci": utils._IS_IN_CI_ENV_OR_TESTING, "dev": utils._IS_MLFLOW_DEV_VERSION,
                  "client": client.get_telemetry_client() is not None,
                  "threads": [t.name for t in threading.enumerate() if "Telemetry" in t.name]}))
"""


def test_the_cli_turns_mlflow_telemetry_off(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in NOT_TRACKED_ANYWAY}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run([sys.executable, "-c", _TELEMETRY, SMOKE], cwd=ROOT, env=env,
                          text=True, capture_output=True, timeout=300)
    found = json.loads(done.stdout.splitlines()[-1])
    assert found == {"ci": False, "dev": False, "client": False, "threads": []}


# --- states a user meets: one line that says what to do next ----------------------------------

def _one_line(capsys) -> str:
    """The one error line, last on stderr (a note such as "downloading ..." may precede it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert [x for x in lines if x.startswith("error: ")] == lines[-1:], err
    return lines[-1]


def test_a_busy_store_says_to_wait(store, capsys, monkeypatch):
    monkeypatch.setenv("STUDY_LEASE_TTL", "4")  # the refusal comes at the holder's next beat
    with tracking.writer_lock("smoke"):  # another `study run` of it, as far as the store tells
        assert cli.main(["run", SMOKE]) == 2
    assert "study 'smoke' is being run by" in _one_line(capsys)


def test_report_before_any_run_says_which_command_makes_them(store, capsys):
    assert cli.main(["report", SMOKE]) == 2
    line = _one_line(capsys)
    assert "no finished runs of 'smoke'" in line and f"python -m study run {SMOKE}" in line


def test_an_absent_required_device_says_what_to_change(store, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has the device; the message is for one that lacks it")
    argv = [SMOKE, "--set", "devices=[cpu, cuda]", "--set", "required_devices=[cuda]"]
    assert cli.main(["plan", *argv]) == 2  # known before anything runs
    assert "drop it from required_devices" in _one_line(capsys)
    assert cli.main(["run", *argv]) == 2
    assert "requires ['cuda']" in _one_line(capsys)


def test_missing_data_without_apt_says_where_to_put_the_files(tmp_path, monkeypatch, capsys):
    from study.engine import data

    monkeypatch.setenv("STUDY_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian-package")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # a machine without apt-get
    proxy = f"http://127.0.0.1:{free_port()}"  # refused at once, as offline
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    # urllib reads the proxy variables once, into an opener it keeps for the process: drop it
    # before (so these are read) and after (so no later test inherits the dead proxy).
    urllib.request.install_opener(None)
    try:
        assert cli.main(["data"]) == 2
    finally:
        urllib.request.install_opener(None)
    line = _one_line(capsys)
    assert "apt-get is not available here" in line and "$STUDY_DATA_DIR" in line
    assert "the download failed" in line and "train-images-idx3-ubyte.gz" in line


# Fills a small private tmpfs that holds the store, then runs the CLI on it. unshare gives the
# mount its own namespace: it needs no root on most systems and vanishes with the process.
_FULL_DISK = """
import os, sys
from study import cli
from study.store import tracking
store = sys.argv[1]
tracking.experiment_id(tracking.client(), "smoke")  # the store exists before the disk fills
fd = os.open(os.path.join(store, "filler"), os.O_WRONLY | os.O_CREAT)
try:
    while True:
        os.write(fd, bytes(1 << 16))
except OSError:
    pass
sys.exit(cli.main(["run", sys.argv[2], "--set", "data.train_subset=500",
                   "--set", "training.epochs=1", "--set", "seeds.count=1"]))
"""


def test_a_full_disk_while_logging_says_to_free_space(tmp_path):
    if not real_data_present():
        pytest.skip("Fashion-MNIST not installed (make test installs it)")
    store = tmp_path / "store"
    store.mkdir()
    script = (f"mount -t tmpfs -o size=8m tmpfs {store} && exec {sys.executable} -c "
              f"\"$FULL_DISK\" {store} {SMOKE}")
    env = {**os.environ, "FULL_DISK": _FULL_DISK,
           "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"}
    probe = subprocess.run(["unshare", "--mount", "--map-root-user", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("unshare cannot make a private mount namespace here")
    done = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", script],
                          cwd=ROOT, env=env, text=True, capture_output=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = [x for x in done.stderr.splitlines() if x.startswith("error: ")]
    assert "Traceback" not in done.stderr
    (line,) = lines
    assert "the disk is full" in line and "free space" in line and "finished runs are kept" in line


def test_a_store_another_process_is_writing_says_to_wait(store, tmp_path, capsys):
    import sqlite3

    other = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # what a writer in another process holds while it commits
    try:
        assert cli.main(["plan", SMOKE]) == 2
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert "is locked by another process" in _one_line(capsys)


def test_an_endpoint_longer_than_the_runs_is_one_line(tmp_path, monkeypatch, capsys):
    """The check needs the runs, so it is the analysis that refuses, in one line with the fix."""
    from study.analysis import comparisons as analysis
    from study import cli, pipeline

    def refuse(*args, **kwargs):
        raise analysis.AnalysisError("analysis.endpoint 'last:9': the runs have only 6 evaluated "
                                     "epoch(s); choose final or last:K with K <= 6")

    monkeypatch.setattr(pipeline, "analyse", refuse)
    assert cli.main(["analyze", "--experiment", "x", "--endpoint", "last:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: analysis.endpoint 'last:9': the runs have only 6 evaluated epoch(s); "
                   "choose final or last:K with K <= 6"]


def test_a_reader_that_left_gets_no_traceback(tmp_path):
    """`study plan ... | head -1`: the pipe's reader is gone before the plan is printed."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    read, write = os.pipe()
    os.close(read)  # every write to `write` now fails with EPIPE, as after `head` exits
    try:
        done = subprocess.run([sys.executable, "-m", "study", "plan", SMOKE], cwd=ROOT, env=env,
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
