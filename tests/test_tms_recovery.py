"""End to end: a shortened TMS 5-2 run recovers the target's feature directions."""

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tms.py"


def test_tms_5_2_shortened_recovery(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("tms_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    mmcs, ml2r = example.main(
        [
            "--setting",
            "5-2",
            "--seed",
            "1",
            "--steps",
            "4000",  # seeds 1, 2, 3 at 3000: MMCS 0.979, 0.979, 0.977 (top-k 0.15 needs longer); seed 1 at 4000: 1.000
            "--target-steps",
            "2000",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"MMCS={mmcs:.4f} ML2R={ml2r:.4f}"
    assert mmcs >= 0.99, last
    assert 0.7 <= ml2r <= 1.1, last
    assert (tmp_path / "tms_5-2_apd_seed1.png").stat().st_size > 10_000
