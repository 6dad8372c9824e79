"""``mmkd run`` dispatches through the PIPELINES registry (``pipeline``, default ``distill``)."""
from __future__ import annotations

from mmkd.cli import compose, main
from mmkd.registry import PIPELINES
from mmkd.run import distill, run


@PIPELINES.register("echo_method")
def echo_method(cfg):
    """A pipeline that returns its own options."""
    return {"method": dict(cfg.method), "experiment": cfg.experiment}


def test_run_dispatches_to_the_configured_pipeline():
    cfg = compose(["pipeline=echo_method", "method.alpha=0.5", "+method.beta=x"])
    assert run(cfg) == {"method": {"alpha": 0.5, "beta": "x"}, "experiment": "quickstart"}
    assert compose([]).pipeline == "distill" and PIPELINES["distill"] is distill


def test_unknown_pipeline_is_a_one_line_error(capsys):
    assert main(["run", "pipeline=nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmkd: error: pipeline: unknown pipeline 'nope'; choose from:") and "distill" in err
