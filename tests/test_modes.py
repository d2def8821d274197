"""The mode registry: one record per mode, read by the loss, the curriculum, the training script and the card."""

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cm_diffusers import hub, model_card, modes  # noqa: E402
from cm_diffusers.losses import (  # noqa: E402
    ESTIMATORS,
    SAMPLERS,
    WEIGHTINGS,
    ConsistencyLoss,
    Curriculum,
    DataPointStep,
    Levels,
    build_loss,
    l2,
)
from cm_diffusers.modes import MODES, Mode, get_mode  # noqa: E402
from training import train_consistency  # noqa: E402


def test_one_table_of_modes_is_what_every_reader_sees():
    assert hub.MODES is model_card.MODES is MODES  # one name, one thing
    assert all(isinstance(record, Mode) for record in MODES.values())
    parser_help = _help_text()
    for name, record in MODES.items():
        assert record.teacher in ("distill", "init", "optional")
        assert record.sampling in ("grid", "sigmas", "trigflow", "lcm")
        assert record.help.split()[0] in parser_help  # the --mode help is built from the records
        assert record.estimator in ESTIMATORS and record.sampler in SAMPLERS and record.weighting in WEIGHTINGS
    with pytest.raises(ValueError, match="Unknown mode 'xyz'; choose one of cd, ct"):
        get_mode("xyz")
    with pytest.raises(ValueError, match="Unknown mode"):
        Curriculum("xyz", 10)(0)


def _help_text() -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        train_consistency.parse_args(["--help"])
    return " ".join(out.getvalue().split())


def test_a_new_mode_is_one_entry(monkeypatch, tmp_path):
    """An entry added to the table is a --mode of the script with its defaults, a loss, a curriculum and a card."""
    toy = MODES["ct"]._replace(
        tag="toy-consistency",
        description="a toy mode that exists only in this test",
        help="toy: the data point as next point on a fixed 7-point grid",
        defaults=dict(num_scales=7, learning_rate=1e-3, loss_type="l2", dropout=0.0),
        levels=lambda curriculum, step: Levels(curriculum.num_scales, 0.0),
        target_ema=lambda curriculum: False,
        card_settings=lambda args, final: dict(toy_grid=final.num_scales),
    )
    monkeypatch.setitem(modes.MODES, "toy", toy)

    args = train_consistency.parse_args(["--mode", "toy", "--output_dir", str(tmp_path)])
    assert (args.num_scales, args.learning_rate, args.loss_type) == (7, 1e-3, "l2")
    curriculum = Curriculum("toy", 100, num_scales=7)
    assert curriculum(50) == Levels(7, 0.0) and not curriculum.uses_target_ema
    loss = build_loss("toy", l2)
    assert isinstance(loss, ConsistencyLoss) and isinstance(loss.next_point, DataPointStep)

    from cm_diffusers.training.consistency import describe_loss, mode_settings

    assert describe_loss(args) == "l2, weighting 1"
    assert mode_settings(args, 0.002, 80.0, Levels(7, 0.0))["toy_grid"] == 7
    (tmp_path / "folder").mkdir()
    card = str(model_card.save_model_card(tmp_path / "folder", mode="toy"))
    assert "a toy mode that exists only in this test" in card and "toy-consistency" in card


def test_existing_modes_keep_their_defaults_and_teacher_needs(tmp_path):
    expected = {
        "cd": dict(num_scales=18, target_ema_decay=0.0, learning_rate=4e-4, loss_type="pseudo_huber", dropout=0.0),
        "ct": dict(s0=2, s1=150, mu0=0.9, learning_rate=4e-4, loss_type="pseudo_huber", dropout=0.0),
        "ict": dict(s0=10, s1=1280, learning_rate=1e-4, loss_type="pseudo_huber", dropout=0.3),
        "ect": dict(learning_rate=1e-4, loss_type="pseudo_huber", dropout=0.2),
    }
    for name, defaults in expected.items():
        assert MODES[name].defaults == defaults
    assert {name for name, record in MODES.items() if record.teacher == "distill"} >= {"cd"}
    assert MODES["ect"].teacher == "init" and MODES["ct"].teacher == MODES["ict"].teacher == "optional"
    for name in ("cd", "ect"):
        with pytest.raises(SystemExit):
            train_consistency.parse_args(["--mode", name, "--output_dir", str(tmp_path)])
    assert Curriculum("ct", 10, s0=2, s1=20).uses_target_ema and not Curriculum("cd", 10).uses_target_ema
    assert torch.is_tensor(build_loss("ict", l2).weighting(torch.tensor([2.0]), torch.tensor([1.0])))
