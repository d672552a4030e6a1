"""Every command and code block of README.md, executed, so that the documentation cannot drift from the code.

Each code block of the README is one test.  A block is a Python example (run with a random-init
authors'-format snapshot standing in for the one it names), the layout listing (checked against the
tree), or shell commands.  Commands run in a fresh directory per block, through the same click
commands the console scripts and ``python -m`` reach, with small substitutions so that they finish in
seconds here: two seeds (ten for ``--class-rows``), two steps, two samples per class, a tiny config for
``--random-init``.  What cannot run on this machine is checked as far as it can be: ``torchrun`` x8 by
parsing its arguments with the command's own parser, the benchmark by collecting it, ``make test`` by
``make -n`` (it is this suite), and TensorRT and GPU commands by their one-line refusal.  A block or
command the test cannot map fails, so a new README block cannot stay untested.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PROGRAMS = ("make", "python", "lego-export", "torchrun", "pytest", "bash")
TINY = "tiny_PG_16"  # stands in for --random-init configs and for the user's own checkpoints
TINY_LATENT = "tiny_latent_PG_8"  # stands in for the user's latent checkpoints (commands with --vae)
AUTHORS = "lego_S_PG_64"  # the architecture of the authors' snapshot in the Python example

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the block's first line in README.md
    text: str

    @property
    def kind(self) -> str:
        lines = [ln for ln in self.text.splitlines() if ln.strip()]
        if any(re.match(r"(from|import) \w", ln) for ln in lines):
            return "python"
        if all(ln.split()[0].endswith("/") for ln in lines):
            return "layout"
        if all(ln.lstrip().startswith("#") or ln.split()[0] in PROGRAMS for ln in lines):
            return "shell"
        return "unknown"


def readme_blocks(text: str) -> list[Block]:
    """The README's code blocks: indented by four spaces after a blank line, or fenced with ```."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            blocks.append(Block(i + 2, "\n".join(lines[i + 1 : j])))
            i = j + 1
        elif lines[i].startswith("    ") and lines[i].strip() and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            body = [ln[4:] for ln in lines[i:j]]
            while body and not body[-1].strip():
                body.pop()
            blocks.append(Block(i + 1, "\n".join(body)))
            i = j
        else:
            i += 1
    return blocks


def inline_commands(text: str) -> list[str]:
    """Commands written inline in the prose (`python -m ... --help`, `pip install ...`)."""
    prose = "\n".join(ln for ln in text.splitlines() if not ln.startswith("    "))
    spans = re.findall(r"`([^`\n]+)`", prose)
    return [s for s in spans if s.split()[0] in PROGRAMS and len(s.split()) > 1]


BLOCKS = readme_blocks(README.read_text())


def test_readme_has_blocks():
    kinds = {b.kind for b in BLOCKS}
    assert {"python", "shell", "layout"} <= kinds, kinds


# --------------------------------------------------------------------------- running commands


def _tensorrt_here() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _console_script(name: str) -> click.Command:
    entry = re.search(rf'^{re.escape(name)}\s*=\s*"([\w.]+):(\w+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert entry, f"README runs {name}, which pyproject.toml does not install"
    module, func = entry.groups()
    return getattr(importlib.import_module(module), func)


def _module_command(module: str) -> click.Command:
    cmd = getattr(importlib.import_module(module), "main", None)
    assert isinstance(cmd, click.Command), f"python -m {module}: no click command main"
    return cmd


def _substitute(cmd: click.Command, args: list[str]) -> list[str]:
    """The same command, sized to finish in seconds: fewer seeds and steps, a tiny random-init config."""
    options = {opt for p in cmd.params for opt in getattr(p, "opts", [])}
    out: list[str] = []
    it = iter(args)
    for a in it:
        if a == "--seeds":
            out += [a, "0-9" if "--class-rows" in args else "0-1"]
            next(it)
        elif a in ("--steps", "--per-class"):
            next(it)  # replaced below
        elif a == "--config" and "--random-init" in args:
            out += [a, TINY]
            next(it)
        else:
            out.append(a)
    if "--seeds" in options and "--seeds" not in args:
        out += ["--seeds", "0-1"]
    if "--steps" in options:
        out += ["--steps", "2"]
    if "--per-class" in options:
        out += ["--per-class", "2", "--plan", "full stack"]
    return out


_EXPORTS: dict[tuple[str, ...], Path] = {}  # lego-export arguments -> a copy of what they wrote


class Runner:
    """Runs README commands in one working directory; the shipped model's ONNX export is made once per session."""

    def __init__(self, cwd: Path, store: Path) -> None:
        self.cwd, self.store = cwd, store

    def run(self, command: str) -> None:
        argv = shlex.split(command, comments=True)
        if not argv:
            return
        prog = argv[0]
        handler = getattr(self, "_" + prog.replace("-", "_"), None)
        assert handler is not None and prog in PROGRAMS, f"README command not covered by the test: {command}"
        handler(argv[1:], command)

    # ---- programs
    def _make(self, targets: list[str], command: str) -> None:
        proc = subprocess.run(
            ["make", "-n", *targets, "VENV=/nonexistent-venv"], cwd=REPO, capture_output=True, text=True
        )
        assert proc.returncode == 0, f"{command}: {proc.stderr}"
        recipes = _makefile_recipes(REPO / "Makefile")
        for target in targets:
            if target == "test":  # this suite and ruff: checked, not run (it would run this test again)
                assert "pytest" in "\n".join(recipes[target]) and "ruff check" in "\n".join(recipes[target])
                continue
            for line in recipes[target]:
                self.run(line.replace("$(VENV)/bin/", "").replace("$(PY)", "python"))

    def _python(self, args: list[str], command: str) -> None:
        assert args[:1] == ["-m"], f"README runs python without -m: {command}"
        self._click(_module_command(args[1]), args[2:], command)

    def _lego_export(self, args: list[str], command: str) -> None:
        self._click(_console_script("lego-export"), args, command)

    def _torchrun(self, args: list[str], command: str) -> None:
        # Eight GPUs are not here: the arguments must parse with the command's own parser.
        assert "-m" in args, command
        module = args[args.index("-m") + 1]
        cmd = _module_command(module)
        cmd.make_context(module, list(args[args.index("-m") + 2 :]))

    def _pytest(self, args: list[str], command: str) -> None:
        # The benchmark takes 11-18 minutes here: collect it (the option and every test must exist).
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", *args, "--collect-only", "-q", "-p", "no:cacheprovider"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, f"{command}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        assert re.search(r"\d+ tests? collected", proc.stdout), proc.stdout[-500:]

    def _bash(self, args: list[str], command: str) -> None:
        script = REPO / args[0]
        assert script.is_file(), f"{command}: {args[0]} does not exist"
        if torch.cuda.is_available():
            proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr
            return
        out = self.cwd / "out"
        proc = subprocess.run(["bash", str(script), str(out)], capture_output=True, text=True, timeout=120)
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and "no CUDA GPU" in lines[0], (proc.returncode, lines)

    # ---- click commands
    def _click(self, cmd: click.Command, args: list[str], command: str) -> None:
        args = _substitute(cmd, args)
        if "--help" in args:
            result = CliRunner().invoke(cmd, args, catch_exceptions=False)
            assert result.exit_code == 0 and "Usage:" in result.output, result.output
            return
        self._presume_files(args)
        is_export = cmd is _console_script("lego-export")
        if is_export and _option(args, "--engines", "onnx") in ("all", "trt") and not _tensorrt_here():
            result = self._invoke(cmd, args)
            lines = result.output.strip().splitlines()
            assert result.exit_code != 0 and "TensorRT" in lines[-1] and "Traceback" not in result.output, (
                f"{command}: expected the one-line missing-TensorRT refusal, got: {result.output}"
            )
            return
        key = tuple(a for a in args if a != "--force")
        if is_export and "--random-init" not in args and key in _EXPORTS:
            out = self.cwd / _option(args, "--out", "engines")
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(_EXPORTS[key], out)  # the same export, made once per session
            return
        result = self._invoke(cmd, args)
        assert result.exit_code == 0, f"{command} (run as {shlex.join(args)}) failed:\n{result.output[-3000:]}"
        if is_export and "--random-init" not in args:
            saved = self.store / f"export{len(_EXPORTS)}"
            shutil.copytree(self.cwd / _option(args, "--out", "engines"), saved)
            _EXPORTS[key] = saved

    def _invoke(self, cmd: click.Command, args: list[str]):
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(self.cwd)
            return CliRunner().invoke(cmd, args, catch_exceptions=False)

    def _presume_files(self, args: list[str]) -> None:
        """Files the README takes the user to have: their checkpoint and VAE, an engine directory made earlier."""
        from lego_model import LegoModel, get_config, save_checkpoint
        from tests.conftest import make_vae_dir

        vae = _option(args, "--vae", None)
        if vae and not (self.cwd / vae).exists():
            make_vae_dir(self.cwd / vae)  # a small random AutoencoderKL with sd-vae-ft-ema's block structure
        checkpoint = _option(args, "--checkpoint", None)
        if checkpoint and not (self.cwd / checkpoint).exists():
            config = get_config(TINY_LATENT if vae else TINY)
            save_checkpoint(LegoModel(config).randomize_(0), self.cwd / checkpoint)
        engine_dir = _option(args, "--engine-dir", None)
        if engine_dir and not (self.cwd / engine_dir).exists():
            self.run(f"lego-export --engines onnx --out {engine_dir}")


def _option(args: list[str], name: str, default: str | None) -> str | None:
    return args[args.index(name) + 1] if name in args else default


def _makefile_recipes(path: Path) -> dict[str, list[str]]:
    recipes: dict[str, list[str]] = {}
    target = None
    for line in path.read_text().splitlines():
        m = re.match(r"^([\w.-]+):", line)
        if m:
            target = m.group(1)
            recipes[target] = []
        elif line.startswith("\t") and target:
            recipes[target].append(line.strip())
    return recipes


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("readme_exports")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{b.line}-{b.kind}" for b in BLOCKS])
def test_readme_block(block: Block, tmp_path, store):
    if block.kind == "python":
        _run_python(block, tmp_path)
    elif block.kind == "layout":
        listed = {ln.split()[0].rstrip("/") for ln in block.text.splitlines() if ln.strip()}
        packages = {p.name for p in REPO.iterdir() if p.is_dir() and any(p.glob("*.py")) and p.name != "build"}
        assert listed == packages, f"README layout lists {sorted(listed)}, the tree has {sorted(packages)}"
    elif block.kind == "shell":
        runner = Runner(tmp_path, store)
        for line in block.text.splitlines():
            runner.run(line)
    else:
        pytest.fail(f"README.md line {block.line}: a code block this test cannot map; teach tests/test_readme.py")


def test_readme_inline_commands(tmp_path, store):
    commands = inline_commands(README.read_text())
    assert commands, "no inline commands found"
    runner = Runner(tmp_path, store)
    for command in commands:
        runner.run(command)


def _run_python(block: Block, tmp_path: Path) -> None:
    """The example, with a random-init authors'-format snapshot under the file name it loads.

    The snapshot's model_type is a published 64-pixel config (brick sizes 4, 16, 64, so the sizes it
    accepts are the real ones), narrowed to a hidden size of 32 and one block per brick for speed.
    """
    from lego_model import LegoModel
    from lego_model.configs import LEGO_CONFIGS
    from tests.lego_model.test_checkpoints import _write_snapshot

    published = LEGO_CONFIGS[AUTHORS]
    narrow = dataclasses.replace(
        published, hidden_size=32, num_heads=2, depths=(1,) * published.num_bricks, label_dim=10
    )
    names = re.findall(r"load_checkpoint\(\"([^\"]+)\"\)", block.text)
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    try:
        for name in names:
            model = LegoModel(narrow).randomize_(0)
            _write_snapshot(
                model,
                tmp_path / name,
                module_src="raise RuntimeError('the snapshot code ran')",
                model_type=AUTHORS,
                resolution=published.resolution,
            )
    finally:
        for k, v in saved.items():  # the loader must not need the stand-in modules
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    namespace: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        mp.setitem(LEGO_CONFIGS, AUTHORS, narrow)
        exec(compile(block.text, f"README.md:{block.line}", "exec"), namespace)
    if "images" in namespace:
        images = namespace["images"]
        assert torch.isfinite(images).all()
        sizes = re.findall(r"draw_latents\(\[([\d, ]+)\],[^,]+,\s*(\d+),\s*(\d+)", block.text)
        for seeds, h, w in sizes:
            assert images.shape[0] == len(seeds.split(",")) and tuple(images.shape[2:]) == (int(h), int(w))


def test_readme_links_are_committed():
    """Every relative link in README.md names a file a clean checkout has: a results run left behind by
    .gitignore would leave the README citing figures nobody can open."""
    links = sorted({m for m in re.findall(r"\]\(([^)#\s]+)\)", README.read_text()) if "://" not in m})
    assert links, "README.md has no relative links: the pattern no longer matches its links"
    missing = [m for m in links if not (REPO / m).is_file()]
    assert not missing, f"README links to missing files: {missing}"
    if (REPO / ".git").exists() and shutil.which("git"):
        # ls-files lists what is tracked or staged: a file present only here (ignored, untracked) is not.
        tracked = subprocess.run(
            ["git", "ls-files", "--", *links], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()
        assert sorted(tracked) == links, f"README links to untracked files: {sorted(set(links) - set(tracked))}"
