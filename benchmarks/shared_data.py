"""The project's real text for the benchmarks: ``shared/data`` beside the checkout (or above a worktree).

Only the benchmarks and tests read it; the package ships its evaluation sets and never looks here. The
benchmarks calibrate on all C4 validation documents 1100-1999, of which the package ships a 250 KB prefix.
"""

from __future__ import annotations

from pathlib import Path

C4_CALIBRATION = "c4/c4_val_calib_docs1100-1999_joined.txt"


def c4_calibration_text() -> str:
    """Path (as str) of the full C4 calibration text; exits with a clear message when it is absent."""
    checkout = Path(__file__).resolve().parents[1]
    for folder in checkout.parents:
        path = folder / "shared" / "data" / C4_CALIBRATION
        if path.is_file():
            return str(path)
    raise SystemExit(
        f"{C4_CALIBRATION} not found in a shared/data folder above {checkout}: the benchmarks calibrate on "
        "the project's full C4 calibration text, which is not part of the package"
    )
