"""The README and docs/ agree with the code: every default written in brackets after a flag
(`` `--lr` [2e-4] ``) is the config dataclass's default, every value given to a flag with a fixed
set of values is one of them, every flag of a documented ``pg-lm`` / recipe / benchmark command
exists there, every ``make`` target named exists in the Makefile, and the figures the README
quotes are BENCHMARKS.md's."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from pg_lm.cli import gym_env
from pg_lm.gym.config import GymConfig
from pg_lm.gym.variance import GymVarianceConfig
from pg_lm.lm.config import EvalConfig, LMConfig
from pg_lm.lm.variance import VarianceConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "BENCHMARKS.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
CONFIGS = (LMConfig, EvalConfig, VarianceConfig, GymConfig, GymVarianceConfig)
FLAG = re.compile(r"(?<![\w-])--([a-z][\w-]*)")
# `--flag ...` [default], or `--a` / `--b` [default] for both: the default of each span's last flag
DEFAULT = re.compile(r"((?:`[^`]*--[^`]*`(?:\s*/\s*)?)+)\s*\[([^\]]+)\](?!\()")


def fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def written_matches(text: str, value) -> bool:
    """Whether a default as the docs write it ("2e-4", "off", "16; 0 = full fine-tuning",
    "none = the whole minibatch") is ``value``: the part before any ';' or ' = ' counts."""
    t = text.split(";")[0].split(" = ")[0].strip().lower()
    if value is None:
        return t in ("none", "off", "all")
    if isinstance(value, bool):
        return t == str(value).lower()
    if isinstance(value, (int, float)):
        try:
            return float(t) == float(value)
        except ValueError:
            return False
    if isinstance(value, list):
        return t == ", ".join(map(str, value)).lower()
    return t == str(value).lower()


def bracket_defaults(text: str) -> list[tuple[str, str]]:
    """(flag, written default) for every `` `--flag ...` [default] `` in ``text``."""
    out = []
    for m in DEFAULT.finditer(text):
        for span in re.findall(r"`([^`]*)`", m.group(1)):
            out.append((FLAG.findall(span)[-1], m.group(2)))
    return out


def flag_table() -> list[str]:
    """The flags column of the README's "Algorithms and flags" table, one cell per row."""
    section = (ROOT / "README.md").read_text().split("## Algorithms and flags", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ")][1:]  # not the header (nor the |---| rule)
    return [re.split(r"(?<!\\)\|", ln)[2] for ln in rows]  # an escaped \| is inside a cell


def test_the_readme_flag_table_gives_lmconfigs_defaults():
    lm = fields(LMConfig)
    cells = flag_table()
    assert len(cells) > 20
    seen = []
    for cell in cells:
        for flag, written in bracket_defaults(cell):
            assert flag in lm, f"README flag table: --{flag} is not an LMConfig field"
            value = default_of(lm[flag])
            assert written_matches(written, value), f"README flag table: --{flag} [{written}], LMConfig's default is {value!r}"
            seen.append(flag)
        # a bracket must follow the flag it belongs to (`--flag` >= 2 [4] would go unchecked)
        loose = [m.group(0) for m in re.finditer(r"\[[^\]]+\](?!\()", DEFAULT.sub("", cell))]
        assert not loose, f"README flag table: {loose} follows no flag in: {cell}"
        for flag in FLAG.findall(cell):
            assert flag in lm, f"README flag table: --{flag} is not an LMConfig field"
    assert {"samples-per-prompt", "prompts-per-step", "lr", "lora-r", "baseline"} <= set(seen)


def test_values_given_to_flags_with_fixed_choices_are_among_them():
    choices: dict[str, set] = {}
    for cls in CONFIGS:
        for name, f in fields(cls).items():
            if f.metadata.get("choices"):
                choices.setdefault(name, set()).update(map(str, f.metadata["choices"]))
    bad = []
    for doc in DOCS:
        for span in re.findall(r"`([^`\n]+)`", (ROOT / doc).read_text()):
            tokens = span.split()
            for flag, value in zip(tokens, tokens[1:] + [""]):
                name = flag[2:]
                if flag.startswith("--") and name in choices and value and not value.startswith(("--", "...")):
                    bad += [f"{doc}: --{name} {v}" for v in re.split(r"\\?\|", value) if v not in choices[name]]
    assert not bad, bad


def test_every_bracketed_default_in_the_docs_is_a_configs_default():
    bad = []
    for doc in DOCS:
        for flag, written in bracket_defaults((ROOT / doc).read_text()):
            values = [default_of(fields(cls)[flag]) for cls in CONFIGS if flag in fields(cls)]
            if not any(written_matches(written, v) for v in values):
                bad.append(f"{doc}: --{flag} [{written}], defaults in the configs: {values}")
    assert not bad, bad


def _commands() -> dict[str, set[str]]:
    """Command -> its flags: each pg-lm subcommand, each recipe and each benchmark script."""
    lm = set(fields(LMConfig)) | {"config", "help"}
    gym = set(fields(GymConfig)) | {"config", "help"}
    out = {"pg-lm lm": lm, "pg_lm.cli lm": lm, "pg-lm eval": set(fields(EvalConfig)) | {"config", "help"},
           "pg-lm gym": gym, "pg-lm export": {"model", "help"}, "pg-lm view": {"step", "output", "help"},
           "recipes/arithmetic.py": lm, "recipes/custom_reward.py": lm, "recipes/cartpole.py": gym,
           "recipes/pendulum.py": gym}
    for script in (ROOT / "benchmarks").glob("*.py"):
        out[f"benchmarks/{script.name}"] = set(re.findall(r'add_argument\(\s*"--([\w-]+)"', script.read_text())) | {"help"}
    return out


def _command_lines(text: str):
    """Lines of fenced code blocks (a trailing backslash joins the next) and inline code spans."""
    fenced = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    for block in fenced:
        yield from block.replace("\\\n", " ").splitlines()
    yield from re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))


@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_use_flags_that_exist(doc):
    commands = _commands()
    variance = (set(fields(VarianceConfig)) | {"config", "help"}, set(fields(GymVarianceConfig)) | {"config", "help"})
    bad = []
    for line in _command_lines((ROOT / doc).read_text()):
        line = line.split(" #")[0]
        for cmd in [*commands, "pg-lm variance"]:
            k = line.find(cmd)
            if k < 0:
                continue
            rest = line[k + len(cmd):]
            rest = re.split(r"(?:pg-lm |python |accelerate |&&|;)", rest)[0]  # up to the next command
            flags = FLAG.findall(rest)
            known = commands.get(cmd) or variance[gym_env(rest.split())]  # routed as the CLI routes it
            bad += [f"{cmd} --{f}" for f in flags if f not in known]
    assert not bad, f"{doc}: {bad}"


@pytest.mark.parametrize("doc", DOCS)
def test_make_targets_named_exist(doc):
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    named = [m for line in _command_lines((ROOT / doc).read_text()) for m in re.findall(r"^\s*make ([\w-]+)", line)]
    assert set(named) <= targets, f"{doc}: make {sorted(set(named) - targets)} not in the Makefile"


@pytest.mark.parametrize("section", ["Results", "The method table, measured"])
def test_the_readmes_measured_figures_are_quoted_from_benchmarks(section):
    """BENCHMARKS.md is the one place for a measured figure: each decimal number of these README
    sections appears there as written."""
    text = (ROOT / "README.md").read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    bench = (ROOT / "BENCHMARKS.md").read_text()
    numbers = re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", text)
    assert numbers
    missing = sorted({n for n in numbers if not re.search(rf"(?<![\w.]){re.escape(n)}(?![\d])", bench)})
    assert not missing, f"README '{section}': {missing} not in BENCHMARKS.md"
