"""lego-export and engine directories against a hostile user: tampered directories, hostile checkpoints, bad
options and output paths, ``--force`` next to user files, and a real SIGKILL of an export mid-run.

Every case asserts a refusal (exit code != 0 for the CLI), one line without a traceback, and that every file
that existed before is byte-identical afterwards.  The CLI runs in-process through click's CliRunner with
``catch_exceptions=False`` (a traceback fails the test) except where a real process must be killed.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from export import atomic, cli, pipeline
from export.errors import ManifestError
from export.identity import check_engine_io, check_plan_identity, engine_identity, plan_name
from export.manifest import MANIFEST_NAME, load_manifest
from export.onnx_wire import onnx_declaration
from export.pipeline import ExportResult
from export.records import PROFILE_LIMITS, CheckpointRecord, FileTensor, TensorSpec
from lego_model.checkpoints import FORMAT_TAG, file_sha256, save_checkpoint
from lego_model.configs import get_config
from lego_model.model import LegoModel

from ..runtimes.conftest import export_onnx_dir

REPO = Path(__file__).resolve().parents[2]
TINY = "tiny_PR_16"  # unconditional, 3 bricks: the quickest export
FAST = ("--exporter", "torchscript", "--batch", "1:1:2", "--height", "16", "--width", "16:16:32", "-q")


# ------------------------------------------------------------------------------------------------ helpers


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (symlinks as their target text) by relative path."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = b"-> " + os.fsencode(os.readlink(path))
        elif path.is_file():
            out[rel] = path.read_bytes()
    return out


def kept(before: dict[str, bytes], root: Path) -> None:
    """Every file of ``before`` is still there, byte-identical."""
    after = snapshot(root)
    lost = [p for p in before if p not in after]
    changed = [p for p in before if p in after and after[p] != before[p]]
    assert not lost and not changed, f"lost {lost}, changed {changed}"


def one_line(text: str) -> str:
    assert "Traceback" not in text, text
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def export_cli(*args: str | Path):
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


def refused(result, *fragments: str) -> str:
    """The CLI exited non-zero with one ``error:`` line holding every fragment."""
    assert result.exit_code != 0, result.output
    line = one_line(result.output)
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, line
    return line


def load_refused(engine_dir: Path, *fragments: str) -> str:
    before = snapshot(engine_dir)
    with pytest.raises(ManifestError) as info:
        load_manifest(engine_dir)
    message = one_line(str(info.value))
    for fragment in fragments:
        assert fragment in message, message
    kept(before, engine_dir)
    return message


def edit_manifest(engine_dir: Path, change) -> None:
    path = engine_dir / MANIFEST_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def put_file(engine_dir: Path, slot: str, content: bytes) -> None:
    """Write ``content`` as engine ``slot``'s ONNX file and fix its size and sha256 in the manifest."""
    (engine_dir / f"{slot}.onnx").write_bytes(content)

    def fix(d: dict) -> None:
        for e in d["engines"]:
            if e["name"] == slot and e["format"] == "onnx":
                e["sha256"] = file_sha256(engine_dir / e["file"])
                e["bytes"] = len(content)

    edit_manifest(engine_dir, fix)


@pytest.fixture
def engines(fp32_export: ExportResult, tmp_path: Path) -> Path:
    """A copy of a real lego-export directory of tiny_PG_16 (class-conditional, 3 bricks)."""
    out = tmp_path / "engines"
    shutil.copytree(fp32_export.out, out)
    return out


@pytest.fixture(scope="module")
def other_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same config exported from other weights (random init seed 1)."""
    model = LegoModel(get_config("tiny_PG_16")).randomize_(1).eval()
    return export_onnx_dir(model, tmp_path_factory.mktemp("other") / "e", checkpoint=CheckpointRecord.random_init(1))


# ------------------------------------------------------------------- item 1: engine files against their role


@pytest.mark.parametrize(
    ("source", "slot", "fragment"),
    [
        ("brick2", "brick1", "engine 'brick2'"),  # same I/O: only the identity tells them apart
        ("brick1", "brick0", "engine 'brick1'"),  # brick0 has no f_prev
        ("brick0", "brick2", "engine 'brick0'"),
        ("embedder", "brick0", "engine 'embedder'"),
        ("brick1", "embedder", "engine 'brick1'"),
    ],
)
def test_file_in_another_engines_slot(engines: Path, source: str, slot: str, fragment: str) -> None:
    put_file(engines, slot, (engines / f"{source}.onnx").read_bytes())
    load_refused(engines, f"(engine {slot})", fragment, f"{slot} entry")


def test_swapped_pair(engines: Path) -> None:
    one, two = (engines / "brick1.onnx").read_bytes(), (engines / "brick2.onnx").read_bytes()
    put_file(engines, "brick1", two)
    put_file(engines, "brick2", one)
    load_refused(engines, "brick1", "'brick2'")


def test_file_of_another_export(engines: Path, other_export: Path) -> None:
    put_file(engines, "brick1", (other_export / "brick1.onnx").read_bytes())
    load_refused(engines, "weights 'random_init_seed:1'", "'random_init_seed:0'")


def test_file_without_identity(engines: Path, fp16_files) -> None:
    put_file(engines, "brick1", fp16_files["brick1"][0].read_bytes())  # exported without an identity
    load_refused(engines, "carries no lego-export identity metadata", "re-run lego-export --force")


def test_not_an_onnx_file(engines: Path) -> None:
    put_file(engines, "brick0", b"\xff" * 64)
    load_refused(engines, "brick0.onnx")


def test_truncated_file_with_fixed_hash(engines: Path) -> None:
    put_file(engines, "brick1", (engines / "brick1.onnx").read_bytes()[:-1000])
    load_refused(engines, "brick1.onnx", "is not an ONNX file", "truncated")


def test_declaration_reader_agrees_with_onnx(fp32_export: ExportResult) -> None:
    """The wire-format reader of load_manifest sees what a full onnx parse sees, without parsing the weights."""
    import onnx

    for entry in fp32_export.manifest.engines:
        content = entry.path(fp32_export.out).read_bytes()
        model = onnx.load_model_from_string(content)
        props, inputs, outputs = onnx_declaration(content, entry.name)
        assert props == {p.key: p.value for p in model.metadata_props}
        assert props["lego.engine"] == entry.name
        for declared, values in ((inputs, model.graph.input), (outputs, model.graph.output)):
            assert [t.name for t in declared] == [v.name for v in values]
            assert [len(t.shape) for t in declared] == [len(v.type.tensor_type.shape.dim) for v in values]


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        (lambda d: d["config"].update(hidden_size=128), ("do not fit the manifest's config", "hidden_size 128")),
        (lambda d: d["config"].update(img_channels=4), ("do not fit", "img_channels 4")),
        (lambda d: d["config"].update(label_dim=7), ("embedder", "label_dim 7")),
        (lambda d: d["config"].update(label_dim=0), ("embedder", "class_labels")),
        (lambda d: d["engines"][2]["inputs"][0].update(dtype="float16"), ("brick1", "float16")),
        (lambda d: d["engines"][0]["outputs"][0].update(dtype="bfloat16"), ("embedder", "bfloat16")),
        (lambda d: d["engines"][3]["inputs"].pop(1), ("brick2", "f_prev")),
        (lambda d: d["engines"][1].update(precision="fp16"), ("precision 'fp32'", "'fp16'")),
        (lambda d: d["checkpoint"].update(random_init_seed=7), ("weights", "random_init_seed:7")),
        (lambda d: d["config"].update(mlp_ratio=2.0), ("model config fingerprint",)),
        (lambda d: d["engines"][1]["profile"].update(batch=[1, 1, 999999999]), ("exceeds the supported maximum",)),
        (lambda d: d["engines"][1]["verification"].update(tolerance=float("nan")), ("finite number",)),
        (lambda d: d["config"].update(hidden_size=2**20), ("invalid model config", "parameters")),
        (lambda d: d["config"].update(depths=[1, 2.5, 2]), ("invalid model config", "depths")),
        (lambda d: d["config"].update(hidden_size=None), ("invalid model config", "hidden_size")),
    ],
)
def test_manifest_disagreeing_with_its_files(engines: Path, change, fragments: tuple[str, ...]) -> None:
    edit_manifest(engines, change)
    load_refused(engines, *fragments)


def test_manifest_and_entries_changed_together_still_disagree_with_the_files(engines: Path) -> None:
    """A config edited consistently with its entries (hidden size 64 -> 128) still does not describe the files."""

    def widen(d: dict) -> None:
        d["config"]["hidden_size"] = 128
        for e in d["engines"]:
            for t in [*e["inputs"], *e["outputs"]]:
                t["shape"] = [128 if dim == 64 else dim for dim in t["shape"]]

    edit_manifest(engines, widen)
    load_refused(engines, "model config fingerprint")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"schema_version": ' + "9" * 5000 + "}", "not valid JSON"),
        ("\x00\xff", "not valid JSON"),
    ],
)
def test_hostile_manifest_json(engines: Path, text: str, fragment: str) -> None:
    (engines / MANIFEST_NAME).write_text(text, encoding="utf-8", errors="surrogateescape")
    load_refused(engines, fragment)


def test_oversized_manifest(engines: Path) -> None:
    with open(engines / MANIFEST_NAME, "w") as f:
        f.write(" " * (17 << 20) + "{}")
    load_refused(engines, "bytes")


def test_plan_io_check_is_the_same_comparison() -> None:
    """The TensorRT backend's check of a deserialized plan, with plan descriptions as TensorRT gives them."""
    inputs = [TensorSpec("x_in", "float32", ["B", 5, "H", "W"]), TensorSpec("cond", "float32", ["B", 64])]
    outputs = [TensorSpec("f", "float32", ["B", 3, "H", "W"])]
    plan_in = [FileTensor("x_in", "float32", (-1, 5, -1, -1)), FileTensor("cond", "float32", (-1, 64))]
    plan_out = [FileTensor("f", "float32", (-1, 3, -1, -1))]
    check_engine_io("brick0.plan", inputs, outputs, plan_in, plan_out)
    cases = [
        ([*plan_in, FileTensor("f_prev", "float32", (-1, 3, -1, -1))], plan_out, "has inputs"),
        ([FileTensor("x_in", "float16", (-1, 5, -1, -1)), plan_in[1]], plan_out, "float16 in the file"),
        ([FileTensor("x_in", "float32", (-1, 7, -1, -1)), plan_in[1]], plan_out, "dim 1 is 7 in the file, 5"),
        ([plan_in[0], FileTensor("cond", "float32", (-1, 128))], plan_out, "dim 1 is 128"),
        ([plan_in[0], FileTensor("cond", "float32", (2, 64))], plan_out, "dim 0 is 2 in the file, B"),
        (plan_in, [FileTensor("f", "float32", (-1, 3, -1))], "rank 3"),
        (plan_in, [FileTensor("cond", "float32", (-1, 64))], "has outputs"),
    ]
    for file_in, file_out, fragment in cases:
        with pytest.raises(ManifestError) as info:
            check_engine_io("brick0.plan (engine brick0)", inputs, outputs, file_in, file_out)
        assert fragment in one_line(str(info.value))


def test_trt_plan_io_reader_with_a_fake_engine() -> None:
    """export.loaders.plan_io reads names, modes, dtypes and shapes through the TensorRT tensor API."""
    from export.loaders import plan_io

    class Enum:
        def __init__(self, name: str) -> None:
            self.name = name

    class FakeTrt:
        class TensorIOMode:
            INPUT, OUTPUT = Enum("INPUT"), Enum("OUTPUT")

    tensors = {
        "x_in": (FakeTrt.TensorIOMode.INPUT, Enum("FLOAT"), (-1, 5, -1, -1)),
        "cond": (FakeTrt.TensorIOMode.INPUT, Enum("HALF"), (-1, 64)),
        "f": (FakeTrt.TensorIOMode.OUTPUT, Enum("INT64"), (-1, 3, -1, -1)),
    }

    class FakeEngine:
        num_io_tensors = len(tensors)

        def get_tensor_name(self, i: int) -> str:
            return list(tensors)[i]

        def get_tensor_mode(self, name: str):
            return tensors[name][0]

        def get_tensor_dtype(self, name: str):
            return tensors[name][1]

        def get_tensor_shape(self, name: str):
            return tensors[name][2]

    inputs, outputs = plan_io(FakeTrt, FakeEngine())
    assert inputs == [FileTensor("x_in", "float32", (-1, 5, -1, -1)), FileTensor("cond", "float16", (-1, 64))]
    assert outputs == [FileTensor("f", "int64", (-1, 3, -1, -1))]


def test_plan_identity() -> None:
    """The identity a TensorRT plan carries in its network name, as the TensorRT backend checks it."""
    config, record = get_config("tiny_PG_16"), CheckpointRecord.random_init(0)
    brick1 = engine_identity("brick1", "brick", 1, "fp16", config, record)
    brick2 = engine_identity("brick2", "brick", 2, "fp16", config, record)
    assert check_plan_identity("brick1.plan", plan_name(brick1), brick1) is None
    with pytest.raises(ManifestError) as info:
        check_plan_identity("brick1.plan (engine brick1)", plan_name(brick2), brick1)
    assert "the file says engine 'brick2', the manifest's brick1 entry needs 'brick1'" in one_line(str(info.value))
    other = engine_identity("brick1", "brick", 1, "fp16", config, CheckpointRecord.random_init(1))
    with pytest.raises(ManifestError, match="weights 'random_init_seed:1'"):
        check_plan_identity("brick1.plan", plan_name(other), brick1)
    with pytest.raises(ManifestError, match="unreadable"):
        check_plan_identity("brick1.plan", "lego-identity:{broken", brick1)
    for unnamed in (None, "", "Unnamed Network 0"):  # an older lego-export: a warning, its I/O is still checked
        assert "carries no identity" in check_plan_identity("brick1.plan", unnamed, brick1)


def test_sampling_refuses_a_swapped_file(engines: Path, tmp_path: Path) -> None:
    """End to end: the runtime's CLI refuses the directory in one line, before sampling anything."""
    put_file(engines, "brick1", (engines / "brick2.onnx").read_bytes())
    before = snapshot(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "runtimes.sample",
            "--engine-dir",
            str(engines),
            "--seeds",
            "0",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "images"),
            "--quiet",
            "--backend",
            "onnxruntime-cpu",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert result.returncode != 0
    assert "engine 'brick2'" in one_line(result.stderr)
    assert not (tmp_path / "images").exists()
    kept(before, tmp_path)


# ---------------------------------------------------------------------------- item 7: hostile checkpoints


def _checkpoint_with(tmp_path: Path, *, config=None, tensors=None, raw_config: str | None = None) -> Path:
    model = LegoModel(get_config(TINY)).randomize_(0)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state.update(tensors or {})
    meta_config = raw_config if raw_config is not None else json.dumps({**model.config.to_dict(), **(config or {})})
    path = tmp_path / "hostile.safetensors"
    save_file(state, str(path), metadata={"format": FORMAT_TAG, "lego_config": meta_config})
    return path


WEIGHT = "model.model.1.blocks.0.attn.qkv.weight"


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"raw_config": "null"}, ("bad config metadata", "JSON object")),
        ({"raw_config": "[1, 2]"}, ("bad config metadata",)),
        ({"raw_config": "[" * 100_000}, ("bad config metadata",)),
        ({"raw_config": "{" + '"a":' * 50_000 + "1" + "}" * 50_000}, ("bad config metadata",)),
        ({"raw_config": '{"hidden_size": ' + "9" * 5000 + "}"}, ("bad config metadata",)),
        ({"config": {"hidden_size": None}}, ("hidden_size must be an integer",)),
        ({"config": {"hidden_size": "64"}}, ("hidden_size must be an integer", "'64'")),
        ({"config": {"hidden_size": 0}}, ("hidden_size must be an integer >= 1",)),
        ({"config": {"hidden_size": -64}}, ("hidden_size",)),
        ({"config": {"hidden_size": 2**20}}, ("parameters", "corrupt")),
        ({"config": {"num_heads": 0}}, ("num_heads",)),
        ({"config": {"depths": [2, 2.5, 1]}}, ("depths must be a list of integers",)),
        ({"config": {"depths": [2, True, 1]}}, ("depths must be a list of integers",)),
        ({"config": {"depths": [2, -1, 1]}}, ("depth -1",)),
        ({"config": {"depths": [2, 10**6, 1]}}, ("depth",)),
        ({"config": {"depths": "221"}}, ("depths must be a list",)),
        ({"config": {"brick_sizes": [16, 8, 0]}}, ("brick 2",)),
        ({"config": {"brick_sizes": []}}, ("one entry per brick",)),
        ({"config": {"img_channels": 0}}, ("img_channels",)),
        ({"config": {"label_dim": -1}}, ("label_dim",)),
        ({"config": {"label_dim": 10**9}}, ("parameters",)),
        ({"config": {"mlp_ratio": float("nan")}}, ("mlp_ratio must be a finite number",)),
        ({"config": {"sigma_data": 0}}, ("sigma_data",)),
        ({"config": {"class_dropout_prob": 2}}, ("class_dropout_prob",)),
        ({"config": {"resolution": 10**9}}, ("resolution",)),
        ({"config": {"name": None}}, ("name",)),
        ({"config": {"colour": 1}}, ("unknown config fields",)),
        ({"tensors": {WEIGHT: torch.ones(192, 64, dtype=torch.int64)}}, (WEIGHT, "dtype int64")),
        ({"tensors": {WEIGHT: torch.ones(192, 64, dtype=torch.int32)}}, (WEIGHT, "int32")),
        ({"tensors": {WEIGHT: torch.ones(192, 64, dtype=torch.bool)}}, (WEIGHT, "bool")),
        ({"tensors": {WEIGHT: torch.full((192, 64), float("nan"))}}, (WEIGHT, "12288 non-finite")),
        ({"tensors": {WEIGHT: torch.zeros(192, 64).index_fill_(0, torch.tensor([3]), float("inf"))}}, (WEIGHT,)),
    ],
)
def test_hostile_checkpoint(tmp_path: Path, kwargs: dict, fragments: tuple[str, ...]) -> None:
    ckpt = _checkpoint_with(tmp_path, **kwargs)
    before = snapshot(tmp_path)
    refused(export_cli("--checkpoint", ckpt, "--out", tmp_path / "e", *FAST), str(ckpt), *fragments)
    kept(before, tmp_path)
    assert not (tmp_path / "e").exists()


def test_truncated_and_foreign_checkpoints(tmp_path: Path) -> None:
    good = _checkpoint_with(tmp_path)
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-100])
    torch.save({"w": torch.ones(3, dtype=torch.int64)}, tmp_path / "ints.pt")
    state = {k: v.long() for k, v in LegoModel(get_config(TINY)).state_dict().items()}
    torch.save(state, tmp_path / "long.pt")
    before = snapshot(tmp_path)
    refused(export_cli("--checkpoint", tmp_path / "cut.safetensors", "--out", tmp_path / "e", *FAST), "cut")
    refused(export_cli("--checkpoint", tmp_path / "ints.pt", "--config", TINY, "--out", tmp_path / "e", *FAST))
    refused(
        export_cli("--checkpoint", tmp_path / "long.pt", "--config", TINY, "--out", tmp_path / "e", *FAST),
        "dtype int64",
    )
    kept(before, tmp_path)
    assert not (tmp_path / "e").exists()


# --------------------------------------------------------------------------- items 8, 10, 12: bad options


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        ("--batch", "1:1:999999999", f"maximum {PROFILE_LIMITS['batch']}"),
        ("--batch", "1:1:99999999999999999999999", "out of range"),
        ("--batch", "1:1:" + "9" * 5000, "out of range"),
        ("--height", "16:16:100000", f"maximum {PROFILE_LIMITS['height']}"),
        ("--width", "16:16:100000", f"maximum {PROFILE_LIMITS['width']}"),
        ("--batch", "\u00b2", "MIN:OPT:MAX"),
        ("--batch", "1:\u0661:8", "MIN:OPT:MAX"),
        ("--batch", "-1:1:8", "MIN:OPT:MAX"),
        ("--batch", "0", "out of range (minimum 1,"),
        ("--batch", "2:1:8", "0 < MIN <= OPT <= MAX"),
        ("--height", "12", "multiples of 16"),
    ],
)
def test_bad_profile_options(tmp_path: Path, option: str, value: str, fragment: str) -> None:
    args = ["--config", TINY, "--random-init", "--out", tmp_path / "e", "--exporter", "torchscript", "-q"]
    refused(export_cli(*args, option, value), fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed", ["-1", str(2**64), str(2**70), "1e3", "nan"])
def test_bad_seed_is_a_usage_error(tmp_path: Path, seed: str) -> None:
    result = export_cli("--config", TINY, "--random-init", "--seed", seed, "--out", tmp_path / "e", *FAST)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [result.stderr.strip()], result.output  # one line
    assert result.stderr.startswith("error: Invalid value for '--seed'"), result.output
    assert list(tmp_path.iterdir()) == []


def test_out_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"precious")
    before = snapshot(tmp_path)
    for out in (tmp_path / "file" / "engines", tmp_path / "file" / "a" / "b"):
        refused(export_cli("--config", TINY, "--random-init", "--out", out, *FAST), "is not a directory")
    for force in ((), ("--force",)):  # with or without --force: a file is not offered --force as the fix
        line = refused(export_cli("--config", TINY, "--random-init", "--out", tmp_path / "file", *force, *FAST), "file")
        assert "is not a directory" in line and "--force" not in line, line
    kept(before, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_out_not_writable(tmp_path: Path) -> None:
    for out in (Path("/proc/lego-engines"), Path("/proc/self/lego/engines")):
        refused(export_cli("--config", TINY, "--random-init", "--out", out, *FAST), "cannot write in")
    if os.geteuid() == 0:
        pytest.skip("the permission case needs a user that file modes apply to (running as root)")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        refused(export_cli("--config", TINY, "--random-init", "--out", locked / "e", *FAST), "cannot write in")
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


def test_out_not_writable_for_another_user(tmp_path: Path) -> None:
    """As root, file modes do not apply: run lego-export as 'nobody' in a directory only root may write."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a child as another user")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o755)
    tmp_path.chmod(0o755)
    command = [sys.executable, "-m", "export", "--config", TINY, "--random-init", "--out", str(locked / "a" / "e")]
    try:
        result = subprocess.run(
            [*command, *FAST],
            capture_output=True,
            text=True,
            cwd="/",
            env={**os.environ, "PYTHONPATH": str(REPO), "HOME": "/nonexistent"},
            user=65534,
            timeout=300,
        )
    except PermissionError as err:
        pytest.skip(f"'nobody' cannot run this interpreter ({err})")
    if "Permission denied" in result.stderr and "error:" not in result.stderr:
        pytest.skip(f"'nobody' cannot read this checkout: {result.stderr.strip()[-200:]}")
    assert result.returncode == 1, result.stderr
    assert "cannot write in" in one_line(result.stderr)
    assert list(locked.iterdir()) == []


def test_out_on_a_read_only_file_system(tmp_path: Path) -> None:
    mount = tmp_path / "ro"
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)]
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(command).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        refused(export_cli("--config", TINY, "--random-init", "--out", mount / "e", *FAST), "Read-only file system")
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_failed_run_leaves_no_empty_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device", "brick0.onnx")

    monkeypatch.setattr(pipeline, "onnx_from_spec", broken)
    out = tmp_path / "a" / "b" / "engines"
    refused(export_cli("--config", TINY, "--random-init", "--out", out, *FAST), "No space left on device")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("room", [0, 60_000])
def test_a_full_disk_is_one_line_not_an_exporter_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, room: int
) -> None:
    """Issue 21, class 7: ENOSPC inside the dynamo exporter's save is the disk's, not the exporter's (no warning
    and no TorchScript retry); nothing stays behind."""
    from tests.fakes.disk import full_disk

    full_disk(monkeypatch, tmp_path, room)
    args = ("--batch", "1:1:2", "--height", "16", "--width", "16", "-q")
    result = export_cli("--config", TINY, "--random-init", "--out", tmp_path / "e", *args)
    monkeypatch.undo()
    refused(result, "No space left on device", "nothing was replaced")
    assert "falling back" not in caplog.text
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ item 4: --force and user files


def _exported(tmp_path: Path, name: str = "engines") -> Path:
    out = tmp_path / name
    result = export_cli("--config", TINY, "--random-init", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def exported_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _exported(tmp_path_factory.mktemp("once"))


@pytest.fixture
def previous(exported_once: Path, tmp_path: Path) -> Path:
    """A fresh copy of a directory lego-export wrote (tiny_PR_16)."""
    out = tmp_path / "engines"
    shutil.copytree(exported_once, out)
    return out


@pytest.mark.parametrize(
    ("plant", "fragment"),
    [
        (lambda d: (d / "notes.txt").write_text("mine"), "notes.txt"),
        (lambda d: (d / "sub").mkdir() or (d / "sub" / "x.png").write_bytes(b"png"), "sub/"),
        (lambda d: (d / ".hidden").write_text("mine"), ".hidden"),
        (lambda d: (d / "link").symlink_to("/etc"), "link"),
        (lambda d: (d / MANIFEST_NAME).write_text("{not json"), "cannot tell which files"),
        (lambda d: (d / MANIFEST_NAME).write_text("[" * 100_000), "cannot tell which files"),
        (lambda d: (d / MANIFEST_NAME).unlink(), f"no {MANIFEST_NAME}"),
    ],
)
def test_force_keeps_user_files(previous: Path, plant, fragment: str) -> None:
    plant(previous)
    before = snapshot(previous.parent)
    line = refused(export_cli("--config", TINY, "--random-init", "--out", previous, "--force", *FAST), fragment)
    assert "refusing to replace" in line or "cannot tell" in line
    assert "--force" not in line, line  # the fix offered is not the one that just failed
    kept(before, previous.parent)


def test_force_refuses_the_checkpoint_inside_out(previous: Path, tmp_path: Path) -> None:
    ckpt = previous / "model.safetensors"
    save_checkpoint(LegoModel(get_config(TINY)).randomize_(2), ckpt)
    line = refused(export_cli("--checkpoint", ckpt, "--out", previous, "--force", *FAST), "lies inside --out")
    assert str(ckpt) in line
    # even when the manifest were to list it (a previous export of the same file)
    edit_manifest(previous, lambda d: d["engines"].append({"file": "model.safetensors"}))
    before = snapshot(tmp_path)
    refused(export_cli("--checkpoint", ckpt, "--out", previous, "--force", *FAST), "lies inside --out")
    kept(before, tmp_path)


def test_force_replaces_a_previous_export(previous: Path, tmp_path: Path) -> None:
    old = load_manifest(previous)
    result = export_cli("--config", TINY, "--random-init", "--seed", "5", "--out", previous, "--force", *FAST)
    assert result.exit_code == 0, result.output
    new = load_manifest(previous)
    assert new.checkpoint == CheckpointRecord.random_init(5) != old.checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]  # no temporaries left


def test_force_replaces_an_older_exports_directory(previous: Path) -> None:
    """The advice of every refusal ("re-run lego-export --force") works on a directory an older lego-export
    wrote: which files are ours is read from its manifest whatever its schema."""
    edit_manifest(previous, lambda d: d.update(schema_version=1))
    with pytest.raises(ManifestError, match="re-run lego-export --force"):
        load_manifest(previous)
    result = export_cli("--config", TINY, "--random-init", "--out", previous, "--force", *FAST)
    assert result.exit_code == 0, result.output
    load_manifest(previous)


def test_force_onto_a_symlinked_directory(previous: Path, tmp_path: Path) -> None:
    link = tmp_path / "current"
    link.symlink_to(previous.name)
    load_manifest(link)  # reading through the link
    result = export_cli("--config", TINY, "--random-init", "--seed", "6", "--out", link, "--force", *FAST)
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and os.readlink(link) == previous.name  # the user's link is kept
    assert load_manifest(link).checkpoint == CheckpointRecord.random_init(6)
    assert load_manifest(previous).checkpoint == CheckpointRecord.random_init(6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "engines"]
    (tmp_path / "dangling").symlink_to("nowhere")
    refused(export_cli("--config", TINY, "--random-init", "--out", tmp_path / "dangling", "--force", *FAST), "nowhere")


def test_replace_without_an_atomic_exchange(previous: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where renameat2 is missing, the fallback swap still replaces the directory and leaves nothing behind."""
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    result = export_cli("--config", TINY, "--random-init", "--seed", "7", "--out", previous, "--force", *FAST)
    assert result.exit_code == 0, result.output
    assert load_manifest(previous).checkpoint == CheckpointRecord.random_init(7)
    assert sorted(p.name for p in previous.parent.iterdir()) == ["engines"]


def test_exchange_swaps_two_directories(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("b")
    if not atomic.exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("no renameat2 RENAME_EXCHANGE on this system")
    assert (tmp_path / "a" / "x").read_text() == "b" and (tmp_path / "b" / "x").read_text() == "a"


# ------------------------------------------------------------------------ item 5: interrupted exports


def _partials(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.name.startswith(".engines."))


def test_sigkill_mid_export_then_rerun(previous: Path, tmp_path: Path) -> None:
    """A real SIGKILL of a child lego-export while it writes: the old directory survives untouched, the next
    run removes the dead export's temporary directory and succeeds."""
    before = snapshot(previous)
    args = ["--config", TINY, "--random-init", "--seed", "3", "--out", str(previous), "--force", *FAST]
    child = subprocess.Popen(
        [sys.executable, "-m", "export", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and child.poll() is None:
            if any((p / "embedder.onnx").is_file() for p in _partials(tmp_path)):
                break
            time.sleep(0.05)
        assert child.poll() is None, "the export finished before it could be killed"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    left = _partials(tmp_path)
    assert len(left) == 1 and f".partial-{child.pid}-" in left[0].name
    kept(before, previous)
    load_manifest(previous)
    result = export_cli(*args)
    assert result.exit_code == 0, result.output
    assert _partials(tmp_path) == []
    assert load_manifest(previous).checkpoint == CheckpointRecord.random_init(3)


def test_a_live_exports_temporary_is_not_removed(previous: Path, tmp_path: Path) -> None:
    live = tmp_path / f".engines.partial-{os.getpid()}-live0001"
    live.mkdir()
    (live / "embedder.onnx").write_bytes(b"being written")
    dead = tmp_path / ".engines.partial-999999999-dead0001"  # no such pid, and nobody holds its lock
    dead.mkdir()
    held = tmp_path / ".engines.partial-999999998-held0001"  # a live export elsewhere holds its lock
    held.mkdir()
    other = tmp_path / ".photos.partial-999999999-dead0001"  # another target's: not ours to judge
    other.mkdir()
    fd = os.open(held, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        result = export_cli("--config", TINY, "--random-init", "--seed", "4", "--out", previous, "--force", *FAST)
    finally:
        os.close(fd)
    assert result.exit_code == 0, result.output
    assert not dead.exists()
    assert held.is_dir() and other.is_dir()
    assert (live / "embedder.onnx").read_bytes() == b"being written"  # its lock is free, but its pid is ours


def test_set_aside_directory_is_restored(previous: Path, tmp_path: Path) -> None:
    """Killed between the two renames of the fallback swap: the next run moves the old directory back first."""
    aside = tmp_path / ".engines.old-999999999-abcdefgh"
    previous.rename(aside)
    before = snapshot(aside)
    refused(export_cli("--config", TINY, "--random-init", "--out", previous, *FAST), "already exists")
    assert snapshot(previous) == before and not aside.exists()
    load_manifest(previous)


def test_cache_dir_without_tensorrt_is_refused(tmp_path: Path) -> None:
    # lego-export refuses an option it would ignore (as --vae-batch without --vae): --cache-dir is TensorRT's
    out = tmp_path / "e"
    args = ("--config", TINY, "--random-init", "--engines", "onnx", "--cache-dir", tmp_path / "c", "--out", out)
    refused(export_cli(*args, *FAST), "--cache-dir holds TensorRT's caches")
    assert not out.exists()
