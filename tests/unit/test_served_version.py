"""What `raylm pipeline` serves after the eval gate: the best version, pinned by number."""

from raylm.pipeline import served_version


def registered(model: str, best: str | None) -> dict:
    return {"name": "lm", "model": model, "best": best}


def test_the_pipeline_serves_the_best_version(capsys):
    assert served_version(registered("lm:3", "lm:3")) == "lm:3"  # passed the gate: the new one
    assert capsys.readouterr().err == ""
    assert served_version(registered("lm:4", "lm:3")) == "lm:3"  # failed it: the earlier best, and says so
    assert "serving lm:3 (the best); lm:4 did not pass the gate" in capsys.readouterr().err
    assert served_version(registered("lm:1", None)) == "lm:1"  # nothing ever promoted: the new one, said
    assert "no lm:best yet; serving lm:1 as registered" in capsys.readouterr().err
