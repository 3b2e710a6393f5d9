"""`python -m llama_jax.convert`: see `llama_jax.convert.cli`."""

import sys

from llama_jax.convert.cli import main

sys.exit(main())
