"""The one place the benchmark imports the namespace test bed from (change this line when the bed moves)."""

from shared import testbed as tb
from shared.stack import HTTP_PORT, Stack, StackError

__all__ = ["HTTP_PORT", "Stack", "StackError", "tb"]
