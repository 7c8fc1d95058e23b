"""The one place the benchmark imports the namespace test bed from (change this line when the bed moves)."""

from tests.bed import testbed as tb
from tests.bed.natd import ct_count
from tests.bed.stack import HTTP_PORT, Stack, StackError

__all__ = ["HTTP_PORT", "Stack", "StackError", "ct_count", "tb"]
