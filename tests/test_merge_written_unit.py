"""The merge rule for elements the old program wrote after migration copied them."""

from __future__ import annotations

from nfctl.datapath.entries import merge_written


def test_counters_gain_what_the_old_program_added_after_the_copy() -> None:
    base = {"packets": 10, "bytes": 0}
    theirs = {"packets": 15, "bytes": 0}  # old program counted 5 more before the switch
    ours = {"packets": 13, "bytes": 300}  # new program counted 3 since the switch
    assert merge_written(base, theirs, ours) == {"packets": 18, "bytes": 300}


def test_other_fields_take_the_newer_write() -> None:
    base = {"state": "10.0.0.1", "tags": [1, 2]}
    theirs = {"state": "10.0.0.2", "tags": [1, 2]}
    untouched = {"state": "10.0.0.1", "tags": [1, 2]}
    assert merge_written(base, theirs, untouched)["state"] == "10.0.0.2"
    rewritten = {"state": "10.0.0.3", "tags": [1, 2]}
    assert merge_written(base, theirs, rewritten)["state"] == "10.0.0.3"


def test_booleans_are_not_summed() -> None:
    assert merge_written(False, True, False) is True
    assert merge_written(False, True, True) is True
