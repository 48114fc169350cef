from ldm_train.stages import last_segment


def test_last_segment_keeps_only_the_latest_run_of_an_append_only_log():
    first = [(0, 1.0), (49, 0.5), (99, 0.4)]
    second = [(0, 0.9), (49, 0.6)]
    assert last_segment(first + second) == second
    assert last_segment(first) == first
    assert last_segment([]) == []
