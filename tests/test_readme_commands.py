"""Every `unclip-jax` command in the README's code blocks parses as written, with its prompts read
as prompts: a `--guidance 1 3` or `--upsamplers RUN` before the prompts swallows them (their
arguments take every following word), which an earlier README did."""

import pathlib
import re
import shlex

import pytest

from unclip_jax import cli

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[str]:
    """The `unclip-jax` lines of the README's bash blocks, with the blocks' own shell variables
    (`D=...`, `S="..."`) substituted; lines built from loop variables are left out."""
    commands = []
    for block in re.findall(r"```(?:bash|console)\n(.*?)```", README.read_text(), re.S):
        variables = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if assignment := re.fullmatch(r"([A-Z]\w*)=(.*)", line):
                variables[assignment[1]] = " ".join(shlex.split(assignment[2]))
            if line.startswith("unclip-jax ") and "${" not in line:
                for name, value in variables.items():
                    line = line.replace(f"${name}", value)
                commands.append(line.split(" # ")[0].strip())
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_commands():
    assert len(COMMANDS) >= 15
    assert {c.split()[1] for c in COMMANDS} >= {"sample", "train", "convert", "vary", "ablate"}


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command):
    argv = shlex.split(command)[1:]
    try:
        args = cli.build_parser().parse_args(argv)
    except SystemExit as err:
        pytest.fail(f"does not parse ({err}): {command}")
    if argv[0] in ("sample", "inpaint"):
        quoted = re.findall(r'"([^"]*)"', command)
        assert quoted and set(quoted) <= set(args.prompt or []), (quoted, args.prompt)
