"""The scripts' command-line conventions: one-line errors, and one rule for exit codes.

    exit 2   a mistake in the command: a flag, a value, or a path that names the wrong thing;
             found before any work starts, so nothing was written or changed
    exit 1   a failure while running: an unreadable or damaged file, NaN weights, a full disk
    exit 130 interrupted (Ctrl-C)
Every error is one line on stderr, `prog: error: what is wrong; what was expected`.

    parser = cli.Parser(prog="train.py", description=__doc__, epilog="examples: ...")
    cli.fail("train.py", "--train-dir x: no such folder", cli.USAGE)
"""
import argparse
import gc
import re
import sys

FAILURE, USAGE, INTERRUPTED = 1, 2, 130


class Exit(SystemExit):
    """SystemExit whose exit status is `status` and whose str() is the one-line message;
    run() prints it. (Raised, not printed, so that a caller of main() can catch it.)"""

    def __init__(self, message, status=FAILURE):
        super().__init__(status)
        self.message = message

    def __str__(self):
        return self.message


def fail(prog, message, status=FAILURE):
    """Ends the program: `prog: error: message` and exit status `status` (USAGE or FAILURE)."""
    raise Exit(f"{prog}: error: {message}", status)


def run(main, interrupted, argv=None):
    """Runs a script's main(argv): an Exit becomes its one line on stderr and its exit status,
    Ctrl-C the line `interrupted` and exit status 130. The line comes last, after the
    progress bars that the failed work leaves behind have closed."""
    try:
        main(argv)
        return
    except Exit as error:
        message, status = str(error), error.code
    except KeyboardInterrupt:
        message, status = interrupted, INTERRUPTED
    gc.collect()  # the failed frames' progress bars close (and draw) now, not after the message
    print(message, file=sys.stderr)
    sys.exit(status)


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default (where it has one) and keeps the description's and the
    examples' line breaks."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`prog: error: ...`, exit 2), not a usage block,
    whose --help shows defaults, and which reads every negative number as a value."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=Formatter, **kwargs)
        # argparse's own pattern misses "-1e-3" and "-inf", which then read as an unknown flag.
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-inf$", re.I)

    def error(self, message):
        self.exit(USAGE, f"{self.prog}: error: {message} (see --help)\n")
