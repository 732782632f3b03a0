"""Checks the example's command-line tests share."""

from __future__ import annotations

import pytest


def one_error_line(capsys: pytest.CaptureFixture, *fragments: str) -> str:
    """The captured stderr is one ``error: ...`` line holding every fragment; returns it.

    A busy machine adds a "warning: the load average is ..." line (``runtime.configure_runtime``); it is
    not an error and is left out.
    """
    err = "\n".join(line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning: "))
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err


def exit_code(main, argv: list[str]) -> int:
    """What a command's ``main`` returns, or the status argparse exits with."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code
