"""`python -m toolchain_client`: the `toolchain` command."""

import sys

from toolchain_client.cli import main

sys.exit(main())
