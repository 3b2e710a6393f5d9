"""Text from a LLaMA checkpoint: `python generate.py --checkpoint DIR --prompt "..."` (see --help).

The logic is `llama_jax.generate.cli`; this file only hands it the command line.
"""

import sys

from llama_jax.generate.cli import main

if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
