"""make demo runs end to end on bundled real photos and warns loudly without weights."""
from __future__ import annotations

from pipeline.data.camfile import load_cams
from pipeline.data.demo import SAMPLES
from stages.demo import main


def test_demo_runs_with_random_model_and_says_so(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "demo")]) == 0
    err = capsys.readouterr().err
    assert "MEANINGLESS" in err
    cams = tmp_path / "demo" / "cams-random"
    files = {p.stem: load_cams(p) for p in cams.glob("*.npz")}
    assert set(files) == set(SAMPLES)
    assert files["chelsea"]["image_size"].tolist() == [300, 451] and files["chelsea"]["keys"].tolist() == [7]
    assert files["camera"]["cams"].shape == (1, 32, 32)
    labels = sorted(p.stem for p in (tmp_path / "demo" / "pseudo-random").glob("*.png"))
    panels = sorted(p.stem for p in (tmp_path / "demo" / "viz-random").glob("*.png"))
    assert labels == panels == sorted(SAMPLES)
    html = (tmp_path / "demo" / "viz-random" / "index.html").read_text()
    assert all(f"{i}.png" in html for i in SAMPLES)
