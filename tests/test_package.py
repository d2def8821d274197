"""The public surface: every exported name resolves, and the CLI lists every sub-command."""

import cm_diffusers
from cm_diffusers.cli import build_parser, main


def test_every_public_name_resolves():
    for name in cm_diffusers.__all__:
        assert getattr(cm_diffusers, name) is not None


def test_cli_lists_all_commands(capsys):
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)
    assert {"generate", "edit", "evaluate", "benchmark", "card", "push", "convert-openai"} <= commands
    assert main([]) == 2
    assert "generate" in capsys.readouterr().out
