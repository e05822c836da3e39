import pytest

from diffalign.cli import main
from diffalign.engine.cliutils import ArgumentParser, parse_float_list, parse_int_list
from diffalign.engine.errors import DiffalignError


def test_snake_case_alias_accepted():
    p = ArgumentParser()
    p.add_argument("--num-samples", type=int, default=1)
    g = p.add_argument_group("g")
    g.add_argument("--origin-layer", type=int, default=0)
    a = p.parse_args(["--num_samples", "5", "--origin_layer", "2"])
    assert a.num_samples == 5 and a.origin_layer == 2
    a = p.parse_args(["--num-samples", "7"])
    assert a.num_samples == 7


@pytest.mark.parametrize(
    "text,expected",
    [("3,5,7", [3, 5, 7]), ("3 5 7", [3, 5, 7]), (" 3, 5  7 ", [3, 5, 7]), ("", []), (None, [])],
)
def test_int_lists(text, expected):
    assert parse_int_list(text) == expected


def test_malformed_list_is_clear_error():
    with pytest.raises(DiffalignError, match="not an integer"):
        parse_int_list("3,x,7", "--residual-target-layers")
    with pytest.raises(DiffalignError, match="not a number"):
        parse_float_list("0.5,abc")


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert "diffalign" in capsys.readouterr().out


def test_unknown_command_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2


def test_every_option_of_every_command_has_help():
    import argparse

    from diffalign.cli import build_parser

    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif not isinstance(action, argparse._HelpAction | argparse._VersionAction):
                if not action.help:
                    missing.append(f"{' '.join(path)} {action.option_strings or action.dest}")

    walk(build_parser(), ["diffalign"])
    assert not missing, missing
