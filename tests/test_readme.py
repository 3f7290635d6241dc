"""README.md stays true: its top-level sections come in the documented order, and every command
in its ```bash blocks is real; so is every command of the guides in GUIDES (docs/CUSTOM_DATA.md).

Commands are read the way a shell would (backslash-newline continuations joined, comments
dropped, `&&` and `;` chains split, `cd` ignored) and checked in-process; nothing is launched.
The arguments of `train_ds.py`, the merge script, `chat.py`, the tools and the benchmarks must
parse with that script's own parser (behind `deepspeed`, whose options must parse with DeepSpeed's
launcher parser and be among `LAUNCHER_OPTIONS`); `make` targets must exist in the Makefile;
`conda env create -f FILE` needs FILE; `hf download ...` must parse with the Hugging Face CLI. A
command this file does not know fails, so a new README command has to be taught here.

Synopsis lines write optional arguments in square brackets (`[--seed 0]`, `[--deep]`): such a
line is parsed twice, with the bracketed arguments and without them.

Parsing happens in an empty working directory that must stay empty: the README's relative paths
(dataset, weights, runs) need not exist, and no parser may create them. The parsers check flag
names, types, choices and the dataset specs (`--dataset`, `--sample_rates`, `--val_dataset`), not
that paths exist. Checked only in part: DeepSpeed's `zero_to_fp32.py` (copied into each
checkpoint and runnable only as a program: two positional paths, no options), and `chat.py`,
whose pairing rules (`--image` with `--prompt`, `--input_jsonl` with `--output_jsonl`) live in
its `main` after the parser.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# guides whose ```bash commands are checked as the README's
GUIDES = (ROOT / "docs" / "CUSTOM_DATA.md",)
SECTIONS = (
    "The two commands",
    "Status",
    "Train on real data",
    "Evaluate",
    "Merge",
    "Chat",
    "Bring published checkpoints",
    "Reproduce paper protocols",
    "Benchmarks",
    "Architecture",
    "Tests",
)
CHAIN_SEPARATORS = ("&&", ";")
# DeepSpeed launcher options the README may put before the script
LAUNCHER_OPTIONS = ("--include", "--master_port", "--num_gpus", "--hostfile", "--master_addr")
# MultiPartReasonSeg's --val_json_name files (MMR README); train_ds.py accepts any name
MMR_JSON_NAMES = (
    "MMR_val.json",
    "MMR_test_obj_only.json",
    "MMR_test_part_only.json",
    "MMR_test_mixed.json",
)
ZERO_TO_FP32 = "zero_to_fp32.py"
ZERO_TO_FP32_POSITIONALS = 2  # checkpoint directory, output directory

ArgvParser = Callable[[list[str]], Any]


class CommandError(AssertionError):
    """A README command that is not real; the message says which and why."""


# --- reading the README ------------------------------------------------------------------------


def outside_code(markdown: str) -> list[str]:
    """The lines of `markdown` that are not inside fenced code blocks (nor fences)."""
    lines: list[str] = []
    fenced = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def top_level_sections(markdown: str) -> list[str]:
    return [line[3:].strip() for line in outside_code(markdown) if line.startswith("## ")]


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)


def split_chain(line: str) -> list[list[str]]:
    """One shell line as its commands: quotes resolved, comment dropped, split at `&&`/`;`."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in CHAIN_SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    return [command for command in commands if command]


def shell_commands(markdown: str) -> list[list[str]]:
    """Every command of the ```bash blocks of `markdown` as argv lists, `cd` left out."""
    commands = []
    for block in bash_blocks(markdown):
        for line in block.replace("\\\n", "").splitlines():
            commands += [argv for argv in split_chain(line) if argv[0] != "cd"]
    return commands


def optional_variants(argv: list[str]) -> list[list[str]]:
    """`argv` with its `[--flag value]` groups unbracketed, and (if it has any) without them."""
    full: list[str] = []
    required: list[str] = []
    inside = False
    for token in argv:
        if token.startswith("[-"):
            if inside:
                raise CommandError("nested optional group")
            inside, token = True, token[1:]
        closes = inside and token.endswith("]")
        if closes:
            token = token[:-1]
        full.append(token)
        if not inside:
            required.append(token)
        inside = inside and not closes
    if inside:
        raise CommandError("unclosed optional group '['")
    return [full] if full == required else [full, required]


# --- the parsers of the project's scripts --------------------------------------------------------


def script_module(script: str) -> ModuleType:
    """The module of a repository script ("tools/check_dataset.py" -> tools.check_dataset)."""
    return importlib.import_module(script.removesuffix(".py").replace("/", "."))


def run_parser(parse: Callable[..., Any], *args: Any) -> Any:
    """`parse(*args)`; an argparse exit becomes a CommandError with the parser's last words."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parse(*args)
    except SystemExit as exit_:
        said = stderr.getvalue().strip().splitlines()
        raise CommandError(said[-1] if said else f"parser exited with {exit_.code}") from None


def argv_parser(script: str, function: str) -> ArgvParser:
    """The script's `function(argv)`."""
    return lambda argv: getattr(script_module(script), function)(argv)


def sys_argv_parser(script: str, function: str) -> ArgvParser:
    """The script's `function()`, which reads `sys.argv` (the benchmarks)."""

    def parse(argv: list[str]) -> Any:
        with mock.patch.object(sys, "argv", [script, *argv]):
            return getattr(script_module(script), function)()

    return parse


def parse_chat(argv: list[str]) -> Any:
    return script_module("chat.py").build_parser().parse_args(argv)


def parse_app(argv: list[str]) -> Any:
    return script_module("app.py").build_parser().parse_args(argv)


def parse_train(argv: list[str]) -> Any:
    config = script_module("train_ds.py").resolve_config(argv).config
    if "MultiPartReasonSeg" in config.val_dataset and config.val_json_name not in (
        "",
        *MMR_JSON_NAMES,
    ):
        raise CommandError(f"--val_json_name {config.val_json_name!r} is none of {MMR_JSON_NAMES}")
    return config


def parse_show_samples(argv: list[str]) -> Any:
    """The tool's own flags, then the train_ds.py part resolved as train_ds.py resolves it."""
    options, train_argv = script_module("tools/show_samples.py").parse_flags(argv)
    return options, parse_train(train_argv)


SCRIPT_PARSERS: dict[str, ArgvParser] = {
    "train_ds.py": parse_train,
    "merge_lora_weights_and_save_hf_model.py": argv_parser(
        "merge_lora_weights_and_save_hf_model.py", "resolve_merge_config"
    ),
    "chat.py": parse_chat,
    "app.py": parse_app,
    "tools/check_dataset.py": argv_parser("tools/check_dataset.py", "parse_args"),
    "tools/convert_checkpoint.py": argv_parser("tools/convert_checkpoint.py", "parse_args"),
    "tools/make_tiny_assets.py": argv_parser("tools/make_tiny_assets.py", "parse_args"),
    "tools/show_samples.py": parse_show_samples,
    "tools/convert_refs.py": argv_parser("tools/convert_refs.py", "parse_args"),
    "tools/convert_to_custom.py": argv_parser("tools/convert_to_custom.py", "parse_args"),
    "benchmarks/data_throughput.py": sys_argv_parser("benchmarks/data_throughput.py", "parse_args"),
    "benchmarks/generate.py": sys_argv_parser("benchmarks/generate.py", "parse"),
    "benchmarks/train_step.py": sys_argv_parser("benchmarks/train_step.py", "parse"),
}


# --- the checks, one per program -----------------------------------------------------------------


def check_script(script: str, args: list[str]) -> None:
    parse = SCRIPT_PARSERS.get(script)
    if parse is None:
        raise CommandError(f"no parser known for {script}: add it to SCRIPT_PARSERS")
    if not (ROOT / script).is_file():
        raise CommandError(f"{script} does not exist")
    run_parser(parse, args)


def check_zero_to_fp32(args: list[str]) -> None:
    """DeepSpeed's script: `python zero_to_fp32.py CHECKPOINT_DIR OUTPUT_DIR`."""
    shipped = Path(importlib.import_module("deepspeed").__file__).parent / "utils" / ZERO_TO_FP32
    if not shipped.is_file():
        raise CommandError(f"the installed DeepSpeed has no {ZERO_TO_FP32}")
    if len(args) != ZERO_TO_FP32_POSITIONALS or any(arg.startswith("-") for arg in args):
        raise CommandError(f"{ZERO_TO_FP32} takes a checkpoint directory and an output directory")


def check_python(args: list[str]) -> None:
    if not args:
        raise CommandError("python without a script")
    script, *rest = args
    if script == ZERO_TO_FP32:
        check_zero_to_fp32(rest)
    else:
        check_script(script, rest)


def check_deepspeed(args: list[str]) -> None:
    runner = importlib.import_module("deepspeed.launcher.runner")
    launch = run_parser(runner.parse_args, args)
    options = args[: args.index(launch.user_script)]
    names = [option.split("=")[0] for option in options if option.startswith("-")]
    unknown = [name for name in names if name not in LAUNCHER_OPTIONS]
    if unknown:
        raise CommandError(f"launcher options {unknown} are none of {LAUNCHER_OPTIONS}")
    check_script(launch.user_script, launch.user_args)


def check_make(args: list[str]) -> None:
    targets = re.findall(
        r"^([A-Za-z][\w.-]*):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE
    )
    unknown = [target for target in args if target not in targets]
    if unknown or not args:
        raise CommandError(f"no Makefile target {unknown}; the targets are {targets}")


def check_conda(args: list[str]) -> None:
    if len(args) != 4 or args[:3] != ["env", "create", "-f"] or not (ROOT / args[3]).is_file():
        raise CommandError("only `conda env create -f <file in the repository>` is known")


def check_hf(args: list[str]) -> None:
    """Parse with the Hugging Face CLI's own (click) command; nothing is downloaded."""
    if args[:1] != ["download"]:
        raise CommandError("only `hf download` is known")
    click = importlib.import_module("click")
    group = importlib.import_module("huggingface_hub.cli.hf").app
    context = group.make_context("hf", args[:1])
    _, command, _ = group.resolve_command(context, args[:1])  # imports the lazy command
    try:
        command.make_context(args[0], args[1:], parent=context)
    except (click.ClickException, click.exceptions.Exit) as error:
        raise CommandError(f"hf download: {error}") from None


def check_huggingface_cli(args: list[str]) -> None:
    raise CommandError(
        "huggingface_hub as pinned by requirements.txt has no huggingface-cli; write `hf`"
    )


def check_cp(args: list[str]) -> None:
    """`cp SOURCE COPY` of a repository file (`with_copies` reads COPY as SOURCE later on)."""
    if len(args) != 2 or not (ROOT / args[0]).is_file():
        raise CommandError("only `cp FILE COPY` of a file in the repository is known")


def with_copies(commands: list[list[str]]) -> list[list[str]]:
    """The commands with each name a `cp` made earlier replaced by the repository file it
    copies (as a token, or as a `--flag=` value), so that the copy is read as it starts."""
    copies: dict[str, str] = {}
    resolved = []
    for argv in commands:
        replaced = []
        for token in argv:
            flag, equals, value = token.rpartition("=")
            if token in copies:
                token = copies[token]
            elif equals and value in copies:
                token = f"{flag}={copies[value]}"
            replaced.append(token)
        resolved.append(replaced)
        if argv[0] == "cp" and len(argv) == 3:
            copies[argv[2]] = str(ROOT / argv[1])
    return resolved


PROGRAMS: dict[str, Callable[[list[str]], None]] = {
    "python": check_python,
    ".venv/bin/python": check_python,
    "deepspeed": check_deepspeed,
    "make": check_make,
    "conda": check_conda,
    "hf": check_hf,
    "huggingface-cli": check_huggingface_cli,
    "cp": check_cp,
}


def check_command(argv: list[str]) -> None:
    """Raise CommandError naming `argv` unless it is a command this project really has."""
    try:
        check = PROGRAMS.get(argv[0])
        if check is None:
            raise CommandError(f"unknown program {argv[0]!r}: teach tests/test_readme.py")
        for variant in optional_variants(argv):
            check(variant[1:])
    except CommandError as error:
        raise CommandError(f"README command `{shlex.join(argv)}`: {error}") from None


# --- tests ---------------------------------------------------------------------------------------

README_COMMANDS = shell_commands(README.read_text())
GUIDE_COMMANDS = [
    (guide.relative_to(ROOT).as_posix(), argv)
    for guide in GUIDES
    for argv in with_copies(shell_commands(guide.read_text()))
]


@pytest.fixture
def empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory, so that the README's relative paths resolve to nothing."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_sections_come_in_the_documented_order() -> None:
    text = README.read_text()
    assert text.startswith("# ")
    assert top_level_sections(text) == list(SECTIONS)


def test_the_readme_commands_cover_each_kind() -> None:
    programs = {argv[0] for argv in README_COMMANDS}
    scripts = {argv[1] for argv in README_COMMANDS if argv[0] != "deepspeed" and len(argv) > 1}
    assert {"make", "deepspeed", "python", ".venv/bin/python", "hf"} <= programs
    assert {"train_ds.py", "merge_lora_weights_and_save_hf_model.py", "chat.py"} <= scripts


@pytest.mark.parametrize(
    "argv",
    README_COMMANDS,
    ids=[f"{i:02d}-{' '.join(a[:2])}" for i, a in enumerate(README_COMMANDS)],
)
def test_readme_command_is_real(argv: list[str], empty_cwd: Path) -> None:
    check_command(argv)
    assert list(empty_cwd.iterdir()) == [], "parsing a README command created files"


@pytest.mark.parametrize(
    ("guide", "argv"),
    GUIDE_COMMANDS,
    ids=[f"{g}-{i:02d}-{' '.join(a[:2])}" for i, (g, a) in enumerate(GUIDE_COMMANDS)],
)
def test_guide_command_is_real(guide: str, argv: list[str], empty_cwd: Path) -> None:
    check_command(argv)
    assert list(empty_cwd.iterdir()) == [], f"parsing a command of {guide} created files"


def test_the_custom_data_guide_covers_its_tools() -> None:
    scripts = {arg for _, argv in GUIDE_COMMANDS for arg in argv if arg.endswith(".py")}
    assert {
        "tools/convert_to_custom.py",
        "tools/check_dataset.py",
        "tools/show_samples.py",
        "train_ds.py",
    } <= scripts
    assert any(argv[0] == "cp" for _, argv in GUIDE_COMMANDS)


def test_copies_are_read_as_their_source() -> None:
    commands = [
        ["cp", "configs/m2sa.yaml", "./mine.yaml"],
        ["python", "train_ds.py", "--recipe", "./mine.yaml", "--recipe=./mine.yaml"],
    ]
    source = str(ROOT / "configs" / "m2sa.yaml")
    assert with_copies(commands)[1] == [
        "python",
        "train_ds.py",
        "--recipe",
        source,
        f"--recipe={source}",
    ]


def test_commands_are_read_as_a_shell_would() -> None:
    markdown = (
        "```text\nmake nothing\n```\n"
        "```bash\n"
        "# a comment line\n"
        'deepspeed --master_port=24999 train_ds.py \\\n  --val_dataset="ReasonSeg|val"  # why\n'
        "cd ./runs/x/ckpt_model && python zero_to_fp32.py . ../out && cd -; make test\n"
        "```\n"
    )
    assert shell_commands(markdown) == [
        ["deepspeed", "--master_port=24999", "train_ds.py", "--val_dataset=ReasonSeg|val"],
        ["python", "zero_to_fp32.py", ".", "../out"],
        ["make", "test"],
    ]
    assert optional_variants(["tool", "--a", "1", "[--b", "2]", "[--c]"]) == [
        ["tool", "--a", "1", "--b", "2", "--c"],
        ["tool", "--a", "1"],
    ]


@pytest.mark.parametrize(
    "line",
    [
        # the benchmarks' own synopsis lines (their docstrings)
        "python benchmarks/data_throughput.py [--image_size 640x480] [--sam_size 1024] "
        "[--samples 120] [--workers 1,2] [--memory_samples 10000] [--assets DIR]",
        "python benchmarks/generate.py [--preset tiny] [--batch_sizes 1,8] "
        "[--new_tokens 32,128,512]",
        "deepspeed --num_gpus 1 benchmarks/train_step.py --preset 7b [--offload_optimizer]",
        "cd ./runs/M2SA/ckpt_model && python zero_to_fp32.py . ../pytorch_model && cd -",
        "conda env create -f M2SA.yaml",  # in the text of "The two commands"
    ],
)
def test_checker_accepts(line: str, empty_cwd: Path) -> None:
    for argv in shell_commands(f"```bash\n{line}\n```\n"):
        check_command(argv)


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ("python train_ds.py --version=x --no_such_flag", "--no_such_flag"),
        ('deepspeed train_ds.py --eval_only --val_dataset="grefcoco|unc|train"', "grefcoco"),
        ("deepspeed --exclude=localhost:1 train_ds.py", "--exclude"),
        ("deepspeed --master_port=port train_ds.py", "--master_port"),
        (
            'python train_ds.py --eval_only --val_dataset="MultiPartReasonSeg|val" '
            "--val_json_name=MMR_tset_mixed.json",
            "MMR_tset_mixed.json",
        ),
        ("python merge_lora_weights_and_save_hf_model.py --save_path=out", "--weight"),
        ("python chat.py --version=x --temperature=0.2", "--temperature"),
        (".venv/bin/python tools/check_dataset.py --dataset_dir ./dataset [--deeep]", "--deeep"),
        (".venv/bin/python tools/make_tiny_assets.py --out x [--seed 0", "unclosed"),
        ("python chat.py [--version x [--precision bf16]]", "nested"),
        ("python tools/no_such_tool.py --x 1", "no_such_tool.py"),
        ("python benchmarks/generate.py --preset 13b", "13b"),
        ("python zero_to_fp32.py .", "zero_to_fp32.py"),
        ("make deploy", "deploy"),
        ("make .PHONY", ".PHONY"),
        ("conda env create -f environment.yml", "conda env create -f"),
        ("hf download openai/clip-vit-large-patch14 --local_dir ./clip", "--local_dir"),
        ("huggingface-cli download openai/clip-vit-large-patch14", "huggingface-cli"),
        ("CUDA_VISIBLE_DEVICES=0 python chat.py", "CUDA_VISIBLE_DEVICES"),
        ("cp configs/no_such.yaml ./mine.yaml", "only `cp FILE COPY`"),
        ("python tools/convert_to_custom.py set --set=refcoco --out=x.jsonl", "--set"),
    ],
)
def test_checker_rejects(line: str, named: str, empty_cwd: Path) -> None:
    (argv,) = shell_commands(f"```bash\n{line}\n```\n")
    with pytest.raises(CommandError) as caught:
        check_command(argv)
    command, _, reason = str(caught.value).partition("`: ")
    assert command == f"README command `{shlex.join(argv)}"
    assert named in reason
