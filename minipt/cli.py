"""What every minipt command line shares: a bad option ends the command with one line
`error: ...` and exit status 1, as bad input does everywhere else (argparse's own error
prints the usage and exits with status 2)."""
import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        sys.exit(f"error: {message} (see {self.prog} --help)")
