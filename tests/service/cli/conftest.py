import pytest

from service.cli import main


@pytest.fixture
def run(capsys):
    """``run(*argv)``: `ircnn argv...` in this process -> ``(exit code, stdout, stderr)``."""

    def run(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run
