"""Write the training presets of `opendino.presets` to `configs/<name>.yaml`, every key commented.

`tests/test_train_config.py` checks that the committed files are exactly what this script writes, so a schema or
preset change shows up as a failing test until the files are rewritten:

    python tools/make_config_presets.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from opendino.presets import PRESETS, render


def main() -> int:
    out = Path(__file__).resolve().parent.parent / "configs"
    out.mkdir(exist_ok=True)
    for name in PRESETS:
        (out / f"{name}.yaml").write_text(render(name))
        print(f"wrote {out / name}.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
