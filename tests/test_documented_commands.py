"""Every command the launchers, examples, grid files and docs tell a user to run names a module or
script that exists, every ``--flag`` it passes is one that module's parser (or subcommand's)
accepts, and every config override they write (``method.top_t=...``) names a config field: a rename
or a dropped option fails here, not on a user's machine. This covers the steps CI cannot run end to
end (``examples/smollm2/run.sh`` downloads a model)."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import re
import sys
import typing
from collections import defaultdict
from pathlib import Path

import pytest

from smft_dist.config import JobConfig

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["README.md", "docs/*.md", "launcher/*.sh", "examples/*/*.sh", "benchmarks/*grids/*.yaml", ".ci/run"]
MODULE = re.compile(r"-m\s+((?:smft_dist|benchmarks)[\w.]*)([^;|&>\n#`]*)")
SCRIPT = re.compile(r"(?:\$PY|python)\s+((?:\$EX/|examples/)[\w/]+\.py)([^;|&>\n#`]*)")
FLAG = re.compile(r"(?<![^\s\[])(--[a-z][\w-]*)")
SECTIONS = [f.name for f in dataclasses.fields(JobConfig)]
OVERRIDE = re.compile(rf"(?<![\w./$-])((?:{'|'.join(SECTIONS)})(?:\.\w+)+)=")


def documented_commands() -> dict[tuple[str, str | None], set[str]]:
    """(module or script path, first bare argument) -> the flags passed to it, over every source."""
    commands: dict[tuple[str, str | None], set[str]] = defaultdict(set)
    for pattern in SOURCES:
        for path in sorted(ROOT.glob(pattern)):
            text = path.read_text().replace("\\\n", " ")
            for regex in (MODULE, SCRIPT):
                for m in regex.finditer(text):
                    target = m.group(1).replace("$EX", str(path.parent.relative_to(ROOT)))
                    args = m.group(2).split()
                    first = args[0] if args and re.fullmatch(r"[a-z]+", args[0]) else None
                    commands[(target, first)].update(FLAG.findall(m.group(2)))
    return commands


COMMANDS = documented_commands()


def documented_overrides() -> dict[str, set[str]]:
    """Config override key -> the sources that write it."""
    keys: dict[str, set[str]] = defaultdict(set)
    for pattern in SOURCES:
        for path in sorted(ROOT.glob(pattern)):
            for key in OVERRIDE.findall(path.read_text()):
                keys[key].add(str(path.relative_to(ROOT)))
    return keys


def is_config_field(key: str) -> bool:
    """``key`` is a field path of :class:`JobConfig`; a list of tasks takes a task name as its part."""
    tp, parts = JobConfig, key.split(".")
    while parts:
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if parts[0] not in hints:
            return False
        tp = hints[parts.pop(0)]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) is list and parts:  # eval.tasks.<name>....
            tp, parts = args[0], parts[1:]
        elif len(args) == 1 and dataclasses.is_dataclass(args[0]):  # X | None
            tp = args[0]
    return True


def load(target: str):
    """The module ``python -m target`` (or the script ``python target``) runs, imported."""
    if target.endswith(".py"):
        assert (ROOT / target).is_file(), f"{target}: no such script"
        spec = importlib.util.spec_from_file_location(Path(target).stem, ROOT / target)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    assert importlib.util.find_spec(target) is not None, f"{target}: no such module"
    return importlib.import_module(target)


def help_text(target: str, argv: list[str], monkeypatch, capsys) -> str:
    """What ``python -m target *argv --help`` (or ``python target ...``) prints, run in this process."""
    module = load(target)
    monkeypatch.setattr(sys, "argv", [target, *argv, "--help"])
    with pytest.raises(SystemExit) as stop:
        module.main(*([[*argv, "--help"]] if inspect.signature(module.main).parameters else []))
    assert stop.value.code in (0, None), f"{target} {' '.join(argv)} --help exited {stop.value.code}"
    return capsys.readouterr().out


def test_documented_commands_are_found():
    """The scan itself: the sources name the entry points users run, with their flags."""
    assert {"--model", "--layers", "--center-queries", "--memory-init"} <= COMMANDS[("smft_dist.retrofit", None)]
    assert ("examples/smollm2/build_data.py", None) in COMMANDS and ("smft_dist.patch", "merge") in COMMANDS
    assert "--policy" in COMMANDS[("smft_dist.patch", "merge")]
    assert {"method.top_t", "eval.tasks.new_facts.source.max_examples"} <= set(documented_overrides())
    assert is_config_field("eval.tasks.new_facts.source.path") and is_config_field("sparse_optim.type")
    assert not is_config_field("method.topt") and not is_config_field("eval.tasks.new_facts.source.paths")


def test_documented_overrides_are_config_fields():
    unknown = {k: sorted(v) for k, v in documented_overrides().items() if not is_config_field(k)}
    assert not unknown, f"documented config overrides that name no config field: {unknown}"


@pytest.mark.parametrize("target, first", sorted(COMMANDS, key=lambda k: (k[0], k[1] or "")), ids=lambda v: str(v))
def test_documented_command_exists_with_its_flags(target, first, monkeypatch, capsys):
    if not COMMANDS[(target, first)]:  # run without flags: the module or script must import
        assert hasattr(load(target), "main"), f"{target}: no main()"
        return
    top = help_text(target, [], monkeypatch, capsys)
    choices = re.search(r"\{([\w,]+)\}", top)
    sub = [first] if first and choices and first in choices.group(1).split(",") else []
    text = help_text(target, sub, monkeypatch, capsys) if sub else top
    unknown = [f for f in sorted(COMMANDS[(target, first)]) if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]
    assert not unknown, f"{target} {' '.join(sub)}: documented flags its parser does not accept: {unknown}"


def test_readme_keeps_the_two_set_up_commands():
    """The README's two commands that set up a fresh machine (the main job, the tests) stay in it, and
    the scripts they name exist: a README rewrite once dropped them unnoticed."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Two commands", 1)
    assert len(section) == 2, "README.md lost its '## Two commands' section"
    block = section[1].split("```bash", 1)[1].split("```", 1)[0]
    for script in ("launcher/quickstart.sh", "launcher/test.sh"):
        assert f"bash {script}" in block, f"README's two commands no longer run {script}"
        assert (ROOT / script).is_file()
    assert "launcher/test.sh" in (ROOT / ".ci/run").read_text()
