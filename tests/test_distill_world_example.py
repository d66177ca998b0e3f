"""examples/spin_distill_world.py distill: students already trained in ``--out`` are reused
only under the settings they were trained with (the SFT student and the distilled student
must see the same prompts and steps)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from spin_distill_world import check_distill_reuse  # noqa: E402

SFT = {"rows": 3000, "steps": 300, "lr": None, "layers": 2, "seed": 0}
VARIANT = {"divergence": "reverse_kl", "set": [], "lr": None, "steps": 300}


def test_students_are_reused_under_their_own_settings_only():
    results = {"sft_student_settings": dict(SFT), "variants": {"rkl": dict(VARIANT)}}
    check_distill_reuse(results, dict(SFT), "rkl", dict(VARIANT))  # the same settings: reused
    check_distill_reuse(results, dict(SFT), "other", dict(VARIANT, steps=600))  # a new variant name
    check_distill_reuse({}, dict(SFT), "rkl", dict(VARIANT))  # nothing trained yet
    with pytest.raises(ValueError) as err:  # a 600-step distilled student against the 300-step SFT student
        check_distill_reuse(results, dict(SFT, steps=600), "long", dict(VARIANT, steps=600))
    msg = str(err.value)
    assert "\n" not in msg and "--steps 300 -> 600" in msg and "another --out" in msg, msg
    with pytest.raises(ValueError) as err:  # a variant name reused with another divergence
        check_distill_reuse(results, dict(SFT), "rkl", dict(VARIANT, divergence="forward_kl"))
    assert "--name rkl" in str(err.value) and "divergence reverse_kl -> forward_kl" in str(err.value)
