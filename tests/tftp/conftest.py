"""Fixtures of the TFTP tests (defined in tftp_support, which the tests import helpers from)."""

from tftp_support import *  # noqa: F403
